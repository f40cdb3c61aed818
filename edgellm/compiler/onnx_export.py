"""Export a Llama-family model as an ONNX graph with the KV cache as explicit inputs and outputs.

The graph is the math of `edgellm.runtime.model` in float32 (weights dequantized through the weight
store), written with standard ONNX ops only so onnxruntime and TVM's ONNX importer can both run it.
It is lowered "as stored": linear weights stay in GGUF layout [out, in] behind a Transpose node and
shape constants are Constant nodes; the graph passes (edgellm.compiler.passes) fold them away.

Interface (batch 1, symbolic `seq` and `past`):
  inputs   input_ids [1, seq] int64, position_ids [1, seq] int64,
           past_key_{i} / past_value_{i} [1, n_kv_heads, past, head_dim] float32 for each layer i
  outputs  logits [1, seq, vocab] ("decode": every position; "prefill": [1, 1, vocab], the last one),
           present_key_{i} / present_value_{i} [1, n_kv_heads, past + seq, head_dim]
The causal mask is built in-graph from past and seq. RoPE uses cos/sin tables (initializers) gathered
by position_ids. Normal-layout (llama) RoPE is turned into the NeoX layout by permuting the rows of
the q/k weights within each head (q.k is unchanged by a shared permutation), so the cached keys are
stored in that permuted order; values are not permuted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import EdgeLLMError
from ..runtime.config import ModelConfig
from ..runtime.model import rope_tables
from ..runtime.weights import WeightStore

OPSET = 17
KINDS = ("decode", "prefill")


def rope_permutation(head_dim: int, rope_dim: int) -> np.ndarray:
    """Per-head row order that maps the normal layout's pairs (2i, 2i+1) onto NeoX halves (i, i+rope_dim/2)."""
    return np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2), np.arange(rope_dim, head_dim)])


class _Builder:
    """Collects nodes and initializers; every op call returns the name of its (first) output."""

    def __init__(self):
        self.model = onnx.ModelProto()      # initializers go straight into it: no whole-model copies later
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, inputs: list[str], name: str | None = None, n_out: int = 1, **attrs):
        self._n += 1
        base = name or f"{op_type.lower()}_{self._n}"
        outs = [base] if n_out == 1 else [f"{base}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n{self._n}_{op_type}", **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, name: str, array: np.ndarray) -> str:
        self.model.graph.initializer.add().CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant as a Constant node (shared by value), the way framework exporters emit them."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._n += 1
            out = f"const_{self._n}"
            self.nodes.append(helper.make_node("Constant", [], [out], name=f"n{self._n}_Constant",
                                               value=numpy_helper.from_array(arr, out)))
            self._consts[key] = out
        return self._consts[key]


class _LlamaExporter:
    def __init__(self, cfg: ModelConfig, weights: WeightStore, kind: str, max_positions: int):
        self.c, self.w, self.kind, self.max_positions = cfg, weights, kind, max_positions
        self.b = _Builder()
        self.perm = None if cfg.rope_neox else rope_permutation(cfg.head_dim, cfg.rope_dim)

    # --- weights ----------------------------------------------------------------------------------
    def weight(self, name: str, heads: int | None = None) -> str:
        w = self.w.get(name).astype(np.float32, copy=False)
        if heads is not None and self.perm is not None:       # q/k rows (or biases) permuted within each head
            d = self.c.head_dim
            w = w.reshape(heads, d, *w.shape[1:])[:, self.perm].reshape(w.shape)
        return self.b.init(name, w)

    def linear(self, x: str, name: str, heads: int | None = None) -> str:
        b = self.b
        wt = b.op("Transpose", [self.weight(name, heads)], name=name + "_T", perm=[1, 0])
        y = b.op("MatMul", [x, wt])
        bias = name.replace(".weight", ".bias")
        if self.c.attn_bias and bias in self.w:
            y = b.op("Add", [y, self.weight(bias, heads)])
        return y

    # --- blocks -----------------------------------------------------------------------------------
    def rms_norm(self, x: str, name: str) -> str:
        b = self.b
        ms = b.op("ReduceMean", [b.op("Mul", [x, x])], axes=[-1], keepdims=1)
        den = b.op("Sqrt", [b.op("Add", [ms, b.const(self.c.norm_eps, np.float32)])])
        return b.op("Mul", [b.op("Div", [x, den]), self.weight(name)])

    def rope(self, x: str, cos: str, sin: str) -> str:
        """NeoX rotation of the first rope_dim dims of x [1, T, heads, head_dim]: x*cos + swap_halves(x)*sin±."""
        b, c = self.b, self.c
        r, h = c.rope_dim, c.rope_dim // 2
        ax = b.const([3])
        xr = x if r == c.head_dim else b.op("Slice", [x, b.const([0]), b.const([r]), ax])
        swapped = b.op("Concat", [b.op("Slice", [xr, b.const([h]), b.const([r]), ax]),
                                  b.op("Slice", [xr, b.const([0]), b.const([h]), ax])], axis=3)
        out = b.op("Add", [b.op("Mul", [xr, cos]), b.op("Mul", [swapped, sin])])
        if r == c.head_dim:
            return out
        rest = b.op("Slice", [x, b.const([r]), b.const([c.head_dim]), ax])
        return b.op("Concat", [out, rest], axis=3)

    def attention(self, i: int, h: str, cos: str, sin: str, mask: str) -> str:
        b, c, p = self.b, self.c, f"blk.{i}."
        H, KVH, d = c.n_heads, c.n_kv_heads, c.head_dim
        q = b.op("Reshape", [self.linear(h, p + "attn_q.weight", H), b.const([0, 0, H, d])])
        k = b.op("Reshape", [self.linear(h, p + "attn_k.weight", KVH), b.const([0, 0, KVH, d])])
        v = b.op("Reshape", [self.linear(h, p + "attn_v.weight"), b.const([0, 0, KVH, d])])
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        k = b.op("Concat", [f"past_key_{i}", b.op("Transpose", [k], perm=[0, 2, 1, 3])], axis=2,
                 name=f"present_key_{i}")
        v = b.op("Concat", [f"past_value_{i}", b.op("Transpose", [v], perm=[0, 2, 1, 3])], axis=2,
                 name=f"present_value_{i}")
        # grouped-query attention: q [1, KVH, rep, T, d] against k, v [1, KVH, 1, S, d]
        qg = b.op("Transpose", [b.op("Reshape", [q, b.const([0, 0, KVH, c.n_rep, d])])], perm=[0, 2, 3, 1, 4])
        kg = b.op("Transpose", [b.op("Unsqueeze", [k, b.const([2])])], perm=[0, 1, 2, 4, 3])
        vg = b.op("Unsqueeze", [v, b.const([2])])
        scores = b.op("Mul", [b.op("MatMul", [qg, kg]), b.const(1.0 / np.sqrt(d), np.float32)])
        probs = b.op("Softmax", [b.op("Add", [scores, mask])], axis=-1)
        out = b.op("Transpose", [b.op("MatMul", [probs, vg])], perm=[0, 3, 1, 2, 4])
        out = b.op("Reshape", [out, b.const([0, 0, H * d])])
        return self.linear(out, p + "attn_output.weight")

    def ffn(self, i: int, h: str) -> str:
        b, p = self.b, f"blk.{i}."
        g = self.linear(h, p + "ffn_gate.weight")
        g = b.op("Mul", [g, b.op("Sigmoid", [g])])                       # SiLU
        return self.linear(b.op("Mul", [g, self.linear(h, p + "ffn_up.weight")]), p + "ffn_down.weight")

    def causal_mask(self) -> str:
        """[T, S] additive mask: -inf where key position > query position (past + t)."""
        b = self.b
        past = b.op("Shape", ["past_key_0"], start=2, end=3)
        seq = b.op("Shape", ["input_ids"], start=1, end=2)
        total = b.op("Squeeze", [b.op("Add", [past, seq]), b.const([0])])
        zero, one = b.const(0), b.const(1)
        kpos = b.op("Unsqueeze", [b.op("Range", [zero, total, one]), b.const([0])])
        qpos = b.op("Unsqueeze", [b.op("Range", [b.op("Squeeze", [past, b.const([0])]), total, one]), b.const([1])])
        return b.op("Where", [b.op("Greater", [kpos, qpos]), b.const(-np.inf, np.float32),
                              b.const(0.0, np.float32)], name="causal_mask")

    def build(self) -> onnx.ModelProto:
        b, c = self.b, self.c
        cos, sin = rope_tables(c, np.arange(self.max_positions))
        b.init("rope_cos", np.concatenate([cos, cos], axis=1))
        b.init("rope_sin", np.concatenate([-sin, sin], axis=1))            # sign of the rotation folded in
        unsq = b.const([2])
        cos_t = b.op("Unsqueeze", [b.op("Gather", ["rope_cos", "position_ids"], axis=0), unsq], name="cos")
        sin_t = b.op("Unsqueeze", [b.op("Gather", ["rope_sin", "position_ids"], axis=0), unsq], name="sin")
        mask = self.causal_mask()
        x = b.op("Gather", [self.weight("token_embd.weight"), "input_ids"], axis=0, name="embed")
        for i in range(c.n_layers):
            p = f"blk.{i}."
            x = b.op("Add", [x, self.attention(i, self.rms_norm(x, p + "attn_norm.weight"), cos_t, sin_t, mask)])
            x = b.op("Add", [x, self.ffn(i, self.rms_norm(x, p + "ffn_norm.weight"))], name=f"residual_{i}")
        if self.kind == "prefill":
            x = b.op("Slice", [x, b.const([-1]), b.const([np.iinfo(np.int64).max]), b.const([1])])
        x = b.op("Reshape", [self.rms_norm(x, "output_norm.weight"), b.const([-1, c.dim])])
        out_w = "token_embd.weight" if c.tied_embeddings else self.weight("output.weight")
        y = b.op("Gemm", [x, out_w], transB=1)
        b.op("Reshape", [y, b.const([1, -1, c.vocab_size])], name="logits")
        return self._model()

    def _model(self) -> onnx.ModelProto:
        c = self.c
        kv = [1, c.n_kv_heads, "past", c.head_dim]
        kv_out = [1, c.n_kv_heads, "total", c.head_dim]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "seq"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                 [1, "seq" if self.kind == "decode" else 1, c.vocab_size])]
        for i in range(c.n_layers):
            for t in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_{t}_{i}", TensorProto.FLOAT, kv))
                outputs.append(helper.make_tensor_value_info(f"present_{t}_{i}", TensorProto.FLOAT, kv_out))
        model = self.b.model
        g = model.graph
        g.name = f"edgellm_{c.arch}_{self.kind}"
        g.node.extend(self.b.nodes)
        g.input.extend(inputs)
        g.output.extend(outputs)
        model.opset_import.append(helper.make_opsetid("", OPSET))
        model.producer_name, model.producer_version = "edgellm", "0.1"
        model.ir_version = 8   # onnxruntime >= 1.14 and TVM's importer read IR 8 (opset 17)
        helper.set_model_props(model, {
            "edgellm.config": json.dumps(c.to_dict(), default=str),
            "edgellm.kind": self.kind,
            "edgellm.max_positions": str(self.max_positions),
            "edgellm.kv_layout": "neox-permuted-qk" if self.perm is not None else "neox",
        })
        return model


def build_onnx(cfg: ModelConfig, weights: WeightStore, kind: str = "decode",
               max_positions: int | None = None) -> onnx.ModelProto:
    """The export graph in memory (weights as in-memory initializers)."""
    if kind not in KINDS:
        raise EdgeLLMError(f"unknown ONNX graph kind {kind!r}", f"choose one of: {', '.join(KINDS)}")
    if cfg.arch not in ("llama", "mistral", "qwen2"):
        raise EdgeLLMError(f"ONNX export does not support architecture {cfg.arch!r}", "supported: llama, mistral, qwen2")
    n = int(max_positions or cfg.context_length)
    if n <= 0:
        raise EdgeLLMError(f"max_positions={n} must be positive", "pass the context length the graph should cover")
    return _LlamaExporter(cfg, weights, kind, n).build()


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, check: bool = True) -> Path:
    """Write model + one external-data file next to it, atomically enough for a compile step; then check it.

    The proto's tensors are moved to the external file (onnx does that in place), so reload it to reuse it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    for f in (path, data):          # onnx appends to an existing data file, so start clean
        if f.exists():
            f.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    if check:
        onnx.checker.check_model(str(path), full_check=True)   # path-based: works past the 2 GB proto limit
    return path


def export_onnx(cfg: ModelConfig, weights: WeightStore, out_dir: str | os.PathLike, kind: str = "decode",
                max_positions: int | None = None, check: bool = True) -> Path:
    """Build and save `<out_dir>/<kind>.onnx` (+ `.onnx.data`); returns the .onnx path."""
    model = build_onnx(cfg, weights, kind, max_positions)
    return save_onnx(model, Path(out_dir) / f"{kind}.onnx", check=check)
