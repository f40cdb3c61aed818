"""Graph passes over exported ONNX models: each a small function ModelProto -> ModelProto.

A pass edits the model in place (copying multi-hundred-MB protos per pass would double peak memory) and
returns it; given a PassReport it records what it fused. `run_passes` chains them and reports node counts
before and after each. Order matters: fold_constants first turns the exporter's Transpose(weight) nodes
into transposed initializers, which is what the MatMul merges look for.
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
        return f"{self.name:<18} nodes {self.nodes_before:>6} -> {self.nodes_after:<6} {what}"


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


def _merge_sibling_matmuls(model: onnx.ModelProto, size: int, tag: str,
                           accept: Callable[[list[onnx.NodeProto], dict], bool],
                           report: PassReport | None) -> onnx.ModelProto:
    """Replace `size` MatMuls that read the same activation with constant [K, N_i] weights by one MatMul on the
    weights concatenated along N (plus the concatenated bias, if each is followed by a constant-bias Add) and a
    Split back into the original output names. One GEMM reads the activation once instead of `size` times."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    cons = _consumers(g)
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in g.node:
        if (node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in inits
                and len(inits[node.input[1]].dims) == 2):
            groups[node.input[0]].append(node)
    drop, insert = set(), {}
    for x, group in groups.items():
        if len(group) != size or not accept(group, cons):
            continue
        ws = [numpy_helper.to_array(inits[n.input[1]]) for n in group]
        if len({w.shape[0] for w in ws}) != 1 or len({w.dtype for w in ws}) != 1:
            continue
        adds = [cons[n.output[0]][0] if len(cons[n.output[0]]) == 1 else None for n in group]
        biased = all(a is not None and a.op_type == "Add" and _bias_of(a, n.output[0], inits, w.shape[1])
                     for a, n, w in zip(adds, group, ws))
        base = _common_prefix([n.input[1] for n in group]) + tag
        merged_w = numpy_helper.from_array(np.concatenate(ws, axis=1), base + ".weight_T")
        split = numpy_helper.from_array(np.array([w.shape[1] for w in ws], dtype=np.int64), base + ".split")
        g.initializer.extend([merged_w, split])
        new = [helper.make_node("MatMul", [x, merged_w.name], [base + ".out"], name=base + "_MatMul")]
        outs = [n.output[0] for n in group]
        if biased:
            bias = np.concatenate([numpy_helper.to_array(inits[_bias_of(a, o, inits, w.shape[1])])
                                   for a, o, w in zip(adds, outs, ws)])
            g.initializer.append(numpy_helper.from_array(bias, base + ".bias"))
            new.append(helper.make_node("Add", [base + ".out", base + ".bias"], [base + ".biased"], name=base + "_Add"))
            outs = [a.output[0] for a in adds]
            drop.update(id(a) for a in adds)
        new.append(helper.make_node("Split", [new[-1].output[0], split.name], outs, name=base + "_Split", axis=-1))
        insert[id(group[0])] = new
        drop.update(id(n) for n in group)
        if report is not None:
            report.fused[tag + (" (+bias)" if biased else "")] += 1
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


def fuse_rms_norm(model: onnx.ModelProto, report: PassReport | None = None) -> onnx.ModelProto:
    """x / sqrt(mean(x*x) + eps) * w (six nodes) -> one RMSNormalization (standard ONNX since opset 23).

    The model's opset is raised to 23, which is only valid when every remaining op means the same there as
    at the model's opset; otherwise the model is returned unchanged (report says why). onnxruntime runs
    RMSNormalization on CPU and TVM's Relax ONNX importer maps it to rms_norm.
    """
    g = model.graph
    opset = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    producer = {o: n for n in g.node for o in n.output}
    cons = _consumers(g)
    inits = {t.name for t in g.initializer}
    fused, drop, insert = 0, set(), {}
    for div in g.node:
        if div.op_type != "Div" or div.input[1] not in producer:
            continue
        x = div.input[0]
        sqrt = producer[div.input[1]]
        add = producer.get(sqrt.input[0]) if sqrt.op_type == "Sqrt" else None
        if add is None or add.op_type != "Add" or len(cons[div.output[0]]) != 1:
            continue
        eps = _const_scalar(g, add.input[1])
        mean = producer.get(add.input[0])
        if eps is None or mean is None or mean.op_type != "ReduceMean":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in mean.attribute}
        square = producer.get(mean.input[0])
        scale = cons[div.output[0]][0]
        w = [i for i in scale.input if i != div.output[0]]
        if (attrs.get("axes") != [-1] or attrs.get("keepdims", 1) != 1 or len(mean.input) != 1 or square is None
                or square.op_type != "Mul" or list(square.input) != [x, x] or scale.op_type != "Mul"
                or len(w) != 1 or w[0] not in inits
                or not all(len(cons[n.output[0]]) == 1 for n in (square, mean, add, sqrt))):
            continue
        node = helper.make_node("RMSNormalization", [x, w[0]], list(scale.output), name=(scale.name or div.name) + "_rms",
                                axis=-1, epsilon=eps)
        insert[id(square)] = node
        drop.update(id(n) for n in (square, mean, add, sqrt, div, scale))
        fused += 1
    nodes = []
    for n in g.node:
        if id(n) in insert:
            nodes.append(insert[id(n)])
        if id(n) not in drop:
            nodes.append(n)
    other = sorted({n.op_type for n in nodes if n.domain in ("", "ai.onnx")} - _SAME_17_TO_23)
    if opset is None or opset.version > RMS_NORM_OPSET or other:
        if report is not None:
            report.fused[f"skipped: ops {', '.join(other)} need conversion to opset {RMS_NORM_OPSET}" if other
                         else f"skipped: opset {opset.version if opset else '?'} not supported"] += 1
        return model
    _replace(g.node, nodes)
    opset.version = RMS_NORM_OPSET
    model.ir_version = max(model.ir_version, 11)          # opset 23 needs IR version 11 (onnx 1.18)
    if report is not None and fused:
        report.fused["rms_norm"] += fused
    return remove_dead_nodes(model)


DEFAULT_PASSES: list[Pass] = [fold_constants, merge_qkv, merge_gate_up]
# opt-in: raises the opset to 23 (onnxruntime >= 1.22 and TVM's importer read it; older consumers may not)
FUSION_PASSES: list[Pass] = [*DEFAULT_PASSES, fuse_rms_norm]


def format_report(reports: list[PassReport]) -> str:
    """The table `edgellm compile --report` prints."""
    lines = [f"{'pass':<18} {'nodes before -> after':<22} patterns"] + [str(r) for r in reports]
    if reports:
        lines.append(f"{'total':<18} nodes {reports[0].nodes_before:>6} -> {reports[-1].nodes_after}")
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
