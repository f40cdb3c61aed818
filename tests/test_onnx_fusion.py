"""onnxruntime contrib fusions (MatMulNBits, SkipSimplifiedLayerNormalization, GroupQueryAttention) and the
quantized (qdq) export, each checked against the numpy float reference through the KV-cache I/O.

Tolerances: float fusions change only float32 summation order (1e-4 relative, max abs diff / max abs logit).
MatMulNBits holds the same 4/8-bit values as the GGUF blocks, so the reference is the same model dequantized
(NumpyBackend act_quant="none"); 1e-3 relative leaves room for its block-wise accumulation order and for Q4_1's
minimum turned into a float zero point.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from edgellm.runtime.backend import NumpyBackend
from edgellm.runtime.loader import load_model
from edgellm.runtime.weights import ResidentStore
from tinymodels import TinySpec, write_tiny_gguf

PROMPT = [5, 7, 100, 3, 40, 41, 200, 9]
FLOAT_TOL = 1e-4
QUANT_TOL = 1e-3


from test_onnx import need_onnx, ops, rel_err  # noqa: E402


def ort_backend(path, threads=1):
    from edgellm.runtime.ort_backend import OnnxRuntimeBackend
    return OnnxRuntimeBackend(None, path, threads=threads)


def trace(backend, prompt=PROMPT, steps=4, greedy_from=None):
    """Prefill logits (all positions), `steps` decodes, then a 5-token chunk after truncating the cache to 3
    (a prompt continuing a cached prefix). Decode tokens: the reference's greedy picks if given."""
    kv = backend.new_cache(64)
    out = [backend.forward(np.asarray(prompt), 0, kv, all_logits=True)]
    for s in range(steps):
        tok = int((greedy_from[s] if greedy_from else out[-1])[-1].argmax())
        out.append(backend.forward(np.asarray([tok]), len(prompt) + s, kv))
    kv.truncate(3)
    out.append(backend.forward(np.asarray(prompt[3:]), 3, kv, all_logits=True))
    return out


class Model:
    """A tiny GGUF model, its numpy float reference trace, and its exported graph (float or qdq)."""

    def __init__(self, root, spec, weights_format="float", **change):
        from edgellm.compiler.onnx_export import export_onnx
        self.spec, self.gguf = spec, write_tiny_gguf(root / "m.gguf", spec)
        m = load_model(self.gguf)
        self.cfg, self.weights = replace(m.config, **change), ResidentStore(m.weights)
        self.ref = trace(NumpyBackend(self.cfg, self.weights, threads=1, act_quant="none"))
        self.path = export_onnx(self.cfg, self.weights, root, weights_format=weights_format)

    def fused(self, tmp_path, passes):
        """(model after passes, reports, max relative error of its trace against the reference)."""
        import onnx
        from edgellm.compiler.onnx_export import save_onnx
        from edgellm.compiler.passes import run_passes
        model, reports = run_passes(onnx.load(str(self.path)), passes)
        path = save_onnx(model, tmp_path / "fused" / "decode.onnx")        # runs onnx.checker as well
        got = trace(ort_backend(path), greedy_from=self.ref)
        return onnx.load(str(path)), reports, max(rel_err(g, r) for g, r in zip(got, self.ref))


FLOAT_SPECS = {"llama-gqa": TinySpec(), "qwen2-bias-tied": TinySpec(arch="qwen2", tied=True, seed=1),
               "mqa-ropescale-3l": TinySpec(n_kv_heads=1, rope_scale=2.0, n_layers=3, seed=2)}


@pytest.fixture(scope="module", params=list(FLOAT_SPECS))
def tiny(request, tmp_path_factory):
    need_onnx()
    return Model(tmp_path_factory.mktemp("fusion"), FLOAT_SPECS[request.param])


# --- float fusions, each alone ------------------------------------------------------------------------

def test_fuse_skip_rms_norm_alone(tiny, tmp_path):
    from edgellm.compiler.passes import fold_constants, fuse_skip_rms_norm
    model, reports, err = tiny.fused(tmp_path, [fold_constants, fuse_skip_rms_norm])
    assert err < FLOAT_TOL
    n = tiny.cfg.n_layers
    fused = 2 * n        # every norm after a residual add: 2 per layer but layer 0's first, plus the final norm
    assert reports[1].fused == Counter({"SkipSimplifiedLayerNormalization": fused})
    assert reports[1].nodes_before - reports[1].nodes_after == 6 * fused       # Add + 6-node norm -> 1
    assert ops(model)["SkipSimplifiedLayerNormalization"] == fused and ops(model)["ReduceMean"] == 1
    assert any(o.domain == "com.microsoft" for o in model.opset_import)


def test_fuse_skip_rms_norm_after_rms_normalization(tiny, tmp_path):
    from edgellm.compiler.passes import fold_constants, fuse_rms_norm, fuse_skip_rms_norm
    model, reports, err = tiny.fused(tmp_path, [fold_constants, fuse_rms_norm, fuse_skip_rms_norm])
    assert err < FLOAT_TOL
    assert reports[2].nodes_before - reports[2].nodes_after == 2 * tiny.cfg.n_layers
    assert ops(model)["RMSNormalization"] == 1        # layer 0's attn_norm reads the embedding, not an Add


def test_fuse_rope_attention_alone(tiny, tmp_path):
    from edgellm.compiler.passes import fold_constants, fuse_rope_attention
    model, reports, err = tiny.fused(tmp_path, [fold_constants, fuse_rope_attention])
    assert err < FLOAT_TOL
    n = tiny.cfg.n_layers
    assert reports[1].fused == Counter({"GroupQueryAttention (rotary)": n})
    assert reports[1].nodes_after < reports[1].nodes_before
    o = ops(model)
    assert o["GroupQueryAttention"] == n and o["Softmax"] == 0 and o["Where"] == 0     # mask built by the op
    assert o["Sin"] == o["Cos"] == 0 and o["Gather"] == 1                             # only the embedding left
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: a.i for a in gqa.attribute if a.type == a.INT}
    assert attrs["num_heads"] == tiny.cfg.n_heads and attrs["kv_num_heads"] == tiny.cfg.n_kv_heads
    assert attrs["do_rotary"] == 1


def test_all_ort_fusions_on_a_float_graph(tiny, tmp_path):
    from edgellm.compiler.passes import ORT_FUSION_PASSES
    model, reports, err = tiny.fused(tmp_path, ORT_FUSION_PASSES)
    assert err < FLOAT_TOL
    n = tiny.cfg.n_layers
    by = {r.name: r for r in reports}
    assert by["fuse_matmul_nbits"].fused == Counter()                      # float weights: nothing to fuse
    assert by["fuse_rope_attention"].fused["GroupQueryAttention (rotary, packed qkv)"] == n
    assert ops(model)["Split"] == n                                        # gate/up only; qkv goes in packed
    assert all(r.nodes_after <= r.nodes_before for r in reports)


@pytest.mark.parametrize("rope_dim, fused", [(8, False), (32, True)])
@pytest.mark.parametrize("neox", [False, True])
def test_partial_rotary(rope_dim, fused, neox, tmp_path):
    """GQA's kernel wants cos/sin widths that are multiples of 8: rope_dim 32 of head_dim 64 fuses, 8 does not."""
    need_onnx()
    from edgellm.compiler.passes import fold_constants, fuse_rope_attention
    tiny = Model(tmp_path, TinySpec(dim=128, n_heads=2, n_kv_heads=1, seed=3), rope_dim=rope_dim, rope_neox=neox)
    model, reports, err = tiny.fused(tmp_path, [fold_constants, fuse_rope_attention])
    assert err < FLOAT_TOL
    assert ops(model)["GroupQueryAttention"] == (tiny.cfg.n_layers if fused else 0)
    if not fused:
        assert "rope_dim % 16" in next(iter(reports[1].fused))


# --- quantized export and MatMulNBits -----------------------------------------------------------------

QUANT_SPECS = {"Q4_0": TinySpec(qtype="Q4_0", seed=4), "Q4_1-qwen2-tied": TinySpec(arch="qwen2", tied=True,
               qtype="Q4_1", seed=5), "Q8_0-tied": TinySpec(qtype="Q8_0", tied=True, seed=6)}


@pytest.fixture(scope="module", params=list(QUANT_SPECS))
def qtiny(request, tmp_path_factory):
    need_onnx()
    return Model(tmp_path_factory.mktemp("qdq"), QUANT_SPECS[request.param], weights_format="qdq")


def test_qdq_export_keeps_gguf_blocks_in_standard_ops(qtiny):
    import onnx
    from onnx import TensorProto
    onnx.checker.check_model(str(qtiny.path), full_check=True)
    m = onnx.load(str(qtiny.path))
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node), "qdq export uses standard ONNX ops only"
    assert next(o.version for o in m.opset_import if o.domain == "") == 21
    n = qtiny.cfg.n_layers
    tied = qtiny.cfg.tied_embeddings
    assert ops(m)["DequantizeLinear"] == 7 * n + 2                         # projections, lm_head, embedding rows
    big_float = [t.name for t in m.graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 4096
                 and not t.name.startswith("rope_")]
    assert big_float == [], "no float weight matrices left"
    if tied:
        dq = [x for x in m.graph.node if x.op_type == "DequantizeLinear" and x.output[0] == "token_embd.weight_dq"]
        assert dq[0].input[0] == "token_embd.weight_rows"                  # lm_head shares the embedding's data


def test_qdq_export_matches_the_dequantized_reference(qtiny, tmp_path):
    got = trace(ort_backend(qtiny.path), greedy_from=qtiny.ref)
    assert max(rel_err(g, r) for g, r in zip(got, qtiny.ref)) < FLOAT_TOL      # bit-exact weights: float tolerance


def test_fuse_matmul_nbits_alone(qtiny, tmp_path):
    from edgellm.compiler.passes import fold_constants, fuse_matmul_nbits
    model, reports, err = qtiny.fused(tmp_path, [fold_constants, fuse_matmul_nbits])
    assert err < QUANT_TOL
    n = qtiny.cfg.n_layers
    assert sum(reports[1].fused.values()) == 7 * n + 1
    assert reports[1].nodes_after < reports[1].nodes_before
    o = ops(model)
    assert o["MatMulNBits"] == 7 * n + 1 and o["DequantizeLinear"] == 1 and o["Transpose"] < 7 * n
    nb = next(x for x in model.graph.node if x.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in nb.attribute}
    assert attrs["block_size"] == 32 and attrs["accuracy_level"] == 0
    assert attrs["bits"] == (8 if qtiny.spec.qtype == "Q8_0" else 4)
    zp = [x for x in model.graph.node if x.op_type == "MatMulNBits" and len(x.input) > 3]
    assert bool(zp) == (qtiny.spec.qtype == "Q4_1")       # Q4_0's 8 and Q8_0's 128 are the op's defaults


def test_lower_float_zero_points_alone(qtiny, tmp_path):
    from edgellm.compiler.passes import fold_constants, fuse_matmul_nbits, lower_float_zero_points
    model, reports, err = qtiny.fused(tmp_path, [fold_constants, fuse_matmul_nbits, lower_float_zero_points])
    assert err < QUANT_TOL
    n = 7 * qtiny.cfg.n_layers + 1
    if qtiny.spec.qtype != "Q4_1":
        assert reports[2].fused == Counter() and reports[2].nodes_after == reports[2].nodes_before
        return
    assert reports[2].fused == Counter({"float zero point -> blocksum correction": n})
    nbits = [x for x in model.graph.node if x.op_type == "MatMulNBits"]
    assert len(nbits) == n and all(len(x.input) == 3 for x in nbits)         # the op's default zero point
    assert ops(model)["ReduceSum"] < n                                         # one block sum per activation


def test_split_8bit_weights_alone(qtiny, tmp_path):
    from edgellm.compiler.passes import fold_constants, fuse_matmul_nbits, split_8bit_weights
    model, reports, err = qtiny.fused(tmp_path, [fold_constants, fuse_matmul_nbits, split_8bit_weights])
    assert err < QUANT_TOL
    n = 7 * qtiny.cfg.n_layers + 1
    assert reports[2].fused["8-bit -> 4-bit hi/lo halves"] == (n if qtiny.spec.qtype == "Q8_0" else 0)
    bits = {a.i for x in model.graph.node if x.op_type == "MatMulNBits" for a in x.attribute if a.name == "bits"}
    assert bits == {4}


def test_ort_fusion_passes_on_the_quantized_graph(qtiny, tmp_path):
    from edgellm.compiler.passes import ORT_FUSION_PASSES, format_report
    model, reports, err = qtiny.fused(tmp_path, ORT_FUSION_PASSES)
    assert err < QUANT_TOL
    n = qtiny.cfg.n_layers
    o = ops(model)
    assert o["MatMulNBits"] == 4 * n + 1            # qkv, out, gate_up, down per layer + lm_head
    assert o["GroupQueryAttention"] == n and o["SkipSimplifiedLayerNormalization"] == 2 * n
    q41 = qtiny.spec.qtype == "Q4_1"       # lowered: x @ W == MatMulNBits(zp 0) + blocksum(x) @ min^T
    assert o["MatMul"] == (4 * n + 1 if q41 else 0) and o["Softmax"] == 0
    assert all(a.i == 4 for x in model.graph.node if x.op_type == "MatMulNBits" for a in x.attribute
               if a.name == "bits")           # 8-bit weights split into exact 4-bit halves (the fast CPU path)
    table = format_report(reports)
    assert "fuse_matmul_nbits" in table and "fuse_rope_attention" in table


def test_llm_greedy_tokens_through_the_fused_quantized_graph(qtiny, tmp_path):
    """edgellm.LLM with the reference backend, then with the fused graph: same greedy tokens."""
    import edgellm
    from edgellm.compiler.passes import ORT_FUSION_PASSES
    model, _, _ = qtiny.fused(tmp_path, ORT_FUSION_PASSES)
    llm = edgellm.LLM(str(qtiny.gguf), threads=1, n_ctx=64)
    llm.backend, llm._kv, llm._cached = NumpyBackend(qtiny.cfg, qtiny.weights, 1, act_quant="none"), None, []
    want = [llm.generate(p, max_tokens=10, temperature=0, ignore_eos=True).tokens for p in ("the cat", "the dog")]
    llm.backend, llm._kv, llm._cached = ort_backend(tmp_path / "fused" / "decode.onnx"), None, []
    got = [llm.generate(p, max_tokens=10, temperature=0, ignore_eos=True).tokens for p in ("the cat", "the dog")]
    assert got == want


def test_standard_pass_lists_add_no_contrib_ops(qtiny, tmp_path):
    """The graph for TVM's importer (DEFAULT_PASSES / FUSION_PASSES) stays standard ONNX, also in qdq form
    (opset 21 -> 23, ReduceMean's axes as an input)."""
    from edgellm.compiler.passes import FUSION_PASSES
    model, reports, err = qtiny.fused(tmp_path, FUSION_PASSES)
    assert err < FLOAT_TOL
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert not any(o.domain == "com.microsoft" for o in model.opset_import)
    assert reports[-1].fused["rms_norm"] == 2 * qtiny.cfg.n_layers + 1
    assert ops(model)["DequantizeLinear"] == 7 * qtiny.cfg.n_layers + 2


def test_unknown_weights_format_is_refused(tmp_path):
    need_onnx()
    from edgellm.compiler.onnx_export import build_onnx
    from edgellm.errors import EdgeLLMError
    m = load_model(write_tiny_gguf(tmp_path / "t.gguf", TinySpec()))
    with pytest.raises(EdgeLLMError, match="float, qdq"):
        build_onnx(m.config, m.weights, weights_format="int3")


# --- SmolLM2 ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_quantized_fused_graph(smollm2_path, tmp_path):
    """SmolLM2 (Q4_1 projections, Q8_0 tied embedding) exported as qdq and fused for onnxruntime: logits match
    the dequantized float reference, and the file holds 4-bit weights (about a quarter of the float export)."""
    need_onnx()
    import onnx
    from edgellm.compiler.onnx_export import build_onnx, save_onnx
    from edgellm.compiler.passes import ORT_FUSION_PASSES, run_passes
    m = load_model(smollm2_path)
    cfg, store = m.config, ResidentStore(m.weights)
    ids = [1, 504, 3458, 253, 655, 28, 905, 2]
    ref = trace(NumpyBackend(cfg, store, threads=2, act_quant="none"), ids)
    model, reports = run_passes(build_onnx(cfg, store, max_positions=512, weights_format="qdq"), ORT_FUSION_PASSES)
    path = save_onnx(model, tmp_path / "decode.onnx")
    got = trace(ort_backend(path, threads=2), ids, greedy_from=ref)
    errs = [rel_err(g, r) for g, r in zip(got, ref)]
    assert max(errs) < QUANT_TOL, errs
    assert [int(g[-1].argmax()) for g in got] == [int(r[-1].argmax()) for r in ref]       # same greedy tokens
    size = path.stat().st_size + path.with_name(path.name + ".data").stat().st_size
    float_bytes = 4 * sum(int(np.prod(store.info(n).shape)) for n in store.names())
    assert size < 0.35 * float_bytes, (size, float_bytes)
    o = ops(onnx.load(str(path), load_external_data=False))
    assert o["MatMulNBits"] == 4 * cfg.n_layers + 1 and o["GroupQueryAttention"] == cfg.n_layers
