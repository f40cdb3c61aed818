"""The decode layer kernel: one token through one transformer layer in a single parallel launch.

A decode token runs ~270 small kernels (9 per layer). Each parallel one costs a thread-pool launch (~2 us on
the 2-core host) and each call another ~0.5 us of Python and FFI, against 3-30 us of work: about 10% of a token.
This kernel expands the same fused kernels' bodies (T.macro: _w4_lanes_body, qkv_post_body,
attention_lanes_body, res_norm_quant_body, silu_quant_body) in the decode plan's order inside one launch
(TVM's pragma_parallel_launch_point): the matmuls' row blocks and attention's KV heads split over the threads
as before, serial parts run on thread 0, and a barrier (TVMBackendParallelBarrier, ~0.5 us) ends each phase.
Same integer arithmetic, so bit-identical to the kernel-by-kernel plan and to intref. Built for decode with the
x86 lane-layout w4 matmuls (the fast path on this host); elsewhere the runtime keeps the per-kernel plan.
"""
from __future__ import annotations

from ..runtime.config import ModelConfig
from ..runtime.intref import QuantConfig
from .tvm_build import host_target

LAYER_ARGS = ("x", "x2", "o", "h8", "ha", "qkv", "q8", "qa", "a8", "aa", "gu", "f8", "fa", "cos", "sin", "pos",
              "kc", "kac", "vc", "layer", "eps_q", "qkv_w*", "vm", "vsh", "om", "osh", "sc_m", "sc_s", "o_w*", "g2",
              "gu_w*", "fshift", "q_ln2", "q_b", "q_c", "one", "shift_h", "down_w*", "g_next", "ao", "pm")
"""The layer kernel's arguments in order; "G_w*" stands for the six of fused matmul G: codes, fp16 scales,
2^-base per row, m, s, pre; "ao" (attention's heads' outputs, int64 [1, n_heads * head_dim]) and "pm" (the
SiLU slices' partial amaxes, int64 [1, SILU_SLICES]) are scratch that threads share, so it is passed in. edgellm.runtime.tvm_int_backend plans the call."""


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(rows, cols) of the four fused matmuls of a layer."""
    qd, kvd, D, F = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.dim, cfg.ffn_dim
    return {"qkv": (qd + 2 * kvd, D), "o": (D, qd), "gu": (2 * F, D), "down": (D, F)}


def decode_layer_kernel(cfg: ModelConfig, qc: QuantConfig, tvm_target=None):
    """The PrimFunc (arguments: LAYER_ARGS) of one decode token through one layer of all-w4 fused matmuls, or
    None where its parts do not apply: w4 codes not in the lane layout on `tvm_target`, or a head shape the
    vector attention does not take."""
    from tvm import tirx
    from tvm.script import tirx as T_
    from .tvm_int import (I64, SCORE_F, SILU_SLICES, attention_lanes_body, exp_consts, qkv_post_body,
                          res_norm_quant_body, silu_quant_body)
    from .tvm_int_matmul import _ISA, _check, _w4_lanes_body, kernel_isa, lane_layout, native_f16
    target = host_target() if tvm_target is None else tvm_target
    shapes = layer_shapes(cfg)
    if qc.w_bits != 4 or not all(lane_layout(r, c, 4, qc.group_size, target) for r, c in shapes.values()):
        return None
    attn = attention_lanes_body(cfg, qc.prob_bits, qc.q_bits, 1, 1, spmd=True)
    if attn is None:
        return None
    isa, native = _ISA[kernel_isa(target)], native_f16(target)
    mm = {k: _w4_lanes_body(_check(r, c, 4, 32, isa), r, c, 1, native, 1, spmd=True) for k, (r, c) in shapes.items()}
    mm_qkv, mm_o, mm_gu, mm_down = mm["qkv"], mm["o"], mm["gu"], mm["down"]
    post = qkv_post_body(cfg, qc.q_bits, 1, spmd=True)
    norm = res_norm_quant_body(cfg.dim, 1, spmd=True)
    silu = silu_quant_body(cfg.ffn_dim, 1, spmd=True)
    H, KVH, d, NL, rd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers, cfg.rope_dim
    D, F, qd, kvd = cfg.dim, cfg.ffn_dim, H * d, KVH * d
    Q = qd + 2 * kvd
    qdt = "int8" if qc.q_bits == 8 else "int16"
    n_ctx, n_rope = tirx.Var("n_ctx", "int32"), tirx.Var("n_rope", "int32")
    q_ln2_max = exp_consts(SCORE_F)[0]
    u8, f16, f64 = "uint8", "float16", "float64"

    @T_.prim_func
    def layer(x: T_.Buffer((1, D), I64), x2: T_.Buffer((1, D), I64), o: T_.Buffer((1, D), I64),
              h8: T_.Buffer((1, D), "int8"), ha: T_.Buffer((1, 1), I64), qkv: T_.Buffer((1, Q), I64),
              q8: T_.Buffer((1, qd), qdt), qa: T_.Buffer((1, H), I64), a8: T_.Buffer((1, qd), "int8"),
              aa: T_.Buffer((1, 1), I64), gu: T_.Buffer((1, 2 * F), I64), f8: T_.Buffer((1, F), "int8"),
              fa: T_.Buffer((1, 1), I64), cos: T_.Buffer((n_rope, rd // 2), "int16"),
              sin: T_.Buffer((n_rope, rd // 2), "int16"), pos: T_.int32,
              kc: T_.Buffer((NL, n_ctx, KVH, d), "int8"), kac: T_.Buffer((NL, n_ctx, KVH), I64),
              vc: T_.Buffer((NL, n_ctx, KVH, d), "int8"), li: T_.int32, eps_q: T_.int64,
              w1: T_.Buffer((Q, D // 2), u8), s1: T_.Buffer((Q, D // 32), f16), f1: T_.Buffer((Q,), f64),
              m1: T_.Buffer((Q,), I64), sh1: T_.Buffer((Q,), I64), p1: T_.Buffer((Q,), I64),
              vm: T_.Buffer((kvd,), I64), vsh: T_.Buffer((kvd,), I64), om: T_.Buffer((qd,), I64),
              osh: T_.Buffer((qd,), I64), sc_m: T_.int64, sc_s: T_.int64,
              w2: T_.Buffer((D, qd // 2), u8), s2: T_.Buffer((D, qd // 32), f16), f2: T_.Buffer((D,), f64),
              m2: T_.Buffer((D,), I64), sh2: T_.Buffer((D,), I64), p2: T_.Buffer((D,), I64),
              g2: T_.Buffer((D,), I64),
              w3: T_.Buffer((2 * F, D // 2), u8), s3: T_.Buffer((2 * F, D // 32), f16), f3: T_.Buffer((2 * F,), f64),
              m3: T_.Buffer((2 * F,), I64), sh3: T_.Buffer((2 * F,), I64), p3: T_.Buffer((2 * F,), I64),
              fshift: T_.int64, q_ln2: T_.int64, q_b: T_.int64, q_c: T_.int64, one: T_.int64, shift_h: T_.int64,
              w4: T_.Buffer((D, F // 2), u8), s4: T_.Buffer((D, F // 32), f16), f4: T_.Buffer((D,), f64),
              m4: T_.Buffer((D,), I64), sh4: T_.Buffer((D,), I64), p4: T_.Buffer((D,), I64),
              g_next: T_.Buffer((D,), I64), ao: T_.Buffer((1, qd), I64), pm: T_.Buffer((1, SILU_SLICES), I64)):
        T_.func_attr({"tir.noalias": True})
        assert pos + 1 <= n_ctx, "decode layer: position past the KV cache"
        assert q_ln2 <= T_.int64(q_ln2_max), "decode layer: exp constants of f <= SCORE_F expected"
        with T_.attr(0, "pragma_parallel_launch_point", 1):
            mm_qkv(h8, w1, s1, f1, ha, m1, sh1, p1, qkv)
            post(qkv, cos, sin, pos, vm, vsh, kc, kac, vc, li, q8, qa)
            attn(q8, qa, kc, kac, vc, om, osh, li, pos, sc_m, sc_s, a8, aa, ao)
            mm_o(a8, w2, s2, f2, aa, m2, sh2, p2, o)
            norm(x, o, g2, eps_q, x2, h8, ha)
            mm_gu(h8, w3, s3, f3, ha, m3, sh3, p3, gu)
            silu(gu, fshift, q_ln2, q_b, q_c, one, shift_h, f8, fa, pm)
            mm_down(f8, w4, s4, f4, fa, m4, sh4, p4, o)
            norm(x2, o, g_next, eps_q, x, h8, ha)
    return layer
