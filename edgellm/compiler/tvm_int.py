"""TVM kernels of the integer-only forward (edgellm.runtime.intref, mode "integer"), bit-identical to it.

Every op of IntTransformer._forward_int after the embedding gather is one TE kernel on int8/int32/int64
tensors: embedding requant, integer RMSNorm (bitlen by clz, isqrt by a fixed number of masked Newton
steps), per-token int8 quantization, the integer linear (int8 x int8 codes, or int8 x packed int4 codes
with the fp16 group scale's integer mantissa << shift, exact int32 group sums then int64), dyadic requant
with the amax-to-16-bits trick, Q15 RoPE, attention (integer scores, I-BERT softmax, P @ V, requant),
SiLU * up, residual add + clip. Calibrated constants (multipliers, shifts, fraction bits) are runtime
arguments, so one library serves any calibration of the same architecture and quantization scheme.
Token count T and context length are symbolic. The runtime side is edgellm.runtime.tvm_int_backend,
which owns the kernel names and argument order.

The fast path's small kernels (qkv_post, decode attention, SiLU + int8, residual + RMSNorm + int8) are TIR
loop nests over LANES-wide vectors (the "lanes" helpers): int32 lanes where the values provably fit (the
I-BERT exp), float64 lanes for divisions of integers below 2^53 with the exact remainder correcting the
quotient, int64 lanes for the rest, so none of them divides int64 per element.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.config import ModelConfig
from ..runtime.intref import NORM_F, SCORE_F, SIG_F, QuantConfig, QuantizedModel, exp_consts
from ..runtime.tvm_int_backend import SILU_SLICES, int_kernel_names
from .tvm_build import _tvm, cross_compiler, export_atomic, host_target, resolve_target

I64 = "int64"
NEWTON_STEPS = 8      # floor(sqrt(n)) for every n < 2^63 converges in <= 5 updates from 2^ceil(bits/2)


# ---------------------------------------------------------------- integer expression helpers (intref's)

def _c(v: int):
    from tvm import tirx
    return tirx.const(int(v), I64)


def rshift_round(x, s):
    """intref.rshift_round: round(x * 2^-s), halves up; s <= 0 shifts left. s: python int or int64 expr."""
    from tvm import te, tirx
    if isinstance(s, int):
        if s <= 0:
            return x << _c(-s) if s else x
        p = min(s, 62)
        return (x + _c(1 << (p - 1))) >> _c(p)
    p = te.max(te.min(s, _c(62)), _c(1))
    return tirx.Select(s > _c(0), (x + (_c(1) << (p - _c(1)))) >> p, x << te.max(-s, _c(0)))


def round_div(a, b):
    """intref.round_div: round(a / b), halves up, for positive b (floor division)."""
    from tvm import tirx
    return tirx.floordiv(_c(2) * a + b, _c(2) * b)


def bitlen(x):
    """Bits of a non-negative int64 (0 for 0), by count-leading-zeros."""
    from tvm import tirx
    return tirx.Select(x > _c(0), _c(64) - tirx.clz(x).astype(I64), _c(0))


def isqrt_stages(n, T):
    """intref.isqrt of te tensor n [T]: Newton from 2^ceil(bits/2), each masked step (kept only while it still
    decreases) one stage, since nesting the steps as one expression grows it exponentially."""
    from tvm import te, tirx

    def step(x):
        def f(t):
            y = (x[t] + tirx.floordiv(n[t], te.max(x[t], _c(1)))) >> _c(1)
            return tirx.Select(y < x[t], y, x[t])
        return f

    x = te.compute((T,), lambda t: _c(1) << tirx.floordiv(bitlen(n[t]) + _c(1), _c(2)), name="isqrt0")
    for k in range(NEWTON_STEPS):
        x = te.compute((T,), step(x), name=f"isqrt{k + 1}")
    return te.compute((T,), lambda t: tirx.Select(n[t] > _c(0), x[t], _c(0)), name="isqrt")


def int_exp(x, q_ln2, q_b, q_c):
    """intref.int_exp (without `one`): I-BERT exp of x <= 0; constants are python ints or int64 exprs."""
    from tvm import te, tirx
    q_ln2, q_b, q_c = (_c(v) if isinstance(v, int) else v for v in (q_ln2, q_b, q_c))
    x = te.max(x, -q_ln2 * _c(60))
    z = tirx.floordiv(-x, q_ln2)
    pb = x + z * q_ln2 + q_b
    return (pb * pb + q_c) >> te.min(z, _c(62))


def _rows():
    from tvm import te
    return te.var("T")


def _func(args, parallel=(), schedule=None):
    """PrimFunc of TE tensors; each block in `parallel` gets its spatial loops fused into one parallel loop
    (elementwise stages), then `schedule(sch)` may do more. No loop-local buffers: inside a parallel loop
    they would be a heap allocation per iteration."""
    from tvm import te
    import tvm.s_tir as s_tir
    sch = s_tir.Schedule(te.create_prim_func(args))
    for name in parallel:
        block = sch.get_sblock(name)
        spatial = [lp for lp, it in zip(sch.get_loops(block), sch.get(block).iter_vars) if it.iter_type == 0]
        sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
    if schedule:
        schedule(sch)
    return sch.mod["main"]


# ---------------------------------------------------------------- kernels

def embed_kernel(V: int, D: int):
    """x[t] = rshift_round(emb_q[tok[t]] * emb_m[tok[t]], emb_sh[tok[t]]): int8 table row -> 2^-F_res."""
    from tvm import te
    T = _rows()
    table = te.placeholder((V, D), "int8", name="table")
    tok = te.placeholder((T,), I64, name="tokens")
    m = te.placeholder((V,), I64, name="m")
    sh = te.placeholder((V,), I64, name="sh")
    x = te.compute((T, D), lambda t, i: rshift_round(
        table[tok[t].astype("int32"), i].astype(I64) * m[tok[t].astype("int32")], sh[tok[t].astype("int32")]),
        name="x")
    return _func([table, tok, m, sh, x])         # one row per token: serial


def _norm(x, g, eps, T, D: int):
    """IntTransformer._int_norm of te tensor x [T, D]: x / isqrt(mean(x^2) + eps) at 2^-NORM_F (x pre-shifted
    to 20 bits), * g."""
    from tvm import te, tirx
    k1, k2 = te.reduce_axis((0, D), "k1"), te.reduce_axis((0, D), "k2")
    amax = te.compute((T,), lambda t: te.max(te.abs(x[t, k1]), axis=k1), name="namax")
    r = te.compute((T,), lambda t: te.max(bitlen(amax[t]) - _c(20), _c(0)), name="r")
    ss = te.compute((T,), lambda t: te.sum(rshift_round(x[t, k2], r[t]) * rshift_round(x[t, k2], r[t]), axis=k2),
                    name="ss")
    ms = te.compute((T,), lambda t: tirx.floordiv(ss[t], _c(D)) + (eps >> te.min(_c(2) * r[t], _c(63))), name="ms")
    rms = isqrt_stages(ms, T)
    return te.compute((T, D), lambda t, i: round_div(x[t, i] << _c(NORM_F), te.max(rms[t], _c(1)) << r[t]) * g[i],
                      name="y")


def _quant(z, T, G: int, K: int, qmax: int = 127, col0: int = 0, name: str = "q"):
    """intref.quant_dynamic on each of G groups of K columns (from col0) of te tensor z: (q, amax [T, G])."""
    from tvm import te
    k = te.reduce_axis((0, K), "k")
    amax = te.compute((T, G), lambda t, g: te.max(te.abs(z[t, col0 + g * K + k]), axis=k), name=name + "amax")
    q = te.compute((T, G * K), lambda t, i: round_div(_c(qmax) * z[t, col0 + i], te.max(amax[t, i // K], _c(1))).astype(
        "int8" if qmax <= 127 else "int16"), name=name)
    return q, amax


def norm_kernel(D: int):
    """The integer RMSNorm (_norm) alone (generic path)."""
    from tvm import te
    T = _rows()
    x = te.placeholder((T, D), I64, name="x")
    g = te.placeholder((D,), I64, name="g")
    eps = te.var("eps_q", I64)
    return _func([x, g, eps, _norm(x, g, eps, T, D)], parallel=["y"])


def norm_quant_kernel(D: int, residual: bool):
    """Fast path: [x + o clipped to int32 (the residual stream, an output) ->] RMSNorm -> per-token int8:
    the input of the next linears in one call."""
    from tvm import te
    T = _rows()
    x = te.placeholder((T, D), I64, name="x")
    g = te.placeholder((D,), I64, name="g")
    eps = te.var("eps_q", I64)
    if residual:
        return res_norm_quant_kernel(D)
    q, amax = _quant(_norm(x, g, eps, T, D), T, 1, D)
    return _func([x, g, eps, q, amax])


def quant_kernel(G: int, K: int, qmax: int = 127):
    """intref.quant_dynamic on each of G groups of K in a row: q = round(qmax z / amax) (int8, int16 past 127)."""
    from tvm import te
    T = _rows()
    z = te.placeholder((T, G * K), I64, name="z")
    q, amax = _quant(z, T, G, K, qmax)
    return _func([z, q, amax], parallel=["q"])


def static_quant_kernel(K: int):
    """IntLinear.__call__'s static input: q8 = clip(round(clip(z, +-cap) * m_in * 2^-s_in), +-127)."""
    from tvm import te
    T = _rows()
    z = te.placeholder((T, K), I64, name="z")
    cap, m_in, s_in = (te.var(n, I64) for n in ("cap", "m_in", "s_in"))
    q = te.compute((T, K), lambda t, i: te.max(te.min(rshift_round(te.max(te.min(z[t, i], cap), -cap) * m_in, s_in),
                                                      _c(127)), _c(-127)).astype("int8"), name="q")
    return _func([z, cap, m_in, s_in, q], parallel=["q"])


def _requant_rows(T, N, acc, amax, m, s, pre):
    """IntLinear.__call__'s tail: acc * amax (amax kept to 16 bits) requantized by (m, s - sa, pre)."""
    from tvm import te
    sa = te.compute((T,), lambda t: te.max(bitlen(amax[t, 0]) - _c(16), _c(0)), name="sa")
    return te.compute((T, N), lambda t, n: rshift_round(
        rshift_round(acc[t, n] * rshift_round(amax[t, 0], sa[t]), pre) * m[n], s[n] - sa[t] - pre), name="out")


def linear_kernel(N: int, K: int, qc: QuantConfig | None):
    """The integer linear of IntLinear.__call__ on int8 input q [T, K] with per-token amax [T, 1].

    qc None (or w8): int8 codes w [N, K], int32 accumulation. w4: packed nibbles [N, K/2] (even column low),
    per group (edgellm.runtime.tvm_int_backend.w4_group_terms) zero z (8 when symmetric), multiplier
    gm = mant << shift and, for fp16 group minima, fm = min_mant << min_shift:
    acc = sum_g gm * sum_k q (u - z) + fm * sum_k q, int32 inside a group, int64 across, exactly.
    Output [T, N] int64 at the layer's fraction bits. A static-input linear passes amax = 1 (then the
    requant is intref's requant(acc, m, s, pre)). This is the one function to swap for a faster GEMM.
    For act="block" models see block_linear_kernel.
    """
    from tvm import te
    T = _rows()
    q = te.placeholder((T, K), "int8", name="q")
    amax = te.placeholder((T, 1), I64, name="amax")
    m = te.placeholder((N,), I64, name="m")
    s = te.placeholder((N,), I64, name="s")
    pre = te.var("pre", I64)
    if qc is None or qc.w_bits == 8:
        w = te.placeholder((N, K), "int8", name="w")
        k = te.reduce_axis((0, K), "k")
        acc32 = te.compute((T, N), lambda t, n: te.sum(q[t, k].astype("int32") * w[n, k].astype("int32"), axis=k),
                           name="acc32")
        acc = te.compute((T, N), lambda t, n: acc32[t, n].astype(I64), name="acc")
        weights = [w]
    else:
        g = qc.group_size
        G = K // g
        fmin = not qc.symmetric and qc.zero == "fp16"
        codes = te.placeholder((N, K // 2), "uint8", name="codes")
        z = te.placeholder((N, G), "int8", name="zero")
        mant = te.placeholder((N, G), "int16", name="mant")
        shift = te.placeholder((N, G), "int8", name="shift")
        gm = lambda n, j: mant[n, j].astype(I64) << shift[n, j].astype(I64)  # noqa: E731

        kb = te.reduce_axis((0, g // 2), "kb")          # one byte = two codes (even column in the low nibble)

        def pair(t, n, j):
            byte, zj = codes[n, j * (g // 2) + kb].astype("int32"), z[n, j].astype("int32")
            c = j * g + 2 * kb
            return q[t, c].astype("int32") * ((byte & 15) - zj) + q[t, c + 1].astype("int32") * ((byte >> 4) - zj)

        gs = te.compute((T, N, G), lambda t, n, j: te.sum(pair(t, n, j), axis=kb), name="gs")
        jj = te.reduce_axis((0, G), "jj")
        weights = [codes, z, mant, shift]
        if fmin:
            fmant = te.placeholder((N, G), "int16", name="min_mant")
            fshift = te.placeholder((N, G), "int8", name="min_shift")
            fm = lambda n, j: fmant[n, j].astype(I64) << fshift[n, j].astype(I64)  # noqa: E731
            k2 = te.reduce_axis((0, g), "k2")
            xs = te.compute((T, G), lambda t, j: te.sum(q[t, j * g + k2].astype("int32"), axis=k2), name="xs")
            acc = te.compute((T, N), lambda t, n: te.sum(
                gs[t, n, jj].astype(I64) * gm(n, jj) + xs[t, jj].astype(I64) * fm(n, jj), axis=jj), name="acc")
            weights += [fmant, fshift]
        else:
            acc = te.compute((T, N), lambda t, n: te.sum(gs[t, n, jj].astype(I64) * gm(n, jj), axis=jj), name="acc")
    out = _requant_rows(T, N, acc, amax, m, s, pre)

    def schedule(sch):
        """Weight rows split over threads (blocks of 4 reused by every token row); requant fused per output."""
        sch.compute_inline(sch.get_sblock("sa"))
        if qc is None or qc.w_bits == 8:
            sch.compute_inline(sch.get_sblock("acc"))
            t, n, _ = sch.get_loops(sch.get_sblock("acc32"))
            no, ni = sch.split(n, [None, 4] if N % 4 == 0 else [None, 1])
            sch.reorder(no, t, ni)
            sch.parallel(no)
            sch.reverse_compute_at(sch.get_sblock("out"), ni)
            return
        t, n, _, _ = sch.get_loops(sch.get_sblock("gs"))
        sch.reorder(n, t)
        sch.parallel(n)
        t, n, _ = sch.get_loops(sch.get_sblock("acc"))
        sch.reorder(n, t)
        sch.parallel(n)
        sch.reverse_compute_at(sch.get_sblock("out"), t)

    return _func([q, amax, *weights, m, s, pre, out], schedule=schedule)


def block_linear_kernel(N: int, K: int, qc: QuantConfig, bits: int):
    """linear_kernel for per-block int8 inputs (act="block", amax [T, K/B]) and `bits`-wide weights: IntLinear.__call__ with block = qc.act_block, exactly:
    out = requant(sum_b a16_b * sum_{k in b} q_k w_k, m, s - sa, pre), a16_b = amax_b kept to the token's 16 bits.
    Weights as linear_kernel (int8 codes, or nibbles with per-group zero, gm, and fp16-minimum terms)."""
    from tvm import te
    B = qc.act_block
    nb = K // B
    T = _rows()
    q = te.placeholder((T, K), "int8", name="q")
    amax = te.placeholder((T, nb), I64, name="amax")
    m = te.placeholder((N,), I64, name="m")
    s = te.placeholder((N,), I64, name="s")
    pre = te.var("pre", I64)
    j = te.reduce_axis((0, nb), "j")
    top = te.compute((T,), lambda t: te.max(amax[t, j], axis=j), name="top")
    sa = te.compute((T,), lambda t: te.max(bitlen(top[t]) - _c(16), _c(0)), name="sa")
    a16 = te.compute((T, nb), lambda t, b: rshift_round(amax[t, b], sa[t]), name="a16")
    kb = te.reduce_axis((0, B), "kb")
    if bits == 8:
        w = te.placeholder((N, K), "int8", name="w")
        weights = [w]
        bs = te.compute((T, N, nb), lambda t, n, b: te.sum(
            q[t, b * B + kb].astype("int32") * w[n, b * B + kb].astype("int32"), axis=kb), name="bs")
        term = lambda t, n, b: bs[t, n, b].astype(I64)  # noqa: E731
    else:
        g = qc.group_size
        r = g // B                                           # activation blocks per weight group
        fmin = not qc.symmetric and qc.zero == "fp16"
        codes = te.placeholder((N, K // 2), "uint8", name="codes")
        z = te.placeholder((N, K // g), "int8", name="zero")
        mant = te.placeholder((N, K // g), "int16", name="mant")
        shift = te.placeholder((N, K // g), "int8", name="shift")
        weights = [codes, z, mant, shift]
        gm = lambda n, gi: mant[n, gi].astype(I64) << shift[n, gi].astype(I64)  # noqa: E731

        def code(n, c):                                      # stored nibble of column c (even column low)
            byte = codes[n, c // 2].astype("int32")
            return te.if_then_else(c % 2 == 0, byte & 15, byte >> 4)
        bs = te.compute((T, N, nb), lambda t, n, b: te.sum(
            q[t, b * B + kb].astype("int32") * (code(n, b * B + kb) - z[n, b // r].astype("int32")), axis=kb), name="bs")
        term = lambda t, n, b: bs[t, n, b].astype(I64) * gm(n, b // r)  # noqa: E731
        if fmin:
            fmant = te.placeholder((N, K // g), "int16", name="min_mant")
            fshift = te.placeholder((N, K // g), "int8", name="min_shift")
            weights += [fmant, fshift]
            k2 = te.reduce_axis((0, B), "k2")
            xs = te.compute((T, nb), lambda t, b: te.sum(q[t, b * B + k2].astype("int32"), axis=k2), name="xs")
            term0 = term
            term = lambda t, n, b: term0(t, n, b) + xs[t, b].astype(I64) * (  # noqa: E731
                fmant[n, b // r].astype(I64) << fshift[n, b // r].astype(I64))
    jb = te.reduce_axis((0, nb), "jb")
    prod = te.compute((T, N), lambda t, n: te.sum(term(t, n, jb) * a16[t, jb], axis=jb), name="prod")
    out = te.compute((T, N), lambda t, n: rshift_round(rshift_round(prod[t, n], pre) * m[n], s[n] - sa[t] - pre),
                     name="out")

    def schedule(sch):
        """Output rows over threads; per row, every token's block sums then the weighted total."""
        for blk in ("sa", "a16"):
            sch.compute_inline(sch.get_sblock(blk))
        t, n, _ = sch.get_loops(sch.get_sblock("bs"))[:3]
        sch.reorder(n, t)
        sch.parallel(n)
        t, n = sch.get_loops(sch.get_sblock("prod"))[:2]
        sch.reorder(n, t)
        sch.parallel(n)

    return _func([q, amax, *weights, m, s, pre, out], parallel=["out"], schedule=schedule)


def _rope_at(x, t, n, d: int, rd: int, neox: bool, cos, sin, pos, col0: int = 0):
    """intref.int_rope's value at column col0 + n (head n // d) of row t (at position pos + t) of x, a te tensor or
    a TIR buffer."""
    from tvm import te
    half = rd // 2
    h, j = n // d, n % d
    base = col0 + h * d
    if neox:
        i = te.min(te.if_then_else(j < half, j, j - half), half - 1)
        a, b = x[t, base + i], x[t, base + te.min(i + half, d - 1)]
        first = j < half
    else:
        i = te.min(j // 2, half - 1)
        a, b = x[t, base + te.min(2 * i, d - 1)], x[t, base + te.min(2 * i + 1, d - 1)]
        first = j % 2 == 0
    c, s = cos[pos + t, i].astype(I64), sin[pos + t, i].astype(I64)
    rot = te.if_then_else(first, rshift_round(a * c - b * s, 15), rshift_round(a * s + b * c, 15))
    return te.if_then_else(j < rd, rot, x[t, col0 + n])


def _rope(x, T, H: int, d: int, rd: int, neox: bool, cos, sin, pos, col0: int = 0, name: str = "y"):
    """intref.int_rope on columns col0 .. col0 + H*d of te tensor x (row t at position pos + t)."""
    from tvm import te
    return te.compute((T, H * d), lambda t, n: _rope_at(x, t, n, d, rd, neox, cos, sin, pos, col0), name=name)


def _rope_tables(rd: int):
    """Placeholders of the Q15 tables [n_ctx, rd/2] and the first row's position."""
    from tvm import te
    n_ctx = te.var("n_ctx")
    return (te.placeholder((n_ctx, rd // 2), "int16", name="cos"), te.placeholder((n_ctx, rd // 2), "int16", name="sin"),
            te.var("pos"))


def rope_kernel(H: int, d: int, rd: int, neox: bool):
    """intref.int_rope on x [T, H*d] (row t at position pos + t) with Q15 int16 tables [n_ctx, rd/2]."""
    from tvm import te
    T = _rows()
    x = te.placeholder((T, H * d), I64, name="x")
    cos, sin, pos = _rope_tables(rd)
    return _func([x, cos, sin, pos, _rope(x, T, H, d, rd, neox, cos, sin, pos)], parallel=["y"])


def _vquant(v, vm, vsh, T, C: int, col0: int = 0):
    """v8 = clip(requant(v, vm, vsh), -127, 127) of columns col0 .. col0 + C of te tensor v."""
    from tvm import te
    return te.compute((T, C), lambda t, c: te.max(te.min(rshift_round(v[t, col0 + c] * vm[c], vsh[c]), _c(127)),
                                                   _c(-127)).astype("int8"), name="v8")


def qkv_post_body(cfg: ModelConfig, q_bits: int, n, spmd: bool = False):
    """Fast path: the q|k|v matmul's output [T, qd + 2 kvd] -> RoPE + per-head int8 (int16) q; RoPE + per-head
    int8 k with its amax, and v at the cache's static int8 scale, written straight into the int8 KV cache of
    `layer` at rows pos .. pos + T - 1 (IntKVCache.update_int): everything between that matmul and the
    attention, one call. Per row: q|k roped into one buffer (they are adjacent heads), then each head's amax
    and int8 codes in LANES-wide vector loops (quant_lanes) when the head width allows. A T.macro over
    rows n (see phases for spmd)."""
    from tvm.script import tirx as T_
    from .tvm_int_matmul import solo_phase
    H, KVH, d, rd, neox = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_dim, cfg.rope_neox
    qd, kvd, V = H * d, KVH * d, LANES
    qmax = (1 << (q_bits - 1)) - 1
    qdt = "int8" if q_bits == 8 else "int16"
    V = V if d % V == 0 else 1

    @T_.macro
    def qkv(x, cos, sin, pos, vm, vsh, kc, kac, vc, layer, q8, qa):
        r = T_.alloc_buffer((qd + kvd,), I64)
        red = T_.alloc_buffer((V,), I64)
        top = T_.alloc_buffer((H + KVH,), I64)           # each head's amax, at least 1
        for t in range(n):
            for i in range(qd + kvd):
                r[i] = _rope_at(x, t, i, d, rd, neox, cos, sin, pos)
            for hh in range(H + KVH):
                for j in T_.vectorized(V):
                    red[j] = T_.int64(0)
                for b in range(d // V):
                    for j in T_.vectorized(V):
                        red[j] = T_.max(red[j], T_.abs(r[hh * d + b * V + j]))
                top[hh] = red[0]
                for j in range(1, V):
                    top[hh] = T_.max(top[hh], red[j])
            for h in range(H):
                qa[t, h] = top[h]
                top[h] = T_.max(top[h], T_.int64(1))
                if top[h] < T_.int64(quant_lanes_max(qmax)):
                    for b in range(d // V):
                        for j in T_.vectorized(V):
                            q8[t, h * d + b * V + j] = T_.Cast(qdt, quant_lanes(r[h * d + b * V + j], top[h], qmax))
                else:
                    for c in range(d):
                        q8[t, h * d + c] = T_.Cast(qdt, round_div(T_.int64(qmax) * r[h * d + c], top[h]))
            for g in range(KVH):
                kac[layer, pos + t, g] = top[H + g]
                top[H + g] = T_.max(top[H + g], T_.int64(1))
                if top[H + g] < T_.int64(quant_lanes_max()):
                    for b in range(d // V):
                        for j in T_.vectorized(V):
                            kc[layer, pos + t, g, b * V + j] = T_.Cast("int8", quant_lanes(r[qd + g * d + b * V + j],
                                                                                           top[H + g]))
                else:
                    for c in range(d):
                        kc[layer, pos + t, g, c] = T_.Cast("int8", round_div(T_.int64(127) * r[qd + g * d + c],
                                                                              top[H + g]))
            for g in range(KVH):
                for b in range(d // V):
                    for j in T_.vectorized(V):
                        vc[layer, pos + t, g, b * V + j] = T_.Cast("int8", T_.max(T_.min(rshift_round_lanes(
                            x[t, qd + kvd + g * d + b * V + j] * vm[g * d + b * V + j], vsh[g * d + b * V + j]),
                            T_.int64(127)), T_.int64(-127)))
    return solo_phase(qkv, spmd)


def qkv_post_kernel(cfg: ModelConfig, q_bits: int):
    """qkv_post_body as a kernel of its own (T rows)."""
    from tvm import tirx
    from tvm.script import tirx as T_
    H, KVH, d, NL, rd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers, cfg.rope_dim
    qd, kvd = H * d, KVH * d
    qdt = "int8" if q_bits == 8 else "int16"
    n = tirx.Var("T", "int32")
    n_ctx, n_rope = tirx.Var("n_ctx", "int32"), tirx.Var("n_rope", "int32")     # cache rows, table rows
    body = qkv_post_body(cfg, q_bits, n)

    @T_.prim_func
    def qkv(x: T_.Buffer((n, qd + 2 * kvd), I64), cos: T_.Buffer((n_rope, rd // 2), "int16"),
            sin: T_.Buffer((n_rope, rd // 2), "int16"), pos: T_.int32, vm: T_.Buffer((kvd,), I64),
            vsh: T_.Buffer((kvd,), I64), kc: T_.Buffer((NL, n_ctx, KVH, d), "int8"),
            kac: T_.Buffer((NL, n_ctx, KVH), I64), vc: T_.Buffer((NL, n_ctx, KVH, d), "int8"), layer: T_.int32,
            q8: T_.Buffer((n, qd), qdt), qa: T_.Buffer((n, H), I64)):
        T_.func_attr({"tir.noalias": True})
        assert pos + n <= n_ctx, "qkv_post: rows past the KV cache"
        body(x, cos, sin, pos, vm, vsh, kc, kac, vc, layer, q8, qa)
    return qkv


def vquant_kernel(C: int):
    """v8 = clip(requant(v, vm, vsh), -127, 127): value channels to the cache's static int8 scale."""
    from tvm import te
    T = _rows()
    v = te.placeholder((T, C), I64, name="v")
    vm = te.placeholder((C,), I64, name="vm")
    vsh = te.placeholder((C,), I64, name="vsh")
    return _func([v, vm, vsh, _vquant(v, vm, vsh, T, C)], parallel=["v8"])


def attention_kernel(cfg: ModelConfig, prob_bits: int, q_bits: int = 8, quant: bool = False):
    """IntTransformer._int_attention over layer `layer` of the int8 cache, positions 0..pos+T-1 (causal);
    `quant`: its output quantized per token to int8 (outputs q8, amax), the attn_output linear's input."""
    from tvm import te
    H, KVH, d, rep = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_rep
    T = _rows()
    n_ctx = te.var("n_ctx")
    q8 = te.placeholder((T, H * d), "int8" if q_bits == 8 else "int16", name="q8")
    qa = te.placeholder((T, H), I64, name="qa")
    kc = te.placeholder((cfg.n_layers, n_ctx, KVH, d), "int8", name="k_cache")
    ka = te.placeholder((cfg.n_layers, n_ctx, KVH), I64, name="ka_cache")
    vc = te.placeholder((cfg.n_layers, n_ctx, KVH, d), "int8", name="v_cache")
    om = te.placeholder((H * d,), I64, name="om")
    osh = te.placeholder((H * d,), I64, name="osh")
    layer, pos = te.var("layer"), te.var("pos")
    sc_m, sc_s = te.var("sc_m", I64), te.var("sc_s", I64)
    S = pos + T
    q_ln2, q_b, q_c, _ = exp_consts(SCORE_F)
    j = te.reduce_axis((0, d), "j")
    acc = te.compute((T, H, S), lambda t, h, l: te.sum(
        q8[t, h * d + j].astype("int32") * kc[layer, l, h // rep, j].astype("int32"), axis=j), name="acc")
    sq = te.compute((T, H), lambda t, h: te.max(bitlen(qa[t, h]) - _c(16), _c(0)), name="sq")

    def score(t, h, l):
        a = ka[layer, l, h // rep]
        sk = te.max(bitlen(a) - _c(16), _c(0))
        t1 = rshift_round(acc[t, h, l].astype(I64) * rshift_round(qa[t, h], sq[t, h]), q_bits) * rshift_round(a, sk)
        return rshift_round(t1 * sc_m, sc_s - _c(q_bits) - sq[t, h] - sk)

    sc = te.compute((T, H, S), score, name="scores")
    l1 = te.reduce_axis((0, S), "l1")
    mx = te.compute((T, H), lambda t, h: te.max(te.if_then_else(l1 <= pos + t, sc[t, h, l1], _c(-(1 << 62))),
                                                 axis=l1), name="mx")
    e = te.compute((T, H, S), lambda t, h, l: te.if_then_else(
        l <= pos + t, int_exp(sc[t, h, l] - mx[t, h], q_ln2, q_b, q_c), _c(0)), name="e")
    l2 = te.reduce_axis((0, S), "l2")
    tot = te.compute((T, H), lambda t, h: te.sum(e[t, h, l2], axis=l2), name="tot")
    p = te.compute((T, H, S), lambda t, h, l: round_div(e[t, h, l] * _c((1 << prob_bits) - 1), tot[t, h]), name="p")
    l3 = te.reduce_axis((0, S), "l3")
    pv = te.compute((T, H, d), lambda t, h, c: te.sum(p[t, h, l3] * vc[layer, l3, h // rep, c].astype(I64), axis=l3),
                    name="pv")
    out = te.compute((T, H * d), lambda t, i: rshift_round(pv[t, i // d, i % d] * om[i], osh[i]), name="out")
    def schedule(sch):
        for name in ("acc", "pv"):         # the two contractions, parallel over (t, h); the rest stays serial
            # (parallelizing every stage triples the compile time for little: they are O(T H S) scalar ops)
            loops = sch.get_loops(sch.get_sblock(name))
            if name == "pv":
                sch.reorder(loops[3], loops[2])              # stream each cached V row once, contiguous in c
            sch.parallel(sch.fuse(loops[0], loops[1]))

    outs = list(_quant(out, T, 1, H * d, name="out8")) if quant else [out]
    return _func([q8, qa, kc, ka, vc, om, osh, layer, pos, sc_m, sc_s, *outs], schedule=schedule)


def round_div_by(a, b, inv):
    """round_div(a, b) for b > 0 with inv = 1.0 / (2 b) computed once for many a (a row's total or amax): the
    quotient from one float64 multiply, corrected to the exact floor by the integer remainder; exact while
    |2a + b| and 2b < 2^52, else an integer division."""
    from tvm import te, tirx
    n, D = _c(2) * a + b, _c(2) * b
    q0 = tirx.Cast(I64, tirx.floor(tirx.Cast("float64", n) * inv))
    r = n - q0 * D
    q = q0 + tirx.Select(r >= D, _c(1), _c(0)) - tirx.Select(r < _c(0), _c(1), _c(0))
    big = _c(1 << 52)
    return tirx.if_then_else(tirx.all(te.abs(n) < big, D < big), q, tirx.floordiv(n, D))


# ---------------------------------------------------------------- vector-lane forms (decode kernels)
# Written for TVM's vectorized loops: no Select-guarded shifts, no int64 division, and int64 -> float64 only
# through _i2f (AVX2 has no vector instruction for it). Every helper is exact on the range its docstring gives.

LANES = 8               # lanes of the decode kernels' vector loops


def rshift_round_lanes(x, s):
    """rshift_round(x, s) for any int64 shift expression s, branch-free: x << max(-s, 0), then round off
    clamp(s, 0, 62) bits (intref clips shifts past 62 the same way)."""
    from tvm import tirx
    sp = tirx.max(tirx.min(s, _c(62)), _c(0))
    return ((x << tirx.max(-s, _c(0))) + ((_c(1) << sp) >> _c(1))) >> sp


_MAGIC = 6755399441055744.0       # 2^52 + 2^51: adding it puts an integer below 2^51 in a double's low bits


def _i2f(v):
    """int64 lanes with |v| < 2^51 -> float64, exactly: add the bits of 2^52 + 2^51, subtract it as a double."""
    from tvm import tirx
    magic = tirx.const(_MAGIC, "float64")
    return tirx.reinterpret("float64", v + tirx.reinterpret(I64, magic)) - magic


def _sel(cond, dtype: str):
    """1 where cond holds, else 0 (a vector bool cast to int may sign-extend to -1: a Select is explicit)."""
    from tvm import tirx
    return tirx.Select(cond, tirx.const(1, dtype), tirx.const(0, dtype))


def int_exp_lanes(n, q_ln2, inv_ln2, q_b, q_c):
    """int_exp(-n) for int32 n in [0, 60 q_ln2] in int32 lanes, for the constants of f <= SCORE_F (then
    (q_b - r)^2 + q_c < 2^26): z = n // q_ln2 from a float32 product, corrected by one step either way."""
    from tvm import tirx
    i32 = "int32"
    z0 = tirx.Cast(i32, tirx.Cast("float32", n) * inv_ln2)
    r0 = n - z0 * q_ln2
    z = z0 + _sel(r0 >= q_ln2, i32) - _sel(r0 < tirx.const(0, i32), i32)
    pb = q_b - (n - z * q_ln2)
    return (pb * pb + q_c) >> tirx.min(z, tirx.const(31, i32))


def quant_lanes(v, top, qmax: int = 127):
    """round_div(qmax v, top) for |v| <= top < quant_lanes_max(qmax), in float64 lanes: the floor of the
    quotient corrected by the exact remainder (every product stays below 2^53)."""
    from tvm import tirx
    f64 = "float64"
    n = _i2f(v) * tirx.const(2.0 * qmax, f64) + tirx.Cast(f64, top)
    return tirx.Cast("int32", _floor_div_lanes(n, tirx.Cast(f64, top * _c(2))))


def quant_lanes_max(qmax: int = 127) -> int:
    """Row amax below which quant_lanes is exact: |2 qmax v + top| < 2^52."""
    return (1 << 52) // (2 * qmax + 1)


def _f2i(f):
    """float64 lanes holding integers with |f| < 2^51 -> int64, exactly (the inverse of _i2f)."""
    from tvm import tirx
    magic = tirx.const(_MAGIC, "float64")
    return tirx.reinterpret(I64, f + magic) - tirx.reinterpret(I64, magic)


def _floor_div_lanes(num, den, inv=None):
    """floor(num / den) of float64 lanes holding integers below 2^53: the float quotient (num / den, or num * inv
    with inv = 1 / den) corrected by one either way from the exact remainder."""
    from tvm import tirx
    f64 = "float64"
    q0 = tirx.floor(num / den if inv is None else num * inv)
    r = num - q0 * den
    return q0 + _sel(r >= den, f64) - _sel(r < tirx.const(0.0, f64), f64)


def res_norm_quant_body(D: int, n, spmd: bool = False):
    """norm_quant_kernel(D, residual=True) (same arguments: x, o, g, eps_q -> x + o clipped, int8, amax) in
    LANES-wide vector loops, rows in turn: the residual add, amax and sum of squares in int64 lanes, the
    integer square root per row (scalar Newton steps, as isqrt_stages), then round_div(x << NORM_F, rms << r)
    in float64 lanes with the exact remainder (x is clipped to int32, so every term stays below 2^47), times
    gamma, and the int8 quantization (quant_lanes). A T.macro over rows n (see phases for spmd)."""
    from tvm import tirx
    from tvm.script import tirx as T_
    from .tvm_int_matmul import solo_phase
    V, lim, f64 = LANES, (1 << 31) - 1, "float64"
    assert D % V == 0, D

    def y_lanes(xo, t, i, den, inv, g):                  # round_div(xo << NORM_F, den) * g
        a = _i2f(xo[t, i]) * tirx.const(2.0 ** (NORM_F + 1), f64) + tirx.Cast(f64, den)
        return _f2i(_floor_div_lanes(a, tirx.Cast(f64, den * _c(2)), inv)) * g[i]

    @T_.macro
    def res_norm(x, o, g, eps_q, xo, q, amax):
        y = T_.alloc_buffer((D,), I64)
        red = T_.alloc_buffer((V,), I64)
        st = T_.alloc_buffer((4,), I64)                  # amax, then r; mean square; isqrt; divisor
        inv = T_.alloc_buffer((1,), f64)
        for t in range(n):
            for j in T_.vectorized(V):
                red[j] = T_.int64(0)
            for b in range(D // V):
                for j in T_.vectorized(V):
                    xo[t, b * V + j] = T_.max(T_.min(x[t, b * V + j] + o[t, b * V + j], T_.int64(lim)), T_.int64(-lim))
                    red[j] = T_.max(red[j], T_.abs(xo[t, b * V + j]))
            st[0] = red[0]
            for j in range(1, V):
                st[0] = T_.max(st[0], red[j])
            st[0] = T_.max(bitlen(st[0]) - T_.int64(20), T_.int64(0))
            for j in T_.vectorized(V):
                red[j] = T_.int64(0)
            for b in range(D // V):
                for j in T_.vectorized(V):
                    red[j] = red[j] + rshift_round_lanes(xo[t, b * V + j], st[0]) * rshift_round_lanes(
                        xo[t, b * V + j], st[0])
            st[1] = red[0]
            for j in range(1, V):
                st[1] = st[1] + red[j]
            st[1] = T_.floordiv(st[1], T_.int64(D)) + (eps_q >> T_.min(st[0] * T_.int64(2), T_.int64(63)))
            st[2] = T_.int64(1) << T_.floordiv(bitlen(st[1]) + T_.int64(1), T_.int64(2))
            for k in range(NEWTON_STEPS):
                st[2] = T_.min(st[2], (st[2] + T_.floordiv(st[1], T_.max(st[2], T_.int64(1)))) >> T_.int64(1))
            st[2] = T_.Select(st[1] > T_.int64(0), st[2], T_.int64(0))
            st[3] = T_.max(st[2], T_.int64(1)) << st[0]
            inv[0] = T_.float64(1) / T_.Cast(f64, st[3] * T_.int64(2))
            for b in range(D // V):
                for j in T_.vectorized(V):
                    y[b * V + j] = y_lanes(xo, t, b * V + j, st[3], inv[0], g)
            for j in T_.vectorized(V):
                red[j] = T_.int64(0)
            for b in range(D // V):
                for j in T_.vectorized(V):
                    red[j] = T_.max(red[j], T_.abs(y[b * V + j]))
            st[0] = red[0]
            for j in range(1, V):
                st[0] = T_.max(st[0], red[j])
            amax[t, 0] = st[0]
            st[0] = T_.max(st[0], T_.int64(1))
            if st[0] < T_.int64(quant_lanes_max()):
                for b in range(D // V):
                    for j in T_.vectorized(V):
                        q[t, b * V + j] = T_.Cast("int8", quant_lanes(y[b * V + j], st[0]))
            else:
                for i in range(D):
                    q[t, i] = T_.Cast("int8", round_div(T_.int64(127) * y[i], st[0]))
    return solo_phase(res_norm, spmd)


def res_norm_quant_kernel(D: int):
    """res_norm_quant_body as a kernel of its own (T rows)."""
    from tvm import tirx
    from tvm.script import tirx as T_
    n = tirx.Var("T", "int32")
    body = res_norm_quant_body(D, n)

    @T_.prim_func
    def res_norm(x: T_.Buffer((n, D), I64), o: T_.Buffer((n, D), I64), g: T_.Buffer((D,), I64), eps_q: T_.int64,
                 xo: T_.Buffer((n, D), I64), q: T_.Buffer((n, D), "int8"), amax: T_.Buffer((n, 1), I64)):
        T_.func_attr({"tir.noalias": True})
        body(x, o, g, eps_q, xo, q, amax)
    return res_norm


def attention_lanes_body(cfg: ModelConfig, prob_bits: int, q_bits: int, T: int | None, n, spmd: bool = False):
    """attention_kernel(quant=True), same arguments and bits, in vector lanes, one query row after another.

    Per KV head: the dot products of its n_rep query heads with each cached key (the key row read once), the
    key's 16-bit amax factor once per position; then per query head LANES positions at a time: scores in int64
    lanes, the I-BERT exp in int32 lanes (int_exp_lanes), the softmax division in float64 lanes with an exact
    int64 remainder, and P @ V in int32 blocks of 256 positions (p < 2^16, |v| <= 127) widened to int64.
    Scratch is laid out per row and KV head. Prefill (symbolic T): rows split over threads (2.1x faster than the
    scalar row loop it replaced, at a 64-token prompt); T = 1 (decode): KV heads split over threads
    (0.78 -> 0.58 ms per token at 64-192 positions on the 2-core host, interleaved). A T.macro over rows n
    (see phases for spmd: there the output of all heads is quantized by thread 0 after a barrier); o [n, HD]
    int64 is scratch that every thread writes (its heads) and thread 0 reads. None where the head shape needs
    the generic kernel."""
    from tvm import tirx
    from tvm.script import tirx as T_
    from .tvm_int_matmul import _hsum, _sum, phases, solo_phase, _tvm as _matmul_tvm
    _matmul_tvm()                                   # binds the vector helpers' tirx
    H, KVH, d, rep = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_rep
    HD, V, W = H * d, LANES, 16
    if d % W or HD % V:
        return None
    q_ln2, q_b, q_c, _ = exp_consts(SCORE_F)
    P, BL = (1 << prob_bits) - 1, 256
    rows, heads = (T_.parallel, T_.serial) if T is None else (T_.serial, T_.parallel)
    bar = phases(spmd)[1]
    i32, f64 = "int32", "float64"

    def dot(q8, kc, layer, t, h, l):
        """q8[h] . k[l] as int32, products summed in even / odd lane pairs first: the pattern LLVM turns into
        vpmaddwd (int16 pairs -> int32) on x86."""
        ev, od = list(range(0, W, 2)), list(range(1, W, 2))
        m = [tirx.Cast(f"int32x{W}", q8[t, tirx.Ramp(h * d + W * c, 1, W)])
             * tirx.Cast(f"int32x{W}", kc[layer, l, h // rep, tirx.Ramp(W * c, 1, W)]) for c in range(d // W)]
        return _hsum(_sum([tirx.Shuffle([x], ev) + tirx.Shuffle([x], od) for x in m]), W // 2, i32)

    def score(acc, t, g, r, l, qa16, sq, kf, ks, sc_m, sc_s):
        """intref's score; acc < 2^28, qa16 and kf < 2^16 + 1 and t1's first factor < 2^29 pass through int32,
        so LLVM multiplies them with one 32 x 32 -> 64 instruction (AVX2 has no 64-bit one)."""
        w = lambda v: tirx.Cast(I64, tirx.Cast(i32, v))      # noqa: E731
        t1 = w(rshift_round(tirx.Cast(I64, acc[t, g, r, l]) * w(qa16), q_bits)) * w(kf[t, g, l])
        return rshift_round_lanes(t1 * sc_m, sc_s - _c(q_bits) - sq - ks[t, g, l])

    def prob(e, t, g, l, tot, inv):
        """round_div(e P, tot) for e < 2^27, tot < 2^51: quotient from float64, remainder in int64."""
        n = tirx.Cast(I64, e[t, g, l]) * _c(2 * P) + tot
        q0 = tirx.Cast(i32, tirx.floor(_i2f(n) * inv))
        r = n - tirx.Cast(I64, q0) * (tot * _c(2))
        return q0 + _sel(r >= tot * _c(2), i32) - _sel(r < _c(0), i32)

    @T_.macro
    def quantize(t, o, om, osh, red, st, out8, amax):       # the heads' outputs requantized, amax, int8
        for j in T_.vectorized(V):
            red[t, 0, j] = T_.int64(0)
        for b in range(HD // V):
            for j in T_.vectorized(V):
                o[t, b * V + j] = rshift_round_lanes(o[t, b * V + j] * om[b * V + j], osh[b * V + j])
                red[t, 0, j] = T_.max(red[t, 0, j], T_.abs(o[t, b * V + j]))
        st[t, 0, 3] = red[t, 0, 0]
        for j in range(1, V):
            st[t, 0, 3] = T_.max(st[t, 0, 3], red[t, 0, j])
        amax[t, 0] = st[t, 0, 3]
        st[t, 0, 3] = T_.max(st[t, 0, 3], T_.int64(1))
        if st[t, 0, 3] < T_.int64(quant_lanes_max()):
            for b in range(HD // V):
                for j in T_.vectorized(V):
                    out8[t, b * V + j] = T_.Cast("int8", quant_lanes(o[t, b * V + j], st[t, 0, 3]))
        else:
            for i in range(HD):
                out8[t, i] = T_.Cast("int8", round_div(T_.int64(127) * o[t, i], st[t, 0, 3]))

    out = solo_phase(quantize, spmd)

    @T_.macro
    def attn(q8, qa, kc, ka, vc, om, osh, layer, pos, sc_m, sc_s, out8, amax, o):
        n_ctx = kc.shape[1]
        acc = T_.alloc_buffer((n, KVH, rep, n_ctx + V), i32)    # per KV head: q . k of its query heads
        kf = T_.alloc_buffer((n, KVH, n_ctx + V), I64)          # key amax kept to 16 bits, and its shift
        ks = T_.alloc_buffer((n, KVH, n_ctx + V), I64)
        sc = T_.alloc_buffer((n, KVH, n_ctx + V), I64)
        e = T_.alloc_buffer((n, KVH, n_ctx + V), i32)
        p32 = T_.alloc_buffer((n, KVH, n_ctx + V), i32)
        pv = T_.alloc_buffer((n, KVH, d), i32)
        red = T_.alloc_buffer((n, KVH, V), I64)
        st = T_.alloc_buffer((n, KVH, 4), I64)                  # sq, qa16, row max, row total
        inv = T_.alloc_buffer((n, KVH), f64)
        for t in rows(n):
            with T_.attr(0, bar, 1):
                for g in heads(KVH):
                    for l in range(pos + t + 1):
                        for r in T_.unroll(rep):
                            acc[t, g, r, l] = dot(q8, kc, layer, t, g * rep + r, l)
                    for l in range(pos + t + 1, (pos + t + V) // V * V):
                        for r in T_.unroll(rep):
                            acc[t, g, r, l] = 0
                    for b in range((pos + t + V) // V):
                        for j in T_.vectorized(V):
                            ks[t, g, b * V + j] = T_.max(bitlen(ka[layer, T_.min(b * V + j, pos + t), g]) - T_.int64(16),
                                                         T_.int64(0))
                            kf[t, g, b * V + j] = rshift_round_lanes(ka[layer, T_.min(b * V + j, pos + t), g],
                                                                     ks[t, g, b * V + j])
                    for r in range(rep):
                        st[t, g, 0] = T_.max(bitlen(qa[t, g * rep + r]) - T_.int64(16), T_.int64(0))
                        st[t, g, 1] = rshift_round_lanes(qa[t, g * rep + r], st[t, g, 0])
                        for j in T_.vectorized(V):
                            red[t, g, j] = T_.int64(-(1 << 62))
                        for b in range((pos + t + V) // V):
                            for j in T_.vectorized(V):
                                sc[t, g, b * V + j] = score(acc, t, g, r, b * V + j, st[t, g, 1], st[t, g, 0], kf, ks,
                                                            sc_m, sc_s)
                                red[t, g, j] = T_.max(red[t, g, j], T_.Select(b * V + j <= pos + t, sc[t, g, b * V + j],
                                                                              T_.int64(-(1 << 62))))
                        st[t, g, 2] = red[t, g, 0]
                        for j in range(1, V):
                            st[t, g, 2] = T_.max(st[t, g, 2], red[t, g, j])
                        for j in T_.vectorized(V):
                            red[t, g, j] = T_.int64(0)
                        for b in range((pos + t + V) // V):
                            for j in T_.vectorized(V):
                                e[t, g, b * V + j] = T_.Select(b * V + j <= pos + t, int_exp_lanes(
                                    T_.Cast(i32, T_.min(st[t, g, 2] - sc[t, g, b * V + j], T_.int64(60 * q_ln2))),
                                    T_.int32(q_ln2), T_.float32(1.0 / q_ln2), T_.int32(q_b), T_.int32(q_c)), T_.int32(0))
                                red[t, g, j] = red[t, g, j] + T_.Cast(I64, e[t, g, b * V + j])
                        st[t, g, 3] = red[t, g, 0]
                        for j in range(1, V):
                            st[t, g, 3] = st[t, g, 3] + red[t, g, j]
                        inv[t, g] = T_.float64(1) / T_.Cast(f64, st[t, g, 3] * T_.int64(2))
                        if st[t, g, 3] < T_.int64(1 << 51):
                            for b in range((pos + t + V) // V):
                                for j in T_.vectorized(V):
                                    p32[t, g, b * V + j] = prob(e, t, g, b * V + j, st[t, g, 3], inv[t, g])
                        else:
                            for l in range(pos + t + 1):
                                p32[t, g, l] = T_.Cast(i32, round_div(T_.Cast(I64, e[t, g, l]) * T_.int64(P), st[t, g, 3]))
                        for c in T_.vectorized(d):
                            o[t, (g * rep + r) * d + c] = T_.int64(0)
                        for lb in range((pos + t + BL) // BL):
                            for c in T_.vectorized(d):
                                pv[t, g, c] = 0
                            for l in T_.serial(lb * BL, T_.min(pos + t + 1, lb * BL + BL)):
                                for c in T_.vectorized(d):
                                    pv[t, g, c] = pv[t, g, c] + p32[t, g, l] * T_.Cast(i32, vc[layer, l, g, c])
                            for c in T_.vectorized(d):
                                o[t, (g * rep + r) * d + c] = o[t, (g * rep + r) * d + c] + T_.Cast(I64, pv[t, g, c])
            out(t, o, om, osh, red, st, out8, amax)
    return attn


def attention_lanes_kernel(cfg: ModelConfig, prob_bits: int, q_bits: int = 8, T: int | None = None):
    """attention_lanes_body as a kernel of its own (attention_kernel's arguments)."""
    from tvm import tirx
    from tvm.script import tirx as T_
    H, KVH, d, NL = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    HD = H * d
    qdt = "int8" if q_bits == 8 else "int16"
    n_ctx = tirx.Var("n_ctx", "int32")
    n = tirx.Var("T", "int32") if T is None else T
    body = attention_lanes_body(cfg, prob_bits, q_bits, T, n)
    if body is None:
        return attention_kernel(cfg, prob_bits, q_bits, quant=True)

    @T_.prim_func
    def attn(q8: T_.Buffer((n, HD), qdt), qa: T_.Buffer((n, H), I64), kc: T_.Buffer((NL, n_ctx, KVH, d), "int8"),
             ka: T_.Buffer((NL, n_ctx, KVH), I64), vc: T_.Buffer((NL, n_ctx, KVH, d), "int8"),
             om: T_.Buffer((HD,), I64), osh: T_.Buffer((HD,), I64), layer: T_.int32, pos: T_.int32,
             sc_m: T_.int64, sc_s: T_.int64, out8: T_.Buffer((n, HD), "int8"), amax: T_.Buffer((n, 1), I64)):
        T_.func_attr({"tir.noalias": True})
        o = T_.alloc_buffer((n, HD), I64)
        body(q8, qa, kc, ka, vc, om, osh, layer, pos, sc_m, sc_s, out8, amax, o)
    return attn


_SILU_ARGS = ("fshift", "q_ln2", "q_b", "q_c", "one", "shift_h")


def _silu_mul(g, u, T, F: int, consts, uc0: int = 0):
    """rshift_round(int_silu(g, f) * u, shift_h) of te tensors (u's columns from uc0)."""
    from tvm import te, tirx
    fshift, q_ln2, q_b, q_c, one, shift_h = consts
    xe = te.compute((T, F), lambda t, i: rshift_round(g[t, i], fshift), name="xe")
    e = te.compute((T, F), lambda t, i: int_exp(-te.abs(xe[t, i]), q_ln2, q_b, q_c), name="e")

    def f(t, i):
        sig = round_div(tirx.Select(xe[t, i] >= _c(0), one, e[t, i]) << _c(SIG_F), one + e[t, i])
        return rshift_round(rshift_round(g[t, i] * sig, SIG_F) * u[t, uc0 + i], shift_h)

    return te.compute((T, F), f, name="h")


def silu_mul_kernel(F: int):
    """rshift_round(int_silu(g, f) * u, shift_h); exp constants of min(f, SCORE_F) are runtime arguments."""
    from tvm import te
    T = _rows()
    g = te.placeholder((T, F), I64, name="g")
    u = te.placeholder((T, F), I64, name="u")
    consts = [te.var(n, I64) for n in _SILU_ARGS]
    return _func([g, u, *consts, _silu_mul(g, u, T, F, consts)], parallel=["xe", "e", "h"])


def _silu_lanes(gu, t, i, F: int, fshift, q_ln2, q_b, q_c, one, shift_h):
    """rshift_round(int_silu(g, f) * u, shift_h) of column i of row t of gu = [g | u], in vector lanes: the exp in
    int32 (int_exp_lanes; its constants are those of min(f, SCORE_F)), the sigmoid's division in float64 lanes
    (numerator < 2^44) corrected by its exact remainder, the products in int64."""
    from tvm import tirx
    i32, f64 = "int32", "float64"
    g = gu[t, i]
    xe = rshift_round_lanes(g, fshift)
    n = tirx.Cast(i32, tirx.min(tirx.abs(xe), q_ln2 * _c(60)))
    e = int_exp_lanes(n, tirx.Cast(i32, q_ln2), tirx.const(1.0, "float32") / tirx.Cast("float32", q_ln2),
                      tirx.Cast(i32, q_b), tirx.Cast(i32, q_c))
    one32 = tirx.Cast(i32, one)
    num = tirx.Cast(f64, tirx.Select(xe >= _c(0), one32, e)) * tirx.const(2.0 ** (SIG_F + 1), f64) + \
        tirx.Cast(f64, one32 + e)
    den = tirx.Cast(f64, one32 + e) * tirx.const(2.0, f64)
    q0 = tirx.floor(num / den)                     # correctly rounded: never below the true floor
    sig = tirx.Cast(i32, q0 - _sel(num - q0 * den < tirx.const(0.0, f64), f64))
    return rshift_round_lanes(rshift_round(g * tirx.Cast(I64, sig), SIG_F) * gu[t, F + i], shift_h)


def silu_quant_body(F: int, n, spmd: bool = False):
    """Fast path: the gate|up matmul's output [T, 2F] -> SiLU(gate) * up -> per-token int8 (ffn_down's input) in
    LANES-wide vector loops (_silu_lanes, then quant_lanes), as a T.macro over rows n. Symbolic T (prefill):
    rows split over threads; macro(gu, consts.., q, amax). T = 1 (decode): SILU_SLICES column slices, each
    with its partial amax (pm, int64 [1, SILU_SLICES], written and read by different threads, so memory all
    of them see), then the amax and each slice's int8 codes: serial in its own kernel (a parallel loop's wake-up
    costs about its work), split over the threads inside the token kernel (spmd, see phases: 8.4 -> 6.2 us
    standalone on the 2-core host, its own launch included); macro(gu, consts.., q, amax, pm). The exp
    constants must be those of f <= SCORE_F (the kernels assert it)."""
    from tvm.script import tirx as T_
    from .tvm_int_matmul import phases
    V = LANES
    assert F % V == 0, F

    def quant(h, t, i, top):
        return T_.Cast("int8", quant_lanes(h[t, i], top))

    if isinstance(n, int):
        S = SILU_SLICES if F % (SILU_SLICES * V) == 0 else 1
        W = F // S
        split, bar = phases(spmd)

        @T_.macro
        def silu1(gu, fshift, q_ln2, q_b, q_c, one, shift_h, q, amax, pm):
            h = T_.alloc_buffer((n, F), I64)
            red = T_.alloc_buffer((S, V), I64)
            top = T_.alloc_buffer((S,), I64)
            with T_.attr(0, bar, 1):
                for sl in split(S):
                    for j in T_.vectorized(V):
                        red[sl, j] = T_.int64(0)
                    for b in range(W // V):
                        for j in T_.vectorized(V):
                            h[0, sl * W + b * V + j] = _silu_lanes(gu, 0, sl * W + b * V + j, F, fshift, q_ln2, q_b,
                                                                   q_c, one, shift_h)
                            red[sl, j] = T_.max(red[sl, j], T_.abs(h[0, sl * W + b * V + j]))
                    pm[0, sl] = red[sl, 0]
                    for j in range(1, V):
                        pm[0, sl] = T_.max(pm[0, sl], red[sl, j])
            with T_.attr(0, bar, 1):
                for sl in split(S):
                    top[sl] = pm[0, 0]
                    for k in range(1, S):
                        top[sl] = T_.max(top[sl], pm[0, k])
                    if sl == 0:
                        amax[0, 0] = top[sl]
                    top[sl] = T_.max(top[sl], T_.int64(1))
                    if top[sl] < T_.int64(quant_lanes_max()):
                        for b in range(W // V):
                            for j in T_.vectorized(V):
                                q[0, sl * W + b * V + j] = quant(h, 0, sl * W + b * V + j, top[sl])
                    else:
                        for i in range(W):
                            q[0, sl * W + i] = T_.Cast("int8", round_div(T_.int64(127) * h[0, sl * W + i], top[sl]))
        return silu1

    @T_.macro
    def silu(gu, fshift, q_ln2, q_b, q_c, one, shift_h, q, amax):
        h = T_.alloc_buffer((n, F), I64)
        red = T_.alloc_buffer((n, V), I64)
        for t in T_.parallel(n):
            for j in T_.vectorized(V):
                red[t, j] = T_.int64(0)
            for b in range(F // V):
                for j in T_.vectorized(V):
                    h[t, b * V + j] = _silu_lanes(gu, t, b * V + j, F, fshift, q_ln2, q_b, q_c, one, shift_h)
                    red[t, j] = T_.max(red[t, j], T_.abs(h[t, b * V + j]))
            amax[t, 0] = red[t, 0]
            for j in range(1, V):
                amax[t, 0] = T_.max(amax[t, 0], red[t, j])
            red[t, 0] = T_.max(amax[t, 0], T_.int64(1))
            if red[t, 0] < T_.int64(quant_lanes_max()):
                for b in range(F // V):
                    for j in T_.vectorized(V):
                        q[t, b * V + j] = quant(h, t, b * V + j, red[t, 0])
            else:
                for i in range(F):
                    q[t, i] = T_.Cast("int8", round_div(T_.int64(127) * h[t, i], red[t, 0]))
    return silu


def silu_quant_kernel(F: int, T: int | None = None):
    """silu_quant_body as a kernel of its own; constants past the int32 exp's range (f > SCORE_F) are refused
    by an assertion."""
    from tvm import tirx
    from tvm.script import tirx as T_
    n = tirx.Var("T", "int32") if T is None else T
    body = silu_quant_body(F, n)
    q_ln2_max = exp_consts(SCORE_F)[0]
    one_row = T == 1

    @T_.prim_func
    def silu(gu: T_.Buffer((n, 2 * F), I64), fshift: T_.int64, q_ln2: T_.int64, q_b: T_.int64, q_c: T_.int64,
             one: T_.int64, shift_h: T_.int64, q: T_.Buffer((n, F), "int8"), amax: T_.Buffer((n, 1), I64)):
        T_.func_attr({"tir.noalias": True})
        assert q_ln2 <= T_.int64(q_ln2_max), "silu_quant: exp constants of f <= SCORE_F expected"
        if one_row:
            pm = T_.alloc_buffer((1, SILU_SLICES), I64)
            body(gu, fshift, q_ln2, q_b, q_c, one, shift_h, q, amax, pm)
        else:
            body(gu, fshift, q_ln2, q_b, q_c, one, shift_h, q, amax)
    return silu


def _residual(x, y, T, D: int):
    """x + y clipped to int32's symmetric range (the residual stream)."""
    from tvm import te
    lim = (1 << 31) - 1
    return te.compute((T, D), lambda t, i: te.max(te.min(x[t, i] + y[t, i], _c(lim)), _c(-lim)), name="out")


def residual_kernel(D: int):
    from tvm import te
    T = _rows()
    x = te.placeholder((T, D), I64, name="x")
    y = te.placeholder((T, D), I64, name="y")
    return _func([x, y, _residual(x, y, T, D)], parallel=["out"])


def _flags(values: list[bool]):
    """A kernel writing int32 [len(values)]: the library's answer to a question the runtime asks once."""
    from tvm import te, tirx

    def f(i):
        v = tirx.const(0, "int32")
        for k in (k for k, flag in enumerate(values) if flag):
            v = tirx.Select(i == k, tirx.const(1, "int32"), v)
        return v
    return te.create_prim_func([te.compute((len(values),), f, name="out")])


def _signature():
    return _flags([True])


def build_int_module(cfg: ModelConfig, qc: QuantConfig, tvm_target=None):
    """The IRModule of every integer kernel, named as edgellm.runtime.tvm_int_backend.int_kernel_names says;
    the fast matmuls use `tvm_target`'s int8 dot-product instructions (default: this machine's)."""
    tvm = _tvm()
    names = int_kernel_names(cfg, qc)
    funcs = {names["signature"]: _signature(),
             names["embed"]: embed_kernel(cfg.vocab_size, cfg.dim)}
    if names["fast"]:
        from .tvm_int_matmul import int_matmul_func, lane_layout
        target = host_target() if tvm_target is None else tvm_target
        funcs.update({names["norm_quant"]: norm_quant_kernel(cfg.dim, False),
                      names["res_norm_quant"]: norm_quant_kernel(cfg.dim, True),
                      names["qkv_post"]: qkv_post_kernel(cfg, qc.q_bits),
                      names["attention_q8"]: attention_lanes_kernel(cfg, qc.prob_bits, qc.q_bits),
                      names["attention_q8_t1"]: attention_lanes_kernel(cfg, qc.prob_bits, qc.q_bits, 1),
                      names["silu_quant"]: silu_quant_kernel(cfg.ffn_dim),
                      names["silu_quant_t1"]: silu_quant_kernel(cfg.ffn_dim, 1)})
        g = {4: qc.group_size, 8: None}
        for (r, c, b, T), n in names["mm"].items():
            funcs[n] = int_matmul_func(r, c, b, g[b], target, T)
        funcs[names["w4_layout"]] = _flags([lane_layout(r, c, b, g[b], target) for r, c, b, _ in names["mm"]])
        from .tvm_int_token import decode_token_kernel
        token = decode_token_kernel(cfg, qc, target)
        if token is not None:
            funcs[names["token_t1"]] = token
    else:
        funcs.update({names["norm"]: norm_kernel(cfg.dim),
                      names["rope_q"]: rope_kernel(cfg.n_heads, cfg.head_dim, cfg.rope_dim, cfg.rope_neox),
                      names["rope_k"]: rope_kernel(cfg.n_kv_heads, cfg.head_dim, cfg.rope_dim, cfg.rope_neox),
                      names["vquant"]: vquant_kernel(cfg.n_kv_heads * cfg.head_dim),
                      names["attention"]: attention_kernel(cfg, qc.prob_bits, qc.q_bits),
                      names["silu_mul"]: silu_mul_kernel(cfg.ffn_dim),
                      names["residual"]: residual_kernel(cfg.dim)})
        for (G, K, qmax), n in names["quant"].items():
            funcs[n] = quant_kernel(G, K, qmax)
        for K, n in names["static_quant"].items():
            funcs[n] = static_quant_kernel(K)
        for (N, K, kind), n in names["linear"].items():
            funcs[n] = block_linear_kernel(N, K, qc, int(kind[1:])) if qc.act_block else \
                linear_kernel(N, K, qc if kind == "w4" else None)
    return tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})


@dataclass
class IntBuildResult:
    path: Path
    names: list[str]
    seconds: float
    target: dict = field(default_factory=dict)


def build_int_kernels(qm: QuantizedModel, tvm_target, out_path: str | os.PathLike) -> IntBuildResult:
    """Compile the integer kernels of quantized model `qm` for `tvm_target` (a name from `edgellm targets`, a
    Target or a TVM target dict) into one shared library at `out_path` (cross-linked for other machines)."""
    tvm = _tvm()
    target = resolve_target(tvm_target)
    out_path = Path(out_path)
    cc = cross_compiler(target)
    t0 = time.perf_counter()
    mod = build_int_module(qm.config, qm.qconfig, target)
    lib = tvm.compile(mod, target=tvm.target.Target(target))
    export_atomic(lib, out_path, cc)
    names = sorted(str(gv.name_hint) for gv in mod.get_global_vars())
    return IntBuildResult(out_path, names, time.perf_counter() - t0, dict(target))
