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
           "w8a8-static-q16": dict(scheme="w8a8", act="static", q_bits=16)}   # static int8 inputs, int16 queries
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
        r = build_int_kernels(qm, host_target(), d / f"{label}.so")
        assert r.seconds < 30, f"compiling the integer kernels took {r.seconds:.1f} s"
        out[label] = (qm, r.path)
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


@pytest.mark.parametrize("scheme", ["w4a8-g32-asym-mp", "w4a8-g64-fmin", "w8a8-static-q16"])
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
            q8, amax = run(lib[names["quant"][(1, K, 127)]], z, out=[((T, K), np.int8), ((T, 1), np.int64)])
            m, s, pre = consts
        got, = run(lib[names["linear"][(N, K, kind)]], q8, amax, *weights, m.astype(np.int64), s.astype(np.int64),
                   int(pre), out=[((T, N), np.int64)])
        assert np.array_equal(got, lin(z, consts)), name
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
    H, KVH, d = c.n_heads, c.n_kv_heads, c.head_dim
    qkv = activations(T, (H + 2 * KVH) * d, bits=30)
    cos, sin = IR.rope_q15(c, 40)
    pos = 40 - T
    got = run(lib[names["qkv_post"]], qkv, cos, sin, pos, L["vm"].astype(np.int64), L["vsh"].astype(np.int64),
              out=[((T, H * d), np.int8), ((T, H), np.int64), ((T, KVH * d), np.int8), ((T, KVH), np.int64),
                   ((T, KVH * d), np.int8)])
    q, k, v = np.split(qkv, [H * d, (H + KVH) * d], axis=1)
    rope = lambda z, h: IR.int_rope(z.reshape(T, h, d), cos[pos:], sin[pos:], c.rope_neox, c.rope_dim)  # noqa: E731
    want = [*IR.quant_dynamic(rope(q, H)), *IR.quant_dynamic(rope(k, KVH)),
            np.clip(IR.requant(v, L["vm"], L["vsh"]), -127, 127)]
    assert all(np.array_equal(g, w.reshape(g.shape)) for g, w in zip(got, want))
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
                                          ("w4a8-g64-fmin", 1), ("w8a8-static-q16", 5)])
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
