"""Integer TVM kernels (edgellm.compiler.tvm_int) against the numpy integer reference, bit for bit.

Each kernel is compared with the intref function it implements, on random inputs shaped like the model's
and on edge cases (zero rows, amax beyond 16 bits, negative values, causal-masked softmax rows); then the whole
TvmIntBackend against IntBackend(qm, "integer") with np.array_equal on the logits of a prefill and of decode
steps, for w8a8 and w4a8 (symmetric, symmetric with mixed int8/int4 precision, asymmetric int zero with mixed
precision, fp16 group minimum) and static int8 activations with int16 queries. w8a8 and symmetric w4a8 run the
fast path (fused matmuls with the requant inside, fused norm / RoPE / SiLU / attention + int8 kernels, each
checked against intref too); the others the generic one-kernel-per-op path. Finally the same kernels,
cross-compiled for rpi5, run by the edgellm runtime in arm64 python under qemu and dump logits the host compares.
"""
from __future__ import annotations

import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

from conftest import require
from test_tvm import EM_AARCH64, REPO, arm_rootfs, finish_on_arm, require_tool, start_on_arm  # noqa: F401
from tinymodels import TinySpec, check_forward_errors, write_tiny_gguf

from edgellm.errors import EdgeLLMError
from edgellm.runtime import intref as IR
from edgellm.runtime.int_backend import IntBackend
from edgellm.runtime.loader import load_model

RNG = np.random.default_rng(7)
SCHEMES = {"w8a8": dict(scheme="w8a8"),
           "w4a8-g32": dict(scheme="w4a8", group_size=32),
           "w4a8-g32-mp": dict(scheme="w4a8", group_size=32, max_bpw=5.5),    # fast path, fused groups split
           "w4a8-g32-asym-mp": dict(scheme="w4a8", group_size=32, symmetric=False, max_bpw=5.5),  # some int8 linears
           "w4a8-g64-fmin": dict(scheme="w4a8", group_size=64, symmetric=False, zero="fp16"),
           "w8a8-static-q16": dict(scheme="w8a8", act="static", q_bits=16),   # static int8 inputs, int16 queries
           # int8 inputs per 32 channels, Q4_1-style groups, some int8 linears (generic path)
           "w4a8-g32-fmin-block-mp": dict(scheme="w4a8", group_size=32, symmetric=False, zero="fp16", act="block",
                                          max_bpw=5.5)}
TOKENS = np.array([5, 100, 7, 42, 3, 9, 200, 11])
STEPS = [17, 250, 3, 64, 8, 1, 99, 12]


def require_tvm():
    require("tvm_ffi", "the tvm-int backend runs kernels through the TVM runtime")
    return require("tvm", "TVM compiles the kernels")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("tvm_int") / "tiny.gguf",
                           TinySpec(n_layers=2, dim=64, ffn_dim=128, seed=3))
    return load_model(path)


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """scheme -> (QuantizedModel, host library path): calibrated on random token chunks, compiled once."""
    require_tvm()
    from edgellm.compiler.quantize import quantize_model
    from edgellm.compiler.tvm_build import host_target
    from edgellm.compiler.tvm_int import build_int_kernels
    d = tmp_path_factory.mktemp("tvm_int_libs")
    rng = np.random.default_rng(0)
    chunks = [list(rng.integers(3, tiny.config.vocab_size, 128)) for _ in range(2)]
    out = {}
    for label, kw in SCHEMES.items():
        qm = quantize_model(tiny.config, tiny.weights, IR.QuantConfig(calib_tokens=256, **kw), chunks,
                            progress=False)
        out[label] = (qm, build_int_kernels(qm, host_target(), d / f"{label}.so").path)
    return out


@pytest.fixture(scope="module")
def ops(built):
    """scheme -> (prepared IntTransformer, loaded library, kernel names)."""
    from edgellm.runtime.tvm_backend import load_library
    from edgellm.runtime.tvm_int_backend import int_kernel_names
    out = {}
    for label, (qm, lib) in built.items():
        ref = IR.IntTransformer(qm, "integer")
        ref.prepare()
        out[label] = (ref, load_library(lib), int_kernel_names(qm.config, qm.qconfig))
    return out


def run(fn, *args, out):
    """Call kernel fn on numpy arrays (copied into aligned TVM tensors) and python ints; return the outputs."""
    from edgellm.runtime.tvm_int_backend import int_buffer
    bufs = [int_buffer(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in args]
    outs = [int_buffer(shape, dt) for shape, dt in out]
    fn(*[b.t if hasattr(b, "t") else b for b in bufs], *[o.t for o in outs])
    return [o.np.copy() for o in outs]


def activations(T: int, K: int, bits: int = 24) -> np.ndarray:
    """int64 rows of mixed magnitude and sign: a zero row, small rows, and rows past 2^bits."""
    z = RNG.integers(-(1 << 12), 1 << 12, size=(T, K)) * (1 << RNG.integers(0, bits - 12, size=(T, 1)))
    z[0] = 0
    if T > 2:
        z[1, :] = -RNG.integers(0, 5, size=K)             # all non-positive, tiny
        z[2, 3] = (1 << 30) + 12345                        # one huge outlier: amax bit length 31
    return z.astype(np.int64)


# ---------------------------------------------------------------- primitives

def test_integer_helpers_match_intref():
    """rshift_round, bitlen, isqrt, int_exp as TVM expressions == intref's numpy, across the int64 range."""
    tvm = require_tvm()
    from tvm import te
    from edgellm.compiler import tvm_int as TI
    from edgellm.runtime.tvm_int_backend import int_buffer
    n = te.var("n")
    x = te.placeholder((n,), "int64", name="x")
    s = te.placeholder((n,), "int64", name="s")
    outs = [te.compute((n,), lambda i: TI.rshift_round(x[i], s[i]), name="rsr"),
            te.compute((n,), lambda i: TI.rshift_round(x[i], 5), name="rsr5"),
            te.compute((n,), lambda i: TI.rshift_round(x[i], -3), name="lsh3"),
            te.compute((n,), lambda i: TI.bitlen(te.abs(x[i])), name="bitlen"),
            te.compute((n,), lambda i: TI.int_exp(-te.abs(x[i]) >> 24, *IR.exp_consts(12)[:3]), name="exp")]
    nn = te.compute((n,), lambda i: te.abs(x[i]), name="nn")
    outs.append(TI.isqrt_stages(nn, n))
    lib = tvm.compile(tvm.IRModule({"f": te.create_prim_func([x, s, *outs]).with_attr("global_symbol", "f")}),
                      target="llvm")
    k = np.concatenate([np.arange(-3000, 3000), RNG.integers(-(1 << 62), 1 << 62, 6000),
                        [(1 << 62) - 1, -(1 << 62), 1 << 52, (1 << 52) - 1, 1 << 40, (1 << 40) - 1]]).astype(np.int64)
    sh = RNG.integers(-8, 70, size=k.shape).astype(np.int64)
    xb, sb = int_buffer(k), int_buffer(sh)
    res = [int_buffer(k.shape, np.int64) for _ in outs]
    lib["f"](xb.t, sb.t, *[r.t for r in res])
    small = np.abs(k) < (1 << 50)                        # left shifts of huge values overflow in both: not compared
    pos = sh > 0
    want = IR.rshift_round(k, sh)
    assert np.array_equal(res[0].np[pos | small], want[pos | small])
    assert np.array_equal(res[1].np, IR.rshift_round(k, 5))
    assert np.array_equal(res[2].np[small], IR.rshift_round(k, -3)[small])
    assert np.array_equal(res[3].np, IR.bitlen(np.abs(k)))
    assert np.array_equal(res[4].np, IR.int_exp(-np.abs(k) >> 24, 12)[0])
    assert np.array_equal(res[5].np, IR.isqrt(np.abs(k)))


# ---------------------------------------------------------------- kernels vs intref

@pytest.mark.parametrize("T", [1, 6])
def test_norm_kernel(ops, T):
    ref, lib, names = ops["w8a8-static-q16"]
    D = ref.cfg.dim
    x = activations(T, D, bits=31)
    for g in (ref.layers[0]["g1"], ref.g_out, RNG.integers(-(1 << 19), 1 << 19, D)):
        g = np.asarray(g, np.int64)
        got, = run(lib[names["norm"]], x, g, ref.eps_q, out=[((T, D), np.int64)])
        assert np.array_equal(got, ref._int_norm(x, g))


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("scheme", ["w4a8-g64-fmin", "w8a8-static-q16"])  # int8 and int16 (queries) outputs
def test_quant_kernels(ops, scheme, T):
    ref, lib, names = ops[scheme]
    for (G, K, qmax), fname in names["quant"].items():
        z = activations(T, G * K, bits=40)
        q, amax = run(lib[fname], z, out=[((T, G * K), np.int8 if qmax == 127 else np.int16), ((T, G), np.int64)])
        want_q, want_a = IR.quant_dynamic(z.reshape(T, G, K), qmax)
        assert np.array_equal(q, want_q.reshape(T, -1)) and np.array_equal(amax, want_a.reshape(T, G)), fname


@pytest.mark.parametrize("scheme", ["w4a8-g32-asym-mp", "w4a8-g64-fmin", "w8a8-static-q16", "w4a8-g32-fmin-block-mp"])
@pytest.mark.parametrize("T", [1, 7])
def test_linear_kernels(built, ops, scheme, T):
    """Input quantization kernel (per token, or static) + integer linear kernel == IntLinear.__call__, for every
    block linear (int8 or int4 per its own bits) and the head."""
    from edgellm.runtime.tvm_int_backend import linear_weights
    qm, _ = built[scheme]
    ref, lib, names = ops[scheme]
    t, qc = qm.tensors, qm.qconfig
    kinds = set()
    head = ("output", ref.head, ref.c_head, [t.get("output.q", t["token_embd.q"])], "w8")
    for name, lin, consts, weights, kind in [head] + [
            (f"blk.{i}.{n}", L[n], L["c_" + n], linear_weights(t, f"blk.{i}.{n}.weight", qc),
             f"w{IR.linear_bits(t, f'blk.{i}.{n}.weight', qc)}") for i, L in enumerate(ref.layers) for n in IR.LINEARS]:
        kinds.add(kind)
        N, K = lin.w.shape
        z = activations(T, K, bits=40)
        if isinstance(consts, IR.StaticConsts):
            q8, = run(lib[names["static_quant"][K]], z, consts.cap, consts.m_in, consts.s_in, out=[((T, K), np.int8)])
            amax, (m, s, pre) = np.ones((T, 1), np.int64), (consts.m, consts.s, consts.pre)
        else:
            B = qc.act_block                                   # per-block amax [T, K / B], or per token
            G, W = (K // B, B) if B else (1, K)
            q8, amax = run(lib[names["quant"][(G, W, 127)]], z, out=[((T, K), np.int8), ((T, G), np.int64)])
            m, s, pre = consts
        got, = run(lib[names["linear"][(N, K, kind)]], q8, amax, *weights, m.astype(np.int64), s.astype(np.int64),
                   int(pre), out=[((T, N), np.int64)])
        assert np.array_equal(got, lin(z, consts, qc.act_block)), name
    if qc.max_bpw is not None:
        assert kinds == {"w4", "w8"}, "the mixed-precision model should have int4 and int8 block linears"


@pytest.mark.parametrize("T", [1, 4])
def test_rope_vquant_silu_residual_embed_kernels(ops, T):
    ref, lib, names = ops["w8a8-static-q16"]
    c = ref.cfg
    cos, sin = IR.rope_q15(c, 40)
    for heads, key in ((c.n_heads, "rope_q"), (c.n_kv_heads, "rope_k")):
        x = activations(T, heads * c.head_dim, bits=30)
        for pos in (0, 9, 40 - T):
            got, = run(lib[names[key]], x, cos, sin, pos, out=[(x.shape, np.int64)])
            want = IR.int_rope(x.reshape(T, heads, c.head_dim), cos[pos:pos + T], sin[pos:pos + T],
                               c.rope_neox, c.rope_dim)
            assert np.array_equal(got, want.reshape(T, -1)), f"{key} pos={pos}"
    L = ref.layers[1]
    v = activations(T, c.n_kv_heads * c.head_dim, bits=28)
    got, = run(lib[names["vquant"]], v, L["vm"].astype(np.int64), L["vsh"].astype(np.int64), out=[(v.shape, np.int8)])
    assert np.array_equal(got, np.clip(IR.requant(v, L["vm"], L["vsh"]), -127, 127))
    g, u = activations(T, c.ffn_dim, bits=26), activations(T, c.ffn_dim, bits=20)
    for fg, shift_h in ((L["fg"], L["shift_h"]), (9, 3), (20, -2), (12, 0)):    # f below, above, at SCORE_F
        fe = min(int(fg), IR.SCORE_F)
        consts = (int(fg) - fe, *IR.exp_consts(fe), int(shift_h))
        got, = run(lib[names["silu_mul"]], g, u, *consts, out=[(g.shape, np.int64)])
        assert np.array_equal(got, IR.rshift_round(IR.int_silu(g, int(fg)) * u, int(shift_h))), (fg, shift_h)
    lim = (1 << 31) - 1
    x, y = activations(T, c.dim, bits=31), activations(T, c.dim, bits=31)
    got, = run(lib[names["residual"]], x, y, out=[(x.shape, np.int64)])
    assert np.array_equal(got, np.clip(x + y, -lim, lim))
    tok = RNG.integers(0, c.vocab_size, T).astype(np.int64)
    got, = run(lib[names["embed"]], ref.emb_q, tok, ref.emb_m.astype(np.int64), ref.emb_sh.astype(np.int64),
               out=[((T, c.dim), np.int64)])
    want = IR.rshift_round(ref.emb_q[tok].astype(np.int64) * ref.emb_m[tok, None], ref.emb_sh[tok, None])
    assert np.array_equal(got, want)


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-static-q16"])          # int8 and int16 queries
@pytest.mark.parametrize("T,pos", [(1, 0), (1, 11), (6, 0), (5, 7)])
def test_attention_kernel(ops, scheme, T, pos):
    """Integer scores, softmax over causal-masked rows, P @ V, requant == IntTransformer._int_attention (the fast
    path's kernel also quantizes it per token). Cache positions past pos + T hold junk that must not leak in."""
    ref, lib, names = ops[scheme]
    q_max = (1 << (ref.qc.q_bits - 1)) - 1
    c = ref.cfg
    n_ctx, layer = 20, 1
    L = ref.layers[layer]
    shape = (c.n_layers, n_ctx, c.n_kv_heads, c.head_dim)
    kc, vc = (RNG.integers(-127, 128, size=shape).astype(np.int8) for _ in range(2))
    ka = RNG.integers(1, 1 << 24, size=shape[:3]).astype(np.int64)                # bit lengths up to 24
    ka[layer, 0] = 0                                                               # an all-zero key row
    q8 = RNG.integers(-q_max, q_max + 1, size=(T, c.n_heads * c.head_dim)).astype(np.int8 if q_max == 127 else np.int16)
    qa = (RNG.integers(0, 1 << 20, size=(T, c.n_heads)) << RNG.integers(0, 12, size=(T, c.n_heads))).astype(np.int64)
    qa[0, 0] = 0
    args = (q8, qa, kc, ka, vc, L["om"].astype(np.int64), L["osh"].astype(np.int64), layer, pos,
            *[int(v) for v in L["sc"]])
    S = pos + T
    want = ref._int_attention(q8.reshape(T, c.n_heads, c.head_dim), qa, kc[layer, :S], ka[layer, :S],
                              vc[layer, :S], pos, L)
    if names["fast"]:
        got = run(lib[names["attention_q8"]], *args, out=[((T, c.n_heads * c.head_dim), np.int8), ((T, 1), np.int64)])
        want = IR.quant_dynamic(want)
    else:
        got, want = run(lib[names["attention"]], *args, out=[((T, c.n_heads * c.head_dim), np.int64)]), [want]
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


# ---------------------------------------------------------------- fast path kernels vs intref

def check_qkv_post(ref, lib, names, T: int, n_ctx: int = 30, n_rope: int = 40, big: bool = False):
    """qkv_post == intref's RoPE + quant_dynamic of q and k and the static v requant, with k8 / amax / v8 written
    into rows pos .. pos + T - 1 of one layer of a junk-filled cache (IntKVCache.update_int) and nothing else
    changed; the RoPE tables longer than the cache. big: heads with amax past the vector quantization's range."""
    from edgellm.runtime.tvm_int_backend import int_buffer
    c, L, layer = ref.cfg, ref.layers[1], 1
    H, KVH, d = c.n_heads, c.n_kv_heads, c.head_dim
    qkv = activations(T, (H + 2 * KVH) * d, bits=30)
    if big:
        qkv[:, :d] <<= 26                                   # first q head past 2^51 / 255
        qkv[:, H * d:(H + 1) * d] <<= 26                    # first k head too
    cos, sin = IR.rope_q15(c, n_rope)
    pos = n_ctx - T
    shape = (c.n_layers, n_ctx, KVH, d)
    cache = [RNG.integers(-127, 128, size=shape).astype(np.int8), RNG.integers(0, 1 << 30, size=shape[:3]),
             RNG.integers(-127, 128, size=shape).astype(np.int8)]
    bufs = [int_buffer(a) for a in cache]
    q_dt = np.int8 if ref.qc.q_bits == 8 else np.int16
    got = run(lib[names["qkv_post"]], qkv, cos, sin, pos, L["vm"].astype(np.int64), L["vsh"].astype(np.int64),
              *bufs, layer, out=[((T, H * d), q_dt), ((T, H), np.int64)])
    q, k, v = np.split(qkv, [H * d, (H + KVH) * d], axis=1)
    rope = lambda z, h: IR.int_rope(z.reshape(T, h, d), cos[pos:pos + T], sin[pos:pos + T],  # noqa: E731
                                    c.rope_neox, c.rope_dim)
    want_q = IR.quant_dynamic(rope(q, H), (1 << (ref.qc.q_bits - 1)) - 1)
    assert all(np.array_equal(g, w.reshape(g.shape)) for g, w in zip(got, want_q))
    k8, ka = IR.quant_dynamic(rope(k, KVH))
    v8 = np.clip(IR.requant(v, L["vm"], L["vsh"]), -127, 127).reshape(T, KVH, d)
    want = IR.IntKVCache(c, n_ctx)
    want.k[...], want.kamax[...], want.v[...] = cache
    want.update_int(layer, pos, k8, ka[..., 0], v8)
    for b, w in zip(bufs, (want.k, want.kamax, want.v)):
        assert np.array_equal(b.np, w)


@pytest.mark.parametrize("T", [1, 5])
def test_fused_elementwise_kernels(ops, T):
    """norm + quant, residual + norm + quant, RoPE + quant of q|k|v, SiLU * up + quant == intref's steps."""
    ref, lib, names = ops["w4a8-g32"]
    c, L, lim = ref.cfg, ref.layers[1], (1 << 31) - 1
    x, o = activations(T, c.dim, bits=31), activations(T, c.dim, bits=31)
    q8 = ((T, c.dim), np.int8), ((T, 1), np.int64)
    got = run(lib[names["norm_quant"]], x, L["g1"].astype(np.int64), ref.eps_q, out=q8)
    want = IR.quant_dynamic(ref._int_norm(x, L["g1"]))
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    got = run(lib[names["res_norm_quant"]], x, o, ref.g_out.astype(np.int64), ref.eps_q, out=[(x.shape, np.int64), *q8])
    xo = np.clip(x + o, -lim, lim)
    assert all(np.array_equal(g, w) for g, w in zip(got, (xo, *IR.quant_dynamic(ref._int_norm(xo, ref.g_out)))))
    check_qkv_post(ref, lib, names, T)
    g, u = activations(T, c.ffn_dim, bits=26), activations(T, c.ffn_dim, bits=20)
    fg = int(L["fg"])
    fe = min(fg, IR.SCORE_F)
    got = run(lib[names["silu_quant"]], np.concatenate([g, u], axis=1), fg - fe, *IR.exp_consts(fe),
              int(L["shift_h"]), out=[((T, c.ffn_dim), np.int8), ((T, 1), np.int64)])
    want = IR.quant_dynamic(IR.rshift_round(IR.int_silu(g, fg) * u, int(L["shift_h"])))
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8-g32", "w4a8-g32-mp"])
@pytest.mark.parametrize("T", [1, 7])
def test_fused_matmuls(built, scheme, T):
    """Each fused group's matmul(s) with the requant inside (q|k|v and gate|up concatenated, or split where
    the members' widths differ) and the head == IntLinear.__call__ of each member, column block by block."""
    from edgellm.runtime.tvm_int_backend import FUSED, TvmIntBackend, int_buffer
    qm, lib = built[scheme]
    ref = IR.IntTransformer(qm, "integer")
    ref.prepare()
    be = TvmIntBackend(qm, lib, chunk=8)
    be.prepare()
    splits = 0
    for L, layer in [(ref.layers[i], be.layers[i]) for i in range(len(ref.layers))] + [(None, None)]:
        for group, members in (FUSED.items() if L else [("head", ["head"])]):
            lins = [(L[n], L["c_" + n]) for n in members] if L else [(ref.head, ref.c_head)]
            grp = layer[group] if L else be.head
            splits += len(grp["parts"]) > 1
            z = activations(T, lins[0][0].w.shape[1], bits=40)
            q8, amax = (int_buffer(a) for a in IR.quant_dynamic(z))
            out = int_buffer((T, grp["rows"]), np.int64)
            be._matmul(grp, q8, amax, out, T)
            assert np.array_equal(out.np, np.concatenate([lin(z, cs) for lin, cs in lins], axis=1)), group
    assert (splits > 0) == (qm.qconfig.max_bpw is not None), "mixed widths should split some groups"


# ---------------------------------------------------------------- whole model

@pytest.mark.parametrize("scheme,chunk", [("w8a8", 32), ("w4a8-g32", 3), ("w4a8-g32-mp", 4), ("w4a8-g32-asym-mp", 32),
                                          ("w4a8-g64-fmin", 1), ("w8a8-static-q16", 5),
                                          ("w4a8-g32-fmin-block-mp", 3)])
def test_whole_model_logits_bit_identical(built, scheme, chunk):
    """Prefill of 8 tokens (in chunks of `chunk`) then 8 decode steps: logits and int8 KV cache equal exactly."""
    from edgellm.runtime.tvm_int_backend import TvmIntBackend
    qm, lib = built[scheme]
    ref = IntBackend(qm, "integer")
    be = TvmIntBackend(qm, lib, threads=2, chunk=chunk)
    kv_ref, kv = ref.new_cache(24), be.new_cache(24)
    a = ref.forward(TOKENS, 0, kv_ref, all_logits=True)
    b = be.forward(TOKENS, 0, kv, all_logits=True)
    assert b.dtype == np.float32 and b.shape == a.shape == (len(TOKENS), qm.config.vocab_size)
    assert np.array_equal(a, b)
    last = be.forward(TOKENS[-3:], len(TOKENS) - 3, kv)          # rewrite positions 5..7, last logits only
    assert np.array_equal(last, a[-1:])
    for step, tok in enumerate(STEPS):
        pos = len(TOKENS) + step
        a, b = ref.forward([tok], pos, kv_ref), be.forward([tok], pos, kv)
        assert b.shape == (1, qm.config.vocab_size) and np.array_equal(a, b), f"decode step {step}"
    for name in ("k", "v", "kamax"):
        assert np.array_equal(getattr(kv, name), getattr(kv_ref, name)), name


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_token_kernel_is_the_per_kernel_plan(built, threads):
    """All layers in one launch (edgellm.compiler.tvm_int_token: serial parts on thread 0, barriers between
    phases, weights stacked over the layers) gives the 9-kernels-a-layer plan's logits and KV cache exactly,
    for any thread count; a scheme whose fused groups split (mixed widths) keeps the 9 kernels."""
    from edgellm.compiler.tvm_int_matmul import kernel_isa
    from edgellm.compiler.tvm_build import host_target
    from edgellm.runtime.tvm_int_backend import TvmIntBackend
    qm, lib = built["w4a8-g32"]
    fused, plain = (TvmIntBackend(qm, lib, threads=threads, token_kernel=k) for k in (True, False))
    kv_f, kv_p = fused.new_cache(24), plain.new_cache(24)
    assert np.array_equal(fused.forward(TOKENS, 0, kv_f), plain.forward(TOKENS, 0, kv_p))
    if kernel_isa(host_target()) not in ("avx2", "avx512vnni"):     # built for x86 lane-layout kernels only
        assert fused.token_t1 is None
        return
    assert fused.token_t1 is not None and plain.token_t1 is None
    plan = fused._plan(1, kv_f, "last")
    assert sum(step[0] is fused.token_t1 for step in plan) == 1 and len(plan) < 9
    for step, tok in enumerate(STEPS):
        pos = len(TOKENS) + step
        assert np.array_equal(fused.forward([tok], pos, kv_f), plain.forward([tok], pos, kv_p)), f"step {step}"
    for name in ("k", "v", "kamax"):
        assert np.array_equal(getattr(kv_f, name), getattr(kv_p, name)), name
    qm_mp, lib_mp = built["w4a8-g32-mp"]
    mixed = TvmIntBackend(qm_mp, lib_mp, threads=threads)
    kv_m = mixed.new_cache(24)
    mixed.forward(TOKENS, 0, kv_m)
    assert mixed.token_t1 is None                   # the max_bpw scheme splits some fused groups
    assert len(mixed._plan(1, kv_m, "last")) > 9 * qm_mp.config.n_layers


def test_huge_page_arena_hands_out_aligned_disjoint_arrays():
    """The weight arena: 64-byte aligned pieces from a huge-page boundary on, none overlapping; a request
    past its end comes from numpy."""
    from edgellm.runtime.tvm_backend import HUGE_PAGE, HugePageArena
    arena = HugePageArena(1 << 16)
    x, y = arena.empty((100,), np.int8), arena.empty((10, 3), np.int64)
    assert x.ctypes.data % HUGE_PAGE == 0 and y.ctypes.data % 64 == 0 and y.shape == (10, 3)
    x[:], y[:] = 1, 2
    assert (x == 1).all() and (y == 2).all() and not np.shares_memory(x, y)
    z = arena.empty((3 * HUGE_PAGE,), np.uint8)
    assert z.ctypes.data % 64 == 0 and not np.shares_memory(z, arena._buf)


def test_ab_decode_tool_runs_both_sides(built, tmp_path, capsys):
    """tools/ab_decode.py on a bundle-shaped directory: both sides decode, same logits, a ratio printed."""
    import importlib.util
    qm, lib = built["w4a8-g32"]
    (tmp_path / "quant").mkdir()
    (tmp_path / "kernels").mkdir()
    qm.save(tmp_path / "quant" / "model.npz")
    (tmp_path / "kernels" / "int.so").write_bytes(Path(lib).read_bytes())
    spec = importlib.util.spec_from_file_location("ab_decode", REPO / "tools" / "ab_decode.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for option in tool.OPTIONS:
        assert tool.main(["--bundle", str(tmp_path), "--option", option, "--rounds", "1", "--prompt-tokens", "4",
                          "--tokens", "3"]) == 0
        out = capsys.readouterr().out
        assert "same logits: True" in out and "ratio on/off:" in out
    assert tool.main(["--bundle", str(tmp_path / "missing"), "--option", "token_kernel"]) == 2


def test_errors(built):
    from edgellm.runtime.tvm_int_backend import TvmIntBackend
    qm, lib = built["w8a8"]
    _, other = built["w4a8-g32"]
    with pytest.raises(EdgeLLMError, match="not compiled for this model"):
        TvmIntBackend(qm, other).prepare()
    with pytest.raises(EdgeLLMError, match="float activations"):          # weight-only schemes are not integer
        TvmIntBackend(IR.QuantizedModel(qm.config, IR.QuantConfig("w8a16"), qm.tensors), lib)
    be = TvmIntBackend(qm, lib)
    check_forward_errors(be, IntBackend(qm).new_cache(8), qm.config.vocab_size)


@pytest.mark.parametrize("scheme", ["w4a8-g32", "w4a8-g32-mp", "w8a8", "w4a8-g32-asym-mp"])   # last: generic path
def test_prepare_from_a_file_expands_no_float_weights(built, scheme, tmp_path):
    """Loaded from its .npz, tvm-int reads each weight once into its kernel buffers and derives intref's
    constants without building IntLinear's float64 matrices (8 bytes per weight): prepare's peak allocation
    stays below that expansion, and the logits equal the int reference's."""
    import tracemalloc

    from edgellm.runtime.int_backend import NpzTensors
    from edgellm.runtime.tvm_int_backend import TvmIntBackend
    qm, lib = built[scheme]
    path = qm.save(tmp_path / "qm.npz")
    be = TvmIntBackend(path, lib, threads=2, chunk=2)
    assert isinstance(be.qmodel.tensors, NpzTensors)
    t, c = qm.tensors, qm.config
    weights = sum(np.prod(IR.linear_shape(t, n, qm.qconfig)) for n in qm.linear_names()) + c.vocab_size * c.dim
    float_bytes = 8 * weights
    tracemalloc.start()
    try:
        be.prepare()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < float_bytes / 2, f"prepare allocated {peak} bytes at its peak; float64 weights are {float_bytes}"
    ref = IntBackend(qm, "integer")
    assert np.array_equal(be.forward(TOKENS, 0, be.new_cache(12), all_logits=True),
                          ref.forward(TOKENS, 0, ref.new_cache(12), all_logits=True))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_intlinear_constants_need_no_expanded_matrix(built, scheme):
    """IntLinear.build finds acc_bits from the codes' per-group range; it equals the bound of the expanded
    matrix, which is made only when a matmul asks for w (here: after the check)."""
    qm, _ = built[scheme]
    t, qc = dict(qm.tensors), qm.qconfig
    # a row whose largest group scale holds only small codes: the first guess is not the maximum
    name = "blk.0.ffn_up.weight"
    if IR.linear_bits(t, name, qc) == 4:
        q = IR.unpack_int4(t[name + ".q"])
        g = qc.group_size
        big = np.unravel_index(np.argmax(t[name + ".scale"]), t[name + ".scale"].shape)
        q[big[0], big[1] * g:(big[1] + 1) * g] = 8 if qc.symmetric else q[big[0], big[1] * g]
        t[name + ".q"] = IR.pack_int4(q)
    for n in qm.linear_names():
        lin = IR.IntLinear.build(t, n, qc)
        assert callable(lin._w), "w is built on first use"
        w = lin.w
        bound = 127.0 * float(np.abs(w).max(initial=1)) * w.shape[1]
        assert lin.acc_bits == int(np.ceil(np.log2(bound + 1))), n
        assert np.array_equal(w, IR.IntLinear.build(t, n, qc).w) and w.dtype == np.float64


def test_npz_tensors_read_like_np_load(built, tmp_path):
    """NpzTensors (tvm-int's lazy model file) returns np.load's arrays, fills caller buffers in place, takes
    assignments, and refuses a compressed or truncated file (load_quantized then falls back or explains)."""
    from edgellm.errors import ModelFormatError
    from edgellm.runtime.int_backend import NpzTensors, load_quantized
    qm, _ = built["w4a8-g32-mp"]
    path = qm.save(tmp_path / "qm.npz")
    t = NpzTensors(path)
    assert set(t) == set(qm.tensors) | set(qm.layout()) | {"__meta__"}
    for k, a in qm.tensors.items():
        assert t.header(k) == (a.shape, a.dtype) and np.array_equal(t[k], a), k
    name = "blk.1.ffn_down.weight.q"
    out = np.zeros((qm.tensors[name].shape[0] + 2,) + qm.tensors[name].shape[1:], qm.tensors[name].dtype)
    t.read_into(name, out[1:-1])
    assert np.array_equal(out[1:-1], qm.tensors[name]) and not out[0].any() and not out[-1].any()
    with pytest.raises(ValueError, match="not"):
        t.read_into(name, out)
    t[name] = np.zeros(3)
    assert t[name].shape == (3,)
    lazy = load_quantized(path, lazy=True)
    assert lazy.qconfig == qm.qconfig and lazy.config == qm.config and "__meta__" not in lazy.tensors
    import zipfile
    v2 = tmp_path / "v2.npz"                                          # .npy format 2.0 headers read too
    with zipfile.ZipFile(v2, "w") as z, z.open("a.npy", "w") as f:
        np.lib.format.write_array(f, qm.tensors[name], version=(2, 0))
    assert np.array_equal(NpzTensors(v2)["a"], qm.tensors[name])
    packed = tmp_path / "packed.npz"
    np.savez_compressed(packed, **{k: v for k, v in np.load(path).items()})
    assert not isinstance(load_quantized(packed, lazy=True).tensors, NpzTensors)      # eager fallback
    cut = tmp_path / "cut.npz"
    cut.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match="not a readable quantized model"):
        load_quantized(cut, lazy=True)


def test_runtime_runs_without_the_compiler(built, tmp_path):
    """The device has only the TVM runtime: the backend's device entry point never imports tvm or the compiler."""
    qm, lib = built["w4a8-g32"]
    path = qm.save(tmp_path / "qm.npz")
    code = ("import sys\nfrom edgellm.runtime.tvm_int_backend import main\n"
            f"main(['--qmodel', {str(path)!r}, '--library', {str(lib)!r}, '--tokens', '1,2,3', '--steps', '4',"
            f" '--out', {str(tmp_path / 'o.npy')!r}])\n"
            "bad = sorted(k for k in sys.modules if k == 'tvm' or k.startswith(('tvm.', 'edgellm.compiler')))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    from edgellm.runtime.tvm_int_backend import run_logits
    assert np.array_equal(np.load(tmp_path / "o.npy"), run_logits(IntBackend(qm, "integer"), [1, 2, 3], [4]))


# ---------------------------------------------------------------- rpi5 (aarch64) under qemu

def test_rpi5_int_kernels_bit_identical_on_emulated_arm(built, arm_rootfs, tmp_path):  # noqa: F811
    """The same kernels cross-compiled for rpi5, run by the edgellm runtime in arm64 python under qemu:
    the logits they dump equal the host's integer reference exactly."""
    require_tool("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")
    from edgellm.compiler.tvm_int import build_int_kernels
    from edgellm.runtime.tvm_backend import elf_machine
    from edgellm.runtime.tvm_int_backend import run_logits
    procs = []
    for scheme in ("w4a8-g32-mp", "w4a8-g32-asym-mp"):    # fast and generic paths, int4 and int8 linears
        qm, _ = built[scheme]
        lib = build_int_kernels(qm, "rpi5", tmp_path / f"{scheme}-rpi5.so").path
        assert elf_machine(lib) == EM_AARCH64
        path = qm.save(tmp_path / f"{scheme}.npz")
        out = tmp_path / f"{scheme}-arm.npy"
        args = ["-m", "edgellm.runtime.tvm_int_backend", "--qmodel", str(path), "--library", str(lib),
                "--tokens", ",".join(map(str, TOKENS)), "--steps", ",".join(map(str, STEPS[:4])), "--out", str(out)]
        procs.append((qm, out, start_on_arm(arm_rootfs, args)))
    for qm, out, proc in procs:
        stdout, _ = finish_on_arm(proc)
        assert stdout.strip().splitlines()[-1] == "aarch64"
        want = run_logits(IntBackend(qm, "integer"), TOKENS, STEPS[:4])
        assert np.array_equal(np.load(out), want)


# ---------------------------------------------------------------- decode kernels (issue #5)

@pytest.mark.parametrize("scheme", ["w8a8", "w4a8-g32"])
@pytest.mark.parametrize("pos", [0, 11, 255, 256, 299])
def test_attention_t1_kernel(ops, scheme, pos):
    """The serial one-row attention (decode) == IntTransformer._int_attention + per-token int8, across the 256
    positions of one int32 P @ V block, with junk in the cache past pos that must not leak in."""
    ref, lib, names = ops[scheme]
    c, n_ctx, layer = ref.cfg, 300, 1
    L = ref.layers[layer]
    shape = (c.n_layers, n_ctx, c.n_kv_heads, c.head_dim)
    kc, vc = (RNG.integers(-127, 128, size=shape).astype(np.int8) for _ in range(2))
    vc[layer, :pos + 1] = RNG.choice([-127, 127], size=vc[layer, :pos + 1].shape)   # block sums near their bound
    ka = RNG.integers(1, 1 << 24, size=shape[:3]).astype(np.int64)
    ka[layer, 0] = 0
    q8 = RNG.integers(-127, 128, size=(1, c.n_heads * c.head_dim)).astype(np.int8)
    qa = (RNG.integers(0, 1 << 20, size=(1, c.n_heads)) << RNG.integers(0, 12, size=(1, c.n_heads))).astype(np.int64)
    S = pos + 1
    om, osh = L["om"].astype(np.int64), L["osh"].astype(np.int64)
    # as calibrated; outputs past the float64 quantization's range (its integer fallback); left shifts (osh < 0)
    for om_, osh_ in ((om, osh), (om, np.zeros_like(osh)), (om >> 8, RNG.integers(-3, 3, size=osh.shape))):
        Lx = {**L, "om": om_, "osh": osh_}
        args = (q8, qa, kc, ka, vc, om_, osh_, layer, pos, *[int(v) for v in L["sc"]])
        got = run(lib[names["attention_q8_t1"]], *args,
                  out=[((1, c.n_heads * c.head_dim), np.int8), ((1, 1), np.int64)])
        want = IR.quant_dynamic(ref._int_attention(q8.reshape(1, c.n_heads, c.head_dim), qa, kc[layer, :S],
                                                   ka[layer, :S], vc[layer, :S], pos, Lx))
        assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_round_div_by_matches_intref():
    """The float64-reciprocal division of the decode kernels == intref.round_div, at the edges of its fast range
    (|2a + b| near 2^52, exact halves, negative numerators) and past it (the integer-division fallback)."""
    tvm = require_tvm()
    from tvm import te
    from edgellm.compiler.tvm_int import round_div_by
    n = te.var("n")
    a = te.placeholder((n,), "int64", name="a")
    b = te.var("b", "int64")
    inv = te.var("inv", "float64")
    out = te.compute((n,), lambda i: round_div_by(a[i], b, inv), name="q")
    lib = tvm.compile(te.create_prim_func([a, b, inv, out]), target="llvm")
    for b_ in (1, 3, 7, 1 << 20, (1 << 40) + 1, (1 << 51) - 1, 1 << 55):
        edges = [(1 << 51) - 1, -(1 << 51), (1 << 52) // 2 - b_, (1 << 60), -(1 << 60), 0]
        av = np.concatenate([RNG.integers(-(1 << 50), 1 << 50, 200), np.arange(-40, 40) * b_ // 2, edges]).astype(np.int64)
        got = tvm.runtime.tensor(np.zeros_like(av))
        lib(tvm.runtime.tensor(av), b_, 1.0 / (2.0 * b_), got)
        assert np.array_equal(got.numpy(), IR.round_div(av, np.int64(b_))), b_


@pytest.mark.parametrize("T", [1, 33])
def test_silu_quant_kernels_one_row_and_rows(ops, T):
    """SiLU * up + int8: the vector decode kernel (one row) and the row-parallel one == intref, with a zero row,
    negative rows, gates past the exp's clamp, f below / at / above SCORE_F, and products past the float64
    quantization's range (shift_h < 0: its integer fallback)."""
    ref, lib, names = ops["w4a8-g32"]
    c, L = ref.cfg, ref.layers[0]
    g, u = activations(T, c.ffn_dim, bits=30), activations(T, c.ffn_dim, bits=20)
    for fg, shift_h in ((int(L["fg"]), int(L["shift_h"])), (9, 3), (12, 0), (20, 17), (16, -6)):
        fe = min(fg, IR.SCORE_F)
        want = IR.quant_dynamic(IR.rshift_round(IR.int_silu(g, fg) * u, shift_h))
        for name in (["silu_quant_t1"] if T == 1 else []) + ["silu_quant"]:
            got = run(lib[names[name]], np.concatenate([g, u], axis=1), fg - fe, *IR.exp_consts(fe), shift_h,
                      out=[((T, c.ffn_dim), np.int8), ((T, 1), np.int64)])
            assert all(np.array_equal(a, b) for a, b in zip(got, want)), (name, fg, shift_h)
    if T == 1:                      # the decode kernel's int32 exp needs the constants of f <= SCORE_F
        with pytest.raises(Exception, match="SCORE_F"):
            run(lib[names["silu_quant_t1"]], np.concatenate([g, u], axis=1), 0, *IR.exp_consts(IR.SCORE_F + 2), 0,
                out=[((T, c.ffn_dim), np.int8), ((T, 1), np.int64)])


@pytest.mark.parametrize("T,big", [(1, False), (1, True), (3, False), (2, True)])
def test_qkv_post_writes_the_kv_cache(ops, T, big):
    """qkv_post's RoPE + int8 q and its k / v rows written in place into the cache (see check_qkv_post)."""
    check_qkv_post(*ops["w8a8"], T, big=big)
