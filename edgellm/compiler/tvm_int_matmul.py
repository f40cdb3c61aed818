"""Exact int8 x int8/int4 matmul kernels in TVM TIR: the fast decode path of the integer reference.

acc[t, j] = sum_k x8[t, k] * W_int[j, k] as int64, bit-identical to intref.int_matmul(x8, IntLinear.build(..).w).
Weights stay in their stored form: w8 int8 [rows, cols]; w4 packed nibbles [rows, cols/2] (low nibble = even
column, value code - 8) with each fp16 group scale split into an 11-bit mantissa and a left shift relative to
the row scale (intref.w4_group_scales), so W_int[j, k] = (code - 8) * mant[j, k//g] << sh[j, k//g];
the kernel takes scale = mant << sh (< 2^31) as float64 (float32 would hold it exactly too, but measured no
faster: the kernels are compute-bound, not memory-bound, on the 2-core AMD EPYC host).

Shapes are static, so each row is built as one TIR expression per block of up to 256 columns (Let-bound
vectors, no buffers): LLVM keeps every partial sum in registers, while a TIR accumulator buffer inside the
parallel loop would be a heap allocation per row on TVM 0.27. Once per token, x8 is split into even and odd
columns (so they line up with the low and high nibbles) and 8 * sum(x8) per 8 columns is precomputed. The
int8 dot products use the target's instructions, named as LLVM intrinsics:
- avx2: vpmaddubsw (unsigned x signed bytes) + vpmaddwd. w4 feeds the unsigned codes 0..15 and subtracts
  8 * sum(x) per 8-column lane afterwards (that sum is computed once per token, shared by all rows); w8 uses
  llama.cpp's sign trick |w| x sign(x, w), exact for |x8| <= 127 (what intref's quant_dynamic produces).
- avx512vnni / avxvnni: vpdpbusd (256-bit) in place of the vpmaddubsw + vpmaddwd pair, same layout.
- sdot (aarch64 dotprod: rpi5, Jetson Orin): sdot on 16 bytes, the same lane layout.
- generic (rpi4's plain NEON, x86 without AVX2): portable int16 vector code that LLVM vectorizes.
The w4 inner sum of a group fits int32 (|x8| <= 127, |code - 8| <= 8, g <= 128); group sums times their
scale are accumulated in float64 lanes, exactly: every term and partial sum is an integer below 2^53 (the bound
IntLinear.build checks), and int -> double + multiply + add is cheaper than int64 multiply + shift + add.
The requant (IntLinear.__call__'s tail) is fused per output. Rows are split over the TVM runtime's thread pool (TVM_NUM_THREADS,
or runtime.config_threadpool as edgellm.runtime.tvm_backend sets it).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..devices import targets
from ..errors import EdgeLLMError
from ..runtime.intref import QuantConfig
from ..runtime.tvm_int_backend import matmul_weights
from . import tvm_build

ISAS = ("avx512vnni", "avx2", "sdot", "generic")
_LET_IDS = itertools.count()
BLOCK_COLS = 256        # columns unrolled per inner loop iteration
PREFILL_TOKENS = 2      # w4 prefill (symbolic T): tokens computed together per weight row (2 and 4 measured
                        # alike, ~10% faster than 1 on the AVX2 host)


@dataclass(frozen=True)
class Isa:
    """One kernel variant. Its w4 step yields int32 lanes of 8 columns each (lane l = columns 8l..8l+7 of
    the step for the SIMD variants), so any 32 consecutive columns are one int32x4."""

    name: str
    chunk4: int          # w4 columns per step (packed bytes = chunk4 / 2)
    chunk8: int          # w8 columns per step
    corrected: bool      # w4 multiplies unsigned codes and subtracts 8 * sum(x) per lane


_ISA = {"avx512vnni": Isa("avx512vnni", 64, 32, True), "avx2": Isa("avx2", 64, 32, True),
        "sdot": Isa("sdot", 32, 16, True), "generic": Isa("generic", 32, 16, False)}


tir = None             # tvm.tirx, imported by _tvm() (edgellm.compiler must import without TVM)


def _tvm():
    global tir
    tvm = tvm_build._tvm()          # a clear error when the TVM compiler is missing
    import tvm.tirx
    tir = tvm.tirx
    return tvm


def _target(tvm_target):
    """A tvm.target.Target from a Target, a TVM target dict or string, or an `edgellm targets` name."""
    tvm = _tvm()
    if isinstance(tvm_target, tvm.target.Target):
        return tvm_target
    if isinstance(tvm_target, targets.Target) or (isinstance(tvm_target, str) and tvm_target in targets.TARGETS):
        tvm_target = tvm_build.resolve_target(tvm_target)
    return tvm.target.Target(tvm_target)


def kernel_isa(tvm_target) -> str:
    """The best kernel variant for a target (as _target takes it): features implied by -mcpu count."""
    from tvm.target import codegen
    target = _target(tvm_target)
    if target.kind.name != "llvm":
        return "generic"
    with target:
        has = lambda f: bool(codegen.target_has_features(f, target))  # noqa: E731
        triple = str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()
        if triple.startswith(("x86_64", "i686")):
            if has("avx2") and (has("avxvnni") or (has("avx512vnni") and has("avx512vl"))):
                return "avx512vnni"
            return "avx2" if has("avx2") else "generic"
        if triple.startswith(("aarch64", "arm64")) and has("dotprod"):
            return "sdot"
    return "generic"


# ---------------------------------------------------------------- vector expressions

def _splat(value, dtype: str, lanes: int):
    return tir.Broadcast(tir.const(value, dtype), lanes)


def _intrin(dtype: str, name: str, *args):
    return tir.call_llvm_pure_intrin(dtype, name, *args)


def _halves(v, dtype: str):
    return tir.vectorlow(dtype, v), tir.vectorhigh(dtype, v)


def _let(value, dtype: str, body):
    """body(v) with v bound once to value (a Let expression: computed once, used twice)."""
    v = tir.Var(f"v{next(_LET_IDS)}", dtype)
    return tir.Let(v, value, body(v))


def _load(buf, row, start, lanes: int):
    return buf[row, tir.Ramp(start, 1, lanes)]


def _i16(v, lanes: int):
    return tir.Cast(f"int16x{lanes}", v)


def _fold(v, lanes: int, to: int, ty: str = "int32"):
    """Sum the halves of a vector of `ty` until `to` lanes are left."""
    while lanes > to:
        half = f"{ty}x{lanes // 2}"
        v = _let(v, f"{ty}x{lanes}", lambda u, half=half: _sum(_halves(u, half)))
        lanes //= 2
    return v


def _hsum(v, lanes: int, ty: str):
    """The sum of the lanes of a vector of `ty`, as a scalar."""
    v2 = _fold(v, lanes, 2, ty)
    return _let(v2, f"{ty}x2", lambda u: tir.Shuffle([u], [0]) + tir.Shuffle([u], [1]))


def _sum(terms):
    total = terms[0]
    for e in terms[1:]:
        total = total + e
    return total


def _w4_step(isa: Isa, wq, xd, xc, j, t, c):
    """int32 lanes of w4 step c (chunk4 columns): lane l = sum of (code - 8) * x over 8 columns
    (generic: 4 lanes of 8 columns each, in its own order). |lane| <= 8 * 8 * 127."""
    nb = isa.chunk4 // 2
    p = _load(wq, j, c * nb, nb)
    lo = p & _splat(15, "uint8", nb)
    hi = p >> _splat(4, "uint8", nb)
    xe, xo = _load(xd, t, c * isa.chunk4, nb), _load(xd, t, c * isa.chunk4 + nb, nb)
    b8 = f"int8x{nb}"
    lo, hi = tir.reinterpret(b8, lo), tir.reinterpret(b8, hi)
    if not isa.corrected:       # signed codes in int8, then widening multiplies (NEON smull / smlal)
        eight = _splat(8, "int8", nb)
        e = _i16(lo - eight, nb) * _i16(xe, nb) + _i16(hi - eight, nb) * _i16(xo, nb)
        return _fold(tir.Cast(f"int32x{nb}", e), nb, 4)
    lanes = nb // 4
    ty = f"int32x{lanes}"
    if isa.name == "avx2":
        s16 = (_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", lo, xe)
               + _intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", hi, xo))       # pairs <= 2 * 15 * 128
        d = _intrin(ty, "llvm.x86.avx2.pmadd.wd", s16, _splat(1, "int16", 16))
    else:
        name = "llvm.x86.avx512.vpdpbusd.256" if isa.name == "avx512vnni" else "llvm.aarch64.neon.sdot"
        d = _intrin(ty, name, _intrin(ty, name, _splat(0, "int32", lanes), lo, xe), hi, xo)
    return d - _load(xc, t, c * lanes, lanes)


def _w8_step(isa: Isa, w, x8, j, t, c):
    """int32 lanes of w8 step c (chunk8 columns): partial sums of x8 * w."""
    n = isa.chunk8
    wv, xv = _load(w, j, c * n, n), _load(x8, t, c * n, n)
    if isa.name == "generic":
        return _fold(tir.Cast(f"int32x{n}", _i16(wv, n) * _i16(xv, n)), n, 4)
    if isa.name == "sdot":
        return _intrin("int32x4", "llvm.aarch64.neon.sdot", _splat(0, "int32", 4), wv, xv)
    aw = tir.reinterpret(f"int8x{n}", tir.abs(wv))          # |w| as unsigned bytes (|-128| = 128 fits)
    sx = _intrin(f"int8x{n}", "llvm.x86.avx2.psign.b", xv, wv)
    if isa.name == "avx512vnni":
        return _intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", _splat(0, "int32", 8), aw, sx)
    s16 = _intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", aw, sx)     # pairs <= 2 * 128 * 127 < 2^15
    return _intrin("int32x8", "llvm.x86.avx2.pmadd.wd", s16, _splat(1, "int16", 16))


def _scaled(q, scale, j, gi):
    """float64x4 q * scale[j, gi] of one group's int32x4 sums: exact, as every product and partial sum of a
    row is an integer below 2^53 (IntLinear.build's bound), and cheaper than int64 multiply + shift."""
    return tir.Cast("float64x4", q) * tir.Broadcast(scale[j, gi], 4)


def _w4_block(isa: Isa, B: int, g: int, wq, xd, xc, scale, j, t, b):
    """Columns [b*B, (b+1)*B) of acc[t, j] for w4: sum over groups of group dot * scale in float64x4 lanes,
    then the lanes (an exact integer). Unrolled over the block; b may be a loop variable."""
    steps = B // isa.chunk4
    lanes = 4 if not isa.corrected else isa.chunk4 // 8
    step = lambda c: _w4_step(isa, wq, xd, xc, j, t, b * steps + c)  # noqa: E731
    g0 = b * (B // g)
    if g < isa.chunk4:      # one step holds two 32-column groups: bind it once, split its halves
        terms = [_let(step(c), "int32x8", lambda v, c=c: _sum([
                      _scaled(q, scale, j, g0 + 2 * c + h) for h, q in enumerate(_halves(v, "int32x4"))]))
                 for c in range(steps)]
    else:
        per = g // isa.chunk4
        terms = [_scaled(_fold(_sum([step(gi * per + i) for i in range(per)]), lanes, 4), scale, j, g0 + gi)
                 for gi in range(B // g)]
    return tir.Cast("int64", _hsum(_sum(terms), 4, "float64"))


def _w4_tokens(isa: Isa, B: int, g: int, wq, xd, xc, scale, j, t0, b, TB: int):
    """_w4_block of tokens t0 .. t0 + TB - 1 as one int64xTB expression: LLVM loads and unpacks each code vector
    once for all of them (a small GEMM: prefill is compute-bound, and the unpacking is a fifth of a step)."""
    if TB == 1:
        return _w4_block(isa, B, g, wq, xd, xc, scale, j, t0, b)
    return tir.Shuffle([_w4_block(isa, B, g, wq, xd, xc, scale, j, t0 + i, b) for i in range(TB)], list(range(TB)))


def _span(i0, stride: int, TB: int):
    return i0 if TB == 1 else tir.Ramp(i0, stride, TB)


def _zeros(TB: int):
    return tir.const(0, "int64") if TB == 1 else tir.Broadcast(tir.const(0, "int64"), TB)


def _w8_block(isa: Isa, B: int, w, x8, j, t, b):
    """Columns [b*B, (b+1)*B) of acc[t, j] for w8: int32 lanes (|sum| < 127 * 128 * B < 2^31), then int64."""
    lanes = 4 if isa.name in ("generic", "sdot") else 8
    steps = B // isa.chunk8
    return tir.Cast("int64", _hsum(_sum([_w8_step(isa, w, x8, j, t, b * steps + c) for c in range(steps)]), lanes, "int32"))


def _block_cols(cols: int, unit: int, limit: int) -> int:
    """The largest multiple of `unit` that divides cols and is at most `limit` (at least unit): the columns
    one loop iteration unrolls, bounding the code size and keeping w8 block sums far below 2^31."""
    best = unit
    for b in range(unit, min(cols, limit) + 1, unit):
        if cols % b == 0:
            best = b
    return best


# ---------------------------------------------------------------- kernels

def _check(rows: int, cols: int, w_bits: int, group_size: int | None, isa: Isa) -> Isa:
    """Validate the shape; fall back to the generic variant when the ISA's step does not divide cols."""
    if w_bits not in (4, 8):
        raise EdgeLLMError(f"no integer matmul kernel for {w_bits}-bit weights", "use w8 or w4 weights")
    if w_bits == 4 and group_size not in (32, 64, 128):
        raise EdgeLLMError(f"w4 group size {group_size} is not supported", "use group size 32, 64 or 128")
    if w_bits == 8 and group_size is not None:
        raise EdgeLLMError("w8 weights are per output channel; a group size does not apply", "pass None")
    step = isa.chunk4 if w_bits == 4 else isa.chunk8
    if cols % step or (w_bits == 4 and cols % group_size):
        isa = _ISA["generic"]
        step = isa.chunk4 if w_bits == 4 else isa.chunk8
    if cols % step or (w_bits == 4 and cols % group_size):
        raise EdgeLLMError(f"integer matmul kernels need a column count that is a multiple of {step}, got "
                           f"{rows}x{cols}", f"pad the weight matrix to a multiple of {step} columns")
    return isa


def _requant(acc, amax, m, s, pre, t, j):
    """IntLinear.__call__'s tail on one accumulator: acc * amax (kept to 16 bits) requantized by (m, s - sa,
    pre) of row j. amax = m = 1, s = pre = 0 leave acc as it is."""
    from .tvm_int import bitlen, rshift_round
    a = amax[t, 0]
    sa = tir.max(bitlen(a) - tir.const(16, "int64"), tir.const(0, "int64"))
    return rshift_round(rshift_round(acc * rshift_round(a, sa), pre[j]) * m[j], s[j] - sa - pre[j])


def int_matmul_func(rows: int, cols: int, w_bits: int, group_size: int | None, tvm_target, T: int | None = None,
                    isa: str | None = None):
    """PrimFunc out[T, rows] (int64) = requant(x8[T, cols] (int8) x stored weights), for `tvm_target`'s ISA.

    Buffers in order: x8 int8[T, cols]; w8: int8[rows, cols] / w4: uint8[rows, cols/2], scale float64[rows,
    cols/g] (mant << sh, exact); then the requant of IntLinear.__call__ fused per output: amax int64[T, 1]
    (the input's per-token amax), m, s, pre int64[rows] (per row, so linears sharing an input concatenate
    exactly); out int64[T, rows]. amax = m = 1, s = pre = 0 give the exact accumulator. T=None makes the
    token count symbolic (prefill). `isa` overrides the variant kernel_isa(tvm_target) picks (one of ISAS).
    Like every TVM kernel it assumes 64-byte aligned arrays (edgellm.runtime.tvm_backend.aligned_empty) and
    |x8| <= 127.
    """
    _tvm()
    from tvm.script import tirx as T_
    name = isa or kernel_isa(tvm_target)
    if name not in _ISA:
        raise EdgeLLMError(f"unknown integer matmul variant {name!r}", f"choose one of {', '.join(ISAS)}")
    k = _check(rows, cols, w_bits, group_size, _ISA[name])
    n = tir.Var("T", "int32") if T is None else int(T)
    if w_bits == 8:
        B = _block_cols(cols, k.chunk8, BLOCK_COLS)

        @T_.prim_func
        def w8(x8: T_.Buffer((n, cols), "int8"), w: T_.Buffer((rows, cols), "int8"),
               amax: T_.Buffer((n, 1), "int64"), m: T_.Buffer((rows,), "int64"), s: T_.Buffer((rows,), "int64"),
               pre: T_.Buffer((rows,), "int64"), acc: T_.Buffer((n, rows), "int64")):
            T_.func_attr({"tir.noalias": True})
            for j in T_.parallel(rows):
                for t in range(n):
                    acc[t, j] = T_.int64(0)
                    for b in range(cols // B):
                        acc[t, j] = acc[t, j] + _w8_block(k, B, w, x8, j, t, b)
                    acc[t, j] = _requant(acc[t, j], amax, m, s, pre, t, j)
        return w8
    g, C = group_size, k.chunk4
    half = C // 2
    TB = 1 if T == 1 else PREFILL_TOKENS
    B = _block_cols(cols, max(g, C), BLOCK_COLS)

    @T_.prim_func
    def w4(x8: T_.Buffer((n, cols), "int8"), wq: T_.Buffer((rows, cols // 2), "uint8"),
           scale: T_.Buffer((rows, cols // g), "float64"),
           amax: T_.Buffer((n, 1), "int64"), m: T_.Buffer((rows,), "int64"), s: T_.Buffer((rows,), "int64"),
           pre: T_.Buffer((rows,), "int64"), acc: T_.Buffer((n, rows), "int64")):
        T_.func_attr({"tir.noalias": True})
        xd = T_.alloc_buffer((n, cols), "int8")            # per step: even columns, then odd columns
        xc = T_.alloc_buffer((n, cols // 8), "int32")      # 8 * sum of x8 over each 8-column lane
        flat = T_.decl_buffer((n * rows,), "int64", data=acc.data)     # acc, for the strided token vectors
        for t, c in T_.grid(n, cols // C):
            for i in T_.vectorized(half):
                xd[t, c * C + i] = x8[t, c * C + 2 * i]
                xd[t, c * C + half + i] = x8[t, c * C + 2 * i + 1]
        if k.corrected:
            for t, lo in T_.grid(n, cols // 32):
                for li in T_.vectorized(4):
                    xc[t, lo * 4 + li] = 8 * _sum([T_.Cast("int32", x8[t, lo * 32 + li * 8 + m]) for m in range(8)])
        for j in T_.parallel(rows):
            for tb in range(n // TB):                      # TB tokens at once: each code vector unpacked once
                flat[_span(tb * TB * rows + j, rows, TB)] = _zeros(TB)
                for b in range(cols // B):
                    flat[_span(tb * TB * rows + j, rows, TB)] = flat[_span(tb * TB * rows + j, rows, TB)] + _w4_tokens(
                        k, B, g, wq, xd, xc, scale, j, tb * TB, b, TB)
                for i in range(TB):
                    acc[tb * TB + i, j] = _requant(acc[tb * TB + i, j], amax, m, s, pre, tb * TB + i, j)
            for t in range(n // TB * TB, n):
                acc[t, j] = T_.int64(0)
                for b in range(cols // B):
                    acc[t, j] = acc[t, j] + _w4_block(k, B, g, wq, xd, xc, scale, j, t, b)
                acc[t, j] = _requant(acc[t, j], amax, m, s, pre, t, j)
    return w4


def pack_for_kernel(t: dict, name: str, qc: QuantConfig) -> tuple[np.ndarray, ...]:
    """The kernel's weight arrays for linear `name` of a QuantizedModel's tensors: (w8,) or (wq, scale)
    (edgellm.runtime.tvm_int_backend.matmul_weights: the device packs them at load time)."""
    return matmul_weights(t, name, qc)
