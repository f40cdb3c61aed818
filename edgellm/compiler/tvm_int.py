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
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.config import ModelConfig
from ..runtime.intref import NORM_F, SCORE_F, SIG_F, QuantConfig, QuantizedModel, exp_consts
from ..runtime.tvm_int_backend import int_kernel_names
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
        o = te.placeholder((T, D), I64, name="o")
        xo = _residual(x, o, T, D)
        q, amax = _quant(_norm(xo, g, eps, T, D), T, 1, D)
        return _func([x, o, g, eps, xo, q, amax])
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


def _rope(x, T, H: int, d: int, rd: int, neox: bool, cos, sin, pos, col0: int = 0, name: str = "y"):
    """intref.int_rope on columns col0 .. col0 + H*d of te tensor x (row t at position pos + t)."""
    from tvm import te
    half = rd // 2

    def f(t, n):
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

    return te.compute((T, H * d), f, name=name)


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


def qkv_post_kernel(cfg: ModelConfig, q_bits: int):
    """Fast path: the q|k|v matmul's output [T, qd + 2 kvd] -> RoPE + per-head int8 (int16) q, RoPE + per-head
    int8 k, v to the cache's static int8 scale: everything between that matmul and the attention, one call."""
    from tvm import te
    T = _rows()
    H, KVH, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    qd, kvd = H * d, KVH * d
    x = te.placeholder((T, qd + 2 * kvd), I64, name="qkv")
    cos, sin, pos = _rope_tables(cfg.rope_dim)
    vm = te.placeholder((kvd,), I64, name="vm")
    vsh = te.placeholder((kvd,), I64, name="vsh")
    qr = _rope(x, T, H, d, cfg.rope_dim, cfg.rope_neox, cos, sin, pos, name="qr")
    kr = _rope(x, T, KVH, d, cfg.rope_dim, cfg.rope_neox, cos, sin, pos, col0=qd, name="kr")
    q8, qa = _quant(qr, T, H, d, (1 << (q_bits - 1)) - 1, name="q8")
    k8, ka = _quant(kr, T, KVH, d, name="k8")
    v8 = _vquant(x, vm, vsh, T, kvd, col0=qd + kvd)
    return _func([x, cos, sin, pos, vm, vsh, q8, qa, k8, ka, v8])


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


def attention_rows_kernel(cfg: ModelConfig, prob_bits: int, q_bits: int = 8, T: int | None = None):
    """attention_kernel(quant=True), same arguments and bits, as one loop nest per query row: heads in turn, each
    row of scores, softmax, then P @ V in int32 blocks of 256 positions (p < 2^16, |v| <= 127: a block sum stays
    below 2^31) widened to int64, every division by a row's total a float64 multiply (round_div_by). Rows split
    over threads (prefill); T = 1 (decode) runs serially, as a parallel loop's thread wake-up costs more than
    the work at a short context."""
    from tvm import te, tirx
    from tvm.script import tirx as T_
    from .tvm_int_matmul import _hsum, _sum, _tvm as _matmul_tvm
    _matmul_tvm()                                   # binds the vector helpers' tirx
    H, KVH, d, rep, NL = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_rep, cfg.n_layers
    HD, W = H * d, 16
    if d % W:
        return attention_kernel(cfg, prob_bits, q_bits, quant=True)
    q_ln2, q_b, q_c, _ = exp_consts(SCORE_F)
    qdt, P, BL = "int8" if q_bits == 8 else "int16", (1 << prob_bits) - 1, 256
    n_ctx = tirx.Var("n_ctx", "int32")
    n = tirx.Var("T", "int32") if T is None else T
    rows = T_.parallel if T is None else T_.serial

    def dot(q8, kc, layer, t, h, l):
        return _hsum(_sum([tirx.Cast(f"int32x{W}", q8[t, tirx.Ramp(h * d + W * c, 1, W)])
                           * tirx.Cast(f"int32x{W}", kc[layer, l, h // rep, tirx.Ramp(W * c, 1, W)])
                           for c in range(d // W)]), W, "int32")

    def score(acc, qa, ka, layer, t, h, l, sc_m, sc_s):
        a = ka[layer, l, h // rep]
        sq = te.max(bitlen(qa[t, h]) - _c(16), _c(0))
        sk = te.max(bitlen(a) - _c(16), _c(0))
        t1 = rshift_round(acc * rshift_round(qa[t, h], sq), q_bits) * rshift_round(a, sk)
        return rshift_round(t1 * sc_m, sc_s - _c(q_bits) - sq - sk)

    @T_.prim_func
    def attn(q8: T_.Buffer((n, HD), qdt), qa: T_.Buffer((n, H), I64), kc: T_.Buffer((NL, n_ctx, KVH, d), "int8"),
             ka: T_.Buffer((NL, n_ctx, KVH), I64), vc: T_.Buffer((NL, n_ctx, KVH, d), "int8"),
             om: T_.Buffer((HD,), I64), osh: T_.Buffer((HD,), I64), layer: T_.int32, pos: T_.int32,
             sc_m: T_.int64, sc_s: T_.int64, out8: T_.Buffer((n, HD), "int8"), amax: T_.Buffer((n, 1), I64)):
        T_.func_attr({"tir.noalias": True})
        sc = T_.alloc_buffer((n, n_ctx), I64)
        p32 = T_.alloc_buffer((n, n_ctx), "int32")
        pv = T_.alloc_buffer((n, d), "int32")
        o = T_.alloc_buffer((n, HD), I64)
        st = T_.alloc_buffer((n, 2), I64)             # row max, then row total / output amax
        inv = T_.alloc_buffer((n,), "float64")
        for t in rows(n):
            for h in range(H):
                for l in range(pos + t + 1):
                    sc[t, l] = T_.Cast(I64, dot(q8, kc, layer, t, h, l))     # stored first: score() uses it twice
                    sc[t, l] = score(sc[t, l], qa, ka, layer, t, h, l, sc_m, sc_s)
                st[t, 0] = sc[t, 0]
                for l in range(pos + t + 1):
                    st[t, 0] = T_.max(st[t, 0], sc[t, l])
                st[t, 1] = T_.int64(0)
                for l in range(pos + t + 1):
                    sc[t, l] = int_exp(sc[t, l] - st[t, 0], q_ln2, q_b, q_c)
                    st[t, 1] = st[t, 1] + sc[t, l]
                inv[t] = T_.float64(1) / T_.Cast("float64", st[t, 1] * T_.int64(2))
                for l in range(pos + t + 1):
                    p32[t, l] = T_.Cast("int32", round_div_by(sc[t, l] * T_.int64(P), st[t, 1], inv[t]))
                for c in T_.vectorized(d):
                    o[t, h * d + c] = T_.int64(0)
                for lb in range((pos + t + BL) // BL):
                    for c in T_.vectorized(d):
                        pv[t, c] = 0
                    for l in T_.serial(lb * BL, T_.min(pos + t + 1, lb * BL + BL)):
                        for c in T_.vectorized(d):
                            pv[t, c] = pv[t, c] + p32[t, l] * T_.Cast("int32", vc[layer, l, h // rep, c])
                    for c in T_.vectorized(d):
                        o[t, h * d + c] = o[t, h * d + c] + T_.Cast(I64, pv[t, c])
            st[t, 1] = T_.int64(0)
            for i in range(HD):
                o[t, i] = rshift_round(o[t, i] * om[i], osh[i])
                st[t, 1] = T_.max(st[t, 1], T_.abs(o[t, i]))
            amax[t, 0] = st[t, 1]
            st[t, 1] = T_.max(st[t, 1], T_.int64(1))
            inv[t] = T_.float64(1) / T_.Cast("float64", st[t, 1] * T_.int64(2))
            for i in range(HD):
                out8[t, i] = T_.Cast("int8", round_div_by(T_.int64(127) * o[t, i], st[t, 1], inv[t]))
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


def silu_quant_kernel(F: int, T: int | None = None):
    """Fast path: the gate|up matmul's output [T, 2F] -> SiLU(gate) * up -> per-token int8 (ffn_down's input).

    Symbolic T (prefill): one row at a time (its SiLU, amax and int8 stay in cache), rows split over threads,
    each step stored before the next reads it (one nested expression would repeat the exp many times).
    T = 1 (decode): the TE stages, serially (measured faster for one row), as a parallel loop's thread wake-up
    costs more than its ~15 us of work."""
    from tvm import te, tirx
    from tvm.script import tirx as T_
    if T == 1:
        gu = te.placeholder((1, 2 * F), I64, name="gu")
        consts = [te.var(n, I64) for n in _SILU_ARGS]
        return _func([gu, *consts, *_quant(_silu_mul(gu, gu, 1, F, consts, uc0=F), 1, 1, F)])
    n = tirx.Var("T", "int32")

    @T_.prim_func
    def silu(gu: T_.Buffer((n, 2 * F), I64), fshift: T_.int64, q_ln2: T_.int64, q_b: T_.int64, q_c: T_.int64,
             one: T_.int64, shift_h: T_.int64, q: T_.Buffer((n, F), "int8"), amax: T_.Buffer((n, 1), I64)):
        T_.func_attr({"tir.noalias": True})
        xe = T_.alloc_buffer((n, F), I64)
        e = T_.alloc_buffer((n, F), I64)
        h = T_.alloc_buffer((n, F), I64)
        inv = T_.alloc_buffer((n,), "float64")
        for t in T_.parallel(n):
            amax[t, 0] = T_.int64(0)
            for i in range(F):
                xe[t, i] = rshift_round(gu[t, i], fshift)
                e[t, i] = int_exp(-T_.abs(xe[t, i]), q_ln2, q_b, q_c)
                e[t, i] = round_div(T_.Select(xe[t, i] >= T_.int64(0), one, e[t, i]) << T_.int64(SIG_F), one + e[t, i])
                h[t, i] = rshift_round(gu[t, i] * e[t, i], SIG_F)
                h[t, i] = rshift_round(h[t, i] * gu[t, F + i], shift_h)
                amax[t, 0] = T_.max(amax[t, 0], T_.abs(h[t, i]))
            top = T_.max(amax[t, 0], T_.int64(1))
            inv[t] = T_.float64(1) / T_.Cast("float64", top * T_.int64(2))
            for i in range(F):
                q[t, i] = T_.Cast("int8", round_div_by(T_.int64(127) * h[t, i], top, inv[t]))
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


def _signature():
    from tvm import te
    out = te.compute((1,), lambda i: te.const(1, "int32"), name="out")
    return te.create_prim_func([out])


def build_int_module(cfg: ModelConfig, qc: QuantConfig, tvm_target=None):
    """The IRModule of every integer kernel, named as edgellm.runtime.tvm_int_backend.int_kernel_names says;
    the fast matmuls use `tvm_target`'s int8 dot-product instructions (default: this machine's)."""
    tvm = _tvm()
    names = int_kernel_names(cfg, qc)
    funcs = {names["signature"]: _signature(),
             names["embed"]: embed_kernel(cfg.vocab_size, cfg.dim)}
    if names["fast"]:
        from .tvm_int_matmul import int_matmul_func
        target = host_target() if tvm_target is None else tvm_target
        funcs.update({names["norm_quant"]: norm_quant_kernel(cfg.dim, False),
                      names["res_norm_quant"]: norm_quant_kernel(cfg.dim, True),
                      names["qkv_post"]: qkv_post_kernel(cfg, qc.q_bits),
                      names["attention_q8"]: attention_rows_kernel(cfg, qc.prob_bits, qc.q_bits),
                      names["attention_q8_t1"]: attention_rows_kernel(cfg, qc.prob_bits, qc.q_bits, 1),
                      names["silu_quant"]: silu_quant_kernel(cfg.ffn_dim),
                      names["silu_quant_t1"]: silu_quant_kernel(cfg.ffn_dim, 1)})
        for (r, c, b, T), n in names["mm"].items():
            funcs[n] = int_matmul_func(r, c, b, qc.group_size if b == 4 else None, target, T)
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
