"""Integer reference forward of a quantized model (the oracle for integer kernels on NPUs, FPGAs, small CPUs).

Two modes over the same quantized weights (a `QuantizedModel` made by `edgellm.compiler.quantize`):
- "mixed": matmuls see quantized weights and int8-rounded activations; norms, softmax, SiLU, RoPE stay float.
- "integer": after the embedding lookup every array on the inference path is an integer. Matmuls are
  int8 x int (int8 or unpacked int4 times its fp16 group-scale mantissa) with integer accumulators, requantized
  with dyadic multipliers m * 2^-s; RMSNorm uses an integer Newton square root, softmax and SiLU use I-BERT's
  integer exponential, RoPE uses Q15 sin/cos tables, and the residual stream is int32 with 2^-F scale chosen
  by calibration. Only the returned logits are converted to float, at the API boundary.
  Linear inputs are int8 per token (act="dynamic"), int8 per block of ACT_BLOCK channels of a token
  (act="block": llama.cpp's Q8_0 activations; an outlier channel then coarsens only its own block), or int8
  with a calibrated per-tensor scale (act="static": one compile-time dyadic multiplier from the fixed-point
  input format, saturating to [-127, 127]).

Mixed precision (QuantConfig.max_bpw): a 4-bit model may keep some linears in int8 per output channel; such a
linear carries `name.bits` = 8 in the tensors dict and every consumer here reads its width from there.

Integer matmuls are computed exactly: every product and partial sum is an integer below 2^53, so float64 BLAS
returns the same integers as an int64 loop (checked at prepare time, and by tests against plain int64 matmul).
This module runs on the device, so it never imports edgellm.compiler.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError
from .config import ModelConfig
from .kv_cache import KVCache
from .model import apply_rope, attention, rms_norm, rope_tables, silu

SCHEMES = {"w8a8": (8, 8), "w4a8": (4, 8), "w8a16": (8, 16), "w4a16": (4, 16)}
GROUP_SIZES = (32, 64, 128)
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
SCORE_F = 12        # fixed-point fraction bits of attention scores and exp inputs
NORM_F = 14         # fraction bits of x / rms
SIG_F = 16          # fraction bits of the integer sigmoid
ATTN_F = 20         # fraction bits of the attention output (input of attn_output)
ACT_BLOCK = 32      # act="block": channels per int8 activation scale
ACT_MODES = ("dynamic", "block", "static")


@dataclass
class QuantConfig:
    """What to quantize and how. Validated on construction so a bad CLI flag fails before any work."""

    scheme: str = "w8a8"
    group_size: int | None = None     # w4 only: 32, 64 or 128 (None -> 64)
    symmetric: bool = True            # w4 only: symmetric (scale) or asymmetric (scale + zero point)
    zero: str = "int"                 # asymmetric w4: "int" 4-bit zero point, or "fp16" group minimum (as Q4_1)
    act: str = "dynamic"              # int8 activations: "dynamic" per token, "block" per 32 channels of a token,
    #                                   or "static" calibrated per tensor
    kv_int8: bool = False             # int8 KV cache (always on in integer-only mode)
    smooth: bool = True               # SmoothQuant / AWQ per-channel scale migration, searched per layer
    qk_smooth: bool = True            # balance q and k channel ranges (per RoPE pair) before int8 q/k/KV
    clip_search: bool = True          # per-channel (per-group) weight clipping search
    prob_bits: int = 16               # integer softmax output bits (8: uint8 probabilities)
    calib_tokens: int = 2048
    max_bpw: float | None = None      # w4 only: promote the most sensitive linears to int8 within this budget
    q_bits: int = 8                   # integer-only queries: int8, or int16 (int16 x int8 QK^T; q is not cached)
    v_bits: int = 8                   # integer-only V cache: int8, or int16 (as compact as llama.cpp's f16 cache)
    gptq: bool = False                # w4 only: GPTQ rounding (error compensation with the calibration Hessian)

    def __post_init__(self):
        s = str(self.scheme).lower()
        m = re.fullmatch(r"w(\d+)a(\d+)", s)
        valid = ", ".join(SCHEMES)
        if m and m.group(2) == "4":
            raise EdgeLLMError(f"scheme {self.scheme!r} asks for int4 activations, which are not supported",
                               f"activations are int8 (a8) or float (a16); valid schemes: {valid}")
        if s not in SCHEMES:
            raise EdgeLLMError(f"unknown quantization scheme {self.scheme!r}", f"choose one of: {valid}")
        self.scheme = s
        if self.w_bits == 4:
            if self.group_size is None:
                self.group_size = 64
            if self.group_size not in GROUP_SIZES:
                raise EdgeLLMError(f"group size {self.group_size} is not supported for {s}",
                                   f"choose --group-size from {', '.join(map(str, GROUP_SIZES))}")
        elif self.group_size is not None:
            raise EdgeLLMError(f"{s} quantizes weights per output channel; a group size does not apply",
                               "drop --group-size, or use w4a8 / w4a16 with --group-size 32, 64 or 128")
        elif not self.symmetric:
            raise EdgeLLMError("asymmetric weights are only offered for 4-bit schemes", "drop --asym for w8 schemes")
        if self.zero not in ("int", "fp16"):
            raise EdgeLLMError(f"unknown zero-point type {self.zero!r}", "choose zero='int' (4-bit) or zero='fp16'")
        if self.act not in ACT_MODES:
            raise EdgeLLMError(f"unknown activation mode {self.act!r}", f"choose act from {', '.join(ACT_MODES)}")
        if self.prob_bits not in (8, 16):
            raise EdgeLLMError(f"prob_bits={self.prob_bits} is not supported", "choose 8 or 16")
        for k in ("q_bits", "v_bits"):
            if getattr(self, k) not in (8, 16):
                raise EdgeLLMError(f"{k}={getattr(self, k)} is not supported", "choose 8 or 16")
        if self.gptq and self.w_bits != 4:
            raise EdgeLLMError(f"gptq applies to 4-bit weights; {s} rounds int8 weights per channel",
                               "drop gptq, or use w4a8 / w4a16")
        if self.max_bpw is not None:
            if self.w_bits != 4:
                raise EdgeLLMError(f"max_bpw applies to 4-bit schemes; {s} is already 8 bits everywhere",
                                   "drop max_bpw, or use w4a8 / w4a16 with a bits-per-weight budget")
            if not self.max_bpw >= self.base_bpw:
                raise EdgeLLMError(f"max_bpw={self.max_bpw} is below {self.base_bpw:g}, the bits per weight of "
                                   f"{self.label} with every matrix at 4 bits",
                                   f"pass max_bpw >= {self.base_bpw:g} (or a larger group size)")

    @property
    def act_block(self) -> int | None:
        """Channels per activation scale for act="block", else None (one scale per token or per tensor)."""
        return ACT_BLOCK if self.act == "block" else None

    @property
    def w_bits(self) -> int:
        return SCHEMES[self.scheme][0]

    @property
    def a_bits(self) -> int:
        return SCHEMES[self.scheme][1]

    @property
    def base_bpw(self) -> float:
        """Bits per weight with every matrix in the scheme's own format (w4: codes + fp16 scale + zero)."""
        if self.w_bits == 8:
            return 8.0
        zero = 0 if self.symmetric else (4 if self.zero == "int" else 16)
        return 4.0 + (16 + zero) / self.group_size

    @property
    def label(self) -> str:
        asym = "" if self.symmetric else ("-asym" if self.zero == "int" else "-fmin")
        g = f"-g{self.group_size}{asym}" if self.w_bits == 4 else ""
        mp = f"-mp{self.max_bpw:g}" if self.max_bpw is not None else ""
        return self.scheme + g + ("-gptq" if self.gptq else "") + mp


# --- weight formats ------------------------------------------------------------------------------

def pack_int4(q: np.ndarray) -> np.ndarray:
    """Unsigned nibbles [rows, cols] (0..15) -> bytes [rows, cols/2]; even column in the low nibble."""
    q = q.astype(np.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4(p: np.ndarray) -> np.ndarray:
    out = np.empty((p.shape[0], p.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = p & 15
    out[:, 1::2] = p >> 4
    return out


def linear_bits(t: dict, name: str, qc: QuantConfig) -> int:
    """Bit width of one stored linear: its own `name.bits` (mixed precision) or the scheme's."""
    b = t.get(name + ".bits")
    return qc.w_bits if b is None else int(b)


def linear_shape(t: dict, name: str, qc: QuantConfig) -> tuple[int, int]:
    """[out, in] of a stored linear (int4 codes are packed two per byte)."""
    r, c = t[name + ".q"].shape
    return r, c * (2 if linear_bits(t, name, qc) == 4 else 1)


def weight_codes(t: dict, name: str, qc: QuantConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(integer codes q [out, in] int16, scales, zero points or None) of a stored linear weight.

    A linear with `name.bits` == 8 in a 4-bit model (mixed precision) is int8 per output channel (fp32 scale).
    """
    if linear_bits(t, name, qc) == 8:
        return t[name + ".q"].astype(np.int16), t[name + ".scale"], None
    u = unpack_int4(t[name + ".q"]).astype(np.int16)
    if qc.symmetric:
        return u - 8, t[name + ".scale"], None
    if qc.zero == "fp16":
        return u, t[name + ".scale"], t[name + ".min"]
    return u, t[name + ".scale"], t[name + ".zero"].astype(np.int16)


def dequantize_linear(t: dict, name: str, qc: QuantConfig) -> np.ndarray:
    q, s, z = weight_codes(t, name, qc)
    if linear_bits(t, name, qc) == 8:
        return (q * s[:, None]).astype(np.float32)
    g = qc.group_size
    qg = q.reshape(q.shape[0], -1, g).astype(np.float32)
    if z is not None and z.dtype == np.float16:
        return (qg * s.astype(np.float32)[..., None] + z.astype(np.float32)[..., None]).reshape(q.shape)
    if z is not None:
        qg = qg - z[..., None]
    return (qg * s.astype(np.float32)[..., None]).reshape(q.shape)


def linear_nbytes(shape: tuple[int, int], qc: QuantConfig, bits: int | None = None) -> int:
    """Stored bytes of one weight matrix in its packed format (codes + fp16/fp32 scales + 4-bit zeros)."""
    rows, cols = shape
    bits = bits or qc.w_bits
    if bits == 8:
        return rows * cols + rows * 4
    n_groups = rows * (cols // qc.group_size)
    zero = 0 if qc.symmetric else ((n_groups + 1) // 2 if qc.zero == "int" else n_groups * 2)
    return rows * cols // 2 + n_groups * 2 + zero


# --- the quantized model container ---------------------------------------------------------------

@dataclass
class QuantizedModel:
    """Integer weights, scales, smoothed norm weights, calibrated fixed-point formats: all numpy arrays."""

    config: ModelConfig
    qconfig: QuantConfig
    tensors: dict[str, np.ndarray]
    report: dict = field(default_factory=dict)

    def linear_names(self) -> list[str]:
        return [f"blk.{i}.{n}.weight" for i in range(self.config.n_layers) for n in LINEARS]

    def linear_bytes(self) -> dict[str, int]:
        """Stored bytes of each block linear in its own format (per-tensor bits honoured)."""
        t, qc = self.tensors, self.qconfig
        return {n: linear_nbytes(linear_shape(t, n, qc), qc, linear_bits(t, n, qc)) for n in self.linear_names()}

    def block_bits_per_weight(self) -> float:
        """Bits per weight over the transformer blocks' matrices, scales and zero points included."""
        n = sum(math.prod(linear_shape(self.tensors, k, self.qconfig)) for k in self.linear_names())
        return 8.0 * sum(self.linear_bytes().values()) / n

    def nbytes(self) -> int:
        """Bytes of the whole model as stored (int8 embedding/head, float norm vectors, calibration constants);
        the layout save() derives and adds (row exponents, largest |w|) is not model data and not counted."""
        lin = self.linear_bytes()
        total = sum(lin.values())
        for k, a in self.tensors.items():
            base, _, suffix = k.rpartition(".")
            if not (base in lin and suffix in ("q", "scale", "zero", "min", "row_exp", "amax")):   # counted above
                total += a.nbytes
        return total

    def layout(self) -> dict[str, np.ndarray]:
        """`name.row_exp` (int16 [rows]) and `name.amax` of every w4 linear of an integer scheme: what
        IntLinear.build derives from the scales and codes (IntLinear.w4_layout), stored so loading on a device
        skips that pass over every scale."""
        t, qc, out = self.tensors, self.qconfig, {}
        if qc.a_bits != 8:
            return out
        for n in self.linear_names():
            if linear_bits(t, n, qc) == 4 and n + ".amax" not in t:
                try:
                    base, amax = IntLinear.w4_layout(t, n, qc)
                except EdgeLLMError:                  # no integer form: integer mode refuses it at load
                    continue
                out[n + ".row_exp"], out[n + ".amax"] = base[:, 0].astype(np.int16), np.int64(amax)
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {"config": self.config.to_dict(), "qconfig": asdict(self.qconfig), "report": self.report}
        np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **self.tensors,
                 **self.layout())
        return path if path.suffix == ".npz" else path.with_suffix(path.suffix + ".npz")

    @classmethod
    def load(cls, path: str | Path) -> "QuantizedModel":
        with np.load(path) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
            tensors = {k: z[k] for k in z.files if k != "__meta__"}
        return cls(ModelConfig.from_dict(meta["config"]), QuantConfig(**meta["qconfig"]), tensors, meta["report"])


# --- integer primitives --------------------------------------------------------------------------

_TRACE: list | None = None


@contextmanager
def trace_integers():
    """Record (name, dtype) of every array the integer-only forward produces; tests assert they are ints."""
    global _TRACE
    _TRACE = []
    try:
        yield _TRACE
    finally:
        _TRACE = None


def _t(name: str, a: np.ndarray) -> np.ndarray:
    if _TRACE is not None:
        _TRACE.append((name, a.dtype))
        if not np.issubdtype(a.dtype, np.integer):
            raise AssertionError(f"integer-only path produced {a.dtype} at {name}")
    return a


def rshift_round(x: np.ndarray, s) -> np.ndarray:
    """round(x * 2^-s) with halves rounded up, for int64 x and integer shift(s) s (s <= 0 shifts left)."""
    x = np.asarray(x, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    if s.ndim == 0 and s <= 0:
        return x << -s
    pos = np.clip(s, 1, 62)
    r = (x + (np.int64(1) << (pos - 1))) >> pos
    return np.where(s > 0, r, x << np.maximum(-s, 0)) if s.ndim else r


def round_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """round(a / b) (halves up) for int64 a and positive int64 b, with integer floor division."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    return (2 * a + b) // (2 * b)


def bitlen(x: np.ndarray) -> np.ndarray:
    """Number of bits of non-negative int64 x (0 for 0), by binary search with shifts."""
    x = np.asarray(x, dtype=np.int64)
    n = np.zeros(x.shape, dtype=np.int64)
    for k in (32, 16, 8, 4, 2, 1):
        big = (x >> k) > 0
        n = n + np.where(big, k, 0)
        x = np.where(big, x >> k, x)
    return n + (x > 0)


def isqrt(n: np.ndarray) -> np.ndarray:
    """floor(sqrt(n)) for non-negative int64 n by Newton's iteration from a power-of-two upper bound."""
    n = np.asarray(n, dtype=np.int64)
    x = np.int64(1) << ((bitlen(n) + 1) // 2)
    for _ in range(40):
        y = (x + n // np.maximum(x, 1)) >> 1
        done = y >= x
        if done.all():
            break
        x = np.where(done, x, y)
    return np.where(n > 0, x, 0)


def dyadic(r, bits: int = 31) -> tuple[np.ndarray, np.ndarray]:
    """Real multiplier(s) r > 0 -> (m, s) with r ~= m * 2^-s and 2^(bits-1) <= m < 2^bits (compile time)."""
    r = np.asarray(r, dtype=np.float64)
    mant, e = np.frexp(r)                       # r = mant * 2^e, mant in [0.5, 1)
    m = np.rint(mant * 2.0 ** bits).astype(np.int64)
    s = (bits - e).astype(np.int64)
    over = m >= (1 << bits)                     # mantissa rounded up to 2^bits
    m = np.where(over, m >> 1, m)
    s = np.where(over, s - 1, s)
    return np.where(r > 0, m, 0), np.where(r > 0, s, 0)


def requant(acc: np.ndarray, m: np.ndarray, s: np.ndarray, pre: int = 0) -> np.ndarray:
    """round(acc * m * 2^-s): acc is first rounded down by `pre` bits so acc * m stays below 2^63."""
    a = rshift_round(acc, pre) if pre else np.asarray(acc, dtype=np.int64)
    return rshift_round(a * m, s - pre)


def quant_dynamic(z: np.ndarray, qmax: int = 127, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (or per block of `block` columns) quantization of integers z: q = round(qmax z / amax).
    Returns (q int8 (int16 if qmax > 127), amax int64 [rows, 1] or [rows, cols / block])."""
    z = np.asarray(z, dtype=np.int64)
    zb = z if block is None else z.reshape(*z.shape[:-1], -1, block)
    amax = np.abs(zb).max(axis=-1, keepdims=True)
    q = round_div(qmax * zb, np.maximum(amax, 1)).reshape(z.shape)
    return q.astype(np.int8 if qmax <= 127 else np.int16), amax if block is None else amax[..., 0]


def int_matmul(a: np.ndarray, bt: np.ndarray, bound: float | None = None) -> np.ndarray:
    """Exact a @ bt.T for integer arrays, as int64. float64 BLAS is exact while |partial sums| < 2^53."""
    if bound is None:
        bound = float(np.abs(a).max(initial=0)) * float(np.abs(bt).max(initial=0)) * a.shape[-1]
    if bound >= 2.0 ** 53:
        return np.asarray(a, dtype=np.int64) @ np.asarray(bt, dtype=np.int64).T
    bf = bt if bt.dtype == np.float64 else bt.astype(np.float64)
    return (a.astype(np.float64) @ bf.T).astype(np.int64)


def exp_consts(f: int) -> tuple[int, int, int, int]:
    """I-BERT i-exp constants at input scale 2^-f: (ln2, b, c, one), exp(x) ~= ((p+b)^2 + c) / one."""
    a, b, c = 0.3585, 1.353, 0.344
    return (int(math.floor(math.log(2) * 2 ** f)), int(math.floor(b * 2 ** f)),
            int(math.floor(c / a * 2 ** (2 * f))), int(round(2 ** (2 * f) / a)))


def int_exp(x: np.ndarray, f: int) -> tuple[np.ndarray, int]:
    """I-BERT integer exp of x <= 0 at scale 2^-f: exp(x) ~= out / one (second-order polynomial + shift)."""
    q_ln2, q_b, q_c, one = exp_consts(f)
    x = np.maximum(np.asarray(x, dtype=np.int64), -q_ln2 * 60)
    z = (-x) // q_ln2
    p = x + z * q_ln2                           # in (-ln2, 0]
    poly = (p + q_b) * (p + q_b) + q_c
    return poly >> np.minimum(z, 62), one


def int_softmax(s: np.ndarray, f: int, bits: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Integer softmax over the last axis of scores s (scale 2^-f); probabilities scaled by 2^bits - 1."""
    s = np.asarray(s, dtype=np.int64)
    if mask is not None:
        s = np.where(mask, np.iinfo(np.int64).min // 4, s)
    e, _ = int_exp(s - s.max(axis=-1, keepdims=True), f)
    if mask is not None:
        e = np.where(mask, 0, e)
    tot = e.sum(axis=-1, keepdims=True)
    return round_div(e * ((1 << bits) - 1), tot)


def int_sigmoid(x: np.ndarray, f: int) -> np.ndarray:
    """sigmoid(x) * 2^SIG_F for x at scale 2^-f, from the integer exp of -|x| and one integer division."""
    x = np.asarray(x, dtype=np.int64)
    fe = min(f, SCORE_F)
    xe = rshift_round(x, f - fe)
    e, one = int_exp(-np.abs(xe), fe)
    num = np.where(xe >= 0, one, e)
    return round_div(num << SIG_F, one + e)


def int_silu(x: np.ndarray, f: int) -> np.ndarray:
    """x * sigmoid(x) at the same scale 2^-f."""
    return rshift_round(np.asarray(x, dtype=np.int64) * int_sigmoid(x, f), SIG_F)


def rope_q15(cfg: ModelConfig, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables as int16 Q15 for positions 0..n_ctx-1 (a compile-time constant table)."""
    c, s = rope_tables(cfg, np.arange(n_ctx))
    q = lambda a: np.clip(np.rint(a.astype(np.float64) * 32768), -32767, 32767).astype(np.int16)
    return q(c), q(s)


def int_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool, rope_dim: int) -> np.ndarray:
    """RoPE on int64 x [T, heads, d] with Q15 tables [T, rope_dim/2]: (a c - b s) >> 15, (a s + b c) >> 15."""
    out = x.copy()
    c, s = cos[:, None, :].astype(np.int64), sin[:, None, :].astype(np.int64)
    if neox:
        h = rope_dim // 2
        ia, ib = slice(0, h), slice(h, rope_dim)
    else:
        ia, ib = slice(0, rope_dim, 2), slice(1, rope_dim, 2)
    a, b = x[..., ia], x[..., ib]
    out[..., ia] = rshift_round(a * c - b * s, 15)
    out[..., ib] = rshift_round(a * s + b * c, 15)
    return out


def norm_gamma(gamma: np.ndarray) -> tuple[np.ndarray, int]:
    """RMSNorm weight as integers g * 2^-gb with |g| < 2^20."""
    gb = 19 - int(math.ceil(math.log2(float(np.abs(gamma).max()) + 1e-30)))
    return np.rint(gamma.astype(np.float64) * 2.0 ** gb).astype(np.int64), gb


def linear_io(t: dict, i: int, n: str) -> tuple[float, int]:
    """(real scale of one unit of the integer input, fraction bits of the output) of linear n in block i."""
    p = f"blk.{i}."
    if n in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"):
        gamma = t[p + ("attn_norm" if n.startswith("attn") else "ffn_norm") + ".weight"]
        out = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "ffn_gate": "gate", "ffn_up": "up"}[n]
        return 2.0 ** -(NORM_F + norm_gamma(gamma)[1]), int(t[p + "int.F_" + out])
    if n == "attn_output":
        return 2.0 ** -ATTN_F, int(t["int.F_res"])
    return 2.0 ** -int(t[p + "int.F_h"]), int(t["int.F_res"])


def _fp16_parts(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fp16 values as exact (integer mantissa, exponent, lowest exponent): a = mant * 2^e with |mant| <= 2^11
    (load time), and a is an integer multiple of 2^elow (e plus the mantissa's trailing zero bits)."""
    mant, e = np.frexp(a.astype(np.float64))
    m, e = np.rint(mant * 2048).astype(np.int64), e.astype(np.int64) - 11
    low = np.where(m != 0, m & -m, 1)                     # lowest set bit: an exact power of two
    return m, e, e + np.rint(np.log2(low.astype(np.float64))).astype(np.int64)


def w4_group_scales(t: dict, name: str, qc: QuantConfig, max_shift: int = 20):
    """The fp16 group scales (and fp16 group minima) of a w4 linear as integers in units of a row scale 2^base:
    ([(mant, shift) for the scales (, the minima)], base [rows, 1]) with value = (mant << shift) * 2^base exactly,
    shift >= 0. base is the largest exponent that keeps every non-zero value of the row an integer, so a
    Q4_1-style minimum that is a multiple of its scale's ulp adds no smaller unit (and no larger shifts)."""
    parts = [_fp16_parts(t[name + ".scale"])]
    if not qc.symmetric and qc.zero == "fp16":
        parts.append(_fp16_parts(t[name + ".min"]))
    big = np.iinfo(np.int64).max
    low = np.minimum.reduce([np.where(m != 0, el, big) for m, _, el in parts])
    base = np.minimum(low.min(axis=1, keepdims=True), parts[0][1].max(axis=1, keepdims=True))
    out = []
    for m, e, _ in parts:
        d = e - base                                      # d < 0 only where the value's trailing zeros allow it
        out.append((np.where(d >= 0, m, m >> np.maximum(-d, 0)), np.where(m != 0, np.maximum(d, 0), 0)))
    if max(int(sh.max(initial=0)) for _, sh in out) > max_shift:
        raise EdgeLLMError(f"{name}: group scales span more than 2^{max_shift}", "re-quantize the model")
    return out, base


# --- integer linear layers -----------------------------------------------------------------------

@dataclass
class StaticConsts:
    """Static int8 input: q8 = clip(round(clip(z, +-cap) * m_in * 2^-s_in), +-127); out = round(acc * m * 2^-s)."""

    m: np.ndarray
    s: np.ndarray
    pre: int
    m_in: int
    s_in: int
    cap: int


class IntLinear:
    """An integer weight matrix w [out, in] (held as exact float64 for BLAS) and its per-row real scale.

    `w` may be given as a function that makes it: the matrix (8 bytes per weight) is then built on the first
    matmul, so deriving the calibrated constants (row_scale, acc_bits) costs no expanded weights; backends
    that keep their own weight layout (tvm-int) never build it."""

    def __init__(self, w, row_scale: np.ndarray, acc_bits: int):
        self._w = w
        self.row_scale = row_scale     # real value of one unit of w in row j
        self.acc_bits = acc_bits       # bits of the largest possible |accumulator| with int8 inputs

    @property
    def w(self) -> np.ndarray:
        if callable(self._w):
            self._w = self._w()
        return self._w

    @classmethod
    def build(cls, t: dict, name: str, qc: QuantConfig, max_shift: int = 20) -> "IntLinear":
        """w = the codes as integers (w8), or per group a * u + b for w4 codes u (_w4_affine); acc_bits from the
        largest |w| (w4_layout, or as QuantizedModel.save stored it). w itself is made on first use, from t."""
        if linear_bits(t, name, qc) == 8:
            q = t[name + ".q"]
            amax = max(int(q.max(initial=0)), -int(q.min(initial=0)))
            return cls._checked(name, lambda: t[name + ".q"].astype(np.float64), t[name + ".scale"].astype(np.float64),
                                amax, q.shape[1])
        if name + ".amax" in t:                       # stored by QuantizedModel.save: no pass over the scales
            base, amax = t[name + ".row_exp"].astype(np.int64)[:, None], int(t[name + ".amax"])
        else:
            base, amax = cls.w4_layout(t, name, qc, max_shift)

        def expand() -> np.ndarray:                   # holds nothing but t and the name until asked
            a, b, _ = cls._w4_affine(t, name, qc, max_shift)
            u = unpack_int4(t[name + ".q"])
            wi = u.reshape(u.shape[0], -1, qc.group_size) * a[..., None] + b[..., None]
            return wi.reshape(u.shape).astype(np.float64)
        cols = t[name + ".scale"].shape[1] * qc.group_size
        return cls._checked(name, expand, np.ldexp(1.0, base[:, 0]).astype(np.float64), amax, cols)

    @classmethod
    def w4_layout(cls, t: dict, name: str, qc: QuantConfig, max_shift: int = 20) -> tuple[np.ndarray, int]:
        """(row exponent base [rows, 1], largest |w|) of a w4 linear (w = (a * u + b) * 2^base, _w4_affine):
        the largest |w| is found without expanding the matrix, as w is affine in the code within a group, so
        only groups whose bound over all 16 codes could beat the best are read."""
        a, b, base = cls._w4_affine(t, name, qc, max_shift)
        ub = np.maximum(np.abs(b), np.abs(15 * a + b))
        groups = t[name + ".q"].reshape(a.shape[0], -1, qc.group_size // 2)
        exact = lambda sel: int(np.abs(a[sel][:, None] * unpack_int4(groups[sel]) + b[sel][:, None]).max(  # noqa: E731
            initial=0))
        amax = exact(ub == ub.max(initial=0))
        return base, max(amax, exact(ub > amax))

    @staticmethod
    def _w4_affine(t: dict, name: str, qc: QuantConfig, max_shift: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a, b, base) of a w4 linear: w = a * u + b per group, integers, with u the stored code 0..15 and
        a = the group scale in units of the row scale 2^base (w4_group_scales), b = -a * zero (8 when
        symmetric) or the fp16 group minimum in the same units."""
        ((mant, sh), *mins), base = w4_group_scales(t, name, qc, max_shift)
        a = mant << sh
        if mins:                                               # fp16 group minimum
            return a, mins[0][0] << mins[0][1], base
        return a, -a * (8 if qc.symmetric else t[name + ".zero"].astype(np.int64)), base

    @classmethod
    def _checked(cls, name: str, w, row: np.ndarray, amax: int, cols: int) -> "IntLinear":
        """The linear, if int8 inputs times weights of magnitude <= amax keep every partial sum below 2^53."""
        bound = 127.0 * float(max(amax, 1)) * cols
        if bound >= 2.0 ** 53:
            raise EdgeLLMError(f"{name}: integer accumulators could exceed 2^53", "re-quantize with clipping")
        return cls(w, row, int(math.ceil(math.log2(bound + 1))))

    def constants(self, in_scale: float, out_f: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Dyadic requant (m, s, pre) of acc * amax: real = row_scale * in_scale * 2^out_f / 127 (compile time)."""
        m, s = dyadic(self.row_scale * in_scale * 2.0 ** out_f / 127.0, 31)
        pre = max(0, self.acc_bits + 16 - 31)
        return m, s, pre

    def static_constants(self, in_scale: float, out_f: int, act_scale: float) -> "StaticConsts":
        """Compile-time constants of the calibrated per-tensor int8 input scale `act_scale` (real per unit)."""
        m_in, s_in = dyadic(in_scale / act_scale, 16)
        cap = int(math.ceil(127.5 * act_scale / in_scale))     # |z| beyond cap saturates to +-127 anyway
        if cap * int(m_in) >= 2 ** 62:
            raise EdgeLLMError("static activation scale too far from the input format", "re-quantize the model")
        m, s = dyadic(self.row_scale * act_scale * 2.0 ** out_f, 31)
        return StaticConsts(m, s, max(0, self.acc_bits - 31), int(m_in), int(s_in), cap)

    def __call__(self, z: np.ndarray, consts, block: int | None = None) -> np.ndarray:
        """z: integer activations [T, in]; int8 quantization (per token, per block of `block` channels, or
        static), integer matmul, requant."""
        if isinstance(consts, StaticConsts):
            c = consts
            q = np.clip(rshift_round(np.clip(z, -c.cap, c.cap) * c.m_in, c.s_in), -127, 127).astype(np.int8)
            acc = _t("acc", int_matmul(_t("act8", q), self.w, bound=2.0 ** self.acc_bits))
            return _t("requant", requant(acc, c.m, c.s, c.pre))
        m, s, pre = consts
        q, amax = quant_dynamic(z, block=block)
        sa = np.maximum(bitlen(amax.max(axis=-1, keepdims=True)) - 16, 0)   # the token's amax to 16 bits
        a16 = rshift_round(amax, sa)
        if block is None:
            acc = _t("acc", int_matmul(q, self.w, bound=2.0 ** self.acc_bits))
            prod = acc * a16                                  # < 2^(acc_bits + 16)
        else:                                                 # sum_b a16_b (q_b . w_b), as two exact matmuls
            qb = q.reshape(q.shape[0], -1, block).astype(np.int64)
            hi, lo = (qb * (a16 >> 8)[..., None]).reshape(q.shape), (qb * (a16 & 255)[..., None]).reshape(q.shape)
            bound = 2.0 ** (self.acc_bits + 8)
            prod = (int_matmul(hi, self.w, bound=bound) << 8) + int_matmul(lo, self.w, bound=bound)
        return _t("requant", requant(_t("acc", prod), m, s - sa, pre))


# --- the forward passes --------------------------------------------------------------------------

class IntKVCache(KVCache):
    """int8 keys with per-(token, head) integer amax, int8 values with static per-channel scales."""

    def __init__(self, cfg: ModelConfig, n_ctx: int, v_dtype=np.int8):
        self.n_ctx = n_ctx
        shape = (cfg.n_layers, n_ctx, cfg.n_kv_heads, cfg.head_dim)
        self.k = np.zeros(shape, dtype=np.int8)
        self.v = np.zeros(shape, dtype=v_dtype)
        self.kamax = np.zeros(shape[:3], dtype=np.int64)
        self.length = 0

    def update_int(self, layer, pos, k8, kamax, v8):
        end = pos + k8.shape[0]
        if end > self.n_ctx:
            raise EdgeLLMError(f"context full: {end} tokens do not fit in n_ctx={self.n_ctx}",
                               "pass a larger n_ctx (--ctx) or a shorter prompt / max_tokens")
        self.k[layer, pos:end], self.kamax[layer, pos:end], self.v[layer, pos:end] = k8, kamax, v8
        if layer == self.k.shape[0] - 1:
            self.length = end
        return self.k[layer, :end], self.kamax[layer, :end], self.v[layer, :end]


def fake_quant_tokens(x: np.ndarray, scale: float | None = None, block: int | None = None) -> np.ndarray:
    """Round activations to int8 and back: per token (dynamic), per block of `block` channels of a token, or
    with a calibrated per-tensor scale."""
    shape = x.shape
    if scale is None:
        x = x if block is None else x.reshape(*shape[:-1], -1, block)
        d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
        d = np.where(d == 0, np.float32(1), d)
    else:
        d = np.float32(scale)
    return (np.clip(np.rint(x / d), -127, 127) * d).astype(np.float32).reshape(shape)


class IntTransformer:
    """Runs a QuantizedModel in "mixed" (float nonlinearities) or "integer" (integer-only) mode."""

    def __init__(self, qm: QuantizedModel, mode: str = "integer"):
        if mode not in ("mixed", "integer"):
            raise EdgeLLMError(f"unknown integer-reference mode {mode!r}", "choose 'mixed' or 'integer'")
        qc = qm.qconfig
        if mode == "integer" and qc.a_bits != 8:
            raise EdgeLLMError(f"{qc.scheme} keeps float activations and cannot run integer-only",
                               "use w8a8 or w4a8 for --integer-only, or mixed mode for weight-only schemes")
        self.qm, self.cfg, self.qc, self.mode = qm, qm.config, qc, mode
        self._ready = False

    # shared -------------------------------------------------------------------------------------
    def prepare(self) -> None:
        if self._ready:
            return
        t, qc = self.qm.tensors, self.qc
        self.emb_q, self.emb_s = t["token_embd.q"], t["token_embd.scale"]
        hq, hs = t.get("output.q", self.emb_q), t.get("output.scale", self.emb_s)   # tied models share the table
        head = IntLinear(lambda: hq.astype(np.float64), hs.astype(np.float64),
                         int(math.ceil(math.log2(127.0 * 127 * self.cfg.dim + 1))))
        if self.mode == "mixed":
            self.w = {n: dequantize_linear(t, n, qc) for n in self.qm.linear_names()}
            self.w["head"] = (hq * hs[:, None]).astype(np.float32)
        else:
            self._prepare_integer(head)
        self._ready = True

    def new_cache(self, n_ctx: int):
        if self.mode == "integer":
            return IntKVCache(self.cfg, n_ctx, np.int8 if self.qc.v_bits == 8 else np.int16)
        return KVCache(self.cfg, n_ctx)

    def forward(self, tokens, pos: int, kv, all_logits: bool = False) -> np.ndarray:
        self.prepare()
        tokens = np.asarray(tokens, dtype=np.int64)
        if self.mode == "mixed":
            return self._forward_mixed(tokens, pos, kv, all_logits)
        logits = self._forward_int(tokens, pos, kv, all_logits)
        return logits.astype(np.float32) * np.float32(2.0 ** -int(self.qm.tensors["int.F_logit"]))

    # mixed --------------------------------------------------------------------------------------
    def _lin(self, x: np.ndarray, name: str) -> np.ndarray:
        if self.qc.a_bits == 8:
            st = self.qm.tensors.get(name + ".act_scale") if self.qc.act == "static" else None
            x = fake_quant_tokens(x, None if st is None else float(st), self.qc.act_block)
        return x @ self.w[name].T

    def _forward_mixed(self, tokens, pos, kv, all_logits):
        c, t = self.cfg, self.qm.tensors
        x = (self.emb_q[tokens] * self.emb_s[tokens, None]).astype(np.float32)
        cos, sin = rope_tables(c, np.arange(pos, pos + len(tokens)))
        T = len(tokens)
        for i in range(c.n_layers):
            p = f"blk.{i}."
            h = rms_norm(x, t[p + "attn_norm.weight"], c.norm_eps)
            q = self._lin(h, p + "attn_q.weight").reshape(T, c.n_heads, c.head_dim)
            k = self._lin(h, p + "attn_k.weight").reshape(T, c.n_kv_heads, c.head_dim)
            v = self._lin(h, p + "attn_v.weight").reshape(T, c.n_kv_heads, c.head_dim)
            q = apply_rope(q, cos, sin, c.rope_neox, c.rope_dim)
            k = apply_rope(k, cos, sin, c.rope_neox, c.rope_dim)
            if self.qc.kv_int8:
                k, v = fake_quant_tokens(k), fake_quant_tokens(v)
            keys, values = kv.update(i, pos, k, v)
            a = attention(q, keys, values, pos, c.n_rep)
            x = x + self._lin(a, p + "attn_output.weight")
            h = rms_norm(x, t[p + "ffn_norm.weight"], c.norm_eps)
            g = silu(self._lin(h, p + "ffn_gate.weight")) * self._lin(h, p + "ffn_up.weight")
            x = x + self._lin(g, p + "ffn_down.weight")
        if not all_logits:
            x = x[-1:]
        return self._head_mixed(rms_norm(x, t["output_norm.weight"], c.norm_eps))

    def _head_mixed(self, h: np.ndarray) -> np.ndarray:
        """The int8 head on int8-rounded normed rows (a method so tools/quant_ablation.py can switch the rounding)."""
        return fake_quant_tokens(h, block=self.qc.act_block) @ self.w["head"].T

    # integer ------------------------------------------------------------------------------------
    def _prepare_integer(self, head: IntLinear) -> None:
        c, t, qc = self.cfg, self.qm.tensors, self.qc
        F = lambda k: int(t[k])
        self.f_res = F("int.F_res")
        self.v_max = (1 << (qc.v_bits - 1)) - 1
        e_m, e_s = dyadic(self.emb_s.astype(np.float64) * 2.0 ** self.f_res, 31)
        self.emb_m, self.emb_sh = e_m, e_s
        self.eps_q = int(round(c.norm_eps * 2.0 ** (2 * self.f_res)))
        self.layers = []
        for i in range(c.n_layers):
            p = f"blk.{i}."
            L = {n: IntLinear.build(t, p + n + ".weight", qc) for n in LINEARS}
            g1, g2 = norm_gamma(t[p + "attn_norm.weight"])[0], norm_gamma(t[p + "ffn_norm.weight"])[0]
            fq, fk, fv, fg, fu, fh = (F(p + "int.F_" + n) for n in ("q", "k", "v", "gate", "up", "h"))
            io = {n: linear_io(t, i, n) for n in LINEARS}
            vs = t[p + "int.v_scale"].astype(np.float64)                    # real per channel of one v8 unit
            vs = vs * 127.0 / self.v_max                                     # ... or of one v16 unit
            vm, vsh = dyadic(2.0 ** -fv / vs, 31)                            # v_fx -> v8 (v16)
            # attention output channel (h, d) = sum_j p_ij v8_jd; real = acc * v_scale / (2^bits - 1)
            vs_q = np.tile(vs.reshape(c.n_kv_heads, 1, c.head_dim), (1, c.n_rep, 1)).reshape(-1)
            om, osh = dyadic(vs_q / ((1 << qc.prob_bits) - 1) * 2.0 ** ATTN_F, 20)
            q_max = (1 << (qc.q_bits - 1)) - 1
            sc_m, sc_s = dyadic(2.0 ** SCORE_F / (q_max * 127.0 * 2.0 ** (fq + fk) * math.sqrt(c.head_dim)), 15)
            if qc.act == "static":
                consts = {n: L[n].static_constants(*io[n], float(t[p + n + ".weight.act_scale"])) for n in LINEARS}
            else:
                consts = {n: L[n].constants(*io[n]) for n in LINEARS}
            L.update(g1=g1, g2=g2, fq=fq, fk=fk, fv=fv, fg=fg, fu=fu, fh=fh, vm=vm, vsh=vsh, om=om, osh=osh,
                     sc=(int(sc_m), int(sc_s)), shift_h=fg + fu - fh, **{"c_" + n: consts[n] for n in LINEARS})
            self.layers.append(L)
        self.g_out, gbo = norm_gamma(t["output_norm.weight"])
        self.head = head
        self.c_head = head.constants(2.0 ** -(NORM_F + gbo), F("int.F_logit"))

    def _int_norm(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        """Integer RMSNorm: x / isqrt(mean(x^2) + eps) at 2^-NORM_F, times integer gamma (scale 2^-(NORM_F+gb))."""
        amax = np.abs(x).max(axis=-1, keepdims=True)
        r = np.maximum(bitlen(amax) - 20, 0)                              # per-token: keep |x >> r| < 2^20
        xs = rshift_round(x, r)
        ms = (xs * xs).sum(axis=-1, keepdims=True) // x.shape[-1]
        rms = _t("rms", isqrt(ms + (self.eps_q >> (2 * r))))              # scale 2^-(F_res - r)
        y = round_div(x << NORM_F, np.maximum(rms, 1) << r)
        return _t("norm", y * g)

    def _forward_int(self, tokens, pos, kv: IntKVCache, all_logits):
        """Integer-only forward: int64 logits at scale 2^-F_logit."""
        self.prepare()
        c, blk = self.cfg, self.qc.act_block
        T = len(tokens)
        if not hasattr(self, "_rope") or self._rope[0].shape[0] < kv.n_ctx:
            self._rope = rope_q15(c, kv.n_ctx)
        cos, sin = self._rope[0][pos:pos + T], self._rope[1][pos:pos + T]
        x = _t("embed", rshift_round(self.emb_q[tokens].astype(np.int64) * self.emb_m[tokens, None],
                                     self.emb_sh[tokens, None]))
        lim = np.int64((1 << 31) - 1)
        for i, L in enumerate(self.layers):
            h = self._int_norm(x, L["g1"])
            q = L["attn_q"](h, L["c_attn_q"], blk).reshape(T, c.n_heads, c.head_dim)
            k = L["attn_k"](h, L["c_attn_k"], blk).reshape(T, c.n_kv_heads, c.head_dim)
            v = L["attn_v"](h, L["c_attn_v"], blk).reshape(T, c.n_kv_heads, c.head_dim)
            q = _t("rope_q", int_rope(q, cos, sin, c.rope_neox, c.rope_dim))
            k = _t("rope_k", int_rope(k, cos, sin, c.rope_neox, c.rope_dim))
            q8, qa = quant_dynamic(q, (1 << (self.qc.q_bits - 1)) - 1)
            k8, ka = quant_dynamic(k)
            v8 = np.clip(requant(v.reshape(T, -1), L["vm"], L["vsh"]), -self.v_max, self.v_max)
            v8 = v8.astype(np.int8 if self.v_max == 127 else np.int16)
            keys, kamax, values = kv.update_int(i, pos, k8, ka[..., 0], v8.reshape(T, c.n_kv_heads, c.head_dim))
            a = self._int_attention(q8, qa[..., 0], keys, kamax, values, pos, L)
            x = np.clip(x + L["attn_output"](a, L["c_attn_output"], blk), -lim, lim)
            h = self._int_norm(x, L["g2"])
            g = L["ffn_gate"](h, L["c_ffn_gate"], blk)
            u = L["ffn_up"](h, L["c_ffn_up"], blk)
            hh = _t("silu_mul", rshift_round(int_silu(g, L["fg"]) * u, L["shift_h"]))
            x = _t("residual", np.clip(x + L["ffn_down"](hh, L["c_ffn_down"], blk), -lim, lim))
        if not all_logits:
            x = x[-1:]
        h = self._int_norm(x, self.g_out)
        return _t("logits", self.head(h, self.c_head, blk))

    def _int_attention(self, q8, qa, k8, ka, v8, pos, L):
        """Causal GQA attention on int8 q/k/v: integer scores, integer softmax, integer P @ V, per-channel requant."""
        c = self.cfg
        T, S = q8.shape[0], k8.shape[0]
        kvh, rep, d = c.n_kv_heads, c.n_rep, c.head_dim
        qg = q8.reshape(T, kvh, rep, d).transpose(1, 2, 0, 3).astype(np.float64)       # [KVH, rep, T, d]
        kt = k8.transpose(1, 2, 0).astype(np.float64)                                  # [KVH, d, S]
        acc = _t("qk", (qg @ kt[:, None]).astype(np.int64))             # exact: < 2^21 (2^28 with int16 q)
        qa_g = qa.reshape(T, kvh, rep).transpose(1, 2, 0)[..., None]                   # [KVH, rep, T, 1]
        ka_g = ka.transpose(1, 0)[:, None, None, :]                                     # [KVH, 1, 1, S]
        m, s = L["sc"]
        sq = np.maximum(bitlen(qa_g) - 16, 0)                                          # amax to 16 bits
        sk = np.maximum(bitlen(ka_g) - 16, 0)
        pre = self.qc.q_bits                                                           # 8, or 16 for int16 q
        t1 = rshift_round(acc * rshift_round(qa_g, sq), pre) * rshift_round(ka_g, sk)  # < 2^(20+16-8+16)
        scores = _t("scores", rshift_round(t1 * m, s - pre - sq - sk))                 # t1 * m < 2^59
        mask = None
        if T > 1 or S > pos + T:
            mask = np.arange(S)[None, :] > (pos + np.arange(T))[:, None]
        p = _t("probs", int_softmax(scores, SCORE_F, self.qc.prob_bits, mask))
        out = (p.astype(np.float64) @ v8.transpose(1, 0, 2)[:, None].astype(np.float64)).astype(np.int64)
        out = _t("pv", out.transpose(2, 0, 1, 3).reshape(T, -1))                         # < 2^16 * 127 * S
        return _t("attn", requant(out, L["om"], L["osh"], 0 if self.v_max == 127 else 8))   # v16: out * om < 2^63
