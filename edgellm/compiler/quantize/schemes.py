"""Weight quantizers of the schemes: int8 per output channel, int4 in groups (symmetric or asymmetric).

Each quantizer takes a clip ratio per row (int8) or per group (int4) so the clipping search can call it
with candidate ratios. Scales of int4 groups are fp16 (as in GPTQ/AWQ/llama.cpp): an fp16 number is an
11-bit integer mantissa times a power of two, which the integer runtime uses directly.
"""
from __future__ import annotations

import numpy as np

from ...runtime.intref import QuantConfig, linear_nbytes, pack_int4

MIN_GROUP_SCALE = 2.0 ** -12   # group scales below this fraction of the row's largest are raised (integer headroom)


def _w8(w: np.ndarray, clip) -> tuple[np.ndarray, np.ndarray]:
    amax = np.abs(w).max(axis=1) * clip
    d = (amax / 127.0).astype(np.float32)
    d = np.where(d == 0, np.float32(1.0), d)
    q = np.clip(np.rint(w / d[:, None]), -127, 127).astype(np.int8)
    return q, d


def _fp16_floor(d: np.ndarray) -> np.ndarray:
    """fp16 scales, with tiny ones raised to MIN_GROUP_SCALE of the row maximum."""
    row = np.abs(d).max(axis=1, keepdims=True)
    floor = row * MIN_GROUP_SCALE
    d = np.where(np.abs(d) < floor, np.where(d < 0, -floor, floor), d)
    return d.astype(np.float16)


def _w4(w: np.ndarray, g: int, symmetric: bool, clip, zero: str = "int"):
    rows, cols = w.shape
    wg = w.reshape(rows, cols // g, g)
    clip = np.broadcast_to(np.asarray(clip, dtype=np.float32), (rows, cols // g))[..., None]
    if symmetric:
        idx = np.abs(wg).argmax(axis=-1)[..., None]
        mx = np.take_along_axis(wg, idx, axis=-1) * clip          # signed extreme maps to -8 (as Q4_0)
        d = _fp16_floor((mx / -8.0)[..., 0])
        df = d.astype(np.float32)[..., None]
        safe = np.where(df == 0, np.float32(1), df)
        q = np.clip(np.rint(wg / safe), -8, 7)
        return q.astype(np.int16).reshape(rows, cols) + 8, d, None
    if zero == "fp16":
        lo, hi = wg.min(axis=-1, keepdims=True), wg.max(axis=-1, keepdims=True)
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * clip
        d = _fp16_floor(((2 * half) / 15.0)[..., 0])
        df = d.astype(np.float32)[..., None]
        safe = np.where(df == 0, np.float32(1), df)
        # group minimum in fp16, snapped to a multiple of d's fp16 ulp: the integer runtime adds it exactly with
        # no finer exponent than d's, and a model that already is Q4_1 (d, m fp16) keeps its grid bit for bit
        unit = np.exp2(np.floor(np.log2(np.where(df == 0, 1, np.abs(df)))) - 10)
        m = (np.rint((mid - half) / unit) * unit).astype(np.float16)
        q = np.clip(np.rint((wg - m.astype(np.float32)) / safe), 0, 15)
        return q.astype(np.int16).reshape(rows, cols), d, m[..., 0]
    mn = np.minimum(wg.min(axis=-1, keepdims=True), 0) * clip
    mx = np.maximum(wg.max(axis=-1, keepdims=True), 0) * clip
    d = _fp16_floor(((mx - mn) / 15.0)[..., 0])
    df = d.astype(np.float32)[..., None]
    safe = np.where(df == 0, np.float32(1), df)
    z = np.clip(np.rint(-mn / safe), 0, 15)
    q = np.clip(np.rint(wg / safe) + z, 0, 15)
    return q.astype(np.int16).reshape(rows, cols), d, z[..., 0].astype(np.uint8)


def _w4_stored(q: np.ndarray, d: np.ndarray, z, qc: QuantConfig) -> dict[str, np.ndarray]:
    out = {"q": pack_int4(q), "scale": d}
    if z is not None:
        out["min" if qc.zero == "fp16" else "zero"] = z
    return out


def quantize_weight(w: np.ndarray, qc: QuantConfig, clip=1.0) -> dict[str, np.ndarray]:
    """float [out, in] -> stored arrays {"q", "scale"[, "zero"]} (int4 codes packed two per byte)."""
    w = np.asarray(w, dtype=np.float32)
    if qc.w_bits == 8:
        q, d = _w8(w, clip)
        return {"q": q, "scale": d}
    return _w4_stored(*_w4(w, qc.group_size, qc.symmetric, clip, qc.zero), qc)


def _w4_column(w: np.ndarray, d: np.ndarray, z, qc: QuantConfig) -> tuple[np.ndarray, np.ndarray]:
    """(codes, dequantized values) of one column with its group's parameters (the formulas of _w4)."""
    df = d.astype(np.float32)
    safe = np.where(df == 0, np.float32(1), df)
    if qc.symmetric:
        q = np.clip(np.rint(w / safe), -8, 7)
        return q + 8, q * df
    if qc.zero == "fp16":
        m = z.astype(np.float32)
        q = np.clip(np.rint((w - m) / safe), 0, 15)
        return q, q * df + m
    q = np.clip(np.rint(w / safe) + z, 0, 15)
    return q, (q - z) * df


def gptq_weight(w: np.ndarray, qc: QuantConfig, xtx: np.ndarray, clip=1.0, block: int = 128,
                damp: float = 0.01) -> dict[str, np.ndarray]:
    """GPTQ (Frantar et al. 2022) for int4 groups: quantize column by column, each rounding error spread over
    the not yet quantized columns through the inverse Hessian of the layer input (xtx = sum x^T x), so the
    output error on the calibration inputs, not the weight error, is minimised. Group scales/zeros come from
    the error-updated weights when their group starts (clip ratios per group as from clip_search).
    Returns the stored arrays of quantize_weight."""
    W = np.array(w, dtype=np.float64)
    rows, cols = W.shape
    g = qc.group_size
    H = np.array(xtx, dtype=np.float64)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(cols)] += damp * float(np.mean(np.diag(H)))
    U = np.linalg.cholesky(np.linalg.inv(H)).T              # upper: H^-1 = U^T U
    clip = np.broadcast_to(np.asarray(clip, dtype=np.float32), (rows, cols // g))
    codes = np.zeros((rows, cols), dtype=np.int16)
    d = np.zeros((rows, cols // g), dtype=np.float16)
    z = None
    block = max(g, block // g * g)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        W1, E1 = W[:, b0:b1].copy(), np.zeros((rows, b1 - b0))
        for i in range(b1 - b0):
            c = b0 + i
            if c % g == 0:                                   # this group's parameters from the updated weights
                _, dg, zg = _w4(W1[:, i:i + g].astype(np.float32), g, qc.symmetric, clip[:, c // g:c // g + 1],
                                qc.zero)
                d[:, c // g] = dg[:, 0]
                if zg is not None:
                    z = np.zeros((rows, cols // g), dtype=zg.dtype) if z is None else z
                    z[:, c // g] = zg[:, 0]
            gz = None if z is None else z[:, c // g]
            q, deq = _w4_column(W1[:, i].astype(np.float32), d[:, c // g], gz, qc)
            codes[:, c] = q
            err = (W1[:, i] - deq) / U[c, c]
            W1[:, i:] -= np.outer(err, U[c, c:b1])
            E1[:, i] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]
    return _w4_stored(codes, d, z, qc)


def fake_quant_weight(w: np.ndarray, qc: QuantConfig, clip=1.0) -> np.ndarray:
    """Quantize and dequantize (float simulation of the stored weight)."""
    w = np.asarray(w, dtype=np.float32)
    if qc.w_bits == 8:
        q, d = _w8(w, clip)
        return q * d[:, None]
    g = qc.group_size
    q, d, z = _w4(w, g, qc.symmetric, clip, qc.zero)
    qg = q.reshape(w.shape[0], -1, g).astype(np.float32)
    if z is not None and qc.zero == "fp16":
        return (qg * d.astype(np.float32)[..., None] + z.astype(np.float32)[..., None]).reshape(w.shape)
    qg = qg - (8 if z is None else z[..., None])
    return (qg * d.astype(np.float32)[..., None]).reshape(w.shape)


def clip_search(w: np.ndarray, qc: QuantConfig, importance: np.ndarray,
                ratios=None) -> tuple[np.ndarray, float]:
    """Clip ratio per row (int8) or group (int4) minimising sum_c E[x_c^2] (w - q(w))^2; returns (clip, gain)."""
    w = np.asarray(w, dtype=np.float32)
    if ratios is None:
        ratios = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85) if qc.w_bits == 8 else \
            (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
    imp = np.asarray(importance, dtype=np.float32)[None, :]
    shape = (w.shape[0],) if qc.w_bits == 8 else (w.shape[0], w.shape[1] // qc.group_size)
    best = np.full(shape, np.inf, dtype=np.float64)
    clip = np.ones(shape, dtype=np.float32)
    base = None
    for r in ratios:
        e = (fake_quant_weight(w, qc, r) - w) ** 2 * imp
        e = e.sum(axis=1) if qc.w_bits == 8 else e.reshape(w.shape[0], -1, qc.group_size).sum(axis=-1)
        if base is None:
            base = float(e.sum())
        better = e < best
        best = np.where(better, e, best)
        clip = np.where(better, np.float32(r), clip)
    return clip, (base / max(float(best.sum()), 1e-30))


def bits_per_weight(shape: tuple[int, int], qc: QuantConfig) -> float:
    """Stored bits per weight of one matrix: codes, scales (fp32 per row or fp16 per group), 4-bit zeros."""
    return 8.0 * linear_nbytes(shape, qc) / (shape[0] * shape[1])
