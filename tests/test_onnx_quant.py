"""ONNX export of quantized models (integer MatMulInteger linears) against the numpy oracle IntTransformer "mixed".

Each linear is checked on the graph's own input activations: the int8 rounding (Round/Clip/Cast) reproduces
numpy's exactly and MatMulInteger sums exactly, so only float32 scaling order differs (1e-5 relative).
End to end, a float32 difference in a norm, softmax or SiLU now and then moves an activation across an int8
rounding boundary (one code step), which the following layers carry on: the logits agree to ~1e-6 when no
code flips and to ~1e-2 when one does, so the end-to-end bound is E2E_TOL and greedy tokens must agree.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from conftest import require
from edgellm.errors import EdgeLLMError
from edgellm.runtime import intref as IR
from edgellm.runtime.loader import load_model
from tinymodels import TinySpec, write_tiny_gguf

LINEAR_TOL = 1e-5
E2E_TOL = 2e-2
PROMPT = [5, 7, 100, 3, 40, 41, 200, 9]
FAST = dict(smooth=False)      # the per-layer scale search is the slow part of quantizing; two configs keep it
CONFIGS = {
    "w8a8": ("untied", dict(scheme="w8a8")),
    "w4a8-g32": ("untied", dict(scheme="w4a8", group_size=32)),
    "w4a8-g32-fmin-kv8": ("untied", dict(scheme="w4a8", group_size=32, symmetric=False, zero="fp16", kv_int8=True,
                                         **FAST)),
    "w4a8-g64-asym-static": ("untied", dict(scheme="w4a8", group_size=64, symmetric=False, act="static", **FAST)),
    "w8a8-tied-static": ("tied", dict(scheme="w8a8", act="static", **FAST)),
    "w4a16-g32": ("untied", dict(scheme="w4a16", group_size=32, **FAST)),
    "w4a8-g32-fmin-block": ("untied", dict(scheme="w4a8", group_size=32, symmetric=False, zero="fp16", act="block",
                                           **FAST)),
    "w4a8-g64-block": ("untied", dict(scheme="w4a8", group_size=64, act="block", **FAST)),
    "w8a8-tied-block": ("tied", dict(scheme="w8a8", act="block", **FAST)),
}
SPECS = {"untied": TinySpec(n_layers=2, dim=64, ffn_dim=128, seed=3),
         "tied": TinySpec(n_layers=2, dim=64, ffn_dim=128, n_kv_heads=1, tied=True, seed=4)}


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    require("onnx", "the compiler exports ONNX graphs")
    require("onnxruntime", "onnxruntime runs them")
    from edgellm.compiler.quantize import quantize_model
    d = tmp_path_factory.mktemp("onnxq")
    rng = np.random.default_rng(0)
    out = {}
    for key, spec in SPECS.items():
        m = load_model(write_tiny_gguf(d / f"{key}.gguf", spec))
        chunks = [rng.integers(0, m.config.vocab_size, 128).tolist() for _ in range(2)]
        for label, (which, kw) in CONFIGS.items():
            if which == key:
                out[label] = quantize_model(m.config, m.weights, IR.QuantConfig(calib_tokens=256, **kw), chunks,
                                            progress=False)
    return out


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    from edgellm.compiler.onnx_quant import export_quant_onnx
    d = tmp_path_factory.mktemp("graphs")
    return {k: export_quant_onnx(qm, d / f"{k}.onnx", max_positions=64) for k, qm in models.items()}   # checked


def _session(model):
    import onnxruntime as ort
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _feeds(cfg, tokens, past=0, kv=None):
    feeds = {"input_ids": np.asarray(tokens, np.int64)[None],
             "position_ids": np.arange(past, past + len(tokens), dtype=np.int64)[None]}
    for i in range(cfg.n_layers):
        for j, t in enumerate(("key", "value")):
            empty = np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
            feeds[f"past_{t}_{i}"] = empty if kv is None else kv[2 * i + j]
    return feeds


@pytest.mark.parametrize("label", list(CONFIGS))
def test_graph_uses_standard_integer_ops_and_no_float_weights(models, exported, label):
    import onnx
    qm, qc = models[label], models[label].qconfig
    model = onnx.load(str(exported[label]))                       # export_quant_onnx already ran onnx.checker
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    assert {o.domain for o in model.opset_import} == {""}        # standard ops only, no contrib domain
    n_lin = len(qm.linear_names())
    assert ops["MatMulInteger"] == (n_lin + 1 if qc.a_bits == 8 else 1)          # + the lm head
    assert ops["MatMul"] == 2 * qm.config.n_layers + (n_lin if qc.a_bits == 16 else 0) \
        + (n_lin if not qc.symmetric and qc.zero == "fp16" else 0)              # attention (+ a16 / fp16 minima)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for n in model.graph.node:
        if n.op_type == "MatMulInteger":                          # int8 x int8: exact on every CPU (see report)
            assert [types[i] for i in n.input] == [onnx.TensorProto.INT8] * 2, n.input
    inits = {t.name: t for t in model.graph.initializer}
    for name in qm.linear_names():
        q = inits[name + "_q"]
        assert q.data_type == onnx.TensorProto.INT8 and np.prod(q.dims) == _n_weights(qm, name)
        floats = [t for k, t in inits.items() if k.startswith(name) and t.data_type == onnx.TensorProto.FLOAT]
        assert all(np.prod(t.dims) <= np.prod(q.dims) // (qc.group_size or q.dims[0]) for t in floats)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["edgellm.quant"] == qc.label and meta["edgellm.weights_format"] == "int8-matmulinteger"


def _n_weights(qm, name) -> int:
    q = qm.tensors[name + ".q"]
    return q.shape[0] * q.shape[1] * (2 if qm.qconfig.w_bits == 4 else 1)


@pytest.mark.parametrize("label", list(CONFIGS))
def test_every_linear_matches_the_oracle_on_the_graph_inputs(models, label):
    import onnx
    from edgellm.compiler.onnx_export import rope_permutation
    from edgellm.compiler.onnx_quant import build_quant_onnx
    qm = models[label]
    c = qm.config
    taps: dict = {}
    model = build_quant_onnx(qm, "decode", 64, taps=taps)
    assert len(taps) == len(qm.linear_names()) + 1
    names = sorted({t for pair in taps.values() for t in pair})
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names)
    sess = _session(model)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, _feeds(c, PROMPT))))
    ref = IR.IntTransformer(qm, "mixed")
    ref.prepare()
    perm = rope_permutation(c.head_dim, c.rope_dim)
    for name, (x, y) in taps.items():
        xs = got[x].reshape(len(PROMPT), -1)
        if name == "head":
            want = IR.fake_quant_tokens(xs, block=qm.qconfig.act_block) @ ref.w["head"].T
        else:
            want = ref._lin(xs, name)
        if ".attn_q." in name or ".attn_k." in name:              # the graph keeps q/k rows in NeoX order
            want = want.reshape(len(PROMPT), -1, c.head_dim)[..., perm].reshape(want.shape)
        assert rel_err(got[y].reshape(want.shape), want) < LINEAR_TOL, name


@pytest.mark.parametrize("label", list(CONFIGS))
def test_onnxruntime_backend_logits_match_oracle(models, exported, label):
    from edgellm.runtime.ort_backend import OnnxRuntimeBackend
    qm = models[label]
    be, ref = OnnxRuntimeBackend(None, exported[label], threads=1), IR.IntTransformer(qm, "mixed")
    kv, kv_ref = be.new_cache(64), ref.new_cache(64)
    got, want = [be.forward(np.asarray(PROMPT), 0, kv, True)], [ref.forward(np.asarray(PROMPT), 0, kv_ref, True)]
    for s in range(4):
        tok = np.asarray([int(want[-1][-1].argmax())])
        got.append(be.forward(tok, len(PROMPT) + s, kv))
        want.append(ref.forward(tok, len(PROMPT) + s, kv_ref))
    for g, w in zip(got, want):
        assert g.shape == w.shape and rel_err(g, w) < E2E_TOL
        assert np.array_equal(g[-1:].argmax(-1), w[-1:].argmax(-1))


def test_prefill_graph_returns_last_position(models):
    from edgellm.compiler.onnx_quant import build_quant_onnx
    qm = models["w4a8-g32"]
    logits = _session(build_quant_onnx(qm, "prefill", 64)).run(["logits"], _feeds(qm.config, PROMPT))[0]
    ref = IR.IntTransformer(qm, "mixed")
    want = ref.forward(np.asarray(PROMPT), 0, ref.new_cache(64))
    assert logits.shape == (1, 1, qm.config.vocab_size) and rel_err(logits[0], want) < E2E_TOL


def test_tvm_imports_builds_and_matches(models):
    """TVM's Relax ONNX importer on the decode graph with fixed shapes (4 cached + 4 new positions)."""
    require("tvm", "TVM's ONNX importer is a target of the export")
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    from edgellm.compiler.onnx_quant import build_quant_onnx
    qm = models["w4a8-g32-fmin-kv8"]
    c = qm.config
    model = build_quant_onnx(qm, "decode", 64)
    sess = _session(model)
    first = sess.run(None, _feeds(c, PROMPT[:4]))
    feeds = _feeds(c, PROMPT[4:], past=4, kv=first[1:])
    want_ort = sess.run(None, feeds)
    mod = from_onnx(model, shape_dict={k: list(v.shape) for k, v in feeds.items()})
    ex = tvm.compile(relax.transform.LegalizeOps()(mod), target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(v)) for v in feeds.values()])
    got = [out[i].numpy() for i in range(len(want_ort))]
    for g, w in zip(got, want_ort):
        assert g.shape == w.shape and rel_err(g, w) < E2E_TOL
    ref = IR.IntTransformer(qm, "mixed")
    kv = ref.new_cache(64)
    ref.forward(np.asarray(PROMPT[:4]), 0, kv)
    oracle = ref.forward(np.asarray(PROMPT[4:]), 4, kv, all_logits=True)
    assert rel_err(got[0][0], oracle) < E2E_TOL


def test_bad_requests_raise_clear_errors(models):
    from dataclasses import replace
    from edgellm.compiler.onnx_quant import build_quant_onnx
    qm = models["w8a8"]
    with pytest.raises(EdgeLLMError, match="decode, prefill"):
        build_quant_onnx(qm, "train")
    with pytest.raises(EdgeLLMError, match="llama, mistral"):
        build_quant_onnx(IR.QuantizedModel(replace(qm.config, arch="qwen2"), qm.qconfig, qm.tensors))
    with pytest.raises(EdgeLLMError, match="re-quantize"):
        build_quant_onnx(IR.QuantizedModel(qm.config, qm.qconfig, {}))
