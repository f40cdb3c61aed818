"""SwiGLU FFN over a subset of neurons: out = sum_j silu(gate_j . h) * (up_j . h) * down[:, j] for active j.

Neuron j owns gate row j, up row j and down column j, so skipping a neuron skips its reads and its
arithmetic. Activations are rounded the way ggml rounds them (act_quant.py) on the full-width
vector (inactive neurons are zeros), so with every neuron active the result is bit-identical to the
reference `Transformer.block` FFN.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

from ..act_quant import VEC_DOT_TYPE, _fp16, _q8, _q8k, quantized_matmul
from ..model import silu


def round_activations(x: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray | None]:
    """x as ggml rounds it before a dot product with `qtype` weights, and the Q8_1 block-sum correction
    (fp16(d*sum q) - fp16(d)*sum q, per 32-block) that multiplies the weight minimums (or None)."""
    x = np.asarray(x, dtype=np.float32)
    vt = VEC_DOT_TYPE.get(qtype)
    if vt is None:
        return x, None
    if vt == Q.F16:
        return _fp16(x), None
    if vt == Q.BF16:
        return (x.view(np.uint32) + 0x7FFF + ((x.view(np.uint32) >> 16) & 1) & 0xFFFF0000).view(np.float32), None
    if vt == Q.Q8_K:
        return _q8k(x), None
    q, d = _q8(x, 32)
    d16 = _fp16(d)
    xr = (q * d16).reshape(x.shape)
    if vt == Q.Q8_1:
        qsum = q.sum(axis=-1)
        return xr, _fp16(d[..., 0] * qsum) - d16[..., 0] * qsum
    return xr, None


def ffn_activations(h: np.ndarray, gate: np.ndarray, up: np.ndarray, qtypes: tuple, mins: tuple,
                    mask: np.ndarray | None = None, act_quant: str = "ggml") -> np.ndarray:
    """silu(gate . h) * (up . h) [T, k] for k neurons (gate, up: float32 [k, dim] rows); mask zeroes inactive ones."""
    if act_quant == "ggml":
        g = quantized_matmul(h, gate, qtypes[0], mins=mins[0])
        u = quantized_matmul(h, up, qtypes[1], mins=mins[1])
    else:
        g, u = h @ gate.T, h @ up.T
    a = silu(g) * u
    return a if mask is None else np.where(mask, a, np.float32(0.0))


def down_input(full: np.ndarray, qd: Q, act_quant: str = "ggml") -> tuple[np.ndarray, np.ndarray | None]:
    """The full-width activations [T, ffn] as ffn_down sees them, and the Q8_1 correction (see round_activations).

    Rounding works on 32-neuron blocks, so it needs every neuron's activation: a hot/cold split computes
    the activations on both devices, rounds the merged vector once here, then splits the down product.
    """
    return round_activations(full, qd) if act_quant == "ggml" else (full, None)


def sparse_ffn(h: np.ndarray, ids: np.ndarray, ffn_dim: int, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
               qtypes: tuple[Q, Q, Q], mins: tuple, mask: np.ndarray | None = None, act_quant: str = "ggml") -> np.ndarray:
    """FFN of h [T, dim] over neurons `ids` (k of ffn_dim, in the order of the rows/columns given; sorted ids
    sum the down product in the reference's order).

    gate, up: float32 [k, dim] rows; down: float32 [dim, k] (C-contiguous); mins: the Q4_1/Q5_1 block
    minimums (gate [k, nb], up [k, nb], down [dim, ffn_dim/32]) or None; mask [T, k]: per-token
    activity (a neuron loaded for one token of a batch is zeroed for the others), None = all.
    """
    a = ffn_activations(h, gate, up, qtypes, mins, mask, act_quant)
    if act_quant != "ggml":
        return a @ down.T
    full = np.zeros((h.shape[0], ffn_dim), dtype=np.float32)
    full[:, ids] = a
    xr, corr = down_input(full, qtypes[2], act_quant)
    return xr[:, ids] @ down.T + down_correction(corr, mins[2])


def down_correction(corr: np.ndarray | None, mins_d: np.ndarray | None):
    """The Q8_1 block-sum term times ffn_down's block minimums (0 when the types have none)."""
    if corr is None or mins_d is None:
        return np.float32(0.0)
    return corr @ mins_d.T
