"""Exact int8 x int8/int4 matmul kernels in TVM TIR: the fast decode path of the integer reference.

acc[t, j] = sum_k x8[t, k] * W_int[j, k] as int64, bit-identical to intref.int_matmul(x8, IntLinear.build(..).w).
Weights stay in their stored form: w8 int8 [rows, cols]; w4 packed nibbles [rows, cols/2] (low nibble = even
column, value code - 8) and the fp16 group scales as stored (2 bytes per group), plus per row the float64
2^-base of intref.w4_group_scales: every scale of row j is an integer multiple of 2^base[j], so
W_int[j, k] = (code - 8) * scale[j, k//g] * 2^-base[j]. fp16 scales in place of the former float64
mant << shift cut the bytes a token streams by a sixth (107.9 -> 89.3 MB for SmolLM2-135M at g32, head
included), but on the 2-core EPYC host (one thread, interleaved, gate|up shape) that alone gained nothing: the
kernel was compute-bound with cache-hot weights and only ~20% slower with weights streamed from memory. So
the per-group float work is cut too (_w4_quad: 3072x576 hot 89 -> 73 us) and the rows ahead are prefetched
(_prefetch: streamed 110 -> 85 us). A SmolLM2-135M token's matmuls got 1.13x faster (2 threads, load 1.3;
1.14-1.26x with other processes running; tools/bench_int_matmul.py --baseline HEAD), tvm-int decode and
prefill 1.20x each (interleaved A/B in one process, bit-identical logits; 1.1-1.4x under heavier load).

Shapes are static, so each row is built as one TIR expression per block of columns (Let-bound vectors, no
buffers): LLVM keeps every partial sum in registers, while a TIR accumulator buffer inside the parallel loop
would be a heap allocation per row on TVM 0.27. Once per token, x8 is split into even and odd columns (so
they line up with the low and high nibbles) and 8 * sum(x8) per 8 columns (or per group) is precomputed. The
int8 dot products use the target's instructions, named as LLVM intrinsics:
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
2^-base is the integer accumulator. On x86 with 32-column groups, horizontal adds first reduce 4 steps to one
int32 per group (_w4_quad), so the float work is per 8 groups, not per group. The requant (IntLinear.__call__'s
tail) is fused per output. Rows are split over the TVM runtime's thread pool (TVM_NUM_THREADS, or
runtime.config_threadpool as edgellm.runtime.tvm_backend sets it).
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
BLOCK_COLS = 256        # columns unrolled per inner loop iteration (_w4_paired: PAIRED_BLOCK_COLS)
PREFILL_TOKENS = 2      # w4 prefill (symbolic T): tokens computed together per weight row (2, 4 and 8 measured
                        # alike, within 3%, and a few % faster than 1 on the AVX2 host)


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
    d = _w4_raw(isa, wq, xd, j, t, c)
    if isa.name == "avx2":
        d = _intrin(f"int32x{lanes}", "llvm.x86.avx2.pmadd.wd", d, _splat(1, "int16", 16))
    return d - _load(xc, t, c * lanes, lanes)


def _paired(isa: Isa, g: int) -> bool:
    """Whether w4 blocks reduce to one int32 per group before any float work (_w4_paired): x86 with 32-column
    groups, where per-group float64 conversions would otherwise cost as much as the dot products."""
    return isa.name in ("avx2", "avx512vnni") and g == 32


PAIR_SLOTS = [2 * (s % 4) + s // 4 for s in range(8)]    # slot -> group of a quad after three phadds
PAIRED_BLOCK_COLS = 2048    # columns per block of _w4_paired: one float64 reduction per row up to this width
PREFETCH_BYTES = 4096       # how far ahead of the current row the weights are prefetched (see _prefetch)


def _group_corr(x8, t, b, slot, B: int):
    """8 * sum(x8) over the 32 columns of the group in `slot` (quad slot // 8, PAIR_SLOTS order) of block b of
    _w4_paired; 0 for the slots a quad of fewer than 4 steps leaves empty."""
    q, s = slot // 8, slot % 8
    gi = 2 * (s % 4) + s // 4                                # PAIR_SLOTS[s]
    n = 2 * tir.min(4, B // 64 - 4 * q)                      # groups in the quad
    col = b * B + (8 * q + tir.min(gi, n - 1)) * 32
    return tir.Select(gi < n, 8 * _sum([tir.Cast("int32", x8[t, col + m]) for m in range(32)]), 0)


def _w4_quad(isa: Isa, wq, xd, xq, sc: tuple, j, t, c0: int, S: int, g0, q0):
    """float64x4 partial sums of S <= 4 steps from step c0 (2S groups of 32 columns from group g0): three
    horizontal adds (phaddw on avx2's int16 pairs, |16 columns| <= 16 * 15 * 127 < 2^15, then vpmaddwd;
    phaddd on VNNI's int32) leave one int32 per group in slots [g0 g2 g4 g6 | g1 g3 g5 g7], minus the
    precomputed 8 * sum(x) of each (xq from q0); the two halves times the matching fp16 scales."""
    scale, _, native = sc
    ty, lanes, op = ("int16", 16, "w") if isa.name == "avx2" else ("int32", 8, "d")
    hadd = lambda u, v: _intrin(f"{ty}x{lanes}", f"llvm.x86.avx2.phadd.{op}", u, v)  # noqa: E731
    zero = _splat(0, ty, lanes)
    raw = [_w4_raw(isa, wq, xd, j, t, c0 + c) for c in range(S)] + [zero] * (4 - S)
    sums = hadd(hadd(raw[0], raw[1]), hadd(raw[2], raw[3]) if S > 2 else zero)
    if isa.name == "avx2":
        sums = _intrin("int32x8", "llvm.x86.avx2.pmadd.wd", sums, _splat(1, "int16", 16))
    sums = sums - _load(xq, t, q0, 8)
    spans = ((0, 8),) if S == 4 else ((0, 4), (4, 2)) if S == 3 else ((0, 2 * S),)
    parts = [scale[j, tir.Ramp(g0 + i, 1, w)] for i, w in spans]
    h8 = parts[0] if S == 4 else tir.Shuffle(parts + [_splat(0.0, "float16", 8 - 2 * S)], list(range(8)))  # 8 groups
    return _let(h8, "float16x8", lambda h: _let(sums, "int32x8", lambda v: _sum([
        tir.Cast("float64x4", q) * _f64(tir.Shuffle([h], PAIR_SLOTS[4 * k:4 * k + 4]), 4, native)
        for k, q in enumerate(_halves(v, "int32x4"))])))


def _w4_paired(isa: Isa, B: int, wq, xd, xq, sc: tuple, j, t, b):
    """Columns [b*B, (b+1)*B) of acc[t, j] for w4 with 32-column groups on x86: _w4_quad over quads of 4
    steps (8 groups), one float64x4 sum for the block (blocks are long: PAIRED_BLOCK_COLS), then the lanes
    times the row's 2^-base: exact as in _w4_block."""
    S = B // isa.chunk4
    quads = [_w4_quad(isa, wq, xd, xq, sc, j, t, b * S + c, min(4, S - c), b * (2 * S) + 2 * c,
                      (b * ((S + 3) // 4) + c // 4) * 8) for c in range(0, S, 4)]
    return tir.Cast("int64", _hsum(_sum(quads), 4, "float64") * sc[1][j])


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
    if _paired(isa, g):
        return _w4_paired(isa, B, wq, xd, xc, sc, j, t, b)
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
                for ln in range(_lines(cols)):
                    T_.evaluate(_prefetch(w, j, rows, cols, ln))
                for t in range(n):
                    acc[t, j] = T_.int64(0)
                    for b in range(cols // B):
                        acc[t, j] = acc[t, j] + _w8_block(k, B, w, x8, j, t, b)
                    acc[t, j] = _requant(acc[t, j], amax, m, s, pre, t, j)
        return w8
    g, C = group_size, k.chunk4
    half = C // 2
    TB = 1 if T == 1 else PREFILL_TOKENS
    f16, paired = native_f16(tvm_target), _paired(k, g)
    B = _block_cols(cols, max(g, C), PAIRED_BLOCK_COLS if paired else BLOCK_COLS)

    @T_.prim_func
    def w4(x8: T_.Buffer((n, cols), "int8"), wq: T_.Buffer((rows, cols // 2), "uint8"),
           scale: T_.Buffer((rows, cols // g), "float16"), rowf: T_.Buffer((rows,), "float64"),
           amax: T_.Buffer((n, 1), "int64"), m: T_.Buffer((rows,), "int64"), s: T_.Buffer((rows,), "int64"),
           pre: T_.Buffer((rows,), "int64"), acc: T_.Buffer((n, rows), "int64")):
        T_.func_attr({"tir.noalias": True})
        xd = T_.alloc_buffer((n, cols), "int8")            # per step: even columns, then odd columns
        xc = T_.alloc_buffer((n, cols // 8), "int32")      # 8 * sum of x8 per 8-column lane, or per group (paired)
        flat = T_.decl_buffer((n * rows,), "int64", data=acc.data)     # acc, for the strided token vectors
        for t, c in T_.grid(n, cols // C):
            for i in T_.vectorized(half):
                xd[t, c * C + i] = x8[t, c * C + 2 * i]
                xd[t, c * C + half + i] = x8[t, c * C + 2 * i + 1]
        if paired:
            for t, bb, sl in T_.grid(n, cols // B, (B // C + 3) // 4 * 8):
                xc[t, bb * ((B // C + 3) // 4 * 8) + sl] = _group_corr(x8, t, bb, sl, B)
        elif k.corrected:
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


def pack_for_kernel(t: dict, name: str, qc: QuantConfig) -> tuple[np.ndarray, ...]:
    """The kernel's weight arrays for linear `name` of a QuantizedModel's tensors: (w8,) or (wq, scale, rowf)
    (edgellm.runtime.tvm_int_backend.matmul_weights: the device packs them at load time)."""
    return matmul_weights(t, name, qc)
