"""The integer reference: integer primitives against float math, and the integer-only forward on tiny models."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgellm.errors import EdgeLLMError
from edgellm.runtime import intref as IR
from edgellm.runtime.backend import NumpyBackend
from edgellm.runtime.int_backend import IntBackend
from edgellm.runtime.loader import load_model
from edgellm.runtime.model import apply_rope, rope_tables
from tinymodels import TinySpec, write_tiny_gguf

RNG = np.random.default_rng(1)


# --- primitives -----------------------------------------------------------------------------------

def test_dyadic_requant_within_one_lsb_of_float():
    acc = RNG.integers(-(1 << 24), 1 << 24, size=20000).astype(np.int64)
    for r in (3.7e-7, 1.9e-4, 0.0123, 0.5, 0.999):
        m, s = IR.dyadic(r)
        assert (1 << 30) <= int(m) < (1 << 31)
        got = IR.requant(acc, m, s)
        assert np.abs(got - np.rint(acc * r)).max() <= 1
    # per-row multipliers with a pre-shift (the path the integer linears take)
    r = RNG.uniform(1e-9, 1e-6, size=64)
    m, s = IR.dyadic(r)
    acc = RNG.integers(-(1 << 40), 1 << 40, size=(8, 64)).astype(np.int64)
    got = IR.requant(acc, m, s, pre=10)
    assert np.abs(got - np.rint(acc * r)).max() <= 1


def test_rshift_round_and_round_div():
    x = RNG.integers(-(1 << 40), 1 << 40, size=5000).astype(np.int64)
    for s in (1, 7, 20):
        assert np.array_equal(IR.rshift_round(x, s), np.floor(x / 2.0 ** s + 0.5).astype(np.int64))
    assert np.array_equal(IR.rshift_round(x, -3), x * 8)
    b = RNG.integers(1, 1 << 20, size=5000).astype(np.int64)
    assert np.array_equal(IR.round_div(x, b), np.floor(x / b + 0.5).astype(np.int64))


def test_isqrt_and_bitlen_exact():
    n = np.concatenate([np.arange(0, 5000), RNG.integers(0, 1 << 62, size=3000), [(1 << 62) - 1, 1 << 52]])
    n = n.astype(np.int64)
    assert np.array_equal(IR.isqrt(n), [math.isqrt(int(v)) for v in n])
    assert np.array_equal(IR.bitlen(n), [int(v).bit_length() for v in n])


def test_int_exp_softmax_sigmoid_silu_error_bounds():
    x = np.rint(np.linspace(-20, 0, 100001) * 4096).astype(np.int64)
    e, one = IR.int_exp(x, 12)
    assert np.abs(e / one - np.exp(x / 4096)).max() < 2.5e-3          # I-BERT's polynomial: ~2e-3
    s = np.rint(RNG.normal(0, 5, (40, 300)) * 4096).astype(np.int64)
    ref = np.exp(s / 4096 - (s / 4096).max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    assert np.abs(IR.int_softmax(s, 12, 16) / 65535 - ref).max() < 1.5e-3
    assert np.abs(IR.int_softmax(s, 12, 8) / 255 - ref).max() < 4e-3
    xs = np.rint(np.linspace(-16, 16, 50001) * 2 ** 18).astype(np.int64)
    xf = xs / 2 ** 18
    assert np.abs(IR.int_sigmoid(xs, 18) / 2 ** 16 - 1 / (1 + np.exp(-xf))).max() < 1.5e-3
    assert np.abs(IR.int_silu(xs, 18) / 2 ** 18 - xf / (1 + np.exp(-xf))).max() < 2e-3


def test_int_matmul_is_exact():
    a = RNG.integers(-127, 128, size=(33, 1536)).astype(np.int8)
    b = RNG.integers(-(1 << 22), 1 << 22, size=(70, 1536)).astype(np.int64)      # expanded int4 * mantissa
    want = a.astype(np.int64) @ b.T
    assert np.array_equal(IR.int_matmul(a, b.astype(np.float64)), want)
    big = np.full((2, 4), 1 << 40, dtype=np.int64)                                  # beyond 2^53: int64 path
    assert np.array_equal(IR.int_matmul(big, big), big @ big.T)


def test_int_rope_matches_float_rope():
    spec = load_model(write_tiny_gguf_cached()).config
    cos, sin = IR.rope_q15(spec, 64)
    x = RNG.normal(0, 3, (64, spec.n_heads, spec.head_dim))
    xi = np.rint(x * 2 ** 16).astype(np.int64)
    got = IR.int_rope(xi, cos, sin, spec.rope_neox, spec.rope_dim) / 2 ** 16
    c, s = rope_tables(spec, np.arange(64))
    assert np.abs(got - apply_rope(x, c, s, spec.rope_neox, spec.rope_dim)).max() < 1e-3


def test_int4_group_expansion_equals_per_group_integer_sum():
    """The expanded int4 matrix (q - z) * mant << shift gives the per-group integer formula exactly."""
    from edgellm.compiler.quantize.schemes import quantize_weight
    w = RNG.normal(0, 0.05, (24, 128)).astype(np.float32)
    w[3, :32] *= 1e-3                                       # a tiny group: wide exponent spread in the row
    for sym, zero in ((True, "int"), (False, "int"), (False, "fp16")):
        qc = IR.QuantConfig("w4a8", group_size=32, symmetric=sym, zero=zero)
        t = {"w." + k: v for k, v in quantize_weight(w, qc).items()}
        lin = IR.IntLinear.build(t, "w", qc)
        x = RNG.integers(-127, 128, size=(5, 128)).astype(np.int8)
        q, sc, z = IR.weight_codes(t, "w", qc)
        mant, e = np.frexp(sc.astype(np.float64))
        mant, e = np.rint(mant * 2048).astype(np.int64), e.astype(np.int64) - 11
        fmin = zero == "fp16"
        qg = q.reshape(24, 4, 32).astype(np.int64) - (0 if z is None or fmin else z[..., None].astype(np.int64))
        xg = x.reshape(5, 4, 32).astype(np.int64)
        acc_g = np.einsum("tgk,ogk->tog", xg, qg)                   # int accumulators per group
        base = np.log2(lin.row_scale).astype(np.int64)
        unit = lambda m, e: np.ldexp(m.astype(np.float64), e - base[:, None]).astype(np.int64)  # noqa: E731
        assert np.array_equal(np.ldexp(unit(mant, e).astype(np.float64), base[:, None]), sc.astype(np.float64))
        want = (acc_g * unit(mant, e)[None]).sum(-1)          # group scale in units of the row scale: an integer
        if fmin:                                                    # + group minimum * sum of the group's inputs
            mm, em = np.frexp(z.astype(np.float64))
            mm, em = np.rint(mm * 2048).astype(np.int64), em.astype(np.int64) - 11
            want += (xg.sum(-1)[:, None, :] * unit(mm, em)[None]).sum(-1)
        assert np.array_equal(IR.int_matmul(x, lin.w), want)
        # and the real value is the dequantized weight
        assert np.allclose(lin.w * lin.row_scale[:, None], IR.dequantize_linear(t, "w", qc), rtol=0, atol=1e-9)


# --- the forward passes on a tiny model -------------------------------------------------------------

_TINY = {}


def write_tiny_gguf_cached():
    if "path" not in _TINY:
        import tempfile
        d = tempfile.mkdtemp()
        _TINY["path"] = write_tiny_gguf(f"{d}/tiny.gguf", TinySpec(n_layers=2, dim=64, ffn_dim=128, seed=3))
    return _TINY["path"]


@pytest.fixture(scope="module")
def tiny():
    return load_model(write_tiny_gguf_cached())


@pytest.fixture(scope="module")
def chunks(tiny, shakespeare_dir):
    from edgellm.compiler.quantize import calibration_chunks, calibration_files
    return calibration_chunks(tiny.tokenizer, calibration_files(shakespeare_dir)[:2], 512, n_ctx=128)


FAST = dict(smooth=False, clip_search=False)        # the scale and clip searches are tested in test_quantize.py


@pytest.fixture(scope="module")
def qmodels(tiny, chunks):
    from edgellm.compiler.quantize import quantize_model
    out = {}
    for label, qc in {"w8a8": IR.QuantConfig("w8a8", calib_tokens=512),
                      "w4a8": IR.QuantConfig("w4a8", group_size=32, symmetric=False, calib_tokens=512),
                      "w4a16": IR.QuantConfig("w4a16", group_size=32, calib_tokens=512),
                      "w4a8-mp": IR.QuantConfig("w4a8", group_size=32, calib_tokens=512, max_bpw=5.0, **FAST),
                      "w8a8-static": IR.QuantConfig("w8a8", calib_tokens=512, act="static", **FAST),
                      "w4a8-fmin-block": IR.QuantConfig("w4a8", group_size=32, symmetric=False, zero="fp16",
                                                        act="block", calib_tokens=512, **FAST)}.items():
        out[label] = quantize_model(tiny.config, tiny.weights, qc, chunks, progress=False)
    return out


PROMPT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


def _logits(backend, ids):
    return backend.forward(np.asarray(ids), 0, backend.new_cache(128), all_logits=True)


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8", "w4a8-mp", "w8a8-static", "w4a8-fmin-block"])
def test_integer_only_forward_is_integer_typed_and_deterministic(tiny, qmodels, scheme):
    ids = tiny.tokenizer.encode(PROMPT)[:48]
    b = IntBackend(qmodels[scheme], mode="integer")
    with IR.trace_integers() as tr:
        first = b.model._forward_int(np.asarray(ids), 0, b.new_cache(128), True)
    names = {n for n, _ in tr}
    assert {"embed", "rms", "norm", "acc", "requant", "rope_q", "scores", "probs", "pv", "silu_mul",
            "residual", "logits"} <= names
    assert all(np.issubdtype(dt, np.integer) for _, dt in tr)
    assert ("act8" in names) == (scheme == "w8a8-static")           # static int8 inputs of the linears
    assert np.issubdtype(first.dtype, np.integer)
    again = b.model._forward_int(np.asarray(ids), 0, b.new_cache(128), True)
    assert np.array_equal(first, again)


@pytest.mark.parametrize("scheme,tol", [("w8a8", 0.06), ("w4a8", 0.3), ("w4a8-mp", 0.3), ("w8a8-static", 0.1),
                                        ("w4a8-fmin-block", 0.3)])
def test_integer_only_close_to_mixed_and_float(tiny, qmodels, scheme, tol):
    ids = tiny.tokenizer.encode(PROMPT)[:48]
    ref = _logits(NumpyBackend(tiny.config, tiny.weights, act_quant="none"), ids)
    mixed = _logits(IntBackend(qmodels[scheme], mode="mixed"), ids)
    integer = _logits(IntBackend(qmodels[scheme], mode="integer"), ids)
    scale = np.abs(ref).max()
    assert np.abs(integer - mixed).max() / scale < 0.05          # the integer nonlinearities cost little
    assert np.abs(mixed - ref).max() / scale < tol
    assert (integer.argmax(-1) == mixed.argmax(-1)).mean() >= 0.9


def test_w8a8_mixed_logits_close_to_float_reference(tiny, qmodels):
    ids = tiny.tokenizer.encode(PROMPT)[:48]
    ref = _logits(NumpyBackend(tiny.config, tiny.weights, act_quant="none"), ids)
    mixed = _logits(IntBackend(qmodels["w8a8"], mode="mixed"), ids)
    assert np.abs(mixed - ref).max() / np.abs(ref).max() < 0.04
    assert (mixed.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_incremental_decode_matches_prefill(tiny, qmodels):
    """Integer KV cache: prefill then one token at a time gives the same integers as one prefill."""
    ids = np.asarray(tiny.tokenizer.encode(PROMPT)[:20])
    m = IR.IntTransformer(qmodels["w8a8"], "integer")
    whole = m._forward_int(ids, 0, m.new_cache(64), True)
    kv = m.new_cache(64)
    m._forward_int(ids[:12], 0, kv, False)
    steps = [m._forward_int(ids[i:i + 1], i, kv, False)[0] for i in range(12, 20)]
    assert np.array_equal(np.stack(steps), whole[12:20])


def test_save_load_roundtrip(tiny, qmodels, tmp_path):
    ids = tiny.tokenizer.encode(PROMPT)[:16]
    qm = qmodels["w4a8"]
    back = IR.QuantizedModel.load(qm.save(tmp_path / "m.npz"))
    assert back.qconfig == qm.qconfig
    a = _logits(IntBackend(qm, mode="integer"), ids)
    b = _logits(IntBackend(back, mode="integer"), ids)
    assert np.array_equal(a, b)


def test_saved_layout_is_what_build_derives(qmodels, tmp_path, monkeypatch):
    """QuantizedModel.save stores each w4 linear's row exponents and largest |w|; a loaded model's build uses
    them (no pass over the scales) and gets the same constants as deriving them."""
    qm = qmodels["w4a8"]
    back = IR.QuantizedModel.load(qm.save(tmp_path / "m.npz"))
    names = [n for n in qm.linear_names() if IR.linear_bits(qm.tensors, n, qm.qconfig) == 4]
    assert names and all(n + ".amax" in back.tensors and n + ".amax" not in qm.tensors for n in names)
    derived = {n: IR.IntLinear.build(qm.tensors, n, qm.qconfig) for n in names}
    monkeypatch.setattr(IR.IntLinear, "w4_layout", lambda *a, **k: pytest.fail("derived again after load"))
    for n in names:
        got = IR.IntLinear.build(back.tensors, n, qm.qconfig)
        assert np.array_equal(got.row_scale, derived[n].row_scale) and got.acc_bits == derived[n].acc_bits
        assert np.array_equal(got.w, derived[n].w)


def test_weight_only_scheme_refuses_integer_only(qmodels):
    with pytest.raises(EdgeLLMError, match="w8a8 or w4a8"):
        IntBackend(qmodels["w4a16"], mode="integer")
    with pytest.raises(EdgeLLMError, match="mixed"):
        IntBackend(qmodels["w8a8"], mode="float16")


def test_mixed_precision_mixed_mode_is_the_float_simulation(tiny, qmodels):
    """Mixed mode of a mixed-precision model = a float forward with every linear dequantized in its own width."""
    qm = qmodels["w4a8-mp"]
    promoted = qm.report["promoted"]
    assert promoted and all(IR.linear_bits(qm.tensors, n, qm.qconfig) == 8 for n in promoted)
    m = IR.IntTransformer(qm, "mixed")
    m.prepare()
    g = qm.qconfig.group_size
    for n in qm.linear_names():
        q = qm.tensors[n + ".q"]
        s = qm.tensors[n + ".scale"].astype(np.float32)
        if n in promoted:                                   # int8 codes, one fp32 scale per output row
            want = q.astype(np.float32) * s[:, None]
        else:                                               # packed symmetric int4, fp16 scale per group of g
            u = IR.unpack_int4(q).astype(np.float32) - 8
            want = (u.reshape(u.shape[0], -1, g) * s[..., None]).reshape(u.shape)
        assert np.array_equal(m.w[n], want), n


def test_static_int8_input_matches_float_rounding():
    """The static path's integer input quantization = clip(round(z * in_scale / act_scale)) within one LSB."""
    w = RNG.integers(-127, 128, size=(16, 96)).astype(np.float64)
    lin = IR.IntLinear(w, RNG.uniform(1e-3, 2e-3, 16), int(math.ceil(math.log2(127 * 127 * 96))))
    in_scale, act = 2.0 ** -21, 0.037
    c = lin.static_constants(in_scale, 16, act)
    z = np.rint(RNG.normal(0, 2.5, (40, 96)) / in_scale).astype(np.int64)      # some beyond the range: clipped
    z[0, :4] = [np.iinfo(np.int64).max // 2, -(1 << 60), 0, 1]
    q = np.clip(IR.rshift_round(np.clip(z, -c.cap, c.cap) * c.m_in, c.s_in), -127, 127)
    want = np.clip(np.rint(z * in_scale / act), -127, 127)
    assert np.abs(q - want).max() <= 1 and (np.abs(want) == 127).any()
    out = lin(z, c)
    ref = (want @ w.T) * lin.row_scale * act * 2.0 ** 16
    assert np.abs(out - ref).max() <= 1 + 1e-3 * np.abs(ref).max()


def test_block_int8_input_is_the_exact_blockwise_sum():
    """act="block": each 32-channel block of a token is rounded with its own amax; the integer linear equals
    sum_b a16_b (q_b . w_b) computed in int64 (also when the float64 route needs its two-half split), and tracks
    the float rounding of fake_quant_tokens(block=32) within the requant LSB."""
    K, N, B = 128, 24, 32
    z = np.rint(RNG.normal(0, 1.0, (6, K)) * 2.0 ** 20).astype(np.int64)
    z[:, 5] *= 300                                                   # an outlier channel: only its block coarsens
    q, amax = IR.quant_dynamic(z, block=B)
    assert amax.shape == (6, K // B) and q.dtype == np.int8
    for b in range(K // B):
        want_q, want_a = IR.quant_dynamic(z[:, b * B:(b + 1) * B])
        assert np.array_equal(q[:, b * B:(b + 1) * B], want_q) and np.array_equal(amax[:, b:b + 1], want_a)
    for wmax in (127, 2 ** 30):                                      # small weights; weights past the 2^53 route
        w = RNG.integers(-wmax, wmax + 1, size=(N, K)).astype(np.float64)
        lin = IR.IntLinear(w, RNG.uniform(1e-3, 2e-3, N) * 127 / wmax, int(math.ceil(math.log2(127.0 * wmax * K))))
        m, s, pre = lin.constants(2.0 ** -20, 12)
        sa = np.maximum(IR.bitlen(amax.max(axis=1, keepdims=True)) - 16, 0)
        a16 = IR.rshift_round(amax, sa)
        wi = w.astype(np.int64)
        prod = sum((q[:, b * B:(b + 1) * B].astype(np.int64) @ wi[:, b * B:(b + 1) * B].T) * a16[:, b:b + 1]
                   for b in range(K // B))
        got = lin(z, (m, s, pre), B)
        assert np.array_equal(got, IR.requant(prod, m, s - sa, pre))
        real = IR.fake_quant_tokens(z * 2.0 ** -20, block=B) @ (w * lin.row_scale[:, None]).T * 2.0 ** 12
        # amax kept to the token's 16 significant bits: a block far below the outlier's loses ~2^-16 of the max
        assert np.abs(got - real).max() <= 2 + 1e-4 * np.abs(real).max()
        per_token = IR.fake_quant_tokens(z * 2.0 ** -20) @ (w * lin.row_scale[:, None]).T * 2.0 ** 12
        exact = (z * 2.0 ** -20) @ (w * lin.row_scale[:, None]).T * 2.0 ** 12
        assert np.abs(real - exact).max() < np.abs(per_token - exact).max()      # why blocks: the outlier


def test_integer_static_tracks_mixed_static(tiny, qmodels):
    ids = tiny.tokenizer.encode(PROMPT)[:48]
    qm = qmodels["w8a8-static"]
    mixed = _logits(IntBackend(qm, mode="mixed"), ids)
    integer = _logits(IntBackend(qm, mode="integer"), ids)
    dyn = _logits(IntBackend(qmodels["w8a8"], mode="integer"), ids)
    scale = np.abs(mixed).max()
    assert np.abs(integer - mixed).max() / scale < 0.05
    assert not np.array_equal(integer, dyn)                          # the static path really ran


def test_int16_queries_and_v_cache_stay_integer_and_close(tiny, qmodels):
    """q_bits / v_bits = 16 (runtime options on the same weights): integer-typed, int16 V cache, decode one
    token at a time equals prefill, and the logits stay as close to mixed mode as the int8 path's."""
    import dataclasses
    ids = np.asarray(tiny.tokenizer.encode(PROMPT)[:20])
    qm = qmodels["w8a8"]
    wide = dataclasses.replace(qm, qconfig=dataclasses.replace(qm.qconfig, q_bits=16, v_bits=16))
    m = IR.IntTransformer(wide, "integer")
    kv = m.new_cache(64)
    assert kv.v.dtype == np.int16 and kv.k.dtype == np.int8
    with IR.trace_integers() as tr:
        whole = m._forward_int(ids, 0, m.new_cache(64), True)
    assert all(np.issubdtype(dt, np.integer) for _, dt in tr)
    m._forward_int(ids[:12], 0, kv, False)
    steps = [m._forward_int(ids[i:i + 1], i, kv, False)[0] for i in range(12, 20)]
    assert np.array_equal(np.stack(steps), whole[12:20])
    mixed = _logits(IntBackend(qm, mode="mixed"), ids)
    narrow = _logits(IntBackend(qm, mode="integer"), ids)
    wide_l = whole.astype(np.float64) * 2.0 ** -int(qm.tensors["int.F_logit"])
    scale = np.abs(mixed).max()
    assert np.abs(wide_l - mixed).max() / scale < max(0.03, 1.5 * np.abs(narrow - mixed).max() / scale)
