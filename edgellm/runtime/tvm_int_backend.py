"""Backend "tvm-int": the integer-only forward of a QuantizedModel through TVM kernels (edgellm.compiler.tvm_int).

Bit-identical to IntBackend(qm, "integer"): the kernels compute intref's integer ops exactly, and the
calibrated constants (dyadic multipliers, shifts, integer gammas, Q15 RoPE tables) are taken from intref's own
prepare step, so the two can only differ if a kernel does. Every activation, the int8 KV cache and the weights
(int8 codes, or packed int4 codes with their fp16 group scales on the fast path, per-group integer multipliers
on the generic one) live in preallocated 64-byte-aligned arrays wrapped once as TVM tensors; the fast path's
qkv_post kernel writes the new k / v rows into the cache itself (numpy does it on the generic path). Logits
become float only at the API boundary, as in intref, and only for the last position unless all are asked for.

Decode speed (issue #5) comes from the fast path: the int8 matmuls of edgellm.compiler.tvm_int_matmul (the
target's int8 dot-product instructions, requant fused), q|k|v and gate|up each one matmul over concatenated
rows, and the small ops fused around them, so a layer is 9 kernel calls. Schemes those kernels do not cover
(static activations, asymmetric w4) run the generic one-kernel-per-op path. Needs only the TVM runtime, never
edgellm.compiler.
"""
from __future__ import annotations

import hashlib
import os
from collections import ChainMap
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError
from .backend import Backend
from .config import ModelConfig
from .int_backend import load_quantized, read_into, tensor_header
from .intref import (LINEARS, SCORE_F, IntKVCache, IntTransformer, QuantConfig, QuantizedModel, StaticConsts,
                     exp_consts, linear_bits, rope_q15, w4_group_scales)
from .tvm_backend import Buffer, HugePageArena, TvmBackend, TvmKVCache, _runtime, aligned_empty

INT_LIBRARY = "kernels/int.so"     # where a bundle keeps the integer kernels
INT_KERNEL_ABI = 5                 # bump when a kernel's arguments or semantics change


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each block linear."""
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"attn_q": (qd, cfg.dim), "attn_k": (kvd, cfg.dim), "attn_v": (kvd, cfg.dim),
            "attn_output": (cfg.dim, qd), "ffn_gate": (cfg.ffn_dim, cfg.dim), "ffn_up": (cfg.ffn_dim, cfg.dim),
            "ffn_down": (cfg.dim, cfg.ffn_dim)}


def int_kernel_signature(cfg: ModelConfig, qc: QuantConfig) -> str:
    """Hash of every config field baked into the integer kernels (calibration constants are arguments)."""
    fields = (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size,
              cfg.rope_dim, bool(cfg.rope_neox), qc.scheme, qc.group_size, qc.symmetric, qc.zero, qc.prob_bits,
              qc.q_bits, qc.act, qc.max_bpw is not None, INT_KERNEL_ABI)
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]


FUSED = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "gu": ("ffn_gate", "ffn_up"),
         "down": ("ffn_down",)}       # linears sharing an input: one matmul over their concatenated rows
SILU_SLICES = 8                        # decode SiLU: column slices with a partial amax each (the token kernel
                                       # splits them over threads); the runtime passes that scratch in
MAX_SHIFT = 20                         # as IntLinear.build: group scales of one row span at most 2^20


def fast_path(cfg: ModelConfig, qc: QuantConfig) -> bool:
    """Whether the fused decode kernels apply: per-token int8 inputs, w8 or symmetric w4 weights (the fast
    matmul's formats) and input widths that are multiples of 32 (its SIMD steps); other models and schemes
    run the generic one-kernel-per-op path."""
    widths = (cfg.dim, cfg.n_heads * cfg.head_dim, cfg.ffn_dim)
    return qc.act == "dynamic" and (qc.w_bits == 8 or qc.symmetric) and all(k % 32 == 0 for k in widths)


def matmul_shapes(cfg: ModelConfig, qc: QuantConfig) -> set[tuple[int, int, int]]:
    """(rows, cols, bits) of every fast matmul: each fused group at each width a linear may have, its
    members alone too when widths can differ (mixed precision), and the int8 head."""
    shapes = linear_shapes(cfg)
    kinds = {4: (4,) if qc.max_bpw is None else (4, 8), 8: (8,)}[qc.w_bits]
    out = {(cfg.vocab_size, cfg.dim, 8)}
    for members in FUSED.values():
        out |= {(sum(shapes[n][0] for n in members), shapes[members[0]][1], b) for b in kinds}
        if len(kinds) > 1:
            out |= {(*shapes[n], b) for n in members for b in kinds}
    return out


def int_kernel_names(cfg: ModelConfig, qc: QuantConfig) -> dict:
    """The contract between edgellm.compiler.tvm_int and this backend: which library function does what.

    Fast path (fast_path(cfg, qc)): "mm" maps (rows, cols, bits, T) -> name, T = 1 (decode) or None (any T);
    "w4_layout" writes int32 [len(mm)]: 1 where that matmul reads w4 codes in the lane layout (to_lane_layout);
    fused kernels "norm_quant" (RMSNorm + int8), "res_norm_quant" (residual add + RMSNorm + int8),
    "qkv_post" (RoPE + int8 q; RoPE + int8 k and v at the cache scale written into the KV cache),
    "attention_q8" (attention + int8),
    "silu_quant" (SiLU * up + int8); "_t1" names: the same for one row (decode, serial kernels); "token_t1"
    (only where the target has it: edgellm.compiler.tvm_int_token) one decode token through every layer of
    all-w4 matmuls in one parallel launch. Generic path:
    "linear" maps (N, K, "w8" | "w4") -> name (the head is w8; mixed-precision w4 schemes also get w8 blocks); "quant" maps (groups, width, qmax) -> name;
    "static_quant" maps width -> name (act="static" only). Every kernel takes T rows (T symbolic unless
    named); attention and RoPE take the context length from their tables.
    """
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    base = {"signature": f"edgellm_int_kernels_{int_kernel_signature(cfg, qc)}", "embed": "int_embed",
            "attention": "int_attention"}
    if fast_path(cfg, qc):
        mm = {(r, c, b, T): f"int_mm_w{b}_{r}x{c}{'_t1' if T else ''}" for r, c, b in matmul_shapes(cfg, qc)
              for T in (1, None)}
        return {**base, "fast": True, "mm": dict(sorted(mm.items(), key=lambda kv: kv[1])),
                "w4_layout": "int_w4_layout",
                "norm_quant": f"int_norm_quant_{cfg.dim}", "res_norm_quant": f"int_res_norm_quant_{cfg.dim}",
                "qkv_post": f"int_qkv_post_kv_{qd}_{kvd}", "attention_q8": "int_attention_q8",
                "attention_q8_t1": "int_attention_q8_t1",
                "silu_quant": f"int_silu_quant_{cfg.ffn_dim}", "silu_quant_t1": f"int_silu_quant_{cfg.ffn_dim}_t1",
                "token_t1": "int_decode_token"}
    kinds = {4: ("w4",) if qc.max_bpw is None else ("w4", "w8"), 8: ("w8",)}[qc.w_bits]
    linear = {(n, k, kind) for n, k in linear_shapes(cfg).values() for kind in kinds} | {(cfg.vocab_size, cfg.dim, "w8")}
    widths = {cfg.dim, qd, cfg.ffn_dim}
    B = qc.act_block                            # act="block": one amax per B channels of a linear input
    quant = {(k // B, B, 127) if B else (1, k, 127) for k in widths} | {(cfg.n_heads, cfg.head_dim, (1 << (qc.q_bits - 1)) - 1),
                                             (cfg.n_kv_heads, cfg.head_dim, 127)}
    return {**base, "fast": False, "norm": f"int_norm_{cfg.dim}",
            "quant": {s: f"int_quant{'' if s[2] == 127 else 16}_{s[0]}x{s[1]}" for s in sorted(quant)},
            "static_quant": {k: f"int_static_quant_{k}" for k in sorted(widths)} if qc.act == "static" else {},
            "linear": {s: f"int_linear_{s[2]}_{s[0]}x{s[1]}" for s in sorted(linear)},
            "rope_q": f"int_rope_{cfg.n_heads}x{cfg.head_dim}", "rope_k": f"int_rope_{cfg.n_kv_heads}x{cfg.head_dim}_k",
            "vquant": f"int_vquant_{kvd}", "silu_mul": f"int_silu_mul_{cfg.ffn_dim}",
            "residual": f"int_residual_{cfg.dim}"}


def w4_group_terms(t: dict, name: str, qc: QuantConfig) -> list[np.ndarray]:
    """[zero int8, mant int16, shift int8 (, min mant int16, min shift int8)], each [N, K/g], of an int4 linear.

    The group-factored form of IntLinear.build's expansion: w[n, k in group j] = (u - z) * (mant << shift)
    (+ (min_mant << min_shift) for fp16 group minima) in units of the row scale (intref.w4_group_scales),
    so the kernel keeps 4-bit codes and 3-5 bytes per group instead of an expanded matrix."""
    pairs, _ = w4_group_scales(t, name, qc, MAX_SHIFT)
    shape = pairs[0][0].shape
    if qc.symmetric:
        z = np.full(shape, 8, np.int8)
    else:
        z = np.zeros(shape, np.int8) if len(pairs) > 1 else t[name + ".zero"].astype(np.int8)
    return [z] + [a for m, sh in pairs for a in (m.astype(np.int16), sh.astype(np.int8))]


def linear_weights(t: dict, name: str, qc: QuantConfig) -> list[np.ndarray]:
    """The weight arguments of a block linear's kernel: int8 codes, or packed int4 codes and group terms
    (a linear's own `name.bits` wins over the scheme's: mixed precision)."""
    return [t[name + ".q"]] + (w4_group_terms(t, name, qc) if linear_bits(t, name, qc) == 4 else [])


def matmul_weights(t: dict, name: str, qc: QuantConfig) -> tuple[np.ndarray, ...]:
    """The fast matmul's weight arrays of a stored linear (edgellm.compiler.tvm_int_matmul): (w8,) or (wq, scale,
    rowf).

    An int8 `.q` (w8 linears, and the int8 head / embedding of every scheme) gives (w8,). w4 keeps the packed
    codes and the fp16 group scales as stored (2 bytes a group: the kernels are bound by the bytes they read),
    plus per row rowf = 2^-base (matmul_scale): every scale of row j is an integer multiple of 2^base[j]
    (intref.w4_group_scales), so the kernel's float64 sum times rowf is IntLinear.build's integer accumulator."""
    q = t[name + ".q"]
    if q.dtype == np.int8:
        return (np.ascontiguousarray(q),)
    rowf = matmul_scale(t, name, qc)
    return np.ascontiguousarray(q, dtype=np.uint8), np.ascontiguousarray(t[name + ".scale"]), rowf


def to_lane_layout(q: np.ndarray) -> np.ndarray:
    """Packed w4 codes [rows, cols/2] rearranged in place (and returned) for the lane-layout kernels
    (edgellm.compiler.tvm_int_matmul.lane_layout): in each full 256-column block (128 bytes), byte 32s + 4k + m
    takes byte 16k + 4s + m (its 4-byte words transposed 8x4 -> 4x8), so the int32 lane k of the block's step
    s holds 8 columns of group k. Bytes past the last full block stay as stored."""
    rows, nbytes = q.shape
    words = q.view(np.uint32)                     # moved as whole 4-byte words: 4x fewer elements than bytes
    n = nbytes // 128 * 32
    if n:
        words[:, :n] = words[:, :n].reshape(rows, n // 32, 8, 4).transpose(0, 1, 3, 2).reshape(rows, n)
    return q


def matmul_scale(t: dict, name: str, qc: QuantConfig) -> np.ndarray:
    """The fast matmul's per-row float64 factor 2^-base [N] of a w4 linear (see matmul_weights): base as
    QuantizedModel.save stored it (`name.row_exp`), else from the scales as IntLinear.build finds it."""
    if not qc.symmetric:
        raise EdgeLLMError(f"{name}: the integer matmul kernels take symmetric w4 weights only",
                           "quantize with symmetric groups (drop --asym) for the compiled integer path")
    dtype = tensor_header(t, name + ".scale")[1]
    if dtype != np.float16:
        raise EdgeLLMError(f"{name}: the integer matmul kernels read fp16 group scales, not {dtype}",
                           "re-quantize the model with edgellm (w4 group scales are stored as fp16)")
    base = t[name + ".row_exp"] if name + ".row_exp" in t else w4_group_scales(t, name, qc, MAX_SHIFT)[1][:, 0]
    return np.ldexp(1.0, -np.asarray(base, np.int64))


def read_stacked(t, names, suffix: str, arena: HugePageArena | None = None) -> tuple[Buffer, dict[str, np.ndarray]]:
    """Tensors `n + suffix` of names stacked row after row in one kernel buffer (from `arena` if given), each
    read straight into its rows (no concatenation copy), and a view of each."""
    heads = [tensor_header(t, n + suffix) for n in names]
    buf = int_buffer((sum(h[0][0] for h in heads), *heads[0][0][1:]), heads[0][1], fill=False, arena=arena)
    views, r = {}, 0
    for n, (shape, _) in zip(names, heads):
        views[n + suffix] = buf.np[r:r + shape[0]]
        read_into(t, n + suffix, views[n + suffix])
        r += shape[0]
    return buf, views


def int_buffer(shape_or_array, dtype=None, fill: bool = True, arena: HugePageArena | None = None) -> Buffer:
    """A Buffer (aligned numpy + TVM tensor, same memory) of any dtype, zeroed (fill=False: left for the caller
    to fill) or holding a copy of an array; its memory from `arena` if given."""
    b = Buffer.__new__(Buffer)
    empty = aligned_empty if arena is None else arena.empty
    if isinstance(shape_or_array, np.ndarray):
        b.np = empty(shape_or_array.shape, dtype or shape_or_array.dtype)
        b.np[...] = shape_or_array
    else:
        b.np = empty(shape_or_array, dtype)
        if fill:
            b.np[...] = 0
    b.t = _runtime().from_dlpack(b.np)
    b._rows = {}
    return b


class TvmIntKVCache(IntKVCache, TvmKVCache):
    """intref's int8 KV cache (its update_int) in aligned memory the attention kernel reads in place."""

    def __init__(self, cfg: ModelConfig, n_ctx: int):
        self.n_ctx = n_ctx
        shape = (cfg.n_layers, n_ctx, cfg.n_kv_heads, cfg.head_dim)
        self._b = [int_buffer(shape, np.int8), int_buffer(shape[:3], np.int64), int_buffer(shape, np.int8)]
        self.k, self.kamax, self.v = (b.np for b in self._b)
        self.tk, self.tka, self.tv = (b.t for b in self._b)
        self.length = 0


class TvmIntBackend(TvmBackend):
    """Runs IntTransformer's integer-only forward with a compiled integer kernel library.

    Forward, chunking (prompts in chunks of up to `chunk` tokens), call validation, kernel lookup and the
    thread policy (`threads`, as llama.cpp's -t) are TvmBackend's; prepare, the cache and a chunk's pass are
    integer. On the fast path a layer is 9 kernel calls (see _run_fast), and a decode token's layers one call
    where the library has the decode token kernel (`token_kernel=False` keeps the 9 per layer); weights live in a
    transparent-huge-page arena (`huge_pages=False`: numpy's pages); `profile=True` times every call
    (self.profile: name -> [calls, seconds]) of the 9-call plan."""

    name = "tvm-int"

    def __init__(self, qmodel: QuantizedModel | str | Path, library: str | os.PathLike, threads: int | None = None,
                 chunk: int = 32, profile: bool = False, token_kernel: bool = True, huge_pages: bool = True):
        if not isinstance(qmodel, QuantizedModel):
            qmodel = load_quantized(qmodel, lazy=True)    # tensors read on use: prepare copies each once
        self.qmodel, self.qc = qmodel, qmodel.qconfig
        IntTransformer(qmodel, "integer")                  # refuses weight-only schemes with a clear error
        self.profile = {} if profile else None
        self.token_kernel = token_kernel and not profile
        self.huge_pages = huge_pages
        super().__init__(qmodel.config, None, library, threads, chunk)

    def _fn(self, name: str):
        fn = super()._fn(name)
        return fn if self.profile is None else self._timed(name, fn)

    def _timed(self, name: str, fn):
        import time
        stat = self.profile.setdefault(name, [0, 0.0])

        def timed(*args):
            t0 = time.perf_counter()
            fn(*args)
            stat[0] += 1
            stat[1] += time.perf_counter() - t0
        return timed

    @staticmethod
    def _linear(fn, weights: list[np.ndarray], consts) -> dict:
        """One integer linear: its kernel, weight arrays, per-row multipliers and shifts, pre-shift, and for a
        static int8 input its (cap, m_in, s_in)."""
        static = isinstance(consts, StaticConsts)
        m, s, pre = (consts.m, consts.s, consts.pre) if static else consts
        keep = [int_buffer(np.ascontiguousarray(a)) for a in weights]
        return {"fn": fn, "w": [b.t for b in keep], "m": int_buffer(np.asarray(m, np.int64).reshape(-1)).t,
                "s": int_buffer(np.asarray(s, np.int64).reshape(-1)).t, "pre": int(pre), "_keep": keep,
                "static": (int(consts.cap), int(consts.m_in), int(consts.s_in)) if static else None}

    @staticmethod
    def _parts(names: list[str], bits: list[int]) -> list[tuple[tuple[str, ...], int]]:
        """The fast matmuls of linears sharing an input: one over all when their widths agree, else one each."""
        return [(tuple(names), bits[0])] if len(set(bits)) == 1 else [((n,), b) for n, b in zip(names, bits)]

    def _read_codes(self) -> dict[str, np.ndarray]:
        """The fast path's weight codes read once, straight into kernel buffers (read_stacked): each fused
        matmul's members row after row, and the int8 embedding table, which a tied head shares. A fused group
        that is one matmul of the same width in every layer is read as one buffer for all layers (layer i's
        rows at i * rows: what the decode token kernel takes), its w4 group scales likewise, and each layer
        gets views of its rows. Returns each stored `.q` as a view of those buffers, for intref's constants."""
        c, qc, t = self.cfg, self.qc, self.qmodel.tensors
        self._codes, self._scales, self._stacked, self._stacked_bufs, views = {}, {}, {}, {}, {}
        self._slot: dict[tuple, tuple] = {}           # a stacked part -> (group, its rows in the stacked buffers)
        parts = []
        for key, members in FUSED.items():
            layers = [[f"blk.{i}.{n}.weight" for n in members] for i in range(c.n_layers)]
            split = [self._parts(g, [linear_bits(t, n, qc) for n in g]) for g in layers]
            if self._stackable(split, t):
                self._stacked[key] = [s[0][0] for s in split]
            else:
                parts += [p for s in split for p in s]
        parts += [(("token_embd",), 8)] + ([(("output",), 8)] if "output.q" in t else [])
        names = [n for ns, _ in parts for n in ns] + [n for layer in self._stacked.values() for ns in layer for n in ns]
        size = sum(int(np.prod(h[0])) * np.dtype(h[1]).itemsize + 64 for n in names
                   for h in [tensor_header(t, n + x) for x in (".q", ".scale") if n + x in t])
        self._arena = HugePageArena(size) if self.huge_pages else None   # the weights every decode token streams
        for key, layers in self._stacked.items():
            rows = sum(tensor_header(t, n + ".q")[0][0] for n in layers[0])
            for suffix, out in ((".q", self._codes), (".scale", self._scales)):
                if layers[0][0] + suffix in t:
                    buf, v = read_stacked(t, [n for ns in layers for n in ns], suffix, self._arena)
                    views.update(v)
                    out.update({ns: buf.row_slice(i * rows, (i + 1) * rows) for i, ns in enumerate(layers)})
                    self._stacked_bufs[(key, suffix)] = buf
            for const, dtype in (("rowf", np.float64), ("m", np.int64), ("s", np.int64), ("pre", np.int64)):
                self._stacked_bufs[(key, const)] = int_buffer((len(layers) * rows,), dtype, fill=False)
            self._slot.update({ns: (key, i * rows, (i + 1) * rows) for i, ns in enumerate(layers)})
        for ns, _ in parts:
            self._codes[ns], v = read_stacked(t, ns, ".q", self._arena)
            views.update(v)
        return views

    def _stackable(self, split: list, t) -> bool:
        """Whether a fused group's parts over the layers (_parts of each) can be stacked for the token kernel:
        the token kernel wanted, one matmul per layer, the same width, and every layer's rows starting on a
        64-byte boundary (as the kernels assume)."""
        if not (self.token_kernel and all(len(p) == 1 for p in split) and len({p[0][1] for p in split}) == 1):
            return False
        if sum(tensor_header(t, n + ".q")[0][0] for n in split[0][0][0]) % 8:     # int64 / float64 per row
            return False
        for suffix in (".q", ".scale"):
            heads = [tensor_header(t, n + suffix) for n in split[0][0][0] if n + suffix in t]
            if heads and (sum(h[0][0] for h in heads) * int(np.prod(heads[0][0][1:])) *
                          np.dtype(heads[0][1]).itemsize) % 64:
                return False
        return True

    def prepare(self) -> None:
        """Take intref's calibrated constants, lay the weights out for the kernels, allocate activations."""
        if self._ready:
            return
        self._set_threads(_runtime())
        c, qc, t = self.cfg, self.qc, self.qmodel.tensors
        names = int_kernel_names(c, qc)
        try:
            self.lib[names["signature"]]
        except Exception:  # noqa: BLE001
            raise EdgeLLMError(f"kernel library {self.library} was not compiled for this model and scheme "
                               f"(no {names['signature']})", "recompile: edgellm.compiler.tvm_int.build_int_kernels")
        self.fast = names["fast"]
        views = self._read_codes() if self.fast else {}
        ref = IntTransformer(QuantizedModel(c, qc, ChainMap(views, t)), "integer")   # constants: no float weights
        ref.prepare()
        self.f_logit = int(t["int.F_logit"])
        table = self._codes[("token_embd",)] if self.fast else int_buffer(ref.emb_q)
        self.emb = {"table": table.t, "m": int_buffer(ref.emb_m.astype(np.int64)).t,
                    "sh": int_buffer(ref.emb_sh.astype(np.int64)).t}
        self.eps_q = int(ref.eps_q)
        self.q_max = (1 << (qc.q_bits - 1)) - 1
        self.g_out = int_buffer(ref.g_out.astype(np.int64)).t
        self.layers = []
        for i, L in enumerate(ref.layers):
            fg = int(L["fg"])
            fe = min(fg, SCORE_F)
            q_ln2, q_b, q_c, one = exp_consts(fe)
            self.layers.append({
                "g1": int_buffer(L["g1"].astype(np.int64)).t, "g2": int_buffer(L["g2"].astype(np.int64)).t,
                "vm": int_buffer(L["vm"].astype(np.int64)).t, "vsh": int_buffer(L["vsh"].astype(np.int64)).t,
                "om": int_buffer(L["om"].astype(np.int64)).t, "osh": int_buffer(L["osh"].astype(np.int64)).t,
                "sc": tuple(int(v) for v in L["sc"]), "silu": (fg - fe, q_ln2, q_b, q_c, one, int(L["shift_h"]))})
        (self._prepare_fast if self.fast else self._prepare_generic)(names, ref)
        self._codes = {}
        self._views: dict[int, dict] = {}
        self._rope_n = 0
        self._ready = True

    def _acts(self, spec: dict) -> None:
        """Activation buffers: name -> (rows (None: the chunk), width (None: one dimension), dtype). Not zeroed:
        kernels write rows before reading them, so rows no chunk reaches (most of the chunk x vocab logits when
        only the last row's are asked for) never take memory."""
        R = self.chunk
        self.acts = {n: int_buffer((R if rows is None else rows,) + (() if w is None else (w,)), dt, fill=False)
                     for n, (rows, w, dt) in spec.items()}

    def _prepare_generic(self, names: dict, ref) -> None:
        """One kernel per intref op (static activations, asymmetric w4): the linear kernels of tvm_int."""
        c, qc, t = self.cfg, self.qc, self.qmodel.tensors
        k = {key: self._fn(names[key]) for key in ("embed", "norm", "rope_q", "rope_k", "vquant", "attention",
                                                   "silu_mul", "residual")}
        k["quant"] = {s: self._fn(n) for s, n in names["quant"].items()}
        k["static_quant"] = {s: self._fn(n) for s, n in names["static_quant"].items()}
        lin = {s: self._fn(n) for s, n in names["linear"].items()}

        def kernel(name: str, shape: tuple[int, int]):
            key = (*shape, f"w{linear_bits(t, name, qc)}")
            if key not in lin:
                raise EdgeLLMError(f"{name} is {key[2]} but the quantization config has no such linears",
                                   "re-quantize the model (mixed precision is set by max_bpw)")
            return lin[key]
        self.k = k
        shapes = linear_shapes(c)
        for i, (L, layer) in enumerate(zip(ref.layers, self.layers)):
            p = f"blk.{i}."
            layer.update({n: self._linear(kernel(p + n + ".weight", shapes[n]), linear_weights(t, p + n + ".weight", qc),
                                          L["c_" + n]) for n in LINEARS})
        self.head = self._linear(lin[(c.vocab_size, c.dim, "w8")], [t.get("output.q", t["token_embd.q"])],
                                 ref.c_head)
        qd, kvd, D, Fd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.dim, c.ffn_dim
        i64, i8 = np.int64, np.int8
        self._acts({"tok": (None, None, i64), "x": (None, D, i64), "x2": (None, D, i64), "h": (None, D, i64),
                    "o": (None, D, i64), "q": (None, qd, i64), "qr": (None, qd, i64), "k": (None, kvd, i64),
                    "kr": (None, kvd, i64), "v": (None, kvd, i64), "a": (None, qd, i64), "g": (None, Fd, i64),
                    "u": (None, Fd, i64), "hh": (None, Fd, i64),
                    "q8": (None, qd, i8 if qc.q_bits == 8 else np.int16), "qa": (None, c.n_heads, i64),
                    "k8": (None, kvd, i8), "ka": (None, c.n_kv_heads, i64), "v8": (None, kvd, i8),
                    "amax": (None, 1, i64), "ones": (None, 1, i64), "last": (1, D, i64),
                    "logits": (None, c.vocab_size, i64)})
        self.acts["ones"].np[:] = 1                                       # amax of static int8 inputs
        self.lin8 = {K: int_buffer((self.chunk, K), i8) for K in {D, qd, Fd}}   # int8 inputs of the linears
        if qc.act_block:                                                  # their per-block amax (act="block")
            self.amax_blocks = {K: int_buffer((self.chunk, K // qc.act_block), i64) for K in {D, qd, Fd}}

    def _lane_shapes(self, names: dict) -> set[tuple]:
        """(rows, cols) of the matmuls whose kernels read w4 codes in the lane layout (the library says which:
        the compiler chose per target)."""
        flags = int_buffer((len(names["mm"]),), np.int32)
        self._fn(names["w4_layout"])(flags.t)
        return {key[:2] for key, f in zip(names["mm"], flags.np) if f}

    def _matmuls(self, mm: dict, names: list[str], consts: list, bits: list[int]) -> dict:
        """The fast matmul call(s) of linears sharing an input: one over their concatenated rows when their
        widths agree (requant constants are per row, so this is exact), else one each (mixed precision)."""
        t, qc = self.qmodel.tensors, self.qc
        by_name = dict(zip(names, consts))
        out, col = [], 0
        for ns, b in self._parts(names, bits):
            cs = [by_name[n] for n in ns]
            w = [self._codes[ns]]                           # codes read by _read_codes
            if b == 4:                                      # fp16 group scales as stored, and 2^-base per row
                if (len(w[0].np), w[0].np.shape[1] * 2) in self._lanes:
                    to_lane_layout(w[0].np)
                rowf = np.concatenate([matmul_scale(t, n, qc) for n in ns])
                scale = self._scales.get(ns) or read_stacked(t, ns, ".scale", self._arena)[0]
                w += [scale, self._row_consts(ns, "rowf", rowf)]
            m = np.concatenate([np.asarray(c[0], np.int64).reshape(-1) for c in cs])
            s = np.concatenate([np.asarray(c[1], np.int64).reshape(-1) for c in cs])
            pre = np.concatenate([np.full(np.size(c[0]), int(c[2]), np.int64) for c in cs])
            rows = len(m)
            K = w[0].np.shape[1] * (2 if b == 4 else 1)
            keep = w + [self._row_consts(ns, k, a) for k, a in (("m", m), ("s", s), ("pre", pre))]
            out.append({"fn1": mm[(rows, K, b, 1)], "fnT": mm[(rows, K, b, None)], "w": [k.t for k in keep[:-3]],
                        "c": [k.t for k in keep[-3:]],
                        "cols": (col, col + rows), "_keep": keep})
            col += rows
        return {"parts": out, "rows": col}

    def _prepare_fast(self, names: dict, ref) -> None:
        """Fused kernels: q|k|v and gate|up as one matmul each (requant fused), norms and quantizations fused."""
        c, qc, t = self.cfg, self.qc, self.qmodel.tensors
        mm = {key: self._fn(n) for key, n in names["mm"].items()}
        self._lanes = self._lane_shapes(names)
        self.token_t1 = None
        if self.token_kernel and len(self._stacked) == len(FUSED):
            try:
                self.token_t1 = self.lib[names["token_t1"]]
            except Exception:  # noqa: BLE001 - not built for this target (or an older library): per-kernel plan
                pass
        self.k = {key: self._fn(names[key]) for key in ("embed", "norm_quant", "res_norm_quant", "qkv_post",
                                                        "attention_q8", "silu_quant", "silu_quant_t1",
                                                        "attention_q8_t1")}
        for i, (L, layer) in enumerate(zip(ref.layers, self.layers)):
            for group, members in FUSED.items():
                ws = [f"blk.{i}.{n}.weight" for n in members]
                layer[group] = self._matmuls(mm, ws, [L["c_" + n] for n in members], [linear_bits(t, w, qc) for w in ws])
        head = "output" if "output.q" in t else "token_embd"
        self.head = self._matmuls(mm, [head], [ref.c_head], [8])
        self._token = self._token_weights() if self.token_t1 is not None else None
        if self._token is None:
            self.token_t1 = None
        qd, kvd, D, Fd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.dim, c.ffn_dim
        i64, i8 = np.int64, np.int8
        spec = {"tok": (None, None, i64), "x": (None, D, i64), "x2": (None, D, i64), "o": (None, D, i64),
                "h8": (None, D, i8), "ha": (None, 1, i64), "qkv": (None, qd + 2 * kvd, i64),
                "q8": (None, qd, i8 if qc.q_bits == 8 else np.int16), "qa": (None, c.n_heads, i64),
                "a8": (None, qd, i8), "aa": (None, 1, i64), "ao": (1, qd, i64), "pm": (1, SILU_SLICES, i64),
                "gu": (None, 2 * Fd, i64), "f8": (None, Fd, i8),
                "fa": (None, 1, i64), "last8": (1, D, i8), "lasta": (1, 1, i64),
                "logits": (None, c.vocab_size, i64)}
        spec.update({f"part{r}": (None, r, i64) for L in self.layers for g in FUSED
                     for r in ([p["cols"][1] - p["cols"][0] for p in L[g]["parts"]] if len(L[g]["parts"]) > 1 else [])})
        self._acts(spec)

    def _row_consts(self, ns: tuple, const: str, values: np.ndarray) -> Buffer:
        """A part's per-row constants: its rows of the stacked buffer (_read_codes) where it has some, else a
        buffer of their own."""
        if ns not in self._slot:
            return int_buffer(values)
        key, r0, r1 = self._slot[ns]
        view = self._stacked_bufs[(key, const)].row_slice(r0, r1)
        view.np[...] = values
        return view

    def _token_weights(self) -> list | None:
        """The token kernel's weight and constant arguments (TOKEN_ARGS after eps_q, before ao): each fused
        matmul's codes, scales, 2^-base, m, s, pre, every one stacked over the layers (_read_codes, _row_consts),
        and the per-layer constants as [n_layers, ...] arrays; None unless every layer's matmuls are the
        lane-layout w4 kernels the token kernel runs."""
        L = self.layers
        if not all(self._lane_group(layer[g]) for layer in L for g in FUSED):
            return None
        cat = lambda arrays: int_buffer(np.concatenate(arrays))            # noqa: E731
        stack = lambda key: cat([np.from_dlpack(layer[key])[None] for layer in L])  # noqa: E731
        mm = {g: [self._stacked_bufs[(g, k)] for k in (".q", ".scale", "rowf", "m", "s", "pre")] for g in FUSED}
        g_next = cat([np.from_dlpack(layer["g1"])[None] for layer in L[1:]] + [np.from_dlpack(self.g_out)[None]])
        bufs = [*mm["qkv"], stack("vm"), stack("vsh"), stack("om"), stack("osh"),
                int_buffer(np.array([layer["sc"] for layer in L], np.int64)), *mm["o"], stack("g2"), *mm["gu"],
                int_buffer(np.array([layer["silu"] for layer in L], np.int64)), *mm["down"], g_next]
        self._token_keep = bufs
        return [b.t for b in bufs]

    def _rope(self, n_ctx: int):
        if n_ctx > self._rope_n:
            cos, sin = rope_q15(self.cfg, n_ctx)
            self.cos, self.sin = int_buffer(cos), int_buffer(sin)
            self._rope_n = n_ctx
        return self.cos.t, self.sin.t

    def new_cache(self, n_ctx: int) -> TvmIntKVCache:
        return TvmIntKVCache(self.cfg, n_ctx)

    # ---------------------------------------------------------------- forward
    def _rows(self, T: int) -> dict:
        """Views of the first T rows of every activation, made once per T."""
        v = self._views.get(T)
        if v is None:
            v = self._views[T] = {n: b.rows(T) for n, b in self.acts.items()}
        return v

    def _run(self, tokens: np.ndarray, pos: int, kv: TvmIntKVCache, logits: str | None):
        return (self._run_fast if self.fast else self._run_generic)(tokens, pos, kv, logits)

    def _lane_group(self, grp: dict) -> bool:
        """Whether a fused group is one w4 matmul over lane-layout codes (what the decode token kernel takes)."""
        parts = grp["parts"]
        return len(parts) == 1 and len(parts[0]["w"]) == 3 and tuple(parts[0]["_keep"][0].np.shape) in {
            (r, c // 2) for r, c in self._lanes}

    def _mm_steps(self, grp: dict, x8, amax, out, T: int) -> list:
        """Plan steps of one fused group's matmul(s) on int8 rows x8 into out [T, rows]; mixed widths: one call
        each into a part buffer, then a copy into out's columns."""
        parts, steps = grp["parts"], []
        for p in parts:
            dst = out if len(parts) == 1 else self._rows(T)[f"part{p['cols'][1] - p['cols'][0]}"]
            steps.append([p["fn1"] if T == 1 else p["fnT"], [x8.t, *p["w"], amax.t, *p["c"], dst.t], -1])
            if len(parts) > 1:
                steps.append([out.np.__setitem__, [(slice(None), slice(*p["cols"])), dst.np], -1])
        return steps

    def _matmul(self, grp: dict, x8, amax, out, T: int) -> None:
        """Run one fused group's matmul(s) now (what a plan's steps do)."""
        for fn, args, _ in self._mm_steps(grp, x8, amax, out, T):
            fn(*args)

    def _plan(self, T: int, kv: TvmIntKVCache, logits: str | None) -> list:
        """A chunk of T rows through the fused kernels as a flat list of [function, arguments, index of `pos` in
        them or -1], every argument bound once per (T, logits, cache), so the Python between ~270 kernel calls
        is a loop over a list. Per layer: q|k|v matmul, qkv_post (which also writes the new int8 k / v rows
        into the cache), attention_q8, o matmul, res_norm_quant, gate|up matmul, silu_quant, down matmul,
        res_norm_quant (the next layer's attention norm, or the output norm); then the head on all rows or the
        last one. One row uses the "_t1" decode kernels, or the token kernel for all layers where it runs."""
        import weakref
        cos, sin = self._rope(kv.n_ctx)
        key = (T, logits)
        cached = getattr(self, "_plans", None)
        if cached is None or cached[0]() is not kv or cached[1] is not cos:
            cached = self._plans = (weakref.ref(kv), cos, {})
        if key in cached[2]:
            return cached[2][key]
        K, a, eps, n = self.k, self._rows(T), self.eps_q, len(self.layers)
        x, x2, h8, ha, o = a["x"].t, a["x2"].t, a["h8"].t, a["ha"].t, a["o"].t
        one = "_t1" if T == 1 else ""

        mm = lambda grp, src, amax, out, rows=T: self._mm_steps(grp, src, amax, out, rows)  # noqa: E731
        plan = [[K["embed"], [self.emb["table"], a["tok"].t, self.emb["m"], self.emb["sh"], x], -1],
                [K["norm_quant"], [x, self.layers[0]["g1"], eps, h8, ha], -1]]
        token = T == 1 and self.token_t1 is not None
        if token:                                           # every layer in one call (TOKEN_ARGS)
            acts = [a[k].t for k in ("x", "x2", "o", "h8", "ha", "qkv", "q8", "qa", "a8", "aa", "gu", "f8", "fa")]
            plan.append([self.token_t1, [*acts, cos, sin, 0, kv.tk, kv.tka, kv.tv, eps, *self._token, a["ao"].t,
                                         a["pm"].t], 15])
        for i, L in enumerate([] if token else self.layers):
            plan += mm(L["qkv"], a["h8"], a["ha"], a["qkv"])
            plan += [[K["qkv_post"], [a["qkv"].t, cos, sin, 0, L["vm"], L["vsh"], kv.tk, kv.tka, kv.tv, i,
                                      a["q8"].t, a["qa"].t], 3],     # new k / v rows straight into the cache
                     [K["attention_q8" + one], [a["q8"].t, a["qa"].t, kv.tk, kv.tka, kv.tv, L["om"], L["osh"], i, 0,
                                                *L["sc"], a["a8"].t, a["aa"].t], 8]]
            plan += mm(L["o"], a["a8"], a["aa"], a["o"])
            plan.append([K["res_norm_quant"], [x, o, L["g2"], eps, x2, h8, ha], -1])
            plan += mm(L["gu"], a["h8"], a["ha"], a["gu"])
            plan.append([K["silu_quant" + one], [a["gu"].t, *L["silu"], a["f8"].t, a["fa"].t], -1])
            plan += mm(L["down"], a["f8"], a["fa"], a["o"])
            if i + 1 < n or logits is not None:
                g = self.layers[i + 1]["g1"] if i + 1 < n else self.g_out
                plan.append([K["res_norm_quant"], [x2, o, g, eps, x, h8, ha], -1])
        if logits == "last" and T > 1:
            v = self._rows(1)

            def last_row():
                v["last8"].np[0], v["lasta"].np[0] = a["h8"].np[-1], a["ha"].np[-1]
            plan.append([last_row, [], -1])
            plan += mm(self.head, v["last8"], v["lasta"], v["logits"], rows=1)
        elif logits is not None:
            plan += mm(self.head, a["h8"], a["ha"], a["logits"])
        cached[2][key] = plan
        return plan

    def _run_fast(self, tokens: np.ndarray, pos: int, kv: TvmIntKVCache, logits: str | None):
        """A chunk through its _plan: logits of all rows, of the last one, or None."""
        T = len(tokens)
        plan = self._plan(T, kv, logits)
        self._rows(T)["tok"].np[:] = tokens
        for fn, args, p in plan:
            if p >= 0:
                args[p] = pos
            fn(*args)
        kv.length = pos + T
        if logits is None:
            return None
        lg = self._rows(1 if logits == "last" else T)["logits"]
        return lg.np.astype(np.float32) * np.float32(2.0 ** -self.f_logit)

    def _mm(self, lin: dict, src, T: int, out, q=None):
        """Linear `lin` on rows src [T, K] into out. Dynamic inputs: the per-token int8 quantization `q` of src
        when a previous linear made it (returned for the next); static inputs: the linear's own scale."""
        K = src.np.shape[1]
        q8 = self.lin8[K].rows(T)
        if lin["static"] is not None:
            self.k["static_quant"][K](src.t, *lin["static"], q8.t)
            q, shared = (q8.t, self.acts["ones"].rows(T).t), None
        elif q is None:
            B = self.qc.act_block
            amax = self.amax_blocks[K].rows(T) if B else self.acts["amax"].rows(T)
            self.k["quant"][(K // B, B, 127) if B else (1, K, 127)](src.t, q8.t, amax.t)
            q = shared = (q8.t, amax.t)
        else:
            shared = q
        lin["fn"](*q, *lin["w"], lin["m"], lin["s"], lin["pre"], out.t)
        return shared

    def _run_generic(self, tokens: np.ndarray, pos: int, kv: TvmIntKVCache, logits: str | None):
        c, K, T = self.cfg, self.k, len(tokens)
        a = {n: b.rows(T) for n, b in self.acts.items() if n != "last"}
        cos, sin = self._rope(kv.n_ctx)
        a["tok"].np[:] = tokens
        x, x2 = a["x"], a["x2"]
        K["embed"](self.emb["table"], a["tok"].t, self.emb["m"], self.emb["sh"], x.t)
        kv_shape = (T, c.n_kv_heads, c.head_dim)
        for i, L in enumerate(self.layers):
            K["norm"](x.t, L["g1"], self.eps_q, a["h"].t)
            hq = None
            for n, out in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v")):
                hq = self._mm(L[n], a["h"], T, a[out], hq)
            K["rope_q"](a["q"].t, cos, sin, pos, a["qr"].t)
            K["rope_k"](a["k"].t, cos, sin, pos, a["kr"].t)
            K["quant"][(c.n_heads, c.head_dim, self.q_max)](a["qr"].t, a["q8"].t, a["qa"].t)
            K["quant"][(c.n_kv_heads, c.head_dim, 127)](a["kr"].t, a["k8"].t, a["ka"].t)
            K["vquant"](a["v"].t, L["vm"], L["vsh"], a["v8"].t)
            kv.update_int(i, pos, a["k8"].np.reshape(kv_shape), a["ka"].np, a["v8"].np.reshape(kv_shape))
            K["attention"](a["q8"].t, a["qa"].t, kv.tk, kv.tka, kv.tv, L["om"], L["osh"], i, pos, *L["sc"], a["a"].t)
            self._mm(L["attn_output"], a["a"], T, a["o"])
            K["residual"](x.t, a["o"].t, x2.t)
            x, x2 = x2, x
            K["norm"](x.t, L["g2"], self.eps_q, a["h"].t)
            self._mm(L["ffn_up"], a["h"], T, a["u"], self._mm(L["ffn_gate"], a["h"], T, a["g"]))
            K["silu_mul"](a["g"].t, a["u"].t, *L["silu"], a["hh"].t)
            self._mm(L["ffn_down"], a["hh"], T, a["o"])
            K["residual"](x.t, a["o"].t, x2.t)
            x, x2 = x2, x
        if logits is None:
            return None
        if logits == "last":
            self.acts["last"].np[0] = x.np[-1]
            x, T = self.acts["last"], 1
        h, lg = self.acts["h"].rows(T), self.acts["logits"].rows(T)
        K["norm"](x.t, self.g_out, self.eps_q, h.t)
        self._mm(self.head, h, T, lg)
        return lg.np.astype(np.float32) * np.float32(2.0 ** -self.f_logit)


def run_logits(backend: Backend, tokens, steps) -> np.ndarray:
    """Logits of a prefill of `tokens` (all rows) then one decode step per id in `steps` (last row each),
    stacked [len(tokens) + len(steps), vocab]: what a device run dumps for the host to compare."""
    tokens = np.asarray(tokens, dtype=np.int64)
    kv = backend.new_cache(len(tokens) + len(steps))
    out = [backend.forward(tokens, 0, kv, all_logits=True)]
    for i, tok in enumerate(steps):
        out.append(backend.forward([int(tok)], len(tokens) + i, kv))
    return np.concatenate(out, axis=0)


def main(argv=None) -> int:
    """`python -m edgellm.runtime.tvm_int_backend --qmodel M.npz --library L --tokens 1,2 --steps 3,4 --out X.npy`:
    a device check of the integer kernels alone (tests run it under qemu for ARM and compare on the host)."""
    import argparse
    import platform
    ap = argparse.ArgumentParser(prog="python -m edgellm.runtime.tvm_int_backend")
    ap.add_argument("--qmodel", required=True)
    ap.add_argument("--library", required=True)
    ap.add_argument("--tokens", required=True, help="comma-separated prompt token ids")
    ap.add_argument("--steps", default="", help="comma-separated decode token ids")
    ap.add_argument("--out", required=True, help=".npy file for the stacked logits")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    ids = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    be = TvmIntBackend(a.qmodel, a.library, a.threads)
    logits = run_logits(be, ids(a.tokens), ids(a.steps))
    tmp = Path(a.out).with_name(Path(a.out).name + ".tmp.npy")
    np.save(tmp, logits)
    os.replace(tmp, a.out)
    print(platform.machine())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
