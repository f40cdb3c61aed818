"""Lower a model's whole forward pass to Apache TVM Relax and compile it into one Relax VM executable.

TVM's ONNX importer cannot read our exported graphs (Add on shape values in the causal mask, uint4
weights), so the Relax module is built directly with relax.BlockBuilder: embedding lookup, every layer,
final norm and lm_head in one function, so a token costs one VM call instead of ~300 kernel calls from
Python. Slicing, SiLU-multiply, biases and the first norm are Relax ops (legalized, then fused by
FuseOps/FuseTIR: the gate/up slices + SiLU + multiply become one kernel); each residual add is fused by hand
with the RMSNorm after it (one TE kernel, two outputs); the GEMVs, RoPE and attention are
edgellm.compiler.tvm_build's hand-scheduled TensorIR kernels (dlight's CPU rules take minutes) called with
call_tir, and the KV cache is written in place (call_tir_inplace). Weights are function parameters
(edgellm.runtime.relax_backend.weight_params, q/k/v and gate/up merged), bound at load time.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.config import ModelConfig
from ..runtime.relax_backend import relax_signature, weight_params
from . import tvm_build
from .tvm_build import cross_compiler, export_atomic, resolve_target


@dataclass
class RelaxBuildResult:
    path: Path
    functions: list[str]                       # the Relax functions of the executable
    fused: list[str]                           # PrimFuncs made by FuseOps + FuseTIR
    kernels_per_token: int = 0                 # kernel launches inside one `decode` VM call
    seconds: dict = field(default_factory=dict)   # per stage: build, passes, compile, export
    target: dict = field(default_factory=dict)


def _kv_write(cfg: ModelConfig):
    """cache[layer, pos + t] = new[t] for T rows, in place."""
    from tvm.script import tirx as T
    L, KVH, d = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim

    @T.prim_func(private=True)
    def kv_write(var_cache: T.handle, var_new: T.handle, layer: T.int64, pos: T.int64):
        T.func_attr({"tir.noalias": True})
        n_ctx, rows = T.int64(), T.int64()
        cache = T.match_buffer(var_cache, (L, n_ctx, KVH, d), "float32")
        new = T.match_buffer(var_new, (rows, KVH * d), "float32")
        for t, h, j in T.grid(rows, KVH, d):
            cache[layer, pos + t, h, j] = new[t, h * d + j]

    return kv_write


_OPAQUE = 8            # tvm::relax::OpPatternKind::kOpaque


class _Kernels:
    """The hand-scheduled TensorIR kernels, added to the BlockBuilder once each (GlobalVars by key)."""

    def __init__(self, bb, cfg: ModelConfig):
        self.bb, self.cfg, self.gv = bb, cfg, {}

    def get(self, key: tuple):
        if key not in self.gv:
            f, name = self._make(key)
            # opaque to FuseOps: these keep their hand schedules (their int32 TE shapes would also trip FuseTIR)
            f = f.with_attr("global_symbol", name).with_attr("op_pattern", _OPAQUE)
            self.gv[key] = self.bb.add_func(f, name)
        return self.gv[key]

    def _make(self, key: tuple):
        c, kind, rows = self.cfg, key[0], key[-1]
        T = 1 if rows == 1 else None
        suffix = "" if rows == 1 else "_rows"
        if kind == "matmul":
            N, K = key[1], key[2]
            name = f"matmul_{N}x{K}{suffix}"
            return tvm_build._matmul(N, K, T), name
        if kind == "rope":
            heads = key[1]
            name = f"rope_{heads}x{c.head_dim}{suffix}"
            return tvm_build._rope(heads, c.head_dim, c.rope_dim, c.rope_neox, T), name   # x, cos, sin, pos -> y
        if kind == "attention":
            name = f"attention{suffix}"
            return tvm_build._attention(c, T), name                 # q, k_cache, v_cache, layer, pos -> out
        if kind == "kv_write":
            return _kv_write(c), "kv_write"
        raise KeyError(key)


def _add_rms_norm(x, o, w, eps: float):
    """TE: s = x + o and y = s / sqrt(mean(s^2) + eps) * w, both outputs of one kernel (s is the residual)."""
    from tvm import te
    D = int(x.shape[1])
    s = te.compute(x.shape, lambda t, i: x[t, i] + o[t, i], name="residual")
    k = te.reduce_axis((0, D), name="k")
    ss = te.compute((x.shape[0],), lambda t: te.sum(s[t, k] * s[t, k], axis=k), name="ss")
    y = te.compute(x.shape, lambda t, i: s[t, i] / te.sqrt(ss[t] / float(D) + eps) * w[i], name="normed")
    return [s, y]


def _forward(bb, cfg: ModelConfig, kern: _Kernels, fname: str, rows, last_only: bool) -> None:
    """Emit Relax function `fname`(ids[T], pos, k_cache, v_cache, cos, sin, *weights) -> logits."""
    import tvm.tirx as tir
    from tvm import relax
    R = relax.op
    c = cfg
    qd, kvd, F = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.ffn_dim
    T = tir.Var("T", "int64") if rows is None else rows
    key_rows = 1 if rows == 1 else "T"
    pos = tir.Var("pos", "int64")
    pos32 = tir.Cast("int32", pos)
    n_ctx, n_rope = tir.Var("n_ctx", "int64"), tir.Var("n_rope", "int64")
    f32 = lambda shape: relax.TensorType(shape, "float32")  # noqa: E731
    ids = relax.Var("ids", relax.TensorType([T], "int32"))
    pos_s = relax.Var("pos", relax.ShapeType([pos]))
    cache = [c.n_layers, n_ctx, c.n_kv_heads, c.head_dim]
    kc, vc = relax.Var("k_cache", f32(cache)), relax.Var("v_cache", f32(cache))
    cos, sin = relax.Var("cos", f32([n_rope, c.rope_dim // 2])), relax.Var("sin", f32([n_rope, c.rope_dim // 2]))
    W = {n: relax.Var(n.replace(".", "_"), f32(list(s))) for n, s in weight_params(c)}

    shapes = {id(W[n]): s for n, s in weight_params(c)}

    def mm(x, w, n_rows, key_r=key_rows):
        N, K = shapes[id(w)]
        return bb.emit(relax.call_tir(kern.get(("matmul", N, K, key_r)), [x, w], f32([n_rows, N])))

    def rms(x, w):
        return bb.emit(R.nn.rms_norm(x, w, axes=[-1], epsilon=float(c.norm_eps)))

    def add_rms(x, o, w):
        """(x + o, rms_norm(x + o) * w): the residual add fused with the next RMSNorm, one kernel."""
        res = bb.emit_te(_add_rms_norm, x, o, w, float(c.norm_eps), primfunc_name_hint="add_rms_norm")
        return bb.emit(relax.TupleGetItem(res, 0)), bb.emit(relax.TupleGetItem(res, 1))

    def cols(x, a, b):
        return bb.emit(R.strided_slice(x, axes=[1], begin=[a], end=[b]))

    with bb.function(fname, [ids, pos_s, kc, vc, cos, sin, *W.values()]):
        with bb.dataflow():
            x = bb.emit(R.take(W["token_embd"], ids, axis=0))
            h = rms(x, W["blk.0.attn_norm"])
            for i in range(c.n_layers):
                p = f"blk.{i}."
                qkv = mm(h, W[p + "attn_qkv"], T)
                if c.attn_bias:
                    qkv = bb.emit(R.add(qkv, W[p + "attn_qkv.bias"]))
                q, k, v = cols(qkv, 0, qd), cols(qkv, qd, qd + kvd), cols(qkv, qd + kvd, qd + 2 * kvd)
                qr = bb.emit(relax.call_tir(kern.get(("rope", c.n_heads, key_rows)), [q, cos, sin, pos32],
                                            f32([T, qd])))
                kr = bb.emit(relax.call_tir(kern.get(("rope", c.n_kv_heads, key_rows)), [k, cos, sin, pos32],
                                            f32([T, kvd])))
                layer = tir.IntImm("int64", i)
                layer32 = tir.IntImm("int32", i)                  # tvm_build's TE scalars are int32
                kw = kern.get(("kv_write", 0))
                kc = bb.emit(R.call_tir_inplace(kw, [kc, kr, layer, pos], 0, f32(cache)))
                vc = bb.emit(R.call_tir_inplace(kw, [vc, v, layer, pos], 0, f32(cache)))
                a = bb.emit(relax.call_tir(kern.get(("attention", key_rows)), [qr, kc, vc, layer32, pos32],
                                           f32([T, qd])))
                x, h = add_rms(x, mm(a, W[p + "attn_output"], T), W[p + "ffn_norm"])
                gu = mm(h, W[p + "ffn_gate_up"], T)
                m = bb.emit(R.multiply(R.nn.silu(cols(gu, 0, F)), cols(gu, F, 2 * F)))
                nxt = W[f"blk.{i + 1}.attn_norm"] if i + 1 < c.n_layers else W["output_norm"]
                x, h = add_rms(x, mm(m, W[p + "ffn_down"], T), nxt)
            n_out, out_rows = T, key_rows
            if last_only:                     # the norm is per row: normalizing all T rows then slicing is the same
                h = bb.emit(R.strided_slice(h, axes=[0], begin=[T - 1], end=[T]))
                n_out, out_rows = 1, 1
            logits = mm(h, W["token_embd" if c.tied_embeddings else "output"], n_out, out_rows)
            out = bb.emit_output(logits)
        bb.emit_func_output(out)


def build_relax_module(cfg: ModelConfig):
    """The Relax IRModule (before passes): decode (T=1), prefill (T rows, all logits), prefill_last
    (T rows, last row's logits) and a marker function named after the config signature."""
    from tvm import relax
    bb = relax.BlockBuilder()
    kern = _Kernels(bb, cfg)
    _forward(bb, cfg, kern, "decode", 1, last_only=False)
    _forward(bb, cfg, kern, "prefill", None, last_only=False)
    _forward(bb, cfg, kern, "prefill_last", None, last_only=True)
    with bb.function(relax_signature(cfg), []):
        bb.emit_func_output(relax.ShapeExpr([0]))
    return bb.finalize()


def kernel_calls(func) -> dict[str, int]:
    """PrimFunc name -> number of call_tir / call_tir_inplace launches in a Relax function."""
    calls: dict[str, int] = {}
    for block in func.body.blocks:
        for b in block.bindings:
            op = getattr(b.value, "op", None)
            if op is not None and str(getattr(op, "name", "")).startswith("relax.call_tir"):
                name = b.value.args[0].name_hint
                calls[name] = calls.get(name, 0) + 1
    return calls


def fuse(mod):
    """LegalizeOps + AnnotateTIROpPattern + FuseOps + FuseTIR (TVM's graph fusion), then dead-code removal."""
    import tvm
    from tvm import relax
    seq = tvm.ir.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                       relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                       relax.transform.FuseTIR(), relax.transform.DeadCodeElimination()])
    return seq(mod)


def build_relax(cfg: ModelConfig, target: str | dict, out_path: str | os.PathLike) -> RelaxBuildResult:
    """Compile the model's forward pass for `target` (name from `edgellm targets` or a TVM target dict) into
    one Relax VM executable at `out_path`, linked with the target's cross compiler when it is not the host."""
    tvm = tvm_build._tvm()
    from tvm import relax
    target = resolve_target(target)
    out_path = Path(out_path)
    cc = cross_compiler(target)             # fail early if the linker is missing
    s = {}
    t0 = time.perf_counter()
    mod = build_relax_module(cfg)
    t1 = time.perf_counter()
    s["build"] = t1 - t0
    mod = fuse(mod)
    t2 = time.perf_counter()
    s["passes"] = t2 - t1
    fused = sorted(gv.name_hint for gv, f in mod.functions.items()
                   if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith("fused_"))
    functions = sorted(gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function))
    ex = tvm.compile(mod, target=tvm.target.Target(target))
    t3 = time.perf_counter()
    s["compile"] = t3 - t2
    export_atomic(ex, out_path, cc)
    s["export"] = time.perf_counter() - t3
    s["total"] = time.perf_counter() - t0
    per_token = sum(kernel_calls(mod["decode"]).values())
    return RelaxBuildResult(out_path, functions, fused, per_token, {k: round(v, 2) for k, v in s.items()},
                            dict(target))
