"""ONNX export, graph passes and the onnxruntime backend, checked against the numpy float reference.

Tolerances: onnxruntime vs numpy differ only in float32 summation order, so logits agree to 1e-4 relative
(max abs difference / max abs logit). Passes reorder no arithmetic that matters, so 1e-5 before vs after.
"""
from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import pytest

from conftest import require
from edgellm.errors import EdgeLLMError, ModelFormatError
from edgellm.runtime.backend import NumpyBackend
from edgellm.runtime.loader import load_model
from edgellm.runtime.weights import ResidentStore
from tinymodels import TinySpec, write_tiny_gguf

PROMPT = [5, 7, 100, 3, 40, 41, 200, 9]
REL_TOL = 1e-4
PASS_TOL = 1e-5

SPECS = {
    "llama-gqa-f32": TinySpec(),
    "qwen2-bias-neox-tied-q8": TinySpec(arch="qwen2", tied=True, qtype="Q8_0", seed=1),
    "llama-mqa-ropescale-q4": TinySpec(n_kv_heads=1, rope_scale=2.0, qtype="Q4_0", n_layers=3, seed=2),
}


def need_onnx():
    require("onnx", "the compiler exports ONNX graphs")
    return require("onnxruntime", "the onnxruntime backend runs them")


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


class Tiny:
    def __init__(self, root, key):
        from edgellm.compiler.onnx_export import export_onnx
        self.key, self.gguf = key, write_tiny_gguf(root / f"{key}.gguf", SPECS[key])
        m = load_model(self.gguf)
        self.cfg, self.weights = m.config, ResidentStore(m.weights)
        self.path = export_onnx(self.cfg, self.weights, root / key)


@pytest.fixture(scope="module", params=list(SPECS))
def tiny(request, tmp_path_factory):
    need_onnx()
    return Tiny(tmp_path_factory.mktemp("onnx"), request.param)


def ort_backend(path, threads=1):
    from edgellm.runtime.ort_backend import OnnxRuntimeBackend
    return OnnxRuntimeBackend(None, path, threads=threads)


def prefill_then_decode(backend, prompt=PROMPT, steps=4, greedy_from=None):
    """Logits of the prompt (all positions) then of `steps` single-token decodes through the KV cache.
    Decode tokens are the reference's greedy picks (`greedy_from`, else this backend's own)."""
    kv = backend.new_cache(64)
    out = [backend.forward(np.asarray(prompt), 0, kv, all_logits=True)]
    for s in range(steps):
        tok = int((greedy_from[s] if greedy_from else out[-1])[-1].argmax())
        out.append(backend.forward(np.asarray([tok]), len(prompt) + s, kv))
    assert kv.length == len(prompt) + steps
    return out


def run_graph(path, prompt=PROMPT):
    """Prefill logits of a graph file straight through onnxruntime (used to compare graphs before/after passes)."""
    be = ort_backend(path)
    return be.forward(np.asarray(prompt), 0, be.new_cache(64), all_logits=True)


# --- export -----------------------------------------------------------------------------------------

def test_export_passes_checker_and_has_kv_cache_io(tiny):
    import onnx
    onnx.checker.check_model(str(tiny.path), full_check=True)
    assert tiny.path.with_name(tiny.path.name + ".data").stat().st_size > 0     # weights as external data
    m = onnx.load(str(tiny.path), load_external_data=False)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node), "only standard ONNX ops"
    c = tiny.cfg
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
    assert ins["input_ids"] == [1, "seq"] and ins["position_ids"] == [1, "seq"]
    assert outs["logits"] == [1, "seq", c.vocab_size]
    for i in range(c.n_layers):
        assert ins[f"past_key_{i}"] == ins[f"past_value_{i}"] == [1, c.n_kv_heads, "past", c.head_dim]
        assert outs[f"present_key_{i}"] == [1, c.n_kv_heads, "total", c.head_dim]


def test_onnxruntime_matches_numpy_reference_prefill_and_decode(tiny):
    ref = prefill_then_decode(NumpyBackend(tiny.cfg, tiny.weights, threads=1, act_quant="none"))
    got = prefill_then_decode(ort_backend(tiny.path), greedy_from=ref)
    assert got[0].shape == (len(PROMPT), tiny.cfg.vocab_size)
    assert all(g.shape == (1, tiny.cfg.vocab_size) for g in got[1:])
    for g, r in zip(got, ref):
        assert rel_err(g, r) < REL_TOL


@pytest.mark.parametrize("change", [{"rope_dim": 8}, {"rope_dim": 8, "rope_neox": True}, {"rope_base": 500.0}])
def test_rope_variants_match_numpy_reference(change, tmp_path):
    """Partial rotary dims and both layouts (the config is changed for both engines alike)."""
    need_onnx()
    from dataclasses import replace
    from edgellm.compiler.onnx_export import export_onnx
    m = load_model(write_tiny_gguf(tmp_path / "t.gguf", TinySpec(seed=3)))
    cfg = replace(m.config, **change)
    ref = prefill_then_decode(NumpyBackend(cfg, m.weights, threads=1, act_quant="none"), steps=2)
    got = prefill_then_decode(ort_backend(export_onnx(cfg, m.weights, tmp_path)), steps=2, greedy_from=ref)
    for g, r in zip(got, ref):
        assert rel_err(g, r) < REL_TOL


def test_prefill_graph_returns_last_position_only(tiny, tmp_path):
    from edgellm.compiler.onnx_export import export_onnx
    path = export_onnx(tiny.cfg, tiny.weights, tmp_path, kind="prefill")
    be, full = ort_backend(path), ort_backend(tiny.path)
    last = be.forward(np.asarray(PROMPT), 0, be.new_cache(16))
    ref = full.forward(np.asarray(PROMPT), 0, full.new_cache(16), all_logits=True)
    assert last.shape == (1, tiny.cfg.vocab_size)
    assert rel_err(last[0], ref[-1]) < PASS_TOL
    with pytest.raises(EdgeLLMError, match="last-position"):
        be.forward(np.asarray(PROMPT), 0, be.new_cache(16), all_logits=True)


def test_qdq_export_matches_numpy_reference(tiny, tmp_path):
    """weights_format="qdq": quantized matrices stay GGUF blocks behind DequantizeLinear (standard ops, opset 21);
    float ones stay float. Values are bit-exact, so the float tolerance holds."""
    import onnx
    from edgellm.compiler.onnx_export import export_onnx
    path = export_onnx(tiny.cfg, tiny.weights, tmp_path, weights_format="qdq")
    m = onnx.load(str(path), load_external_data=False)
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    quantized = SPECS[tiny.key].qtype != "F32"
    assert (ops(m)["DequantizeLinear"] > 0) == quantized
    assert m.metadata_props and dict((p.key, p.value) for p in m.metadata_props)["edgellm.weights_format"] == "qdq"
    ref = prefill_then_decode(NumpyBackend(tiny.cfg, tiny.weights, threads=1, act_quant="none"))
    got = prefill_then_decode(ort_backend(path), greedy_from=ref)
    for g, r in zip(got, ref):
        assert rel_err(g, r) < REL_TOL


def test_unknown_kind_is_refused(tiny, tmp_path):
    from edgellm.compiler.onnx_export import export_onnx
    with pytest.raises(EdgeLLMError, match="decode, prefill"):
        export_onnx(tiny.cfg, tiny.weights, tmp_path, kind="train")


# --- runtime backend --------------------------------------------------------------------------------

def test_cache_truncate_reuses_a_prefix(tiny):
    be = ort_backend(tiny.path)
    fresh = be.forward(np.asarray(PROMPT), 0, be.new_cache(32), all_logits=True)
    kv = be.new_cache(32)
    be.forward(np.asarray(PROMPT[:3] + [11, 12, 13]), 0, kv)
    kv.truncate(3)
    assert kv.length == 3
    rest = be.forward(np.asarray(PROMPT[3:]), 3, kv, all_logits=True)
    assert rel_err(rest, fresh[3:]) < PASS_TOL
    assert ort_backend(tiny.path.parent).path == tiny.path          # a directory resolves to its decode.onnx
    with pytest.raises(EdgeLLMError, match="context full"):
        be.forward(np.asarray(PROMPT), 30, kv)


def test_llm_generates_the_same_greedy_tokens_with_onnxruntime(tiny):
    import edgellm
    from edgellm.runtime.backend import NumpyBackend
    llm = edgellm.LLM(str(tiny.gguf), threads=1, n_ctx=64)
    # the exported graph multiplies float activations: compare with the reference's plain float mode
    llm.backend = NumpyBackend(llm.config, llm.weights, threads=1, act_quant="none")
    want = [llm.generate(p, max_tokens=12, temperature=0, ignore_eos=True).tokens for p in ("the cat", "the dog")]
    llm.backend, llm._kv, llm._cached = ort_backend(tiny.path), None, []   # prefix reuse exercises truncate
    got = [llm.generate(p, max_tokens=12, temperature=0, ignore_eos=True).tokens for p in ("the cat", "the dog")]
    assert got == want


def test_backend_errors_are_clear(tmp_path, monkeypatch):
    need_onnx()
    from edgellm.runtime.ort_backend import OnnxRuntimeBackend
    with pytest.raises(ModelFormatError, match="does not exist"):
        OnnxRuntimeBackend(None, tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelFormatError, match="cannot load"):
        OnnxRuntimeBackend(None, tmp_path / "bad.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(EdgeLLMError, match="pip install onnxruntime"):
        OnnxRuntimeBackend(None, tmp_path / "bad.onnx")


# --- graph passes -----------------------------------------------------------------------------------

def _load(path):
    import onnx
    return onnx.load(str(path))


def _apply_and_compare(tiny, tmp_path, passes):
    """Run passes on the exported graph, save, and return (model after, reports, logits before, logits after)."""
    from edgellm.compiler.onnx_export import save_onnx
    from edgellm.compiler.passes import run_passes
    model, reports = run_passes(_load(tiny.path), passes)
    after = _load(save_onnx(model, tmp_path / "opt.onnx"))           # save_onnx runs the checker too
    return after, reports, run_graph(tiny.path), run_graph(tmp_path / "opt.onnx")


def test_run_passes_keeps_logits_and_reduces_nodes(tiny, tmp_path):
    after, reports, before_logits, after_logits = _apply_and_compare(tiny, tmp_path, None)
    assert rel_err(after_logits, before_logits) < PASS_TOL
    assert [r.name for r in reports] == ["fold_constants", "merge_qkv", "merge_gate_up"]
    assert reports[-1].nodes_after < reports[0].nodes_before
    assert all(r.nodes_after <= r.nodes_before for r in reports)
    n = tiny.cfg.n_layers
    assert sum(v for k, v in reports[1].fused.items() if k.startswith("qkv")) == n
    assert reports[2].fused["gate_up"] == n
    assert ops(after)["MatMul"] == 6 * n         # per layer: qkv, out, gate_up, down + 2 attention matmuls
    from edgellm.compiler.passes import format_report
    table = format_report(reports)
    assert "merge_qkv" in table and f"-> {reports[-1].nodes_after}" in table.splitlines()[-1]


def test_fold_constants_on_the_exported_graph(tiny, tmp_path):
    from edgellm.compiler.passes import fold_constants
    before = ops(_load(tiny.path))
    after, reports, a, b = _apply_and_compare(tiny, tmp_path, [fold_constants])
    assert rel_err(b, a) < PASS_TOL
    n = tiny.cfg.n_layers
    assert ops(after)["Transpose"] == before["Transpose"] - 7 * n          # weight transposes became initializers
    assert ops(after)["Constant"] == 0
    assert reports[0].fused["folded Transpose"] == 7 * n
    assert reports[0].nodes_after < reports[0].nodes_before


def test_merge_qkv_alone(tiny, tmp_path):
    from edgellm.compiler.passes import fold_constants, merge_qkv
    after, reports, a, b = _apply_and_compare(tiny, tmp_path, [fold_constants, merge_qkv])
    assert rel_err(b, a) < PASS_TOL
    n = tiny.cfg.n_layers
    assert reports[1].nodes_before - reports[1].nodes_after == (3 if tiny.cfg.attn_bias else 1) * n
    assert ops(after)["Split"] == n
    key = "qkv (+bias)" if tiny.cfg.attn_bias else "qkv"
    assert reports[1].fused == Counter({key: n})


def test_merge_gate_up_alone(tiny, tmp_path):
    from edgellm.compiler.passes import fold_constants, merge_gate_up
    after, reports, a, b = _apply_and_compare(tiny, tmp_path, [fold_constants, merge_gate_up])
    assert rel_err(b, a) < PASS_TOL
    n = tiny.cfg.n_layers
    assert ops(after)["MatMul"] == 9 * n - n and ops(after)["Split"] == n
    assert reports[1].fused == Counter({"gate_up": n})


def test_fuse_rms_norm_alone(tiny, tmp_path):
    from edgellm.compiler.passes import fold_constants, fuse_rms_norm
    after, reports, a, b = _apply_and_compare(tiny, tmp_path, [fold_constants, fuse_rms_norm])
    assert rel_err(b, a) < PASS_TOL
    n_norms = 2 * tiny.cfg.n_layers + 1
    assert reports[1].fused == Counter({"rms_norm": n_norms})
    assert reports[1].nodes_before - reports[1].nodes_after == 5 * n_norms
    assert ops(after)["RMSNormalization"] == n_norms and ops(after)["ReduceMean"] == 0
    assert next(o.version for o in after.opset_import if o.domain == "") == 23


def test_fuse_rms_norm_leaves_a_model_it_cannot_upgrade():
    need_onnx()
    from onnx import helper
    from edgellm.compiler.passes import PassReport, fuse_rms_norm
    model = _small_graph([helper.make_node("ReduceMean", ["y0"], ["m"], axes=[-1], keepdims=1),
                          helper.make_node("Sub", ["y0", "m"], ["y"])])
    model.graph.node[0].output[0] = "y0"
    r = PassReport("rms")
    out = fuse_rms_norm(model, r)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "ReduceMean", "Sub"]
    assert out.opset_import[0].version == 17
    assert list(r.fused) == ["skipped: ops ReduceMean need conversion to opset 23"]


def _small_graph(extra_nodes=(), extra_inits=()):
    """y = x @ W1, plus whatever the caller adds; x [2, 4]."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W1"), *extra_inits]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["y"]), *extra_nodes]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run_model(model, x):
    ort = need_onnx()
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]


def test_remove_dead_nodes():
    need_onnx()
    from onnx import helper, numpy_helper
    from edgellm.compiler.passes import PassReport, remove_dead_nodes
    dead = [helper.make_node("Relu", ["x"], ["unused"]), helper.make_node("Neg", ["unused"], ["unused2"])]
    model = _small_graph(dead, [numpy_helper.from_array(np.ones(3, np.float32), "orphan")])
    r = PassReport("dead")
    remove_dead_nodes(model, r)
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    assert [t.name for t in model.graph.initializer] == ["W1"]
    assert r.fused == Counter({"dead Relu": 1, "dead Neg": 1, "unused initializer": 1})


def test_fold_constants_simple_cases():
    need_onnx()
    import copy
    from onnx import helper, numpy_helper
    from edgellm.compiler.passes import fold_constants
    # y2 = y + (c1 * c2) + transpose(Wt): everything in parentheses is constant
    nodes = [helper.make_node("Constant", [], ["c1"], value=numpy_helper.from_array(np.full(3, 2, np.float32))),
             helper.make_node("Mul", ["c1", "c2"], ["c12"]),
             helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]),
             helper.make_node("Add", ["y0", "c12"], ["y1"]),
             helper.make_node("Add", ["y1", "W"], ["y"])]
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(np.arange(3, dtype=np.float32), "c2"),
             numpy_helper.from_array(rng.standard_normal((3, 2)).astype(np.float32), "Wt")]
    model = _small_graph(nodes, inits)
    model.graph.node[0].output[0] = "y0"
    x = rng.standard_normal((2, 4)).astype(np.float32)
    want = _run_model(model, x)
    folded = fold_constants(copy.deepcopy(model))
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add", "Add"]
    assert sorted(t.name for t in folded.graph.initializer) == ["W", "W1", "c12"]
    np.testing.assert_allclose(_run_model(folded, x), want, rtol=0, atol=1e-6)


def test_gate_up_merge_needs_the_swiglu_pattern():
    need_onnx()
    from onnx import helper, numpy_helper
    from edgellm.compiler.passes import merge_gate_up, merge_qkv
    w2 = numpy_helper.from_array(np.ones((4, 3), np.float32), "W2")
    plain = _small_graph([helper.make_node("MatMul", ["x", "W2"], ["z"]), helper.make_node("Add", ["y0", "z"], ["y"])],
                         [w2])
    plain.graph.node[0].output[0] = "y0"
    n = len(plain.graph.node)
    assert len(merge_gate_up(plain).graph.node) == n          # two sibling MatMuls, but no SiLU-multiply
    assert len(merge_qkv(plain).graph.node) == n              # and not three of them


# --- SmolLM2 ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(smollm2_path, tmp_path_factory):
    need_onnx()
    from edgellm.compiler.onnx_export import export_onnx
    m = load_model(smollm2_path)
    store = ResidentStore(m.weights)
    path = export_onnx(m.config, store, tmp_path_factory.mktemp("smol"), max_positions=512)
    return m.config, store, path


@pytest.mark.slow
def test_smollm2_onnxruntime_matches_numpy_reference(smol):
    cfg, store, path = smol
    ids = [1, 504, 3458, 253, 655, 28, 905, 2]
    ref = prefill_then_decode(NumpyBackend(cfg, store, threads=2, act_quant="none"), ids)
    got = prefill_then_decode(ort_backend(path, threads=2), ids, greedy_from=ref)
    errs = [rel_err(g, r) for g, r in zip(got, ref)]
    assert max(errs) < REL_TOL, errs


@pytest.mark.slow
def test_smollm2_passes_keep_logits(smol, tmp_path):
    from edgellm.compiler.onnx_export import save_onnx
    from edgellm.compiler.passes import FUSION_PASSES, run_passes
    cfg, _, path = smol
    model, reports = run_passes(_load(path), FUSION_PASSES)
    opt = save_onnx(model, tmp_path / "opt.onnx")
    ids = [1, 504, 3458, 253, 655, 28, 905, 2]
    a = ort_backend(path, threads=2)
    b = ort_backend(opt, threads=2)
    assert rel_err(b.forward(np.asarray(ids), 0, b.new_cache(16), all_logits=True),
                   a.forward(np.asarray(ids), 0, a.new_cache(16), all_logits=True)) < PASS_TOL
    assert reports[-1].nodes_after < reports[0].nodes_before
    assert reports[1].fused["qkv"] == reports[2].fused["gate_up"] == cfg.n_layers
    assert reports[3].fused["rms_norm"] == 2 * cfg.n_layers + 1
