"""The decode token kernel: one token through every transformer layer in a single parallel launch.

A decode token ran ~270 small kernels (9 per layer). Each parallel one costs a thread-pool launch (~2 us on the
2-core host) and each call another ~0.5 us of Python and FFI, against 3-30 us of work. This kernel expands the
same fused kernels' bodies (T.macro: _w4_lanes_body, qkv_post_body, attention_lanes_body, res_norm_quant_body,
silu_quant_body) in the decode plan's order inside one launch (TVM's pragma_parallel_launch_point), in a loop
over the layers: the matmuls' row blocks and attention's KV heads split over the threads as before, serial
parts run on thread 0, and a barrier (TVMBackendParallelBarrier, ~0.5 us) ends each phase. The runtime stacks
each fused matmul's weights of all layers in one buffer (layer i's rows at i * rows), and the per-layer
constants in [n_layers, ...] arrays. Same integer arithmetic, so bit-identical to the kernel-by-kernel plan
and to intref. Decode 1.10-1.13x over the 9 kernels a layer (interleaved, tools/ab_decode.py); one launch per
layer, an earlier version, gave 1.04-1.09x. Built for decode with the x86 lane-layout w4 matmuls (the fast path on this
host); elsewhere the runtime keeps the per-kernel plan.
"""
from __future__ import annotations

from ..runtime.config import ModelConfig
from ..runtime.intref import QuantConfig
from .tvm_build import host_target

TOKEN_ARGS = ("x", "x2", "o", "h8", "ha", "qkv", "q8", "qa", "a8", "aa", "gu", "f8", "fa", "cos", "sin", "pos",
              "kc", "kac", "vc", "eps_q", "qkv_w*", "vm", "vsh", "om", "osh", "sc", "o_w*", "g2", "gu_w*", "silu",
              "down_w*", "g_next", "ao", "pm")
"""The token kernel's arguments in order. "G_w*" stands for the six of fused matmul G, all layers stacked:
codes [L * rows, cols / 2], fp16 scales [L * rows, cols / 32], 2^-base, m, s, pre [L * rows]. Per layer: vm,
vsh [L, kv_dim]; om, osh [L, q_dim]; sc [L, 2] (the score's m, s); g2 [L, dim] (the FFN norm); silu [L, 6]
(SiLU constants, tvm_int._SILU_ARGS); g_next [L, dim] (the next layer's attention norm, the output norm after
the last). "ao" (attention's heads' outputs, int64 [1, q_dim]) and "pm" (the SiLU slices' partial amaxes, int64
[1, SILU_SLICES]) are scratch that threads share, so it is passed in. edgellm.runtime.tvm_int_backend plans the
call."""


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(rows, cols) of the four fused matmuls of a layer."""
    qd, kvd, D, F = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.dim, cfg.ffn_dim
    return {"qkv": (qd + 2 * kvd, D), "o": (D, qd), "gu": (2 * F, D), "down": (D, F)}


def _stacked(body, rows: int, cols: int):
    """A T.macro running matmul `body` on layer li's rows of stacked weights (views, no copies)."""
    from tvm.script import tirx as T_
    I64 = "int64"

    @T_.macro
    def run(x8, W, S, Fb, M, SH, P, amax, acc, li):
        w = T_.decl_buffer((rows, cols // 2), "uint8", data=W.data, elem_offset=li * rows * (cols // 2))
        s = T_.decl_buffer((rows, cols // 32), "float16", data=S.data, elem_offset=li * rows * (cols // 32))
        f = T_.decl_buffer((rows,), "float64", data=Fb.data, elem_offset=li * rows)
        m = T_.decl_buffer((rows,), I64, data=M.data, elem_offset=li * rows)
        sh = T_.decl_buffer((rows,), I64, data=SH.data, elem_offset=li * rows)
        p = T_.decl_buffer((rows,), I64, data=P.data, elem_offset=li * rows)
        body(x8, w, s, f, amax, m, sh, p, acc)
    return run


def decode_token_kernel(cfg: ModelConfig, qc: QuantConfig, tvm_target=None):
    """The PrimFunc (arguments: TOKEN_ARGS) of one decode token through every layer of all-w4 fused matmuls,
    or None where its parts do not apply: w4 codes not in the lane layout on `tvm_target`, or a head shape the
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
    mm = {k: _stacked(_w4_lanes_body(_check(r, c, 4, 32, isa), r, c, 1, native, 1, spmd=True), r, c)
          for k, (r, c) in shapes.items()}
    mm_qkv, mm_o, mm_gu, mm_down = mm["qkv"], mm["o"], mm["gu"], mm["down"]
    post = qkv_post_body(cfg, qc.q_bits, 1, spmd=True)
    norm = res_norm_quant_body(cfg.dim, 1, spmd=True)
    silu = silu_quant_body(cfg.ffn_dim, 1, spmd=True)
    H, KVH, d, NL, rd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers, cfg.rope_dim
    D, F, qd, kvd = cfg.dim, cfg.ffn_dim, H * d, KVH * d
    Q, F2 = qd + 2 * kvd, 2 * cfg.ffn_dim
    qdt = "int8" if qc.q_bits == 8 else "int16"
    n_ctx, n_rope = tirx.Var("n_ctx", "int32"), tirx.Var("n_rope", "int32")
    q_ln2_max = exp_consts(SCORE_F)[0]
    u8, f16, f64 = "uint8", "float16", "float64"

    @T_.prim_func
    def token(x: T_.Buffer((1, D), I64), x2: T_.Buffer((1, D), I64), o: T_.Buffer((1, D), I64),
              h8: T_.Buffer((1, D), "int8"), ha: T_.Buffer((1, 1), I64), qkv: T_.Buffer((1, Q), I64),
              q8: T_.Buffer((1, qd), qdt), qa: T_.Buffer((1, H), I64), a8: T_.Buffer((1, qd), "int8"),
              aa: T_.Buffer((1, 1), I64), gu: T_.Buffer((1, F2), I64), f8: T_.Buffer((1, F), "int8"),
              fa: T_.Buffer((1, 1), I64), cos: T_.Buffer((n_rope, rd // 2), "int16"),
              sin: T_.Buffer((n_rope, rd // 2), "int16"), pos: T_.int32,
              kc: T_.Buffer((NL, n_ctx, KVH, d), "int8"), kac: T_.Buffer((NL, n_ctx, KVH), I64),
              vc: T_.Buffer((NL, n_ctx, KVH, d), "int8"), eps_q: T_.int64,
              W1: T_.Buffer((NL * Q, D // 2), u8), S1: T_.Buffer((NL * Q, D // 32), f16),
              F1: T_.Buffer((NL * Q,), f64), M1: T_.Buffer((NL * Q,), I64), SH1: T_.Buffer((NL * Q,), I64),
              P1: T_.Buffer((NL * Q,), I64),
              VM: T_.Buffer((NL, kvd), I64), VSH: T_.Buffer((NL, kvd), I64), OM: T_.Buffer((NL, qd), I64),
              OSH: T_.Buffer((NL, qd), I64), SC: T_.Buffer((NL, 2), I64),
              W2: T_.Buffer((NL * D, qd // 2), u8), S2: T_.Buffer((NL * D, qd // 32), f16),
              F2b: T_.Buffer((NL * D,), f64), M2: T_.Buffer((NL * D,), I64), SH2: T_.Buffer((NL * D,), I64),
              P2: T_.Buffer((NL * D,), I64), G2: T_.Buffer((NL, D), I64),
              W3: T_.Buffer((NL * F2, D // 2), u8), S3: T_.Buffer((NL * F2, D // 32), f16),
              F3: T_.Buffer((NL * F2,), f64), M3: T_.Buffer((NL * F2,), I64), SH3: T_.Buffer((NL * F2,), I64),
              P3: T_.Buffer((NL * F2,), I64), SI: T_.Buffer((NL, 6), I64),
              W4: T_.Buffer((NL * D, F // 2), u8), S4: T_.Buffer((NL * D, F // 32), f16),
              F4: T_.Buffer((NL * D,), f64), M4: T_.Buffer((NL * D,), I64), SH4: T_.Buffer((NL * D,), I64),
              P4: T_.Buffer((NL * D,), I64), GN: T_.Buffer((NL, D), I64),
              ao: T_.Buffer((1, qd), I64), pm: T_.Buffer((1, SILU_SLICES), I64)):
        T_.func_attr({"tir.noalias": True})
        assert pos + 1 <= n_ctx, "decode token: position past the KV cache"
        for li in range(NL):
            assert SI[li, 1] <= T_.int64(q_ln2_max), "decode token: exp constants of f <= SCORE_F expected"
        with T_.attr(0, "pragma_parallel_launch_point", 1):
            for li in range(NL):
                vm = T_.decl_buffer((kvd,), I64, data=VM.data, elem_offset=li * kvd)
                vsh = T_.decl_buffer((kvd,), I64, data=VSH.data, elem_offset=li * kvd)
                om = T_.decl_buffer((qd,), I64, data=OM.data, elem_offset=li * qd)
                osh = T_.decl_buffer((qd,), I64, data=OSH.data, elem_offset=li * qd)
                g2 = T_.decl_buffer((D,), I64, data=G2.data, elem_offset=li * D)
                gn = T_.decl_buffer((D,), I64, data=GN.data, elem_offset=li * D)
                mm_qkv(h8, W1, S1, F1, M1, SH1, P1, ha, qkv, li)
                post(qkv, cos, sin, pos, vm, vsh, kc, kac, vc, li, q8, qa)
                attn(q8, qa, kc, kac, vc, om, osh, li, pos, SC[li, 0], SC[li, 1], a8, aa, ao)
                mm_o(a8, W2, S2, F2b, M2, SH2, P2, aa, o, li)
                norm(x, o, g2, eps_q, x2, h8, ha)
                mm_gu(h8, W3, S3, F3, M3, SH3, P3, ha, gu, li)
                silu(gu, SI[li, 0], SI[li, 1], SI[li, 2], SI[li, 3], SI[li, 4], SI[li, 5], f8, fa, pm)
                mm_down(f8, W4, S4, F4, M4, SH4, P4, fa, o, li)
                norm(x2, o, gn, eps_q, x, h8, ha)
    return token
