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

Weight formats (`weights_format`):
  "float"  every weight dequantized to float32 initializers (opset 17; what TVM's importer reads today).
  "qdq"    Q4_0 / Q4_1 / Q8_0 matrices keep their GGUF blocks in the standard ONNX QDQ form (opset 21 blocked
           quantization): DequantizeLinear(q [out, in] uint4|int8, scale [out, in/32], zero_point, axis=1,
           block_size=32) -> Transpose -> MatMul (Gemm transB=1 for the lm_head). Q4_0 is uint4 with zero point 8,
           Q8_0 int8 without one; Q4_1's float minimum (not an integer zero point) is added after the
           DequantizeLinear per block: Reshape [out, in/32, 32] -> Add(min [out, in/32, 1]) -> Reshape. The
           embedding Gathers quantized rows (int8, or 4-bit values one per uint8) and their scales, then
           dequantizes only those rows. Values are bit-exact with the GGUF dequantizer; other types stay float.
           `passes.fuse_matmul_nbits` turns each DequantizeLinear+MatMul into onnxruntime's MatMulNBits.
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
QDQ_OPSET = 21          # DequantizeLinear with block_size and int4/uint4 tensors
KINDS = ("decode", "prefill")
WEIGHT_FORMATS = ("float", "qdq")
QDQ_BLOCK = 32
# GGUF block layouts the qdq export keeps: bytes per 32-weight block
_QDQ_TYPES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


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
    tensor_shapes = False           # Cast the mask's Shape outputs to tensors (TVM's ONNX importer needs it)

    def __init__(self, cfg: ModelConfig, weights: WeightStore, kind: str, max_positions: int,
                 weights_format: str = "float"):
        self.c, self.w, self.kind, self.max_positions = cfg, weights, kind, max_positions
        self.weights_format = weights_format
        self.opset = QDQ_OPSET if weights_format == "qdq" else OPSET
        self.b = _Builder()
        self.perm = None if cfg.rope_neox else rope_permutation(cfg.head_dim, cfg.rope_dim)

    # --- weights ----------------------------------------------------------------------------------
    def weight(self, name: str, heads: int | None = None) -> str:
        w = self.w.get(name).astype(np.float32, copy=False)
        if heads is not None and self.perm is not None:       # q/k rows (or biases) permuted within each head
            d = self.c.head_dim
            w = w.reshape(heads, d, *w.shape[1:])[:, self.perm].reshape(w.shape)
        return self.b.init(name, w)

    def quantized(self, name: str) -> bool:
        return (self.weights_format == "qdq" and self.w.qtype(name).name in _QDQ_TYPES
                and len(self.w.info(name).shape) == 2 and self.w.info(name).shape[1] % QDQ_BLOCK == 0)

    def blocks(self, name: str, heads: int | None = None):
        """GGUF blocks of a 2-D weight -> (q [out, in] int8 or uint8 4-bit values, scale, min or None) arrays."""
        qt = self.w.qtype(name).name
        n, k = self.w.info(name).shape
        raw = np.ascontiguousarray(self.w.raw(name)).view(np.uint8).reshape(n, k // QDQ_BLOCK, _QDQ_TYPES[qt])
        if heads is not None and self.perm is not None:          # permute whole rows, blocks run along `in`
            raw = raw.reshape(heads, self.c.head_dim, *raw.shape[1:])[:, self.perm].reshape(raw.shape)
        scale = raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        if qt == "Q8_0":
            return raw[..., 2:].copy().view(np.int8).reshape(n, k), scale, None
        qs = raw[..., 4 if qt == "Q4_1" else 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)   # GGUF: low nibbles first, then high
        mins = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if qt == "Q4_1" else None
        return q, scale, mins

    def qweight(self, name: str, heads: int | None = None) -> str:
        """Initializers + DequantizeLinear (+ Q4_1 minimum) for weight `name`; returns the float [out, in] output."""
        b, qt = self.b, self.w.qtype(name).name
        q, scale, mins = self.blocks(name, heads)
        n, k = q.shape
        if qt == "Q8_0":
            ins = [b.init(name + "_q", q), b.init(name + "_scale", scale)]
        else:
            ins = [_init_uint4(b, name + "_q", q), b.init(name + "_scale", scale)]
            if qt == "Q4_0":
                ins.append(_init_uint4(b, name + "_zp", np.full(scale.shape, 8, np.uint8)))
        w = b.op("DequantizeLinear", ins, name=name + "_dq", axis=1, block_size=QDQ_BLOCK)
        if mins is None:
            return w
        blocks = b.op("Reshape", [w, b.const([n, k // QDQ_BLOCK, QDQ_BLOCK])])
        added = b.op("Add", [blocks, b.init(name + "_min", mins[..., None])])
        return b.op("Reshape", [added, b.const([n, k])], name=name + "_dqmin")

    def embed(self, name: str) -> str:
        """Token embedding: Gather of float rows, or (qdq) of quantized rows dequantized after the Gather."""
        b = self.b
        if not self.quantized(name):
            return b.op("Gather", [self.weight(name), "input_ids"], axis=0, name="embed")
        qt = self.w.qtype(name).name
        q, scale, mins = self.blocks(name)
        n, k = q.shape
        gather = lambda t: b.op("Gather", [t, "input_ids"], axis=0)  # noqa: E731
        table = b.init(name + "_rows", q)      # int8 (Q8_0) or one 4-bit value per uint8: Gather takes no int4
        ins = [gather(table), gather(b.init(name + "_scale", scale))]
        if qt == "Q4_0":
            ins.append(gather(b.init(name + "_zp", np.full(scale.shape, 8, np.uint8))))
        x = b.op("DequantizeLinear", ins, axis=2, block_size=QDQ_BLOCK,
                 name="embed" if mins is None else None)
        if mins is not None:
            blocks = b.op("Reshape", [x, b.const([1, -1, k // QDQ_BLOCK, QDQ_BLOCK])])
            mins_rows = b.op("Gather", [b.init(name + "_min", mins[..., None]), "input_ids"], axis=0)
            x = b.op("Reshape", [b.op("Add", [blocks, mins_rows]), b.const([1, -1, k])], name="embed")
        return x

    def lm_head_weight(self) -> str:
        """[vocab, dim] weight for Gemm(transB=1): float, or a DequantizeLinear of the (shared) quantized rows."""
        c, b = self.c, self.b
        name = "token_embd.weight" if c.tied_embeddings else "output.weight"
        if not self.quantized(name):
            return name if c.tied_embeddings else self.weight(name)
        if not c.tied_embeddings:
            return self.qweight(name)
        qt = self.w.qtype(name).name
        q, scale, mins = self.blocks(name)
        n, k = q.shape
        ins = [name + "_rows", name + "_scale"] + ([name + "_zp"] if qt == "Q4_0" else [])
        w = b.op("DequantizeLinear", ins, name=name + "_dq", axis=1, block_size=QDQ_BLOCK)
        if mins is None:
            return w
        blocks = b.op("Reshape", [w, b.const([n, k // QDQ_BLOCK, QDQ_BLOCK])])
        return b.op("Reshape", [b.op("Add", [blocks, name + "_min"]), b.const([n, k])], name=name + "_dqmin")

    def lm_head(self, x: str) -> str:
        """Logits of the normed hidden states x [1, T, dim], any shape that reshapes to [1, T, vocab]."""
        x = self.b.op("Reshape", [x, self.b.const([-1, self.c.dim])])
        return self.b.op("Gemm", [x, self.lm_head_weight()], transB=1)

    def linear(self, x: str, name: str, heads: int | None = None) -> str:
        b = self.b
        w = self.qweight(name, heads) if self.quantized(name) else self.weight(name, heads)
        wt = b.op("Transpose", [w], name=name + "_T", perm=[1, 0])
        y = b.op("MatMul", [x, wt])
        bias = name.replace(".weight", ".bias")
        if self.c.attn_bias and bias in self.w:
            y = b.op("Add", [y, self.weight(bias, heads)])
        return y

    # --- blocks -----------------------------------------------------------------------------------
    def rms_norm(self, x: str, name: str) -> str:
        b = self.b
        sq = b.op("Mul", [x, x])
        ms = (b.op("ReduceMean", [sq], axes=[-1], keepdims=1) if self.opset < 18   # axes became an input in 18
              else b.op("ReduceMean", [sq, b.const([-1])], keepdims=1))
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
        k, v = self.cache_entry(k), self.cache_entry(v)
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

    def cache_entry(self, x: str) -> str:
        """What a new key/value [1, T, heads, head_dim] is stored as in the cache (hook: float as computed)."""
        return x

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
        if self.tensor_shapes:      # TVM's Relax importer adds no Shape outputs; a Cast makes them tensors
            past, seq = (b.op("Cast", [s], to=TensorProto.INT64) for s in (past, seq))
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
        x = self.embed("token_embd.weight")
        for i in range(c.n_layers):
            p = f"blk.{i}."
            x = b.op("Add", [x, self.attention(i, self.rms_norm(x, p + "attn_norm.weight"), cos_t, sin_t, mask)])
            x = b.op("Add", [x, self.ffn(i, self.rms_norm(x, p + "ffn_norm.weight"))], name=f"residual_{i}")
        if self.kind == "prefill":
            x = b.op("Slice", [x, b.const([-1]), b.const([np.iinfo(np.int64).max]), b.const([1])])
        y = self.lm_head(self.rms_norm(x, "output_norm.weight"))
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
        model.opset_import.append(helper.make_opsetid("", self.opset))
        model.producer_name, model.producer_version = "edgellm", "0.1"
        # onnxruntime >= 1.14 and TVM's importer read IR 8 (opset 17); opset 21 and int4 tensors need IR 10
        model.ir_version = 8 if self.opset < 21 else 10
        helper.set_model_props(model, {
            "edgellm.config": json.dumps(c.to_dict(), default=str),
            "edgellm.kind": self.kind,
            "edgellm.max_positions": str(self.max_positions),
            "edgellm.kv_layout": "neox-permuted-qk" if self.perm is not None else "neox",
            "edgellm.weights_format": self.weights_format,
        })
        return model


def _init_uint4(b: _Builder, name: str, values: np.ndarray) -> str:
    """A uint4 initializer from one value (0..15) per uint8, packed two per byte, first element in the low nibble."""
    flat = values.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    tensor = helper.make_tensor(name, TensorProto.UINT4, values.shape, packed.tobytes(), raw=True)
    b.model.graph.initializer.append(tensor)
    return name


def build_onnx(cfg: ModelConfig, weights: WeightStore, kind: str = "decode",
               max_positions: int | None = None, weights_format: str = "float") -> onnx.ModelProto:
    """The export graph in memory (weights as in-memory initializers); see the module docstring for the formats."""
    if kind not in KINDS:
        raise EdgeLLMError(f"unknown ONNX graph kind {kind!r}", f"choose one of: {', '.join(KINDS)}")
    if weights_format not in WEIGHT_FORMATS:
        raise EdgeLLMError(f"unknown ONNX weights format {weights_format!r}",
                           f"choose one of: {', '.join(WEIGHT_FORMATS)}")
    if cfg.arch not in ("llama", "mistral", "qwen2"):
        raise EdgeLLMError(f"ONNX export does not support architecture {cfg.arch!r}", "supported: llama, mistral, qwen2")
    n = int(max_positions or cfg.context_length)
    if n <= 0:
        raise EdgeLLMError(f"max_positions={n} must be positive", "pass the context length the graph should cover")
    return _LlamaExporter(cfg, weights, kind, n, weights_format).build()


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
                max_positions: int | None = None, check: bool = True, weights_format: str = "float") -> Path:
    """Build and save `<out_dir>/<kind>.onnx` (+ `.onnx.data`); returns the .onnx path."""
    model = build_onnx(cfg, weights, kind, max_positions, weights_format)
    return save_onnx(model, Path(out_dir) / f"{kind}.onnx", check=check)
