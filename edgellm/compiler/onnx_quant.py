"""ONNX export of a quantized model (edgellm.runtime.intref.QuantizedModel) in "mixed" mode, with integer matmuls.

Why: the int8 codes and scales made by `edgellm.compiler.quantize` should run on any ONNX runtime without a
dequantized float copy, and give the numbers of the numpy oracle `IntTransformer(qm, "mixed")`. The graph is
the float export's (`onnx_export._LlamaExporter`: same inputs, outputs, KV-cache I/O, RoPE, mask, metadata),
with every linear written in standard ONNX integer ops that onnxruntime and TVM's Relax ONNX importer both run:

  activations   symmetric int8 as the oracle rounds them: d = ReduceMax(Abs(x)) / 127 per token (or the
                calibrated per-tensor scale when qconfig.act == "static"), q = Cast<int8>(Clip(Round(x / d), ±127)).
                Not DynamicQuantizeLinear: it is uint8 asymmetric, and onnxruntime's uint8 x int8 MatMulInteger
                saturates int16 pair sums on AVX2 CPUs without VNNI; int8 x int8 is exact there and in TVM.
  w8            int8 codes [in, out]: MatMulInteger(q, W) -> int32 -> Cast -> Mul(d) -> Mul(row scale [out]).
  w4 (group g)  codes unpacked to int8 (q - 8, or q - zero point) as [G, g, out]; x is split into its G groups
                [G, T, g]; one batched MatMulInteger gives the int32 sum of every group, scaled by the group
                scales [G, 1, out] and summed over G. An fp16 group minimum adds min [G, out] times each group's
                int8 code sum. (Blocked DequantizeLinear would need opset 21, which TVM's importer rejects.)
  a16           weight-only schemes: the same integer codes, Cast to float, float MatMul, same scaling.
  lm head       the oracle's per-token int8 activations x int8 rows (tied models share the embedding table
                through a Transpose); the embedding Gathers int8 rows and scales.
  act "block"   one d per 32 channels of a token: x as [blocks, T, 32] int8 and the weight as [blocks, 32, out],
                one batched MatMulInteger, each block's int32 sum times its d (and its group's scale), summed.
  kv_int8       new keys/values are rounded to int8 per (token, head) and stored dequantized (float cache I/O).
TVM (apache-tvm 0.27 relax.frontend.onnx) imports the graph with fixed input shapes only: with symbolic seq/past
its Reshape converter loses the attention output's shape. The mask's Shape outputs are Cast to tensors for it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from ..errors import EdgeLLMError
from ..runtime.intref import QuantizedModel, weight_codes
from .onnx_export import KINDS, _LlamaExporter, save_onnx

WEIGHTS_FORMAT = "int8-matmulinteger"


class _QuantExporter(_LlamaExporter):
    """The float exporter with quantized linears, embedding, head and (optionally) int8 KV rounding."""

    tensor_shapes = True

    def __init__(self, qm: QuantizedModel, kind: str, max_positions: int, taps: dict | None = None):
        super().__init__(qm.config, qm.tensors, kind, max_positions)     # norms are read from qm.tensors
        self.qm, self.qc, self.t = qm, qm.qconfig, qm.tensors
        self.taps = {} if taps is None else taps
        self._int8: dict[tuple, tuple[str, str]] = {}                  # q/k/v and gate/up share one rounding

    # --- int8 rounding ------------------------------------------------------------------------------
    def round_int8(self, x: str, scale: float | None = None) -> tuple[str, str]:
        """(Clip(Round(x / d), -127, 127) as float, d): per-row d = max|x| / 127 (1 where 0), or a fixed scale."""
        b = self.b
        f32 = lambda v: b.const(v, np.float32)  # noqa: E731
        if scale is None:
            amax = b.op("ReduceMax", [b.op("Abs", [x])], axes=[-1], keepdims=1)
            d = b.op("Div", [amax, f32(127.0)])
            d = b.op("Where", [b.op("Equal", [d, f32(0.0)]), f32(1.0), d])
        else:
            d = f32(scale)
        q = b.op("Clip", [b.op("Round", [b.op("Div", [x, d])]), f32(-127.0), f32(127.0)])
        return q, d

    def quant_act(self, x: str, scale: float | None = None) -> tuple[str, str]:
        if (x, scale) not in self._int8:
            q, d = self.round_int8(x, scale)
            self._int8[x, scale] = self.b.op("Cast", [q], to=TensorProto.INT8), d
        return self._int8[x, scale]

    def cache_entry(self, x: str) -> str:
        if not self.qc.kv_int8:
            return x
        q, d = self.round_int8(x)
        return self.b.op("Mul", [q, d])

    # --- linears --------------------------------------------------------------------------------------
    def codes(self, name: str, heads: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Signed codes [out, in] int8, scales (fp32, [out] or [out, G]) and fp16-minimum [out, G] or None."""
        q, s, z = weight_codes(self.t, name, self.qc)
        fmin = z if z is not None and z.dtype == np.float16 else None
        if z is not None and fmin is None:                                    # integer zero point, per group
            q = (q.reshape(q.shape[0], -1, self.qc.group_size) - z[..., None]).reshape(q.shape)
        if heads is not None and self.perm is not None:   # NeoX row order of q/k, as the float export
            d = self.c.head_dim
            rows = lambda a: a.reshape(heads, d, *a.shape[1:])[:, self.perm].reshape(a.shape)  # noqa: E731
            q, s = rows(q), rows(s)
            fmin = None if fmin is None else rows(fmin)
        return q.astype(np.int8), s.astype(np.float32), None if fmin is None else fmin.astype(np.float32)

    def quant_blocks(self, x: str, k: int) -> tuple[str, str]:
        """act="block": x [.., k] -> (int8 codes [blocks, T, B], d [blocks, T, 1]), d = max|x| / 127 per block."""
        b, B = self.b, self.qc.act_block
        if (x, "block") not in self._int8:
            q, d = self.round_int8(b.op("Reshape", [x, b.const([-1, k // B, B])]))            # [T, nb, B]
            self._int8[x, "block"] = (b.op("Transpose", [b.op("Cast", [q], to=TensorProto.INT8)], perm=[1, 0, 2]),
                                      b.op("Transpose", [d], perm=[1, 0, 2]))
        return self._int8[x, "block"]

    def block_matmul(self, x: str, k: int, w: str, gscale=None, fmin=None, name: str = "") -> str:
        """sum over blocks of d_b (q_b @ w_b) [T, out], w int8 [blocks, B, out]; w4 group scales / minima
        ([groups, out]) apply to the r = blocks / groups consecutive blocks of their group."""
        b = self.b
        xq, d = self.quant_blocks(x, k)
        acc = b.op("Mul", [self.to_float(b.op("MatMulInteger", [xq, w])), d])                     # [nb, T, out]
        if gscale is None:
            return b.op("ReduceSum", [acc, b.const([0])], keepdims=0)
        G, n = gscale.shape
        r = k // self.qc.act_block // G
        acc = b.op("Mul", [b.op("Reshape", [acc, b.const([G, r, -1, n])]), b.init(name + "_scale", gscale[:, None, None, :])])
        y = b.op("ReduceSum", [acc, b.const([0, 1])], keepdims=0)
        if fmin is not None:                                       # + min * (sum of the group's values)
            xs = b.op("ReduceSum", [b.op("Mul", [self.to_float(xq), d]), b.const([2])], keepdims=0)   # [nb, T]
            xs = b.op("ReduceSum", [b.op("Reshape", [xs, b.const([G, r, -1])]), b.const([1])], keepdims=0)
            y = b.op("Add", [y, b.op("MatMul", [b.op("Transpose", [xs], perm=[1, 0]),
                                                b.init(name + "_min", np.ascontiguousarray(fmin))])])
        return y

    def linear(self, x: str, name: str, heads: int | None = None) -> str:
        b, qc = self.b, self.qc
        q, s, fmin = self.codes(name, heads)
        n, k = q.shape
        if qc.act_block:
            B = qc.act_block
            w = b.init(name + "_q", np.ascontiguousarray(q.reshape(n, k // B, B).transpose(1, 2, 0)))  # [nb, B, out]
            if qc.w_bits == 8:
                y = b.op("Mul", [self.block_matmul(x, k, w), b.init(name + "_scale", s)])
            else:
                y = self.block_matmul(x, k, w, np.ascontiguousarray(s.T), None if fmin is None else fmin.T, name)
            y = b.op("Reshape", [y, b.const([1, -1, n])])
            self.taps[name] = (x, y)
            return y
        if qc.a_bits == 8:
            st = self.t.get(name + ".act_scale") if qc.act == "static" else None
            xa, d = self.quant_act(x, None if st is None else float(st))
        else:
            xa, d = x, None
        if qc.w_bits == 8:
            y = self.matmul(xa, b.init(name + "_q", np.ascontiguousarray(q.T)))
            y = b.op("Mul", [y, b.init(name + "_scale", s)])
        else:
            g = qc.group_size
            G = k // g
            xg = b.op("Transpose", [b.op("Reshape", [xa, b.const([-1, G, g])])], perm=[1, 0, 2])   # [G, T, g]
            w = b.init(name + "_q", np.ascontiguousarray(q.reshape(n, G, g).transpose(1, 2, 0)))  # [G, g, out]
            acc = b.op("Mul", [self.matmul(xg, w), b.init(name + "_scale", s.T[:, None, :])])     # [G, T, out]
            y = b.op("ReduceSum", [acc, b.const([0])], keepdims=0)                                # [T, out]
            if fmin is not None:                                   # + min * (sum of the group's codes)
                xs = b.op("ReduceSum", [self.to_float(xg), b.const([2])], keepdims=0)             # [G, T]
                mins = b.init(name + "_min", np.ascontiguousarray(fmin.T))                       # [G, out]
                y = b.op("Add", [y, b.op("MatMul", [b.op("Transpose", [xs], perm=[1, 0]), mins])])
            y = b.op("Reshape", [y, b.const([1, -1, n])])
        if d is not None:
            y = b.op("Mul", [y, d])
        self.taps[name] = (x, y)
        return y

    def matmul(self, xa: str, w: str) -> str:
        """int8 x int8 -> int32 MatMulInteger, as float; weight-only schemes multiply float x by the codes."""
        if self.qc.a_bits == 8:
            return self.to_float(self.b.op("MatMulInteger", [xa, w]))
        return self.b.op("MatMul", [xa, self.to_float(w)])

    def to_float(self, x: str) -> str:
        return self.b.op("Cast", [x], to=TensorProto.FLOAT)

    # --- embedding and head -------------------------------------------------------------------------
    def embed(self, name: str) -> str:
        b, t = self.b, self.t
        rows = b.op("Gather", [b.init("token_embd_q", t["token_embd.q"]), "input_ids"], axis=0)
        scale = b.op("Gather", [b.init("token_embd_scale", t["token_embd.scale"].astype(np.float32)[:, None]),
                                "input_ids"], axis=0)
        return b.op("Mul", [self.to_float(rows), scale], name="embed")

    def lm_head(self, x: str) -> str:
        b, t = self.b, self.t
        if "output.q" in t:
            w = b.init("output_q", np.ascontiguousarray(t["output.q"].T))
            s = b.init("output_scale", t["output.scale"].astype(np.float32))
        else:                                                      # tied: the embedding table, transposed
            w = b.op("Transpose", ["token_embd_q"], perm=[1, 0], name="lm_head_q")
            s = b.op("Reshape", ["token_embd_scale", b.const([-1])])
        if self.qc.act_block:                                      # [D, V] -> [blocks, B, V]
            D, B = self.c.dim, self.qc.act_block
            wb = b.op("Reshape", [w, b.const([D // B, B, -1])])
            y = b.op("Mul", [b.op("Reshape", [self.block_matmul(x, D, wb), b.const([1, -1, self.c.vocab_size])]), s])
            self.taps["head"] = (x, y)
            return y
        xa, d = self.quant_act(x)
        y = b.op("Mul", [b.op("Mul", [self.to_float(b.op("MatMulInteger", [xa, w])), d]), s])
        self.taps["head"] = (x, y)
        return y

    def _model(self) -> onnx.ModelProto:
        model = super()._model()
        props = {"edgellm.weights_format": WEIGHTS_FORMAT, "edgellm.quant": self.qc.label,
                 "edgellm.kv_int8": str(bool(self.qc.kv_int8)).lower(), "edgellm.act": self.qc.act}
        for p in model.metadata_props:
            if p.key in props:
                p.value = props.pop(p.key)
        for key, value in props.items():
            model.metadata_props.add(key=key, value=value)
        return model


def build_quant_onnx(qm: QuantizedModel, kind: str = "decode", max_positions: int | None = None,
                     taps: dict | None = None) -> onnx.ModelProto:
    """The mixed-mode integer-matmul graph of `qm` in memory (see the module docstring).

    `taps`, if given, is filled with {linear name or "head": (input, output) tensor names} so a test or a
    debugging session can compare each linear with the oracle on the graph's own inputs."""
    if kind not in KINDS:
        raise EdgeLLMError(f"unknown ONNX graph kind {kind!r}", f"choose one of: {', '.join(KINDS)}")
    cfg = qm.config
    if cfg.arch not in ("llama", "mistral"):
        raise EdgeLLMError(f"quantized ONNX export does not support architecture {cfg.arch!r}",
                           "supported: llama, mistral (the quantizer handles no attention biases)")
    missing = [n for n in ("token_embd.q", "token_embd.scale", "output_norm.weight") if n not in qm.tensors]
    if missing:
        raise EdgeLLMError(f"the quantized model lacks {missing}", "re-quantize it with edgellm.compiler.quantize")
    n = int(max_positions or cfg.context_length)
    if n <= 0:
        raise EdgeLLMError(f"max_positions={n} must be positive", "pass the context length the graph should cover")
    return _QuantExporter(qm, kind, n, taps).build()


def export_quant_onnx(qm: QuantizedModel, path: str | os.PathLike, kind: str = "decode",
                      max_positions: int | None = None, check: bool = True) -> Path:
    """Build and save the graph to `path` (+ `path.data`), checked by onnx.checker; returns the .onnx path.

    The result runs unchanged in `edgellm.runtime.ort_backend.OnnxRuntimeBackend`."""
    return save_onnx(build_quant_onnx(qm, kind, max_positions), path, check=check)
