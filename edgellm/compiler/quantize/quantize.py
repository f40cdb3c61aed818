"""Produce a QuantizedModel: per-layer scale migration, weight clipping search, integer weights, formats.

Pipeline: float weights -> calibration statistics (calibrate.collect) -> per linear group, the best of
SmoothQuant / AWQ per-channel scales (folded into the preceding RMSNorm weight, W_v rows or W_up rows, so
the float model is unchanged) -> per row/group clipping search weighted by E[x^2] -> int codes + scales ->
fixed-point formats for the integer-only path (residual, q/k/v, gate/up, SiLU*up, logits; int8 V scales)
and the dyadic requant multipliers of every integer linear (the numbers an integer kernel consumes).
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np

from ...errors import EdgeLLMError, UnsupportedModelError
from ...runtime.config import ModelConfig
from ...runtime.intref import LINEARS, IntLinear, QuantConfig, QuantizedModel, linear_io
from ...runtime.weights import WeightStore
from .calibrate import GROUPS, _kv_expand, collect, qk_scales, search_scales
from .schemes import clip_search, fake_quant_weight, quantize_weight

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
    if qc.w_bits == 4:
        widths = {cfg.dim, cfg.n_heads * cfg.head_dim, cfg.ffn_dim}
        ok = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)]
        if any(w % qc.group_size for w in widths):
            raise EdgeLLMError(f"group size {qc.group_size} does not divide the model's input widths "
                               f"{sorted(widths)}", f"choose --group-size from {', '.join(map(str, ok)) or 'none'}")
    W = dict(store) if isinstance(store, dict) else float_weights(cfg, store)
    n_tok = sum(len(c) for c in chunks)
    if n_tok < qc.calib_tokens // 2 or n_tok < 256:
        raise EdgeLLMError(f"only {n_tok} calibration tokens", f"pass at least {max(256, qc.calib_tokens // 2)}")
    st = collect(cfg, W, chunks)
    log = (lambda *a: print(*a, file=sys.stderr)) if progress else (lambda *a: None)
    log(f"calibrated on {st.tokens} tokens in {time.perf_counter() - t0:.1f}s")
    T: dict[str, np.ndarray] = {}
    report = {"scheme": qc.label, "layers": [], "calib_tokens": st.tokens}
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
            for m in members:
                clip, gain = clip_search(w[m], qc, imp) if qc.clip_search else (1.0, 1.0)
                for k, a in quantize_weight(w[m], qc, clip).items():
                    T[f"{p}{m}.weight.{k}"] = a
                act_max = float((stats.amax / full).max())
                T[f"{p}{m}.weight.act_scale"] = np.float32(act_max / 127.0)
                err = _err_clipped(X, w[m], W[p + m + ".weight"], stats.sample, qc, clip,
                                   act_max / 127.0 if qc.act == "static" else None)
                report["layers"].append({"name": f"{p}{m}", "scales": choices[gname], "rel_err": err,
                                         "clip": float(np.mean(clip)), "act_max": act_max})
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
    if qc.a_bits == 8:
        add_requant_constants(qm)
    report["seconds"] = time.perf_counter() - t0
    report["bits_per_weight"] = qm.block_bits_per_weight()
    return qm


def _err_clipped(Xs, Wq_src, W, X, qc, clip, act_scale):
    """Relative output error of the final quantized linear vs the original float one, on the sample."""
    from ...runtime.intref import fake_quant_tokens
    Y = Xs @ Wq_src.T          # the migrated float linear: same as X @ W.T up to the folded row scales
    A = fake_quant_tokens(Xs, act_scale) if qc.a_bits == 8 else Xs
    Yq = A @ fake_quant_weight(Wq_src, qc, clip).T
    return float(np.linalg.norm(Yq - Y) / max(np.linalg.norm(Y), 1e-30))


def add_requant_constants(qm: QuantizedModel) -> None:
    """Store each integer linear's dyadic output requantization (m int32, s) and row scale in the dict.

    The integer runtime derives the same numbers at load; an integer kernel compiler (TVM, ONNX
    MatMulInteger + requant) reads them from here: out = round(acc * amax_token * m * 2^-s).
    """
    t, cfg = qm.tensors, qm.config
    for i in range(cfg.n_layers):
        for n in LINEARS:
            name = f"blk.{i}.{n}.weight"
            L = IntLinear.build(t, name, qm.qconfig)
            m, s, pre = L.constants(*linear_io(t, i, n))
            t[name + ".row_scale"] = L.row_scale.astype(np.float32)
            t[name + ".rq_m"], t[name + ".rq_s"] = m.astype(np.int32), s.astype(np.int8)
