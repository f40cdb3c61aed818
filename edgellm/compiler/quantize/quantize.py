"""Produce a QuantizedModel: per-layer scale migration, weight clipping search, integer weights, formats.

Pipeline: float weights -> calibration statistics (calibrate.collect) -> per linear group, the best of
SmoothQuant / AWQ per-channel scales (folded into the preceding RMSNorm weight, W_v rows or W_up rows, so
the float model is unchanged) -> per row/group clipping search weighted by E[x^2] -> int codes + scales ->
fixed-point formats for the integer-only path (residual, q/k/v, gate/up, SiLU*up, logits; int8 V scales)
and the dyadic requant multipliers of every integer linear (the numbers an integer kernel consumes).
Options: GPTQ rounding of int4 weights (with each group input's x^T x), and mixed precision under a
bits-per-weight budget (`promote`: the linears whose int4 error costs most move to int8 per channel).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time

import numpy as np

from ...errors import EdgeLLMError, UnsupportedModelError
from ...runtime.config import ModelConfig
from ...runtime.intref import (LINEARS, IntLinear, QuantConfig, QuantizedModel, dequantize_linear, fake_quant_tokens,
                               linear_io, linear_nbytes, linear_shape)
from ...runtime.weights import WeightStore
from .calibrate import GROUPS, _kv_expand, collect, qk_scales, search_scales
from .schemes import clip_search, gptq_weight, quantize_weight

__all__ = ["QuantConfig", "QuantizedModel", "quantize_model", "float_weights"]


def float_weights(cfg: ModelConfig, store: WeightStore) -> dict[str, np.ndarray]:
    return {n: np.asarray(store.get(n), dtype=np.float32) for n in store.names()}


def _frac_bits(max_abs: float, target_bits: int) -> int:
    """Fraction bits F so that 2 * max_abs * 2^F stays below 2^target_bits (2x headroom over calibration)."""
    return int(target_bits - math.ceil(math.log2(2.0 * max(max_abs, 1e-6))))


def quantize_model(cfg: ModelConfig, store: WeightStore | dict, qc: QuantConfig, chunks: list[list[int]],
                   progress: bool = True) -> QuantizedModel:
    """Quantize a float model with calibration token chunks (see calibrate.calibration_chunks)."""
    t0 = time.perf_counter()
    if cfg.attn_bias:
        raise UnsupportedModelError(f"{cfg.arch} models with attention biases cannot be quantized yet",
                                    "quantize a llama or mistral model (qwen2 q/k/v biases are not handled)")
    widths = {cfg.dim, cfg.n_heads * cfg.head_dim, cfg.ffn_dim}
    if qc.act_block and any(w % qc.act_block for w in widths):
        raise EdgeLLMError(f"per-block activations need input widths divisible by {qc.act_block}; this model has "
                           f"{sorted(widths)}", "use --act dynamic (one int8 scale per token)")
    if qc.w_bits == 4:
        ok = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)]
        if any(w % qc.group_size for w in widths):
            raise EdgeLLMError(f"group size {qc.group_size} does not divide the model's input widths "
                               f"{sorted(widths)}", f"choose --group-size from {', '.join(map(str, ok)) or 'none'}")
    W = dict(store) if isinstance(store, dict) else float_weights(cfg, store)
    n_tok = sum(len(c) for c in chunks)
    if n_tok < qc.calib_tokens // 2 or n_tok < 256:
        raise EdgeLLMError(f"only {n_tok} calibration tokens", f"pass at least {max(256, qc.calib_tokens // 2)}")
    st = collect(cfg, W, chunks, hessian=qc.gptq)
    log = (lambda *a: print(*a, file=sys.stderr)) if progress else (lambda *a: None)
    log(f"calibrated on {st.tokens} tokens in {time.perf_counter() - t0:.1f}s")
    T: dict[str, np.ndarray] = {}
    report = {"scheme": qc.label, "layers": [], "calib_tokens": st.tokens}
    q8 = _int8_config(qc) if qc.max_bpw is not None else None
    alt: dict[str, tuple] = {}        # mixed precision: name -> (int8 arrays, int8 error, int4 error)
    for i in range(cfg.n_layers):
        p, L, R = f"blk.{i}.", st.layers[i], st.ranges[i]
        w = {n: W[p + n + ".weight"].copy() for n in LINEARS}
        norms = {"qkv": W[p + "attn_norm.weight"].copy(), "gate_up": W[p + "ffn_norm.weight"].copy()}
        v_range, h_range, up_range = R["v"].copy(), R["hprod"].copy(), R["up_ch"].copy()
        q_max, k_max = R["q"], R["k"]
        fulls, choices = {}, {}
        for gname, members in GROUPS.items():
            stats = L[gname]
            Ws = [w[m] for m in members]
            kv_tied = gname == "o"
            if qc.smooth:
                s, choice, err, base = search_scales(stats, Ws, qc, cfg, kv_tied=kv_tied)
            else:
                s, choice = np.ones(Ws[0].shape[1] // (cfg.n_rep if kv_tied else 1), np.float32), "none"
            full = _kv_expand(s, cfg) if kv_tied else s
            # fold s: X/s comes from the producer, W*s absorbs it, so the float model is unchanged
            for m in members:
                w[m] = w[m] * full[None, :]
            if gname in norms:
                norms[gname] = norms[gname] / s
            elif gname == "o":
                w["attn_v"] = w["attn_v"] / s[:, None]
                v_range = v_range / s
            else:
                w["ffn_up"] = w["ffn_up"] / s[:, None]
                h_range, up_range = h_range / s, up_range / s
            fulls[gname] = full
            choices[gname] = choice
        if qc.qk_smooth and (qc.a_bits == 8 or qc.kv_int8):
            # int8 q and k: move range between them per RoPE pair (q*s, k/s leaves q.k unchanged). Row scaling
            # does not change per-row / per-group weight quantization, so it is applied after the search.
            sk = qk_scales(R["q_ch"], R["k_ch"], cfg)
            w["attn_k"] = w["attn_k"] / sk[:, None]
            w["attn_q"] = w["attn_q"] * _kv_expand(sk, cfg)[:, None]
            q_max = float((R["q_ch"] * _kv_expand(sk, cfg)).max())
            k_max = float((R["k_ch"] / sk).max())
        for gname, members in GROUPS.items():        # quantize after every fold (o and down rescale v and up rows)
            stats, full = L[gname], fulls[gname]
            imp = stats.sq / full ** 2
            X = stats.sample / full
            xtx = None if stats.xtx is None else stats.xtx / np.outer(full, full)      # Hessian of X / s
            for m in members:
                act_max = float((stats.amax / full).max())
                T[f"{p}{m}.weight.act_scale"] = np.float32(act_max / 127.0)
                a_scale = act_max / 127.0 if qc.act == "static" else None
                arrays, err, clip = _quantize_linear(w[m], X, qc, imp, a_scale, xtx)
                T.update({f"{p}{m}.weight.{k}": a for k, a in arrays.items()})
                if q8 is not None:
                    alt[f"{p}{m}.weight"] = _quantize_linear(w[m], X, q8, imp, a_scale)[:2] + (err,)
                report["layers"].append({"name": f"{p}{m}", "scales": choices[gname], "rel_err": err,
                                         "clip": float(np.mean(clip)), "act_max": act_max, "bits": qc.w_bits})
        T[p + "attn_norm.weight"] = norms["qkv"].astype(np.float32)
        T[p + "ffn_norm.weight"] = norms["gate_up"].astype(np.float32)
        T[p + "int.F_q"] = np.int32(_frac_bits(q_max * 1.5, 24))     # RoPE can grow a pair by sqrt(2)
        T[p + "int.F_k"] = np.int32(_frac_bits(k_max * 1.5, 24))
        T[p + "int.F_v"] = np.int32(_frac_bits(float(v_range.max()), 24))
        T[p + "int.v_scale"] = (np.maximum(v_range, 1e-6) / 127.0).astype(np.float32)
        T[p + "int.F_gate"] = np.int32(_frac_bits(R["gate"], 24))
        T[p + "int.F_up"] = np.int32(_frac_bits(float(up_range.max()), 24))
        T[p + "int.F_h"] = np.int32(_frac_bits(float(h_range.max()), 30))
        log(f"layer {i}: " + ", ".join(f"{r['name'].split('.')[-1]}={r['rel_err']:.4f}({r['scales']})"
                                        for r in report["layers"][-7:]))
    emb = quantize_weight(W["token_embd.weight"], QuantConfig("w8a8"))
    T["token_embd.q"], T["token_embd.scale"] = emb["q"], emb["scale"]
    if "output.weight" in W:
        head = quantize_weight(W["output.weight"], QuantConfig("w8a8"))
        T["output.q"], T["output.scale"] = head["q"], head["scale"]
    T["output_norm.weight"] = W["output_norm.weight"].astype(np.float32)
    T["int.F_res"] = np.int32(_frac_bits(st.res_max, 30))
    T["int.F_logit"] = np.int32(_frac_bits(st.logit_max, 30))
    qm = QuantizedModel(cfg, qc, T, report)
    if q8 is not None:
        promote(qm, alt)
    if qc.a_bits == 8:
        add_requant_constants(qm)
    report["seconds"] = time.perf_counter() - t0
    report["bits_per_weight"] = qm.block_bits_per_weight()
    return qm


def _int8_config(qc: QuantConfig) -> QuantConfig:
    """The int8 per-channel format a promoted linear of a 4-bit scheme takes (same activations)."""
    return dataclasses.replace(qc, scheme="w8a" + str(qc.a_bits), group_size=None, symmetric=True, max_bpw=None,
                               gptq=False)


def _quantize_linear(w, X, qc, imp, act_scale, xtx=None) -> tuple[dict, float, np.ndarray]:
    """(stored arrays, relative output error on the calibration sample, clip ratios) of one migrated linear:
    round to nearest after the clipping search, or GPTQ when asked for and the Hessian is there."""
    clip, _ = clip_search(w, qc, imp) if qc.clip_search else (1.0, 1.0)
    if qc.gptq and qc.w_bits == 4 and xtx is not None:
        arrays = gptq_weight(w, qc, xtx, clip)
    else:
        arrays = quantize_weight(w, qc, clip)
    deq = dequantize_linear({"w." + k: a for k, a in arrays.items()}, "w", qc)
    return arrays, _output_error(X, w, deq, qc, act_scale), np.asarray(clip)


def _output_error(Xs, W, Wq, qc, act_scale):
    """Relative output error of the quantized linear Wq vs the migrated float one W, on the sample."""
    Y = Xs @ W.T               # the migrated float linear: same as X @ W.T up to the folded row scales
    A = fake_quant_tokens(Xs, act_scale, qc.act_block) if qc.a_bits == 8 else Xs
    return float(np.linalg.norm(A @ Wq.T - Y) / max(np.linalg.norm(Y), 1e-30))


def promote(qm: QuantizedModel, alt: dict[str, tuple[dict, float, float]]) -> list[str]:
    """Mixed precision under qm.qconfig.max_bpw: greedily move linears from int4 to int8 per channel.

    Sensitivity of a linear = the drop in squared relative output error on the calibration sample
    (err4^2 - err8^2) per extra stored byte; the largest go first while the blocks' bits per weight (scales
    and zero points included) stay within the budget, as llama.cpp's Q4_K_M keeps sensitive tensors wider.
    `alt[name] = (int8 arrays, err8, err4)`. Writes `name.bits` = 8 for each promoted linear.
    """
    t, qc = qm.tensors, qm.qconfig
    nbytes = qm.linear_bytes()
    n_weights = sum(math.prod(linear_shape(t, n, qc)) for n in nbytes)
    budget = qc.max_bpw * n_weights / 8.0 - sum(nbytes.values())
    gains = []
    for n, (_, e8, e4) in alt.items():
        extra = linear_nbytes(linear_shape(t, n, qc), qc, 8) - nbytes[n]
        gains.append(((e4 ** 2 - e8 ** 2) / extra, n, extra))
    chosen = []
    for g, n, extra in sorted(gains, reverse=True):
        if g <= 0 or extra > budget:
            continue
        budget -= extra
        for k in ("q", "scale", "zero", "min"):
            t.pop(f"{n}.{k}", None)
        arrays = alt[n][0]
        t.update({f"{n}.{k}": a for k, a in arrays.items()})
        t[n + ".bits"] = np.int8(8)
        chosen.append(n)
    for r in qm.report["layers"]:
        n = r["name"] + ".weight"
        r.update(rel_err_w4=alt[n][2], rel_err_w8=alt[n][1])
        if n in chosen:
            r.update(bits=8, rel_err=alt[n][1])
    qm.report["promoted"] = chosen
    return chosen


def add_requant_constants(qm: QuantizedModel) -> None:
    """Store each integer linear's dyadic output requantization (m int32, s) and row scale in the dict.

    The integer runtime derives the same numbers at load; an integer kernel compiler (TVM, ONNX
    MatMulInteger + requant) reads them from here: out = round(acc * amax_token * m * 2^-s).
    Static-activation models (act="static") also get the static path's constants (intref.StaticConsts):
    `.srq_in_m/.srq_in_s/.srq_cap` (input -> int8 with the calibrated scale) and `.srq_m/.srq_s` (acc -> out).
    """
    t, cfg = qm.tensors, qm.config
    for i in range(cfg.n_layers):
        for n in LINEARS:
            name = f"blk.{i}.{n}.weight"
            L = IntLinear.build(t, name, qm.qconfig)
            m, s, pre = L.constants(*linear_io(t, i, n))
            t[name + ".row_scale"] = L.row_scale.astype(np.float32)
            t[name + ".rq_m"], t[name + ".rq_s"] = m.astype(np.int32), s.astype(np.int8)
            if qm.qconfig.act == "static":
                c = L.static_constants(*linear_io(t, i, n), float(t[name + ".act_scale"]))
                t[name + ".srq_m"], t[name + ".srq_s"] = c.m.astype(np.int32), c.s.astype(np.int16)
                t[name + ".srq_in_m"], t[name + ".srq_in_s"] = np.int32(c.m_in), np.int16(c.s_in)
                t[name + ".srq_cap"] = np.int64(c.cap)
