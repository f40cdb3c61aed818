"""Activation quantization as ggml does it before a quantized dot product.

llama.cpp never multiplies quantized weights by float activations: it first quantizes each row of
activations to the weight type's "vec_dot_type" (Q8_0, Q8_1 or Q8_K blocks, or fp16) and then takes
integer dot products. The reference reproduces that rounding, so its logits match llama.cpp's to
float-summation-order noise instead of to activation-quantization noise (~1e-2), which is what
makes 64-token greedy continuations identical. `mode="none"` gives the plain float model.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

# weight type -> the type ggml quantizes activations to (ggml-cpu type_traits_cpu[].vec_dot_type)
VEC_DOT_TYPE = {
    Q.Q4_0: Q.Q8_0, Q.Q5_0: Q.Q8_0, Q.Q8_0: Q.Q8_0,
    Q.Q4_1: Q.Q8_1, Q.Q5_1: Q.Q8_1,
    Q.Q2_K: Q.Q8_K, Q.Q3_K: Q.Q8_K, Q.Q4_K: Q.Q8_K, Q.Q5_K: Q.Q8_K, Q.Q6_K: Q.Q8_K,
    Q.F16: Q.F16, Q.BF16: Q.BF16,
}
# bytes per block and offset of the fp16 block minimum `m` for the types whose blocks carry one
_MIN_OFFSET = {Q.Q4_1: (20, 2), Q.Q5_1: (24, 2)}
MIN_TYPES = tuple(_MIN_OFFSET)      # types whose blocks carry a minimum


def _q8(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per block (Q8_0/Q8_1): q = rint(x / d), d = amax / 127. Returns (q, d in float32)."""
    xb = x.reshape(*x.shape[:-1], -1, block)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    d = amax / np.float32(127.0)
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d != 0)
    return np.rint(xb * inv), d    # x86 SIMD paths round half to even


def _q8k(x: np.ndarray) -> np.ndarray:
    """Q8_K: 256-element blocks, float32 scale from the signed max (quantize_row_q8_K)."""
    xb = x.reshape(*x.shape[:-1], -1, 256)
    idx = np.abs(xb).argmax(axis=-1)[..., None]
    mx = np.take_along_axis(xb, idx, axis=-1)
    iscale = np.divide(np.float32(-127.0), mx, out=np.zeros_like(mx), where=mx != 0)
    q = np.minimum(np.rint(iscale * xb), 127)
    d = np.divide(np.float32(1.0), iscale, out=np.zeros_like(iscale), where=iscale != 0)
    return (q * d).reshape(x.shape)


def quantized_matmul(x: np.ndarray, w: np.ndarray, qtype: Q, raw: np.ndarray | None = None,
                     mins: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w.T with x rounded the way ggml rounds activations for weights of `qtype`.

    `mins` [out, n_blocks] are the per-block minimums of Q4_1/Q5_1 weights (see block_mins): ggml
    stores the activation block sum in fp16 and multiplies it by them, so that rounding is applied too.
    """
    x = np.asarray(x, dtype=np.float32)
    vt = VEC_DOT_TYPE.get(qtype)
    if vt is None:
        return x @ w.T
    if vt == Q.F16:
        return _fp16(x) @ w.T
    if vt == Q.BF16:
        return (x.view(np.uint32) + 0x7FFF + ((x.view(np.uint32) >> 16) & 1) & 0xFFFF0000).view(np.float32) @ w.T
    if vt == Q.Q8_K:
        return _q8k(x) @ w.T
    q, d = _q8(x, 32)
    d16 = _fp16(d)                                           # ggml stores the block scale as fp16
    y = (q * d16).reshape(x.shape) @ w.T
    if vt == Q.Q8_1 and mins is not None:
        # Q8_1 also stores s = fp16(d * sum(q)) from the unrounded d; ggml multiplies it by the weight minimum
        qsum = q.sum(axis=-1)
        y += (_fp16(d[..., 0] * qsum) - d16[..., 0] * qsum) @ mins.T
    return y


def _fp16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


def block_mins(raw: np.ndarray, qtype: Q, rows: int) -> np.ndarray | None:
    """Per-block fp16 minimums of Q4_1/Q5_1 weights as float32 [rows, n_blocks]."""
    if qtype not in _MIN_OFFSET:
        return None
    size, off = _MIN_OFFSET[qtype]
    b = np.asarray(raw, dtype=np.uint8).reshape(rows, -1, size)
    return np.ascontiguousarray(b[:, :, off:off + 2]).view(np.float16)[..., 0].astype(np.float32)
