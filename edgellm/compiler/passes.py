"""Graph passes over exported ONNX models: each a small function ModelProto -> ModelProto.

A pass edits the model in place (copying multi-hundred-MB protos per pass would double peak memory) and
returns it; given a PassReport it records what it fused. `run_passes` chains them and reports node counts
before and after each. Order matters: fold_constants first turns the exporter's Transpose(weight) nodes
into transposed initializers, which is what the MatMul merges look for.

Two pass lists: DEFAULT_PASSES / FUSION_PASSES keep the graph standard ONNX (what TVM's importer reads);
ORT_FUSION_PASSES adds onnxruntime's com.microsoft contrib ops (MatMulNBits for the qdq export's quantized
weights, SkipSimplifiedLayerNormalization, GroupQueryAttention with rotary) and two lowerings that pick
onnxruntime 1.32's fast CPU kernels (lower_float_zero_points, split_8bit_weights). Those graphs run only in
onnxruntime.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

# ops cheap and safe to evaluate at compile time (none of them grows its input by more than a concat)
FOLDABLE = {"Constant", "Identity", "Transpose", "Reshape", "Cast", "Neg", "Concat", "Unsqueeze", "Squeeze",
            "Mul", "Add", "Sub", "Div", "Sqrt", "Slice", "Gather"}


@dataclass
class PassReport:
    name: str
    nodes_before: int = 0
    nodes_after: int = 0
    fused: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        what = ", ".join(f"{k} x{v}" for k, v in sorted(self.fused.items())) or "nothing"
        return f"{self.name:<24} nodes {self.nodes_before:>6} -> {self.nodes_after:<6} {what}"


Pass = Callable[..., onnx.ModelProto]


def _uses(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node, including from inside subgraphs (If/Loop bodies)."""
    names = set()
    for node in graph.node:
        names.update(i for i in node.input if i)
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= _uses(g)
    return names


def remove_dead_nodes(model: onnx.ModelProto, report: PassReport | None = None) -> onnx.ModelProto:
    """Drop nodes no graph output depends on, then initializers and value_info nobody reads."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for a in node.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    needed |= _uses(sub)
        elif report is not None:
            report.fused[f"dead {node.op_type}"] += 1
    keep.reverse()
    dead_inits = [t for t in g.initializer if t.name not in needed]
    if report is not None and dead_inits:
        report.fused["unused initializer"] += len(dead_inits)
    _replace(g.node, keep)
    for k in reversed([k for k, t in enumerate(g.initializer) if t.name not in needed]):
        del g.initializer[k]            # in place: re-adding the survivors would copy every weight
    produced = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    _replace(g.value_info, [v for v in g.value_info if v.name in produced])
    return model


def _replace(repeated, items) -> None:
    items = list(items)
    del repeated[:]
    repeated.extend(items)


def _evaluate(node: onnx.NodeProto, inputs: list[np.ndarray], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator
    names = [f"in{k}" for k in range(len(node.input))]
    n = helper.make_node(node.op_type, [nm if i else "" for nm, i in zip(names, node.input)],
                         list(node.output), domain=node.domain)
    n.attribute.extend(node.attribute)
    feeds = {nm: x for nm, i, x in zip(names, node.input, inputs) if i}
    return ReferenceEvaluator(n, opsets={"": opset}).run(None, feeds)


def fold_constants(model: onnx.ModelProto, report: PassReport | None = None) -> onnx.ModelProto:
    """Evaluate nodes whose inputs are all constant (Constant nodes, Transpose/Reshape of weights, shape
    arithmetic on constants) once, at compile time, and store the results as initializers."""
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    inits = {t.name: t for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    values: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray:
        if name not in values:
            values[name] = numpy_helper.to_array(inits[name])
        return values[name]

    kept, new_inits = [], []
    for node in g.node:
        foldable = (node.domain in ("", "ai.onnx") and node.op_type in FOLDABLE
                    and all(i == "" or i in inits for i in node.input)
                    and not any(o in graph_outputs for o in node.output))
        if not foldable:
            kept.append(node)
            continue
        outs = _evaluate(node, [value(i) if i else None for i in node.input], opset)
        for name, arr in zip(node.output, outs):
            t = numpy_helper.from_array(np.ascontiguousarray(arr), name)
            inits[name] = t
            values[name] = arr
            new_inits.append(t)
        if report is not None:
            report.fused[f"folded {node.op_type}"] += 1
    _replace(g.node, kept)
    g.initializer.extend(new_inits)
    return remove_dead_nodes(model, report)


def _consumers(g: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out = defaultdict(list)
    for node in g.node:
        for i in node.input:
            out[i].append(node)
    return out


def _common_prefix(names: list[str]) -> str:
    return os.path.commonprefix(names)


def _matmul_weight(node: onnx.NodeProto, inits: dict):
    """(signature, width N, weight pieces) of a MatMul with a constant [K, N] weight or of a MatMulNBits whose
    inputs are constants (no g_idx, no bias); None for any other node. Siblings merge only on equal signatures."""
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in inits \
            and len(inits[node.input[1]].dims) == 2:
        w = numpy_helper.to_array(inits[node.input[1]])
        return ("float", w.shape[0], w.dtype.str), w.shape[1], [w]
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and 3 <= len(node.input) <= 4 \
            and all(i in inits for i in node.input[1:] if i):
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        n = a["N"]
        zp = inits.get(node.input[3]) if len(node.input) == 4 and node.input[3] else None
        sig = ("nbits", a["K"], a.get("bits", 4), a["block_size"], a.get("accuracy_level", 0),
               None if zp is None else zp.data_type)
        parts = [numpy_helper.to_array(inits[i]).reshape(n, -1) for i in node.input[1:] if i]
        return sig, n, parts
    return None


def _merge_sibling_matmuls(model: onnx.ModelProto, size: int, tag: str,
                           accept: Callable[[list[onnx.NodeProto], dict], bool],
                           report: PassReport | None) -> onnx.ModelProto:
    """Replace `size` MatMuls that read the same activation with constant [K, N_i] weights by one MatMul on the
    weights concatenated along N (plus the concatenated bias, if each is followed by a constant-bias Add) and a
    Split back into the original output names. One GEMM reads the activation once instead of `size` times.
    MatMulNBits siblings (same bits, block size, zero-point kind) merge the same way: their B, scales and zero
    points are all stored row by row (one row per output), so they concatenate along N too."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    cons = _consumers(g)
    groups: dict[tuple, list] = defaultdict(list)
    for node in g.node:
        got = _matmul_weight(node, inits)
        if got is not None:
            groups[(node.input[0], got[0])].append((node, got[1], got[2]))
    drop, insert = set(), {}
    for (x, sig), members in groups.items():
        group = [m[0] for m in members]
        if len(group) != size or not accept(group, cons):
            continue
        widths = [m[1] for m in members]
        adds = [cons[n.output[0]][0] if len(cons[n.output[0]]) == 1 else None for n in group]
        biased = all(a is not None and a.op_type == "Add" and _bias_of(a, n.output[0], inits, w)
                     for a, n, w in zip(adds, group, widths))
        base = _common_prefix([n.input[1] for n in group]) + tag
        split = numpy_helper.from_array(np.array(widths, dtype=np.int64), base + ".split")
        if sig[0] == "float":
            merged = [numpy_helper.from_array(np.concatenate([m[2][0] for m in members], axis=1), base + ".weight_T")]
            new = [helper.make_node("MatMul", [x, merged[0].name], [base + ".out"], name=base + "_MatMul")]
        else:
            src = group[0]
            shapes = [inits[i].dims for i in src.input[1:] if i]
            merged = [numpy_helper.from_array(np.concatenate([m[2][k] for m in members]).reshape(
                          sum(widths), *shapes[k][1:]) if len(shapes[k]) > 1 else
                          np.concatenate([m[2][k].reshape(-1) for m in members]), base + suffix)
                      for k, suffix in enumerate((".nbits_B", ".nbits_scales", ".nbits_zp")[:len(shapes)])]
            attrs = {a.name: helper.get_attribute_value(a) for a in src.attribute}
            attrs["N"] = sum(widths)
            new = [helper.make_node("MatMulNBits", [x, *(t.name for t in merged)], [base + ".out"],
                                    name=base + "_MatMulNBits", domain="com.microsoft", **attrs)]
        g.initializer.extend([*merged, split])
        outs = [n.output[0] for n in group]
        if biased:
            bias = np.concatenate([numpy_helper.to_array(inits[_bias_of(a, o, inits, w)])
                                   for a, o, w in zip(adds, outs, widths)])
            g.initializer.append(numpy_helper.from_array(bias, base + ".bias"))
            new.append(helper.make_node("Add", [base + ".out", base + ".bias"], [base + ".biased"], name=base + "_Add"))
            outs = [a.output[0] for a in adds]
            drop.update(id(a) for a in adds)
        new.append(helper.make_node("Split", [new[-1].output[0], split.name], outs, name=base + "_Split", axis=-1))
        insert[id(group[0])] = new
        drop.update(id(n) for n in group)
        if report is not None:
            report.fused[tag + (" (+bias)" if biased else "") + (" MatMulNBits" if sig[0] == "nbits" else "")] += 1
    nodes = []
    for node in g.node:
        nodes.extend(insert.get(id(node), []))
        if id(node) not in drop:
            nodes.append(node)
    _replace(g.node, nodes)
    return remove_dead_nodes(model)


def _bias_of(add: onnx.NodeProto, x: str, inits: dict, n: int) -> str | None:
    """The constant 1-D bias [n] that `add` adds to x, or None."""
    other = [i for i in add.input if i != x]
    if len(other) != 1 or other[0] not in inits or list(inits[other[0]].dims) != [n]:
        return None
    return other[0]


def merge_qkv(model: onnx.ModelProto, report: PassReport | None = None) -> onnx.ModelProto:
    """Three projections of one normalized activation (q, k, v) -> one MatMul + Split."""
    return _merge_sibling_matmuls(model, 3, "qkv", lambda group, cons: True, report)


def _is_swiglu(group: list[onnx.NodeProto], cons: dict) -> bool:
    """gate/up pair: one output feeds Sigmoid (SiLU = g * sigmoid(g)) and the other multiplies SiLU's result."""
    a, b = (n.output[0] for n in group)
    for gate, up in ((a, b), (b, a)):
        sig = [c for c in cons[gate] if c.op_type == "Sigmoid"]
        silu = [c for c in cons[gate] if c.op_type == "Mul" and sig and sig[0].output[0] in c.input]
        if silu and any(c.op_type == "Mul" and silu[0].output[0] in c.input for c in cons[up]):
            return True
    return False


def merge_gate_up(model: onnx.ModelProto, report: PassReport | None = None) -> onnx.ModelProto:
    """SwiGLU's gate and up projections -> one MatMul + Split feeding the SiLU-multiply."""
    return _merge_sibling_matmuls(model, 2, "gate_up", _is_swiglu, report)


# ops whose float32/int64 semantics are the same from opset 17 to 23 (later versions only added types)
_SAME_17_TO_23 = {"Add", "Cast", "Concat", "Constant", "Div", "Gather", "Gemm", "Greater", "Identity", "MatMul", "Mul",
                  "Neg", "RMSNormalization", "Range", "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "Split", "Sqrt",
                  "Squeeze", "Sub", "Transpose", "Unsqueeze", "Where"}
RMS_NORM_OPSET = 23


def _const_scalar(g: onnx.GraphProto, name: str) -> float | None:
    for t in g.initializer:
        if t.name == name:
            a = numpy_helper.to_array(t)
            return float(a.reshape(-1)[0]) if a.size == 1 else None
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] == name and n.attribute[0].name == "value":
            a = numpy_helper.to_array(n.attribute[0].t)
            return float(a.reshape(-1)[0]) if a.size == 1 else None
    return None


def _ints(g: onnx.GraphProto, name: str) -> list[int] | None:
    """An int64 constant (initializer or Constant node) as a list, or None."""
    a = _const_array(g, name)
    return None if a is None or a.dtype.kind not in "iu" else [int(v) for v in a.reshape(-1)]


def _const_array(g: onnx.GraphProto, name: str) -> np.ndarray | None:
    for t in g.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] == name and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
    return None


@dataclass
class _RmsNorm:
    x: str                          # normalized input
    weight: str                     # gamma initializer
    eps: float
    output: str
    nodes: list                     # the nodes computing it (6 exploded, or 1 RMSNormalization)


def _rms_norms(g: onnx.GraphProto) -> list[_RmsNorm]:
    """Every RMSNorm over the last axis: x / sqrt(mean(x*x) + eps) * w as the exporter writes it (ReduceMean axes
    as attribute before opset 18, as input after), or an RMSNormalization node; w a constant initializer."""
    producer = {o: n for n in g.node for o in n.output}
    cons = _consumers(g)
    inits = {t.name for t in g.initializer}
    found = []
    for node in g.node:
        if node.op_type == "RMSNormalization" and node.domain in ("", "ai.onnx"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("axis", -1) == -1 and len(node.input) == 2 and node.input[1] in inits:
                found.append(_RmsNorm(node.input[0], node.input[1], float(attrs.get("epsilon", 1e-5)),
                                      node.output[0], [node]))
            continue
        if node.op_type != "Div" or node.input[1] not in producer:
            continue
        div, x = node, node.input[0]
        sqrt = producer[div.input[1]]
        add = producer.get(sqrt.input[0]) if sqrt.op_type == "Sqrt" else None
        if add is None or add.op_type != "Add" or len(cons[div.output[0]]) != 1:
            continue
        eps = _const_scalar(g, add.input[1])
        mean = producer.get(add.input[0])
        if eps is None or mean is None or mean.op_type != "ReduceMean":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in mean.attribute}
        axes = attrs.get("axes") if len(mean.input) == 1 else _ints(g, mean.input[1])
        square = producer.get(mean.input[0])
        scale = cons[div.output[0]][0]
        w = [i for i in scale.input if i != div.output[0]]
        if (axes != [-1] or attrs.get("keepdims", 1) != 1 or attrs.get("noop_with_empty_axes", 0)
                or square is None or square.op_type != "Mul" or list(square.input) != [x, x]
                or scale.op_type != "Mul" or len(w) != 1 or w[0] not in inits
                or not all(len(cons[n.output[0]]) == 1 for n in (square, mean, add, sqrt))):
            continue
        found.append(_RmsNorm(x, w[0], eps, scale.output[0], [square, mean, add, sqrt, div, scale]))
    return found


def _same_in_23(op: str, version: int) -> bool:
    """Whether op at opset `version` means the same at opset 23 (later versions only added types)."""
    return (op in _SAME_17_TO_23 or (op == "ReduceMean" and version >= 18)
            or (op == "DequantizeLinear" and version >= 21))


def _splice(g: onnx.GraphProto, drop: set, insert: dict) -> list:
    """g's nodes without those in `drop` (ids), with insert[id(n)] (a list) placed before node n.
    The caller must hold references to the keyed nodes (protobuf wrappers of dead ones may reuse an id)."""
    nodes = []
    for n in g.node:
        nodes.extend(insert.get(id(n), []))
        if id(n) not in drop:
            nodes.append(n)
    return nodes


def fuse_rms_norm(model: onnx.ModelProto, report: PassReport | None = None) -> onnx.ModelProto:
    """x / sqrt(mean(x*x) + eps) * w (six nodes) -> one RMSNormalization (standard ONNX since opset 23).

    The model's opset is raised to 23, which is only valid when every remaining op means the same there as
    at the model's opset; otherwise the model is returned unchanged (report says why). onnxruntime runs
    RMSNormalization on CPU and TVM's Relax ONNX importer maps it to rms_norm.
    """
    g = model.graph
    opset = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    drop, insert = set(), {}
    norms = [r for r in _rms_norms(g) if len(r.nodes) > 1]
    for r in norms:
        insert[id(r.nodes[0])] = [helper.make_node("RMSNormalization", [r.x, r.weight], [r.output], axis=-1,
                                                   name=(r.nodes[-1].name or r.output) + "_rms", epsilon=r.eps)]
        drop.update(id(n) for n in r.nodes)
    nodes = _splice(g, drop, insert)
    version = opset.version if opset else 0
    other = sorted({n.op_type for n in nodes if n.domain in ("", "ai.onnx") and not _same_in_23(n.op_type, version)})
    if opset is None or opset.version > RMS_NORM_OPSET or other:
        if report is not None:
            report.fused[f"skipped: ops {', '.join(other)} need conversion to opset {RMS_NORM_OPSET}" if other
                         else f"skipped: opset {opset.version if opset else '?'} not supported"] += 1
        return model
    _replace(g.node, nodes)
    opset.version = RMS_NORM_OPSET
    model.ir_version = max(model.ir_version, 11)          # opset 23 needs IR version 11 (onnx 1.18)
    if report is not None and norms:
        report.fused["rms_norm"] += len(norms)
    return remove_dead_nodes(model)


# --- onnxruntime contrib fusions (domain com.microsoft): for the onnxruntime graph only, never for TVM ---------

CONTRIB = "com.microsoft"


def _use_contrib(model: onnx.ModelProto) -> None:
    if not any(o.domain == CONTRIB for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB, 1))


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _int_values(t: onnx.TensorProto) -> np.ndarray:
    """Integer tensor -> numpy int32 array of its values (4-bit tensors unpacked, low nibble first)."""
    if t.data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.INT4):
        raw = np.frombuffer(t.raw_data, np.uint8) if t.raw_data else np.asarray(t.int32_data, np.uint8)
        v = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(-1)[:int(np.prod(t.dims))].astype(np.int32)
        if t.data_type == onnx.TensorProto.INT4:
            v = np.where(v > 7, v - 16, v)
        return v.reshape(tuple(t.dims))
    return numpy_helper.to_array(t).astype(np.int32)


def _pack_bits(v: np.ndarray, bits: int) -> np.ndarray:
    """uint values along the last axis, packed `8 // bits` per byte, first in the low bits (MatMulNBits order)."""
    if bits == 8:
        return v.astype(np.uint8)
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros((*v.shape[:-1], 1), v.dtype)], axis=-1)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


@dataclass
class _DQWeight:
    """A constant weight W [N, K] = DequantizeLinear(q, scale, zp; axis=1, block) (+ per-block float minimum)."""
    dq: onnx.NodeProto
    output: str          # the float [N, K] tensor the matmul reads
    mins: str | None     # initializer [N, K/block, 1] added per block (GGUF Q4_1), or None


def _dq_weight(g: onnx.GraphProto, name: str, producer: dict, inits: dict) -> _DQWeight | None:
    node = producer.get(name)
    mins = None
    if node is not None and node.op_type == "Reshape":            # Q4_1: Reshape(Add(Reshape(DQ), min))
        add = producer.get(node.input[0])
        r1 = producer.get(add.input[0]) if add is not None and add.op_type == "Add" else None
        dq = producer.get(r1.input[0]) if r1 is not None and r1.op_type == "Reshape" else None
        if dq is None or dq.op_type != "DequantizeLinear" or add.input[1] not in inits:
            return None
        x = inits.get(dq.input[0])
        if x is None or len(x.dims) != 2:
            return None
        n, k = x.dims
        bs = _attrs(dq).get("block_size", 0)
        m = inits[add.input[1]]
        if (not bs or _ints(g, r1.input[1]) != [n, k // bs, bs] or _ints(g, node.input[1]) != [n, k]
                or list(m.dims) != [n, k // bs, 1] or m.data_type != onnx.TensorProto.FLOAT):
            return None
        node, mins = dq, add.input[1]
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    a = _attrs(node)
    x = inits.get(node.input[0])
    bs = a.get("block_size", 0)
    if (x is None or len(x.dims) != 2 or a.get("axis", 1) not in (1, -1) or bs < 16 or bs & (bs - 1)
            or x.dims[1] % bs or not all(i in inits for i in node.input if i)
            or x.data_type not in (onnx.TensorProto.UINT4, onnx.TensorProto.INT4, onnx.TensorProto.INT8,
                                   onnx.TensorProto.UINT8)
            or inits[node.input[1]].data_type != onnx.TensorProto.FLOAT):
        return None
    return _DQWeight(node, name, mins)


def _nbits_inputs(w: _DQWeight, inits: dict) -> tuple[dict, list[onnx.TensorProto]]:
    """MatMulNBits attributes and initializers (B, scales, zero_points) holding the same values as w."""
    dq, x = w.dq, inits[w.dq.input[0]]
    n, k = x.dims
    bs = _attrs(dq)["block_size"]
    nb = k // bs
    q = _int_values(x).reshape(n, nb, bs)
    zp = (_int_values(inits[dq.input[2]]).reshape(n, nb) if len(dq.input) > 2 and dq.input[2]
          else np.zeros((n, nb), np.int32))
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32).reshape(n, nb).copy()
    if x.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT8):       # MatMulNBits stores unsigned values
        shift = 8 if x.data_type == onnx.TensorProto.INT4 else 128
        q, zp = q + shift, zp + shift
    bits = 4 if q.max(initial=0) < 16 and zp.max(initial=0) < 16 and zp.min(initial=0) >= 0 else 8
    base = dq.input[0]
    zero = None
    if w.mins is not None:
        # (q - zp) * s + m == (q - (zp - m / s)) * s: a float zero point. Blocks with s == 0 hold only m.
        m = numpy_helper.to_array(inits[w.mins]).reshape(n, nb).astype(np.float32)
        flat = scale == 0
        q = np.where(flat[..., None], 0, q)
        zf = np.where(flat, -1.0, zp - m / np.where(flat, 1.0, scale)).astype(np.float32)
        scale = np.where(flat, m, scale).astype(np.float32)
        zero = numpy_helper.from_array(zf, base + "_nbits_zp")
    elif not (zp == 2 ** (bits - 1)).all():                                 # the op's default zero point
        zero = numpy_helper.from_array(_pack_bits(zp.astype(np.uint8), bits), base + "_nbits_zp")
    b = numpy_helper.from_array(_pack_bits(q.astype(np.uint8), bits).reshape(n, nb, bs * bits // 8), base + "_nbits_B")
    out = [b, numpy_helper.from_array(scale, base + "_nbits_scales")] + ([zero] if zero is not None else [])
    return {"K": k, "N": n, "bits": bits, "block_size": bs, "accuracy_level": 0}, out


def fuse_matmul_nbits(model: onnx.ModelProto, report: PassReport | None = None) -> onnx.ModelProto:
    """DequantizeLinear(blocked constant weight) -> [Transpose ->] MatMul, or -> Gemm(transB=1), becomes
    onnxruntime's MatMulNBits (com.microsoft): the weight stays 4/8-bit in the file and in memory and the kernel
    dequantizes block by block. Handles the exporter's qdq forms: uint4 + zero point (Q4_0), int8 (Q8_0),
    4-bit values in uint8 (a tied embedding), and uint4 + per-block float minimum (Q4_1), whose minimum becomes a
    float zero point zp - min / scale (equal to within float32 rounding of the weight)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    drop, insert, made = set(), {}, {}
    for node in g.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "MatMul":
            t = producer.get(node.input[1])
            if t is None or t.op_type != "Transpose" or _attrs(t).get("perm") != [1, 0]:
                continue
            w = _dq_weight(g, t.input[0], producer, inits)
        elif node.op_type == "Gemm":
            a = _attrs(node)
            if (a.get("transA", 0) or a.get("transB", 0) != 1 or a.get("alpha", 1.0) != 1.0
                    or len(node.input) > 2 and node.input[2]):
                continue
            w = _dq_weight(g, node.input[1], producer, inits)
        else:
            continue
        if w is None:
            continue
        key = w.output
        if key not in made:
            attrs, tensors = _nbits_inputs(w, inits)
            for t in tensors:
                if t.name not in inits:
                    g.initializer.append(t)
                    inits[t.name] = t
            made[key] = (attrs, [t.name for t in tensors])
        attrs, names = made[key]
        insert[id(node)] = [helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output),
                                             name=(node.name or node.output[0]) + "_nbits", domain=CONTRIB, **attrs)]
        drop.add(id(node))
        if report is not None:
            report.fused[f"MatMulNBits {attrs['bits']}-bit" + (" (float zero point)" if w.mins else "")] += 1
    if not drop:
        return model
    _use_contrib(model)
    _replace(g.node, _splice(g, drop, insert))
    return remove_dead_nodes(model)


def fuse_skip_rms_norm(model: onnx.ModelProto, report: PassReport | None = None) -> onnx.ModelProto:
    """Residual add + RMSNorm (h = a + b; y = rms_norm(h) * w) -> onnxruntime's SkipSimplifiedLayerNormalization
    (com.microsoft): one pass over the row computes both; its input_skip_bias_sum output is h, which feeds the
    next residual add. Matches the exploded six-node norm or RMSNormalization (after fuse_rms_norm)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    cons = _consumers(g)
    inits = {t.name for t in g.initializer}
    outputs = {o.name for o in g.output}
    drop, insert = set(), {}
    for r in _rms_norms(g):
        add = producer.get(r.x)
        if (add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or id(add) in drop
                or any(i in inits or i not in producer and i not in {v.name for v in g.input} for i in add.input)):
            continue
        # h is still needed by whatever else reads it (the next residual add) -> the op's 4th output
        others = [c for c in cons[r.x] if c not in r.nodes]
        keep_sum = bool(others) or r.x in outputs
        node = helper.make_node("SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], r.weight],
                                [r.output, "", "", r.x if keep_sum else ""], name=r.output + "_skip_rms",
                                domain=CONTRIB, epsilon=r.eps)
        insert[id(r.nodes[-1])] = [node]
        drop.update(id(n) for n in (add, *r.nodes))
        if report is not None:
            report.fused["SkipSimplifiedLayerNormalization"] += 1
    if not drop:
        return model
    _use_contrib(model)
    _replace(g.node, _splice(g, drop, insert))
    _toposort(g)                 # the fused node sits where the norm ended; readers of h may come earlier
    return remove_dead_nodes(model)


def _toposort(g: onnx.GraphProto) -> None:
    """Reorder g's nodes topologically, keeping the current order wherever it is already valid."""
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending, order = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at {rest[0].name} ({rest[0].op_type})")
        pending = rest
    _replace(g.node, order)


@dataclass
class _Rope:
    x: str              # [1, T, heads, head_dim] before rotation
    cos: str            # [1, T, 1, rope_dim] gathered cos (both halves)
    sin: str            # [1, T, 1, rope_dim] gathered sin with the first half negated
    rope_dim: int
    nodes: list


def _match_rope(g, out: str, producer: dict, head_dim: int) -> _Rope | None:
    """The exporter's NeoX rotation: x*cos + concat(x[h:r], x[:h])*sin on the first r dims (+ the rest as is)."""
    def slice_of(name):
        n = producer.get(name)
        if n is None or n.op_type != "Slice" or len(n.input) < 4 or len(n.input) > 4 and n.input[4]:
            return None
        s, e, ax = _ints(g, n.input[1]), _ints(g, n.input[2]), _ints(g, n.input[3])
        return (n, n.input[0], s[0], e[0]) if s and e and ax in ([3], [-1]) else None

    top = producer.get(out)
    nodes, rest = [], None
    if top is not None and top.op_type == "Concat" and len(top.input) == 2 and _attrs(top).get("axis") in (3, -1):
        rest = slice_of(top.input[1])
        if rest is None:
            return None
        nodes += [top, rest[0]]
        top = producer.get(top.input[0])
    if top is None or top.op_type != "Add":
        return None
    m1, m2 = producer.get(top.input[0]), producer.get(top.input[1])
    if m1 is None or m2 is None or m1.op_type != "Mul" or m2.op_type != "Mul":
        return None
    sw = producer.get(m2.input[0])
    if sw is None or sw.op_type != "Concat" or len(sw.input) != 2:
        return None
    hi, lo = slice_of(sw.input[0]), slice_of(sw.input[1])
    xr, cos, sin = m1.input[0], m1.input[1], m2.input[1]
    if hi is None or lo is None or hi[1] != xr or lo[1] != xr or lo[2] != 0 or hi[2] != lo[3]:
        return None
    r = hi[3] if hi[3] < 2 ** 62 else head_dim
    nodes += [top, m1, m2, sw, hi[0], lo[0]]
    x = xr
    if rest is not None:
        head = slice_of(xr)
        if head is None or head[1] != rest[1] or head[2] != 0 or head[3] != r or rest[2] != r:
            return None
        nodes.append(head[0])
        x = rest[1]
    elif r != head_dim or hi[2] * 2 != r:
        return None
    return _Rope(x, cos, sin, r, nodes) if hi[2] * 2 == r else None


def _rope_cache(g, name: str, producer: dict, inits: dict, half: int, sin: bool):
    """Unsqueeze(Gather(table [P, 2*half], position_ids), [2]) -> (the GQA cache [P, half], position_ids)."""
    u = producer.get(name)
    ga = producer.get(u.input[0]) if u is not None and u.op_type == "Unsqueeze" else None
    if (ga is None or ga.op_type != "Gather" or _attrs(ga).get("axis", 0) != 0 or ga.input[0] not in inits
            or _ints(g, u.input[1]) not in ([2], [-2])):
        return None
    t = numpy_helper.to_array(inits[ga.input[0]])
    if t.ndim != 2 or t.shape[1] != 2 * half:
        return None
    a, b = t[:, :half], t[:, half:]
    if not (np.array_equal(-a, b) if sin else np.array_equal(a, b)):
        return None                                     # not the table layout this pass knows
    return (b if sin else a), ga.input[1]


def fuse_rope_attention(model: onnx.ModelProto, report: PassReport | None = None) -> onnx.ModelProto:
    """RoPE on q and k + KV-cache concat + grouped-query attention (causal mask, softmax) -> onnxruntime's
    GroupQueryAttention (com.microsoft) with do_rotary=1 and the cos/sin tables as its caches.

    Why GQA and not RotaryEmbedding + MultiHeadAttention: MultiHeadAttention needs n_kv_heads == n_heads (SmolLM2
    has 9 query heads on 3 KV heads), so the KV heads would have to be repeated in the graph. GQA takes the
    graph's explicit past/present I/O as it is: past [1, kv_heads, past, head_dim] in, present = past + new
    (BNSH, rotated keys) out, so the runtime feeds the fused graph exactly like the exported one. Its
    seqlens_k (= past + seq - 1) and total_sequence_length come from the input shapes inside the graph; the
    position_ids input is passed through. If q, k, v come straight from merge_qkv's Split, GQA reads the
    packed projection and the Split goes too."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    cons = _consumers(g)
    inits = {t.name: t for t in g.initializer}
    graph_in = {i.name for i in g.input}
    graph_out = {o.name for o in g.output}

    def one(name, op):
        n = producer.get(name)
        return n if n is not None and n.op_type == op and n.domain in ("", "ai.onnx") else None

    def perm(n, p):
        return n is not None and _attrs(n).get("perm") == p

    matches = []
    for sm in g.node:
        if sm.op_type != "Softmax" or _attrs(sm).get("axis", -1) != -1:
            continue
        add = one(sm.input[0], "Add")
        mul = one(add.input[0], "Mul") if add else None
        mask = one(add.input[1], "Where") if add else None
        mm1 = one(mul.input[0], "MatMul") if mul else None
        scale = _const_scalar(g, mul.input[1]) if mul else None
        if mm1 is None or mask is None or scale is None or not one(mask.input[0], "Greater") \
                or _const_scalar(g, mask.input[1]) != -np.inf or _const_scalar(g, mask.input[2]) != 0.0:
            continue
        qg, kg = one(mm1.input[0], "Transpose"), one(mm1.input[1], "Transpose")
        q5 = one(qg.input[0], "Reshape") if perm(qg, [0, 2, 3, 1, 4]) else None
        ku = one(kg.input[0], "Unsqueeze") if perm(kg, [0, 1, 2, 4, 3]) else None
        after = cons[sm.output[0]]
        mm2 = after[0] if len(after) == 1 and after[0].op_type == "MatMul" else None
        vu = one(mm2.input[1], "Unsqueeze") if mm2 else None
        ot = cons[mm2.output[0]][0] if mm2 and len(cons[mm2.output[0]]) == 1 else None
        orr = cons[ot.output[0]][0] if perm(ot, [0, 3, 1, 2, 4]) and len(cons[ot.output[0]]) == 1 else None
        if None in (q5, ku, vu, orr) or orr.op_type != "Reshape":
            continue
        pk, pv = one(ku.input[0], "Concat"), one(vu.input[0], "Concat")
        if pk is None or pv is None or pk.output[0] not in graph_out or pv.output[0] not in graph_out \
                or pk.input[0] not in graph_in or pv.input[0] not in graph_in:
            continue
        kt, vt = one(pk.input[1], "Transpose"), one(pv.input[1], "Transpose")
        if not (perm(kt, [0, 2, 1, 3]) and perm(vt, [0, 2, 1, 3])):
            continue
        shape5, shape_out = _ints(g, q5.input[1]), _ints(g, orr.input[1])
        vr = one(vt.input[0], "Reshape")
        if vr is None or shape5 is None or len(shape5) != 5 or shape_out is None:
            continue
        kvh, rep, d = shape5[2:]
        qrope = _match_rope(g, q5.input[0], producer, d)
        krope = _match_rope(g, kt.input[0], producer, d)
        if qrope is None or krope is None or (qrope.cos, qrope.sin) != (krope.cos, krope.sin) \
                or qrope.rope_dim != krope.rope_dim:
            continue
        qr, kr = one(qrope.x, "Reshape"), one(krope.x, "Reshape")
        h = kvh * rep
        if (qr is None or kr is None or _ints(g, qr.input[1]) != [0, 0, h, d] or _ints(g, kr.input[1]) != [0, 0, kvh, d]
                or _ints(g, vr.input[1]) != [0, 0, kvh, d] or shape_out != [0, 0, h * d]):
            continue
        half = qrope.rope_dim // 2
        if half % 8 or qrope.rope_dim > d:
            if report is not None:       # onnxruntime's kernel: cos_cache width <= head_size / 2, multiple of 8
                report.fused[f"skipped: GroupQueryAttention needs rope_dim % 16 == 0 (rope_dim {qrope.rope_dim})"] += 1
            continue
        cos = _rope_cache(g, qrope.cos, producer, inits, half, sin=False)
        sin = _rope_cache(g, qrope.sin, producer, inits, half, sin=True)
        if cos is None or sin is None or cos[1] != sin[1]:
            continue
        region = [sm, add, mul, mm1, qg, q5, kg, ku, mm2, vu, ot, orr, pk, pv, kt, vt, qr, kr, vr,
                  *qrope.nodes, *krope.nodes]
        ids = {id(n) for n in region}
        inner = [o for n in region if n not in (orr, pk, pv) for o in n.output]
        if any(id(c) not in ids for o in inner for c in cons[o]) or any(o in graph_out for o in inner):
            continue                                    # an intermediate is read elsewhere: leave it alone
        matches.append(dict(region=region, q=qr.input[0], k=kr.input[0], v=vr.input[0], past_k=pk.input[0],
                            past_v=pv.input[0], out=orr.output[0], present_k=pk.output[0], present_v=pv.output[0],
                            h=h, kvh=kvh, scale=scale, cos=cos[0], sin=sin[0], pos=cos[1]))
    if not matches:
        return model
    first = matches[0]
    # shared by every layer: seqlens_k = past + seq - 1 (int32 [1]), total_sequence_length (int32 scalar)
    i64 = lambda n, v: numpy_helper.from_array(np.asarray(v, np.int64), n)  # noqa: E731
    g.initializer.extend([i64("gqa_one", [1]), i64("gqa_axis0", [0]),
                          numpy_helper.from_array(first["cos"], "gqa_cos_cache"),
                          numpy_helper.from_array(first["sin"], "gqa_sin_cache")])
    setup = [helper.make_node("Shape", [first["past_k"]], ["gqa_past"], start=2, end=3),
             helper.make_node("Shape", [first["pos"]], ["gqa_seq"], start=1, end=2),
             helper.make_node("Add", ["gqa_past", "gqa_seq"], ["gqa_total64"]),
             helper.make_node("Sub", ["gqa_total64", "gqa_one"], ["gqa_seqlens64"]),
             helper.make_node("Cast", ["gqa_seqlens64"], ["gqa_seqlens_k"], to=onnx.TensorProto.INT32),
             helper.make_node("Squeeze", ["gqa_total64", "gqa_axis0"], ["gqa_total_s64"]),
             helper.make_node("Cast", ["gqa_total_s64"], ["gqa_total_len"], to=onnx.TensorProto.INT32)]
    drop, insert = set(), {id(g.node[0]): setup}
    for m in matches:
        if not (np.array_equal(m["cos"], first["cos"]) and np.array_equal(m["sin"], first["sin"])):
            continue
        q, k, v = m["q"], m["k"], m["v"]
        split = producer.get(q)
        packed = (split is not None and split.op_type == "Split" and list(split.output) == [q, k, v]
                  and all(len(cons[o]) == 1 for o in (q, k, v)))
        qkv = [split.input[0], "", ""] if packed else [q, k, v]
        node = helper.make_node(
            "GroupQueryAttention",
            [*qkv, m["past_k"], m["past_v"], "gqa_seqlens_k", "gqa_total_len", "gqa_cos_cache", "gqa_sin_cache",
             m["pos"]],
            [m["out"], m["present_k"], m["present_v"]], name=m["out"] + "_gqa", domain=CONTRIB,
            num_heads=m["h"], kv_num_heads=m["kvh"], scale=float(m["scale"]), do_rotary=1, rotary_interleaved=0)
        insert[id(m["region"][0])] = insert.get(id(m["region"][0]), []) + [node]
        drop.update(id(n) for n in m["region"])
        if packed:
            drop.add(id(split))
        if report is not None:
            report.fused["GroupQueryAttention (rotary" + (", packed qkv)" if packed else ")")] += 1
    _use_contrib(model)
    _replace(g.node, _splice(g, drop, insert))
    _toposort(g)
    return remove_dead_nodes(model)


def lower_float_zero_points(model: onnx.ModelProto, report: PassReport | None = None) -> onnx.ModelProto:
    """MatMulNBits with float zero points (GGUF Q4_1) -> MatMulNBits with the default zero point + a per-block
    correction.

    (q - z) * s == (q - 8) * s + c with c = (8 - z) * s per block (4 bits), so
    x @ W^T == MatMulNBits(x; q, s) + blocksum(x) @ c^T,
    blocksum(x) [M, K/block] being x summed within each block (computed once per activation). onnxruntime 1.32
    runs float zero points on a slow dequantize-everything path (~10x slower on CPU, measured: 13.8 vs 1.4 ms
    for a 576x3072 weight); the correction matmul is K/32 wide, so this lowering wins despite adding nodes.
    Run it after the merges: it rewrites each MatMulNBits into two nodes that merge_qkv/merge_gate_up no longer
    recognise as one projection."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    drop, insert, sums = set(), {}, {}
    nodes = list(g.node)       # keeps the wrappers alive, so the id()s used as keys stay unique
    for node in nodes:
        if node.op_type != "MatMulNBits" or node.domain != CONTRIB or len(node.input) != 4 \
                or node.input[3] not in inits or inits[node.input[3]].data_type != onnx.TensorProto.FLOAT:
            continue
        a = _attrs(node)
        n, k, bs, bits = a["N"], a["K"], a["block_size"], a.get("bits", 4)
        nb = k // bs
        scale = numpy_helper.to_array(inits[node.input[2]]).reshape(n, nb).astype(np.float32)
        zf = numpy_helper.to_array(inits[node.input[3]]).reshape(n, nb).astype(np.float32)
        base = node.input[1]
        # against the op's default zero point d = 2^(bits-1): (q - z) * s == (q - d) * s + (d - z) * s
        corr = numpy_helper.from_array(np.ascontiguousarray(((2 ** (bits - 1) - zf) * scale).T), base + "_min_T")
        g.initializer.append(corr)                                                                 # [nb, N]
        x, out = node.input[0], node.output[0]
        new = []
        if (x, bs, k) not in sums:
            shape = numpy_helper.from_array(np.array([-1, nb, bs], np.int64), f"{x}_blocks{bs}_shape")
            axes = numpy_helper.from_array(np.array([-1], np.int64), f"{x}_blocks{bs}_axes")
            g.initializer.extend([shape, axes])
            new += [helper.make_node("Reshape", [x, shape.name], [f"{x}_blocks{bs}"]),
                    helper.make_node("ReduceSum", [f"{x}_blocks{bs}", axes.name], [f"{x}_blocksum{bs}"], keepdims=0)]
            sums[(x, bs, k)] = f"{x}_blocksum{bs}"
        attrs = {**a}
        new += [helper.make_node("MatMulNBits", [x, node.input[1], node.input[2]], [out + "_q"],
                                 name=node.name + "_zp0", domain=CONTRIB, **attrs),
                helper.make_node("MatMul", [sums[(x, bs, k)], corr.name], [out + "_min"]),
                helper.make_node("Add", [out + "_q", out + "_min"], [out])]
        insert[id(node)] = new
        drop.add(id(node))
        if report is not None:
            report.fused["float zero point -> blocksum correction"] += 1
    if not drop:
        return model
    _replace(g.node, _splice(g, drop, insert))
    return remove_dead_nodes(model)


def split_8bit_weights(model: onnx.ModelProto, report: PassReport | None = None) -> onnx.ModelProto:
    """8-bit MatMulNBits -> one 4-bit MatMulNBits over [x, x] (K doubled), exactly: each stored byte
    u = 16 * hi + lo, so (u - z) * s == (hi - z_hi) * 16s + (lo - z_lo) * s with z = 16 * z_hi + z_lo.
    onnxruntime 1.32's CPU kernel has a fast path for 4-bit weights at accuracy_level 0 but dequantizes 8-bit
    ones on every call (measured: 18 ms vs 1.4 ms for a 576x3072 weight; SmolLM2's Q8_0 lm_head took ~0.5 s per
    token). Same bytes on disk; the Concat of the activation is K floats."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    drop, insert, twice = set(), {}, set()
    nodes = list(g.node)       # keeps the wrappers alive, so the id()s used as keys stay unique
    for node in nodes:
        a = _attrs(node) if node.op_type == "MatMulNBits" and node.domain == CONTRIB else {}
        if a.get("bits") != 8 or len(node.input) > 4 or not all(i in inits for i in node.input[1:] if i):
            continue
        n, k, bs = a["N"], a["K"], a["block_size"]
        nb = k // bs
        u = numpy_helper.to_array(inits[node.input[1]]).reshape(n, nb, bs)
        s = numpy_helper.to_array(inits[node.input[2]]).reshape(n, nb).astype(np.float32)
        zt = inits.get(node.input[3]) if len(node.input) == 4 and node.input[3] else None
        if zt is not None and zt.data_type != onnx.TensorProto.UINT8:
            continue
        z = numpy_helper.to_array(zt).reshape(n, nb) if zt is not None else np.full((n, nb), 128, np.uint8)
        q4 = np.concatenate([u >> 4, u & 0x0F], axis=1)                                  # [N, 2*nb, bs]
        z4 = np.concatenate([z >> 4, z & 0x0F], axis=1)
        base = node.input[1] + "_hilo"
        tensors = [numpy_helper.from_array(_pack_bits(q4, 4), base + "_B"),
                   numpy_helper.from_array(np.concatenate([s * 16, s], axis=1), base + "_scales"),
                   numpy_helper.from_array(_pack_bits(z4, 4), base + "_zp")]
        g.initializer.extend(tensors)
        x = node.input[0]
        attrs = {**a, "bits": 4, "K": 2 * k}
        new = [] if x in twice else [helper.make_node("Concat", [x, x], [x + "_twice"], axis=-1)]
        twice.add(x)
        insert[id(node)] = new + [helper.make_node("MatMulNBits", [x + "_twice", *(t.name for t in tensors)],
                                                   list(node.output), name=node.name + "_hilo", domain=CONTRIB,
                                                   **attrs)]
        drop.add(id(node))
        if report is not None:
            report.fused["8-bit -> 4-bit hi/lo halves"] += 1
    if not drop:
        return model
    _replace(g.node, _splice(g, drop, insert))
    return remove_dead_nodes(model)


DEFAULT_PASSES: list[Pass] = [fold_constants, merge_qkv, merge_gate_up]
# opt-in: raises the opset to 23 (onnxruntime >= 1.22 and TVM's importer read it; older consumers may not)
FUSION_PASSES: list[Pass] = [*DEFAULT_PASSES, fuse_rms_norm]
# for the graph only onnxruntime runs: standard fusions + com.microsoft contrib ops (MatMulNBits,
# SkipSimplifiedLayerNormalization, GroupQueryAttention). TVM's importer gets DEFAULT_PASSES / FUSION_PASSES.
# MatMulNBits fusion runs before the merges so q/k/v and gate/up merge as MatMulNBits.
# SwiGLU: gate/up are merged; Sigmoid/Mul/Mul is left as is (onnxruntime's CPU provider has no fused SwiGLU op
# for this layout, and its own graph optimizer handles the elementwise chain).
ORT_FUSION_PASSES: list[Pass] = [fold_constants, fuse_matmul_nbits, merge_qkv, merge_gate_up, fuse_rms_norm,
                                 fuse_skip_rms_norm, fuse_rope_attention, lower_float_zero_points,
                                 split_8bit_weights]


def format_report(reports: list[PassReport]) -> str:
    """The table `edgellm compile --report` prints."""
    lines = [f"{'pass':<24} {'nodes before -> after':<22} patterns"] + [str(r) for r in reports]
    if reports:
        lines.append(f"{'total':<24} nodes {reports[0].nodes_before:>6} -> {reports[-1].nodes_after}")
    return "\n".join(lines)


def run_passes(model: onnx.ModelProto, passes: list[Pass] | None = None) -> tuple[onnx.ModelProto, list[PassReport]]:
    """Apply passes in order (in place); one PassReport per pass with node counts and fused patterns."""
    reports = []
    for p in passes or DEFAULT_PASSES:
        r = PassReport(p.__name__, nodes_before=len(model.graph.node))
        model = p(model, r)
        r.nodes_after = len(model.graph.node)
        reports.append(r)
    return model, reports
