"""Exact int8 x int8/int4 matmul kernels in TVM TIR: the fast decode path of the integer reference.

acc[t, j] = sum_k x8[t, k] * W_int[j, k] as int64, bit-identical to intref.int_matmul(x8, IntLinear.build(..).w).
Weights stay in their stored form: w8 int8 [rows, cols]; w4 packed nibbles [rows, cols/2] (low nibble = even
column, value code - 8) and the fp16 group scales as stored (2 bytes per group), plus per row the float64
2^-base of intref.w4_group_scales: every scale of row j is an integer multiple of 2^base[j], so
W_int[j, k] = (code - 8) * scale[j, k//g] * 2^-base[j]. On x86 with 32-column groups the device lays the
codes out once at load time in the "lane layout" (edgellm.runtime.tvm_int_backend.to_lane_layout, chosen by
lane_layout and reported by the library), so the 4 steps of a 256-column block add up lane by lane: int32 lane
k = group k, no horizontal adds (_w4_lanes). Prefill computes LANE_TOKENS tokens per weight row (each
code vector unpacked once for all of them: a small GEMM), decode one row per expression; the per-token part
of the requant is computed once per call and the rest runs in int64 vectors over ROW_BLOCK rows. Against the
horizontal-add kernel this replaced (interleaved, one process, AVX2 host): prefill matmuls 1.6x (T=64, 2
threads), decode 1.07x with the weights streamed from memory.

Shapes are static, so each row is built as one TIR expression per block of columns (Let-bound vectors, no
buffers): LLVM keeps every partial sum in registers, while a TIR accumulator buffer inside the parallel loop
would be a heap allocation per row on TVM 0.27. Once per token, x8 is split into even and odd columns (so
they line up with the low and high nibbles; lane layout: in its block order) and 8 * sum(x8) per 8 columns (or
per group) is precomputed. The int8 dot products use the target's instructions, named as LLVM intrinsics:
- avx2: vpmaddubsw (unsigned x signed bytes) + vpmaddwd. w4 feeds the unsigned codes 0..15 and subtracts
  8 * sum(x) afterwards (that sum is computed once per token, shared by all rows); w8 uses llama.cpp's sign
  trick |w| x sign(x, w), exact for |x8| <= 127 (what intref's quant_dynamic produces).
- avx512vnni / avxvnni: vpdpbusd (256-bit) in place of the vpmaddubsw + vpmaddwd pair, same layout.
- sdot (aarch64 dotprod: rpi5, Jetson Orin): sdot on 16 bytes, the same lane layout.
- generic (rpi4's plain NEON, x86 without AVX2): portable int16 vector code that LLVM vectorizes.
The w4 inner sum of a group fits int32 (|x8| <= 127, |code - 8| <= 8, g <= 128); group sums times their fp16
scale (widened by F16C vcvtph2ps / NEON fcvtl, or by moving the bits on x86 without F16C) are accumulated in
float64 lanes, exactly: every product is an integer multiple of 2^base (a group sum below 2^17 times an 11-bit
mantissa), every partial sum below 2^53 * 2^base (the bound IntLinear.build checks), and the row total times
2^-base is the integer accumulator, whatever the order of the sum. The requant (IntLinear.__call__'s tail) is
fused per output. Rows are split over the TVM runtime's thread pool (TVM_NUM_THREADS, or
runtime.config_threadpool as edgellm.runtime.tvm_backend sets it).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..devices import targets
from ..errors import EdgeLLMError
from ..runtime.intref import QuantConfig
from ..runtime.tvm_int_backend import matmul_weights, to_lane_layout
from . import tvm_build
from .tvm_build import host_target

ISAS = ("avx512vnni", "avx2", "sdot", "generic")
_LET_IDS = itertools.count()
BLOCK_COLS = 256        # columns unrolled per inner loop iteration (the plain-layout w4 and the w8 kernels)
PREFILL_TOKENS = 2      # plain-layout w4 prefill (symbolic T): tokens computed together per weight row


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
    from tvm import tirx
    tir = tirx
    return tvm


def _target(tvm_target):
    """A tvm.target.Target from a Target, a TVM target dict or string, or an `edgellm targets` name."""
    tvm = _tvm()
    if isinstance(tvm_target, tvm.target.Target):
        return tvm_target
    if isinstance(tvm_target, targets.Target) or (isinstance(tvm_target, str) and tvm_target in targets.TARGETS):
        tvm_target = tvm_build.resolve_target(tvm_target)
    return tvm.target.Target(tvm_target)


def _llvm_features(tvm_target):
    """(triple, has(feature)) of an LLVM target (as _target takes it), features implied by -mcpu counted;
    None for other kinds."""
    from tvm.target import codegen
    target = _target(tvm_target)
    if target.kind.name != "llvm":
        return None
    with target:
        triple = str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()
        has = {f: bool(codegen.target_has_features(f, target))
               for f in ("avx2", "avxvnni", "avx512vnni", "avx512vl", "dotprod", "f16c")}
    return triple, has.__getitem__


def kernel_isa(tvm_target) -> str:
    """The best kernel variant for a target (as _target takes it): features implied by -mcpu count."""
    llvm = _llvm_features(tvm_target)
    if llvm is None:
        return "generic"
    triple, has = llvm
    if triple.startswith(("x86_64", "i686")):
        if has("avx2") and (has("avxvnni") or (has("avx512vnni") and has("avx512vl"))):
            return "avx512vnni"
        return "avx2" if has("avx2") else "generic"
    if triple.startswith(("aarch64", "arm64")) and has("dotprod"):
        return "sdot"
    return "generic"


def native_f16(tvm_target) -> bool:
    """Whether the target converts fp16 to float32 in hardware: aarch64 (fcvtl), x86 with F16C (vcvtph2ps)."""
    llvm = _llvm_features(tvm_target)
    return llvm is not None and (llvm[0].startswith(("aarch64", "arm64")) or llvm[1]("f16c"))


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


def _unpack(isa: Isa, wq, xd, j, t, c):
    """Step c's low and high nibbles (unsigned codes 0..15 as int8) and the even and odd columns of x8."""
    nb = isa.chunk4 // 2
    p = _load(wq, j, c * nb, nb)
    lo = tir.reinterpret(f"int8x{nb}", p & _splat(15, "uint8", nb))
    hi = tir.reinterpret(f"int8x{nb}", p >> _splat(4, "uint8", nb))
    return lo, hi, _load(xd, t, c * isa.chunk4, nb), _load(xd, t, c * isa.chunk4 + nb, nb)


def _w4_raw(isa: Isa, wq, xd, j, t, c):
    """Step c (chunk4 columns) of a corrected variant with the unsigned codes 0..15, before the 8 * sum(x)
    correction: avx2 int16x16 (lane = 4 columns, |lane| <= 4 * 15 * 127), else int32 lanes of 8 columns."""
    lo, hi, xe, xo = _unpack(isa, wq, xd, j, t, c)
    if isa.name == "avx2":
        return (_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", lo, xe)
                + _intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", hi, xo))       # pairs <= 2 * 15 * 128
    lanes = isa.chunk4 // 8
    name = "llvm.x86.avx512.vpdpbusd.256" if isa.name == "avx512vnni" else "llvm.aarch64.neon.sdot"
    return _intrin(f"int32x{lanes}", name, _intrin(f"int32x{lanes}", name, _splat(0, "int32", lanes), lo, xe), hi, xo)


def _widen(isa: Isa, raw):
    """_w4_raw's lanes as int32 lanes of 8 columns: avx2's int16 pairs summed by vpmaddwd (VNNI and sdot are
    int32 already)."""
    if isa.name != "avx2":
        return raw
    return _intrin("int32x8", "llvm.x86.avx2.pmadd.wd", raw, _splat(1, "int16", 16))


def _w4_step(isa: Isa, wq, xd, xc, j, t, c):
    """int32 lanes of w4 step c (chunk4 columns): lane l = sum of (code - 8) * x over 8 columns
    (generic: 4 lanes of 8 columns each, in its own order). |lane| <= 8 * 8 * 127."""
    nb = isa.chunk4 // 2
    if not isa.corrected:       # signed codes in int8, then widening multiplies (NEON smull / smlal)
        lo, hi, xe, xo = _unpack(isa, wq, xd, j, t, c)
        eight = _splat(8, "int8", nb)
        e = _i16(lo - eight, nb) * _i16(xe, nb) + _i16(hi - eight, nb) * _i16(xo, nb)
        return _fold(tir.Cast(f"int32x{nb}", e), nb, 4)
    lanes = nb // 4
    return _widen(isa, _w4_raw(isa, wq, xd, j, t, c)) - _load(xc, t, c * lanes, lanes)


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


def _f64(h, lanes: int, native: bool):
    """fp16 lanes h as float64, exactly: F16C vcvtph2ps / NEON fcvtl then a widening, or (native=False: x86
    without F16C, where LLVM would call a soft-float routine) the bits moved into float64's fields and scaled
    by 2^(1023 - 15), which also maps fp16 subnormals exactly."""
    ty = lambda base: f"{base}x{lanes}" if lanes > 1 else base  # noqa: E731
    c = lambda v, dt: _splat(v, dt, lanes) if lanes > 1 else tir.const(v, dt)  # noqa: E731
    if native:
        return tir.Cast(ty("float64"), tir.Cast(ty("float32"), h))
    u = tir.Cast(ty("uint64"), tir.reinterpret(ty("uint16"), h))
    bits = ((u & c(0x7FFF, "uint64")) << c(42, "uint64")) | ((u & c(0x8000, "uint64")) << c(48, "uint64"))
    return tir.reinterpret(ty("float64"), bits) * c(2.0 ** 1008, "float64")


def _with_scales(scale, j, g0, n: int, native: bool, body):
    """body(s) where s(i) is float64x4 of group scale g0 + i of row j: the block's fp16 scales loaded and
    widened 4 (else 2, 1) at a time, one vcvtph2ps each, every vector bound once and its lanes broadcast."""
    lane = []                                # group i -> (its vector, lane, vector width)

    def bind(i: int):
        if i >= n:
            return body(lambda gi: tir.Broadcast(lane[gi][0] if lane[gi][2] == 1
                                                 else tir.Shuffle([lane[gi][0]], [lane[gi][1]]), 4))
        w = 4 if n - i >= 4 else 2 if n - i >= 2 else 1
        h = scale[j, tir.Ramp(g0 + i, 1, w)] if w > 1 else scale[j, g0 + i]
        return _let(_f64(h, w, native), f"float64x{w}" if w > 1 else "float64",
                    lambda v: (lane.extend((v, k, w) for k in range(w)), bind(i + w))[1])
    return bind(0)


def _w4_block(isa: Isa, B: int, g: int, wq, xd, xc, sc: tuple, j, t, b):
    """Columns [b*B, (b+1)*B) of acc[t, j] for w4: sum over groups of group dot * fp16 scale in float64x4 lanes,
    then the lanes times the row's 2^-base (an exact integer). Exact: every product is a multiple of 2^base
    (a group dot below 2^17 times an 11-bit mantissa), every partial sum below 2^53 * 2^base (IntLinear.build's
    bound). sc = (scale buffer, rowf buffer, native fp16 conversion). Unrolled over the block; b may be a loop
    variable."""
    scale, rowf, native = sc
    steps = B // isa.chunk4
    lanes = 4 if not isa.corrected else isa.chunk4 // 8
    step = lambda c: _w4_step(isa, wq, xd, xc, j, t, b * steps + c)  # noqa: E731
    f64 = lambda q, s: tir.Cast("float64x4", q) * s  # noqa: E731

    def body(s):
        if g < isa.chunk4:      # one step holds two 32-column groups: bind it once, split its halves
            terms = [_let(step(c), "int32x8", lambda v, c=c: _sum([
                          f64(q, s(2 * c + h)) for h, q in enumerate(_halves(v, "int32x4"))]))
                     for c in range(steps)]
        else:
            per = g // isa.chunk4
            terms = [f64(_fold(_sum([step(gi * per + i) for i in range(per)]), lanes, 4), s(gi))
                     for gi in range(B // g)]
        return tir.Cast("int64", _hsum(_sum(terms), 4, "float64") * rowf[j])
    return _with_scales(scale, j, b * (B // g), B // g, native, body)


def _w4_tokens(isa: Isa, B: int, g: int, wq, xd, xc, sc: tuple, j, t0, b, TB: int):
    """_w4_block of tokens t0 .. t0 + TB - 1 as one int64xTB expression: LLVM loads and unpacks each code vector
    once for all of them (a small GEMM: prefill is compute-bound, and the unpacking is a fifth of a step)."""
    if TB == 1:
        return _w4_block(isa, B, g, wq, xd, xc, sc, j, t0, b)
    return tir.Shuffle([_w4_block(isa, B, g, wq, xd, xc, sc, j, t0 + i, b) for i in range(TB)], list(range(TB)))


def _span(i0, stride: int, TB: int):
    return i0 if TB == 1 else tir.Ramp(i0, stride, TB)


def _zeros(TB: int):
    return tir.const(0, "int64") if TB == 1 else tir.Broadcast(tir.const(0, "int64"), TB)


def _w8_block(isa: Isa, B: int, w, x8, j, t, b):
    """Columns [b*B, (b+1)*B) of acc[t, j] for w8: int32 lanes (|sum| < 127 * 128 * B < 2^31), then int64."""
    lanes = 4 if isa.name in ("generic", "sdot") else 8
    steps = B // isa.chunk8
    return tir.Cast("int64", _hsum(_sum([_w8_step(isa, w, x8, j, t, b * steps + c) for c in range(steps)]), lanes, "int32"))


PREFETCH_BYTES = 4096   # how far ahead of the current row the weights are prefetched (see _prefetch)


def _prefetch(buf, row, rows: int, row_bytes: int, line, item: int = 1):
    """Software prefetch (llvm.prefetch: read, keep) of 64-byte line `line` of row `row` + PREFETCH_BYTES /
    row_bytes of buf; issued for every line of every row, so (rows being contiguous) every line ahead is
    requested. The decode matmuls stream their weights once per token, and the hardware prefetcher alone
    left ~20% of the w4 kernel's time waiting on memory (interleaved A/B, tools/bench_int_matmul.py)."""
    ahead = tir.min(row + max(1, PREFETCH_BYTES // row_bytes), rows - 1)
    return tir.call_llvm_intrin("void", "llvm.prefetch.p0", tir.address_of(buf[ahead, line * (64 // item)]),
                                tir.const(0, "int32"), tir.const(3, "int32"), tir.const(1, "int32"))


def _lines(row_bytes: int) -> int:
    return (row_bytes + 63) // 64


def _block_cols(cols: int, unit: int, limit: int) -> int:
    """The largest multiple of `unit` that divides cols and is at most `limit` (at least unit): the columns
    one loop iteration unrolls, bounding the code size and keeping w8 block sums far below 2^31."""
    best = unit
    for b in range(unit, min(cols, limit) + 1, unit):
        if cols % b == 0:
            best = b
    return best


# ---------------------------------------------------------------- lane layout (x86, 32-column groups)

LANE_COLS = 256         # columns of a lane block: 8 groups of 32, 4 steps of 64
LANE_TOKENS = 4         # prefill: tokens per expression, each code vector unpacked once for all of them (4 and 8
                        # measured best; 2-4 rows per expression as well were slower: LLVM spills the x vectors)
ROW_BLOCK = 16          # rows per parallel task (lane and w8 kernels): their requant runs in int64 vectors this wide


def lane_layout(rows: int, cols: int, w_bits: int, group_size: int | None, tvm_target, isa: str | None = None) -> bool:
    """Whether the kernel int_matmul_func builds for these arguments reads w4 codes in the lane layout
    (edgellm.runtime.tvm_int_backend.to_lane_layout): x86 with 32-column groups. There, int32 lane k of
    every step of a 256-column block belongs to group k of the block, so the block's 4 steps add up lane by
    lane: no horizontal adds, one float64 multiply per 4 groups (1.07x decode, 1.6x prefill over the
    horizontal-add kernel it replaced, interleaved on the AVX2 host)."""
    if w_bits != 4:
        return False
    k = _check(rows, cols, w_bits, group_size, _ISA[isa or kernel_isa(tvm_target)])
    return k.name in ("avx2", "avx512vnni") and group_size == 32


def _lane_f64(v, s8):
    """float64x4: the int32x8 lanes v times the float64x8 scales s8, the two halves added (one accumulator
    register per output instead of two)."""
    return _let(v, "int32x8", lambda u: _let(s8, "float64x8", lambda f: _sum([
        tir.Cast("float64x4", q) * g for q, g in zip(_halves(u, "int32x4"), _halves(f, "float64x4"))])))


def _lane_block(isa: Isa, wq, xd, xg, f64s, j, t, b: int):
    """float64x4 of lane block b of acc[t, j], lanes k and k + 4 = (group 8b + k's dot) * its fp16 scale, added.
    The unsigned-code dot of each step (avx2 int16 lanes <= 4 * 15 * 127, so 4 steps stay below 2^15; VNNI
    int32) summed over the block's 4 steps, minus the group's precomputed 8 * sum(x) (xg)."""
    raw = _widen(isa, _sum([_w4_raw(isa, wq, xd, j, t, 4 * b + s) for s in range(4)]))
    return _lane_f64(raw - xg[t, tir.Ramp(8 * b, 1, 8)], f64s(j, b))


def _lane_tail(isa: Isa, wq, xd, xt, scale, native: bool, j, t, c: int, c0: int):
    """float64x4 of step c (plain layout: lanes 0-3 group 2c, 4-7 group 2c + 1) past the last full lane block
    (step c0 on): int32 lanes of 8 columns minus their 8 * sum(x) (xt), times their group's scale."""
    raw = _widen(isa, _w4_raw(isa, wq, xd, j, t, c))
    h = _f64(scale[j, tir.Ramp(2 * c, 1, 2)], 2, native)
    return _lane_f64(raw - xt[t, tir.Ramp(8 * (c - c0), 1, 8)], tir.Shuffle([h] * 4, [0, 2, 4, 6, 1, 3, 5, 7]))


def _lane_row(isa: Isa, cols: int, wq, xd, xg, xt, sc: tuple, j, t):
    """acc[t, j] (int64) of a lane-layout w4 row: every block and tail step in float64x4 lanes, one horizontal
    sum, times the row's 2^-base. Exact as _w4_block (integers below 2^53 * 2^base, any order)."""
    scale, rowf, native = sc
    nb = cols // LANE_COLS
    f64s = lambda r, b: _f64(scale[r, tir.Ramp(8 * b, 1, 8)], 8, native)  # noqa: E731
    terms = [_lane_block(isa, wq, xd, xg, f64s, j, t, b) for b in range(nb)]
    terms += [_lane_tail(isa, wq, xd, xt, scale, native, j, t, c, 4 * nb) for c in range(4 * nb, cols // 64)]
    return tir.Cast("int64", _hsum(_sum(terms), 4, "float64") * rowf[j])


def _byte_sum(x8, t, c0):
    """sum(x8[t, c0:c0 + 32]) as int32 with x86's pair-summing multiplies (by ones): vpmaddubsw, vpmaddwd."""
    pairs = _intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", _splat(1, "int8", 32), x8[t, tir.Ramp(c0, 1, 32)])
    return _hsum(_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, _splat(1, "int16", 16)), 8, "int32")


BARRIER = "pragma_parallel_barrier_when_finish"      # TVM codegen: all threads of the launch meet after the body


def phases(spmd: bool):
    """(split, barrier) of a kernel body (a T.macro) whose parallel phases are wrapped in
    `with T.attr(0, barrier, 1)`. Standalone: a serial loop and an inert attribute. Inside one parallel launch
    (spmd: the decode token kernel, edgellm.compiler.tvm_int_token): a parallel loop, split over its threads,
    and a barrier of all threads after the phase: ~0.5 us against ~2 us for a launch of its own on the 2-core
    host."""
    from tvm.script import tirx as T_
    return (T_.parallel, BARRIER) if spmd else (T_.serial, "edgellm_phase")


def solo_phase(body, spmd: bool):
    """T.macro `body` as a serial phase: standalone, simply run; inside one parallel launch (spmd), run by
    thread 0 alone (a parallel loop of 2 whose iteration 0 does it: a one-iteration loop would be lowered
    away, and every thread would run the body), then a barrier of all threads."""
    from tvm.script import tirx as T_
    split, bar = phases(spmd)

    @T_.macro
    def run(*args):
        with T_.attr(0, bar, 1):
            for w in split(2):
                if w == 0:
                    body(*args)
    return run


def _w4_lanes_body(k: Isa, rows: int, cols: int, n, native: bool, T, spmd: bool = False):
    """The w4 kernel over lane-layout codes as a T.macro (see int_matmul_func for the buffers): per token, x8
    laid out to match (xd), 8 * sum(x) per group (xg) and per 8 tail columns (xt); then per row N tokens at a
    time, one expression whose code vectors LLVM loads and unpacks once for all N. spmd (see phases): every
    thread computes that per-token prologue itself (TVM puts small buffers on each thread's stack, large
    ones in one shared workspace: either way each thread reads what it wrote, or the same values), then its
    row blocks, then a barrier."""
    from tvm.script import tirx as T_
    from .tvm_int import rshift_round
    N = 1 if T == 1 else LANE_TOKENS
    nb, G = cols // LANE_COLS, cols // 32
    tail = cols // 64 - 4 * nb
    o0 = nb * LANE_COLS
    rows_bar = phases(spmd)[1]

    def tokens(xd, xg, xt, sc, wq, j, t0, nt: int):
        rows_t = [_lane_row(k, cols, wq, xd, xg, xt, sc, j, t0 + i) for i in range(nt)]
        return tir.Shuffle(rows_t, list(range(nt))) if nt > 1 else rows_t[0]

    RB = _block_cols(rows, 1, ROW_BLOCK)                  # rows per parallel task

    @T_.macro
    def w4(x8, wq, scale, rowf, amax, m, s, pre, acc):
        xd = T_.alloc_buffer((n, cols), "int8")           # block b, step s: even then odd columns, lane k = group k
        xg = T_.alloc_buffer((n, G), "int32")             # 8 * sum(x8) per group
        xt = T_.alloc_buffer((n, max(1, 8 * tail)), "int32")   # 8 * sum(x8) per 8 columns of the tail steps
        ta = T_.alloc_buffer((n, 2), "int64")             # per token: amax kept to 16 bits, and the bits dropped
        flat = T_.decl_buffer((n * rows,), "int64", data=acc.data)
        for t, b, st in T_.grid(n, nb, 4):              # 4 bytes at a time: a stride-2 load each
            for p in T_.unroll(2):
                for kk in T_.unroll(8):
                    for q in T_.vectorized(4):
                        xd[t, b * 256 + st * 64 + p * 32 + kk * 4 + q] = \
                            x8[t, b * 256 + kk * 32 + st * 8 + q * 2 + p]
        for t, c in T_.grid(n, tail):
            for i in T_.vectorized(32):
                xd[t, o0 + c * 64 + i] = x8[t, o0 + c * 64 + 2 * i]
                xd[t, o0 + c * 64 + 32 + i] = x8[t, o0 + c * 64 + 2 * i + 1]
        for t, gi in T_.grid(n, G):
            xg[t, gi] = 8 * _byte_sum(x8, t, gi * 32)
        for t, li in T_.grid(n, 8 * tail):
            xt[t, li] = 8 * _sum([T_.Cast("int32", x8[t, o0 + li * 8 + q]) for q in range(8)])
        for t in range(n):
            ta[t, 1] = _amax_drop(amax[t, 0])
            ta[t, 0] = rshift_round(amax[t, 0], ta[t, 1])
        with T_.attr(0, rows_bar, 1):
            for jb in T_.parallel(rows // RB):
                for jr in range(RB):
                    for ln in range(_lines(cols // 2)):
                        T_.evaluate(_prefetch(wq, jb * RB + jr, rows, cols // 2, ln))
                    for ln in range(_lines(G * 2)):
                        T_.evaluate(_prefetch(scale, jb * RB + jr, rows, G * 2, ln, 2))
                    for tb in range(n // N):
                        flat[_span(tb * N * rows + jb * RB + jr, rows, N)] = tokens(
                            xd, xg, xt, (scale, rowf, native), wq, jb * RB + jr, tb * N, N)
                    for t in range(n // N * N, n):
                        acc[t, jb * RB + jr] = _lane_row(k, cols, wq, xd, xg, xt, (scale, rowf, native), jb * RB + jr, t)
                for t in range(n):
                    for jv in T_.vectorized(RB):
                        acc[t, jb * RB + jv] = _requant_lanes(acc[t, jb * RB + jv], ta, m, s, pre, t, jb * RB + jv)
    return w4


def _w4_lanes(k: Isa, rows: int, cols: int, n, native: bool, T):
    """_w4_lanes_body as a kernel of its own."""
    from tvm.script import tirx as T_
    body = _w4_lanes_body(k, rows, cols, n, native, T)
    G = cols // 32

    @T_.prim_func
    def w4(x8: T_.Buffer((n, cols), "int8"), wq: T_.Buffer((rows, cols // 2), "uint8"),
           scale: T_.Buffer((rows, G), "float16"), rowf: T_.Buffer((rows,), "float64"),
           amax: T_.Buffer((n, 1), "int64"), m: T_.Buffer((rows,), "int64"), s: T_.Buffer((rows,), "int64"),
           pre: T_.Buffer((rows,), "int64"), acc: T_.Buffer((n, rows), "int64")):
        T_.func_attr({"tir.noalias": True})
        body(x8, wq, scale, rowf, amax, m, s, pre, acc)
    return w4


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


def _amax_drop(a):
    """The bits a token's amax drops to fit 16 bits (IntLinear.__call__'s sa)."""
    from .tvm_int import bitlen
    return tir.max(bitlen(a) - tir.const(16, "int64"), tir.const(0, "int64"))


def _requant_lanes(acc, ta, m, s, pre, t, j):
    """_requant with the token's 16-bit amax and dropped bits precomputed (ta[t] = a16, sa): row j may be a
    vector of rows."""
    from .tvm_int import rshift_round
    return rshift_round(rshift_round(acc * ta[t, 0], pre[j]) * m[j], s[j] - ta[t, 1] - pre[j])


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

    Buffers in order: x8 int8[T, cols]; w8: int8[rows, cols] / w4: uint8[rows, cols/2], scale float16[rows,
    cols/g] (as stored), rowf float64[rows] (2^-base, matmul_weights); then the requant of IntLinear.__call__
    fused per output: amax int64[T, 1] (the input's per-token amax), m, s, pre int64[rows] (per row, so
    linears sharing an input concatenate exactly); out int64[T, rows]. amax = m = 1, s = pre = 0 give the exact
    accumulator. T=None makes the token count symbolic (prefill). `isa` overrides the variant
    kernel_isa(tvm_target) picks (one of ISAS). Like every TVM kernel it assumes 64-byte aligned arrays
    (edgellm.runtime.tvm_backend.aligned_empty) and |x8| <= 127.
    """
    _tvm()
    from tvm.script import tirx as T_
    from .tvm_int import rshift_round
    name = isa or kernel_isa(tvm_target)
    if name not in _ISA:
        raise EdgeLLMError(f"unknown integer matmul variant {name!r}", f"choose one of {', '.join(ISAS)}")
    k = _check(rows, cols, w_bits, group_size, _ISA[name])
    n = tir.Var("T", "int32") if T is None else int(T)
    if w_bits == 8:
        B = _block_cols(cols, k.chunk8, BLOCK_COLS)

        RB = _block_cols(rows, 1, ROW_BLOCK)

        @T_.prim_func
        def w8(x8: T_.Buffer((n, cols), "int8"), w: T_.Buffer((rows, cols), "int8"),
               amax: T_.Buffer((n, 1), "int64"), m: T_.Buffer((rows,), "int64"), s: T_.Buffer((rows,), "int64"),
               pre: T_.Buffer((rows,), "int64"), acc: T_.Buffer((n, rows), "int64")):
            T_.func_attr({"tir.noalias": True})
            ta = T_.alloc_buffer((n, 2), "int64")
            for t in range(n):
                ta[t, 1] = _amax_drop(amax[t, 0])
                ta[t, 0] = rshift_round(amax[t, 0], ta[t, 1])
            for jb in T_.parallel(rows // RB):
                for jr in range(RB):
                    for ln in range(_lines(cols)):
                        T_.evaluate(_prefetch(w, jb * RB + jr, rows, cols, ln))
                    for t in range(n):
                        acc[t, jb * RB + jr] = T_.int64(0)
                        for b in range(cols // B):
                            acc[t, jb * RB + jr] = acc[t, jb * RB + jr] + _w8_block(k, B, w, x8, jb * RB + jr, t, b)
                for t in range(n):
                    for jv in T_.vectorized(RB):
                        acc[t, jb * RB + jv] = _requant_lanes(acc[t, jb * RB + jv], ta, m, s, pre, t, jb * RB + jv)
        return w8
    g, C = group_size, k.chunk4
    if lane_layout(rows, cols, w_bits, g, tvm_target, k.name):
        return _w4_lanes(k, rows, cols, n, native_f16(tvm_target), T)
    half = C // 2
    TB = 1 if T == 1 else PREFILL_TOKENS
    f16 = native_f16(tvm_target)
    B = _block_cols(cols, max(g, C), BLOCK_COLS)

    @T_.prim_func
    def w4(x8: T_.Buffer((n, cols), "int8"), wq: T_.Buffer((rows, cols // 2), "uint8"),
           scale: T_.Buffer((rows, cols // g), "float16"), rowf: T_.Buffer((rows,), "float64"),
           amax: T_.Buffer((n, 1), "int64"), m: T_.Buffer((rows,), "int64"), s: T_.Buffer((rows,), "int64"),
           pre: T_.Buffer((rows,), "int64"), acc: T_.Buffer((n, rows), "int64")):
        T_.func_attr({"tir.noalias": True})
        xd = T_.alloc_buffer((n, cols), "int8")            # per step: even columns, then odd columns
        xc = T_.alloc_buffer((n, cols // 8), "int32")      # 8 * sum of x8 per 8-column lane
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
            for ln in range(_lines(cols // 2)):
                T_.evaluate(_prefetch(wq, j, rows, cols // 2, ln))
            for ln in range(_lines(cols // g * 2)):
                T_.evaluate(_prefetch(scale, j, rows, cols // g * 2, ln, 2))
            for tb in range(n // TB):                      # TB tokens at once: each code vector unpacked once
                flat[_span(tb * TB * rows + j, rows, TB)] = _zeros(TB)
                for b in range(cols // B):
                    flat[_span(tb * TB * rows + j, rows, TB)] = flat[_span(tb * TB * rows + j, rows, TB)] + _w4_tokens(
                        k, B, g, wq, xd, xc, (scale, rowf, f16), j, tb * TB, b, TB)
                for i in range(TB):
                    acc[tb * TB + i, j] = _requant(acc[tb * TB + i, j], amax, m, s, pre, tb * TB + i, j)
            for t in range(n // TB * TB, n):
                acc[t, j] = T_.int64(0)
                for b in range(cols // B):
                    acc[t, j] = acc[t, j] + _w4_block(k, B, g, wq, xd, xc, (scale, rowf, f16), j, t, b)
                acc[t, j] = _requant(acc[t, j], amax, m, s, pre, t, j)
    return w4


def pack_for_kernel(t: dict, name: str, qc: QuantConfig, tvm_target=None,
                    isa: str | None = None) -> tuple[np.ndarray, ...]:
    """The weight arrays of linear `name` of a QuantizedModel's tensors for the kernel int_matmul_func builds
    for `tvm_target` (default: this machine) and `isa`: (w8,) or (wq, scale, rowf), wq in the lane layout
    where that kernel reads it (edgellm.runtime.tvm_int_backend: the device packs them at load time)."""
    arrays = matmul_weights(t, name, qc)
    if len(arrays) == 3:
        rows, half = arrays[0].shape
        if lane_layout(rows, 2 * half, 4, qc.group_size, host_target() if tvm_target is None else tvm_target, isa):
            arrays = (to_lane_layout(arrays[0].copy()),) + arrays[1:]
    return arrays
