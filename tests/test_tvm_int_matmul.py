"""The compiled integer matmul kernels (edgellm.compiler.tvm_int_matmul) are bit-identical to the integer reference.

Every kernel variant computes acc = x8 @ W_int.T as int64 from the stored weights; the oracle is intref's
exact matmul over IntLinear.build(...).w, the matrix the integer forward uses. Weights and activations include
the extremes: x8 = +-127 rows, all-0 / all-15 nibble rows, +-127 w8 rows, the largest 11-bit scale mantissa,
group scales 2^20 apart (the largest shift IntLinear accepts) and a zero group scale; the kernels read the fp16
scales as stored, so rows of scales with widely spread exponents (fp16 subnormals, negative and zero scales, a
dead row) check the fp16 -> float64 widening and the per-row 2^-base. x86 AVX2 and the portable
variant run here; the AVX-512 VNNI variant is compiled only (no such CPU here); the aarch64 sdot (rpi5) and plain
NEON (rpi4) variants are cross-compiled and run by the TVM runtime in arm64 python under qemu-aarch64.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import require
from test_tvm import arm_rootfs, finish_on_arm, require_tool, start_on_arm  # noqa: F401 (arm_rootfs: fixture)

from edgellm.errors import EdgeLLMError
from edgellm.runtime import intref as IR

NAME = "blk.0.attn_q.weight"
FORMATS = {"w8": (8, None), "w4g32": (4, 32), "w4g64": (4, 64), "w4g128": (4, 128)}
TARGETS = {"avx2": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3", "mattr": ["+avx2", "+fma"]},
           "avx512vnni": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"},
           "generic": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}}
ARM = {"sdot": "rpi5", "generic": "rpi4"}
TOKENS = 5


@pytest.fixture(scope="module")
def tvm():
    require("tvm_ffi", "the kernels run through the TVM runtime")
    return require("tvm", "TVM compiles the kernels")


def quantized(fmt: str, rows: int, cols: int, seed: int) -> tuple[dict, IR.QuantConfig]:
    """A stored linear weight in intref's format, with extreme codes and scales."""
    bits, g = FORMATS[fmt]
    rng = np.random.default_rng(seed)
    if bits == 8:
        q = rng.integers(-127, 128, (rows, cols)).astype(np.int8)
        q[0], q[1] = 127, -127
        return {NAME + ".q": q, NAME + ".scale": rng.uniform(1e-3, 1e-2, rows).astype(np.float32)}, \
            IR.QuantConfig("w8a8")
    codes = rng.integers(0, 16, (rows, cols)).astype(np.uint8)
    codes[0], codes[1] = 0, 15
    ng = cols // g
    scale = (1 + rng.random((rows, ng))) * 2.0 ** rng.integers(-14, -4, (rows, ng))
    scale[:, 0], scale[:, -1] = 2.0 ** -24, 2047 * 2.0 ** -4    # 2047 << 20 apart (fp16 subnormal 1 x 2^-24)
    scale[2, ng // 2] = 0.0                                                   # a dead group
    return {NAME + ".q": IR.pack_int4(codes), NAME + ".scale": scale.astype(np.float16)}, \
        IR.QuantConfig("w4a8", group_size=g)


def quantized_wide(fmt: str, rows: int, cols: int, seed: int) -> tuple[dict, IR.QuantConfig]:
    """w4 scales whose exponents differ a lot within a row: value m * 2^(lo + k), m an 11-bit mantissa (or
    less), lo the row's lowest unit (down to fp16's subnormal 2^-24), k up to the 20-bit span IntLinear
    accepts; negative, zero and all-zero rows too. The kernels read the fp16 scales as stored."""
    bits, g = FORMATS[fmt]
    rng = np.random.default_rng(seed)
    ng = cols // g
    lo = rng.integers(-24, -8, (rows, 1))
    k = rng.integers(0, 21, (rows, ng))
    k = np.minimum(k, 4 - lo)                                    # 2047 * 2^4 < fp16 max
    scale = rng.integers(1, 2048, (rows, ng)) * 2.0 ** (lo + k) * rng.choice([1, -1], (rows, ng), p=[0.8, 0.2])
    scale[:, 0] = 2.0 ** lo[:, 0]                                # each row's lowest unit, subnormal below 2^-14
    scale[rng.random((rows, ng)) < 0.15] = 0.0
    scale[3] = 0.0                                               # a dead row
    assert (scale.astype(np.float16).astype(np.float64) == scale).all()
    codes = rng.integers(0, 16, (rows, cols)).astype(np.uint8)
    return {NAME + ".q": IR.pack_int4(codes), NAME + ".scale": scale.astype(np.float16)}, \
        IR.QuantConfig("w4a8", group_size=g)


def quantized_real(fmt: str, rows: int, cols: int, seed: int) -> tuple[dict, IR.QuantConfig]:
    """A heavy-tailed float weight through edgellm's own quantizer."""
    from edgellm.compiler.quantize.schemes import quantize_weight
    bits, g = FORMATS[fmt]
    qc = IR.QuantConfig("w8a8") if bits == 8 else IR.QuantConfig("w4a8", group_size=g)
    w = np.random.default_rng(seed).standard_t(3, (rows, cols)).astype(np.float32) * 0.05
    return {f"{NAME}.{k}": v for k, v in quantize_weight(w, qc).items()}, qc


def activations(cols: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).integers(-127, 128, (TOKENS, cols)).astype(np.int8)
    x[0], x[1] = 127, -127
    return x


def reference(t: dict, qc: IR.QuantConfig, x8: np.ndarray) -> np.ndarray:
    return IR.int_matmul(x8, IR.IntLinear.build(t, NAME, qc).w)


def cases(rows: int, cols: int, seed: int = 0, formats=tuple(FORMATS), make=quantized, tag: str = "",
          isa: str | None = None) -> dict:
    """name -> (x8, weight arrays for the `isa` kernels (default: this machine's), reference acc, (rows, cols,
    bits, g))."""
    from edgellm.compiler.tvm_int_matmul import pack_for_kernel
    out = {}
    for i, fmt in enumerate(formats):
        t, qc = make(fmt, rows, cols, seed + i)
        x8 = activations(cols, seed + 10 + i)
        out[fmt + tag] = (x8, pack_for_kernel(t, NAME, qc, isa=isa), reference(t, qc, x8), (rows, cols, *FORMATS[fmt]))
    return out


def build(tvm, specs: dict, target: dict, isa: str):
    """One module: each case as a decode kernel (T=1) and a prefill kernel (symbolic T)."""
    from edgellm.compiler.tvm_int_matmul import int_matmul_func
    funcs = {}
    for name, (*_, shape) in specs.items():
        for mode, T in (("decode", 1), ("prefill", None)):
            funcs[f"{name}_{mode}"] = int_matmul_func(*shape, target, T, isa=isa)
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    return tvm.compile(mod, target=tvm.target.Target(target))


def identity(T: int, rows: int) -> tuple[np.ndarray, ...]:
    """Requant arguments (amax, m, s, pre) that leave the exact accumulator: amax = m = 1, s = pre = 0."""
    return np.ones((T, 1), np.int64), np.ones(rows, np.int64), np.zeros(rows, np.int64), np.zeros(rows, np.int64)


def run(fn, x8: np.ndarray, weights: tuple, rows: int) -> np.ndarray:
    import tvm
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (x8, *weights, *identity(len(x8), rows))]
    out = tvm.runtime.tensor(np.full((x8.shape[0], rows), -1, np.int64), dev)
    fn(*args, out)
    return out.numpy()


def host_has(flag: str) -> bool:
    from edgellm.devices.targets import _cpuinfo_flags
    return flag in _cpuinfo_flags()


# ---------------------------------------------------------------- x86 host

@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_bit_identical_to_integer_reference(tvm, isa):
    if isa == "avx2" and not host_has("avx2"):
        pytest.skip("this CPU has no AVX2")
    specs = cases(rows=40, cols=384, isa=isa)                                  # avx2 g32: a lane block + 2 steps
    specs.update(cases(8, 96, seed=7, formats=("w4g32",), tag="narrow", isa=isa))   # 96 % 64: generic steps
    specs.update(cases(24, 256, seed=30, formats=("w8", "w4g128"), make=quantized_real, tag="real", isa=isa))
    specs.update(cases(16, 576, seed=50, formats=("w4g32", "w4g64"), make=quantized_wide, tag="wide", isa=isa))
    specs.update(cases(8, 2304, seed=70, formats=("w4g32",), tag="long", isa=isa))  # 9 lane blocks (avx2 g32)
    specs.update(cases(8, 64, seed=75, formats=("w4g32",), tag="one-step", isa=isa))   # a tail step only
    lib = build(tvm, specs, TARGETS[isa], isa)
    for name, (x8, w, ref, (rows, *_)) in specs.items():
        for i in range(TOKENS):
            assert np.array_equal(run(lib[f"{name}_decode"], x8[i:i + 1], w, rows), ref[i:i + 1]), name
        prefill = lib[f"{name}_prefill"]
        assert np.array_equal(run(prefill, x8, w, rows), ref), name
        assert np.array_equal(run(prefill, x8[:1], w, rows), ref[:1]), name


@pytest.mark.parametrize("T", [32, 33])
def test_prefill_token_blocks(tvm, T):
    """The prefill kernel computes a tile of tokens per weight row together (LANE_TOKENS on x86 with 32-column
    groups, else PREFILL_TOKENS), the rest one by one: full tiles and an odd remainder == the reference."""
    from edgellm.compiler.tvm_int_matmul import (LANE_TOKENS, PREFILL_TOKENS, int_matmul_func, lane_layout,
                                                 pack_for_kernel)
    target = TARGETS["avx2" if host_has("avx2") else "generic"]
    tokens = LANE_TOKENS if lane_layout(24, 384, 4, 32, target) else PREFILL_TOKENS
    assert tokens > 1 and T % tokens == (0 if T == 32 else 1)
    t, qc = quantized("w4g32", 24, 384, 40)
    x8 = np.random.default_rng(41).integers(-127, 128, (T, 384)).astype(np.int8)
    x8[T - 1] = 127
    fn = int_matmul_func(24, 384, 4, 32, target, None)
    lib = tvm.compile(tvm.IRModule({"mm": fn.with_attr("global_symbol", "mm")}), target=tvm.target.Target(target))
    assert np.array_equal(run(lib["mm"], x8, pack_for_kernel(t, NAME, qc, target), 24), reference(t, qc, x8))


def test_lane_layout_moves_whole_column_pairs():
    """to_lane_layout: in each full 256-column block, step s's int32 lane k (bytes 32s + 4k .. + 3) holds the
    8 columns of group k at offset 8s (a byte = two adjacent columns), and the tail stays as stored."""
    from edgellm.runtime.tvm_int_backend import to_lane_layout
    cols = 576
    codes = np.random.default_rng(5).integers(0, 16, (3, cols)).astype(np.uint8)
    packed = IR.pack_int4(codes)
    lanes = to_lane_layout(packed.copy())
    for b in range(cols // 256):
        for s in range(4):
            for k in range(8):
                for m in range(4):
                    c = b * 256 + 32 * k + 8 * s + 2 * m
                    assert np.array_equal(lanes[:, b * 128 + 32 * s + 4 * k + m], packed[:, c // 2]), (b, s, k, m)
    assert np.array_equal(lanes[:, 256:], packed[:, 256:])
    assert np.array_equal(np.sort(lanes, axis=1), np.sort(packed, axis=1))


def test_fused_requant_matches_intref(tvm):
    """The requant fused per output (IntLinear.__call__'s tail, the token's amax kept to 16 bits) with per-row
    m, s and pre (linears sharing an input concatenate their rows): == intref's formula on the
    exact accumulator, decode and prefill, for amax below and above 2^16."""
    from edgellm.compiler.tvm_int_matmul import int_matmul_func
    target = TARGETS["avx2" if host_has("avx2") else "generic"]
    rng = np.random.default_rng(90)
    specs = cases(24, 256, seed=80, formats=("w8", "w4g32"), make=quantized_real)
    for name, (x8, w, acc, (rows, cols, bits, g)) in specs.items():
        amax = np.array([[3], [70000], [2 ** 40 + 12345], [1], [65535]], np.int64)
        m = rng.integers(1 << 29, 1 << 31, rows)
        pre = rng.integers(0, 9, rows)
        s = pre + rng.integers(20, 50, rows)
        sa = np.maximum(IR.bitlen(amax) - 16, 0)
        prod = acc * IR.rshift_round(amax, sa)
        want = IR.rshift_round(IR.rshift_round(prod, pre[None]) * m[None], (s - pre)[None] - sa)
        funcs = {T or "T": int_matmul_func(rows, cols, bits, g, target, T) for T in (1, None)}
        lib = tvm.compile(tvm.IRModule({f"f{k}": f.with_attr("global_symbol", f"f{k}") for k, f in funcs.items()}),
                          target=tvm.target.Target(target))
        dev = tvm.cpu()
        for fn, rows_t in ((lib["fT"], slice(None)), (lib["f1"], slice(2, 3))):
            xs, a = x8[rows_t], amax[rows_t]
            out = tvm.runtime.tensor(np.zeros((len(xs), rows), np.int64), dev)
            fn(*[tvm.runtime.tensor(v, dev) for v in (xs, *w, a, m, s, pre)], out)
            assert np.array_equal(out.numpy(), want[rows_t]), name


def test_vnni_variant_compiles_to_vpdpbusd(tvm):
    """No AVX-512 VNNI CPU here: the variant must pass LLVM's verifier and use vpdpbusd (not run)."""
    from edgellm.compiler.tvm_int_matmul import int_matmul_func, kernel_isa
    target = TARGETS["avx512vnni"]
    assert kernel_isa(target) == "avx512vnni"
    funcs = {f"{f}_{T}": int_matmul_func(16, 128, *FORMATS[f], target, T) for f in ("w8", "w4g32") for T in (1, None)}
    lib = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}),
                      target=tvm.target.Target(target))
    assert "vpdpbusd" in lib.mod.inspect_source("asm")


def test_fp16_scales_widened_in_hardware_and_weights_prefetched(tvm):
    """The w4 kernels read the fp16 scales with F16C's vcvtph2ps where the target has it, never through LLVM's
    soft-float call (x86 without F16C moves the bits instead), and prefetch the rows ahead (compiled, not run)."""
    import re
    from edgellm.compiler.tvm_int_matmul import int_matmul_func, native_f16
    asm = {}
    for isa in ("avx2", "generic", "avx512vnni"):
        target = TARGETS[isa]
        fn = int_matmul_func(16, 576, 4, 32, target, 1)
        lib = tvm.compile(tvm.IRModule({"mm": fn.with_attr("global_symbol", "mm")}), target=tvm.target.Target(target))
        asm[isa] = lib.mod.inspect_source("asm")
        assert not re.search(r"call\w*\s+__extendhfsf2", asm[isa]), isa
        assert "prefetcht0" in asm[isa], isa
    assert native_f16(TARGETS["avx2"]) and not native_f16(TARGETS["generic"])
    assert "vcvtph2ps" in asm["avx2"] and "vcvtph2ps" in asm["avx512vnni"] and "vcvtph2ps" not in asm["generic"]
    for isa in ("avx2", "avx512vnni"):                  # lane layout: the steps of a block add up lane by lane
        assert "vphadd" not in asm[isa] and "vcvtdq2pd" in asm[isa], isa


def test_kernel_isa_follows_the_target(tvm):
    from edgellm.compiler.tvm_int_matmul import kernel_isa
    from edgellm.devices.targets import get_target
    assert kernel_isa(TARGETS["avx2"]) == "avx2"
    assert kernel_isa(TARGETS["generic"]) == "generic"
    assert kernel_isa({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "alderlake"}) == "avx512vnni"
    assert kernel_isa("rpi5") == kernel_isa(get_target("rpi5").tvm_target) == "sdot"
    assert kernel_isa(get_target("jetson-orin").tvm_target) == "sdot"
    assert kernel_isa(get_target("rpi4").tvm_target) == "generic"


def test_pack_for_kernel_and_clear_errors(tvm):
    from edgellm.compiler.tvm_int_matmul import int_matmul_func, pack_for_kernel
    t, qc = quantized("w4g64", 8, 128, 3)
    wq, scale, rowf = pack_for_kernel(t, NAME, qc)
    assert wq.dtype == np.uint8 and wq.shape == (8, 64) and rowf.shape == (8,) and rowf.dtype == np.float64
    assert scale.dtype == np.float16 and np.array_equal(scale, t[NAME + ".scale"])
    units = scale.astype(np.float64) * rowf[:, None]          # the scales in units of the row's 2^base
    assert units.max() == 2047 * 2.0 ** 20 and units[2, 1] == 0 and (units == np.rint(units)).all()
    assert np.array_equal(np.log2(rowf), -IR.w4_group_scales(t, NAME, qc)[1][:, 0])
    with pytest.raises(EdgeLLMError, match="fp16"):
        pack_for_kernel({**t, NAME + ".scale": t[NAME + ".scale"].astype(np.float32)}, NAME, qc)
    asym = IR.QuantConfig("w4a8", group_size=64, symmetric=False)
    with pytest.raises(EdgeLLMError, match="symmetric"):
        pack_for_kernel({**t, NAME + ".zero": np.zeros((8, 1), np.uint8)}, NAME, asym)
    with pytest.raises(EdgeLLMError, match="multiple of 16"):
        int_matmul_func(8, 100, 8, None, TARGETS["avx2"])
    with pytest.raises(EdgeLLMError, match="group size"):
        int_matmul_func(8, 128, 4, 16, TARGETS["avx2"])


# ---------------------------------------------------------------- aarch64 under qemu

ARM_SCRIPT = '''
import sys
import numpy as np
from edgellm.runtime.tvm_backend import _runtime, aligned_empty, load_library

lib, data, out_path = load_library(sys.argv[1]), np.load(sys.argv[2]), sys.argv[3]
ffi, results = _runtime(), {}
for key in [k[:-len(".out")] for k in data.files if k.endswith(".out")]:
    arrays = []
    for i in range(int(data[key + ".n"])):
        a = data[f"{key}.{i}"]
        b = aligned_empty(a.shape, a.dtype)
        b[...] = a
        arrays.append(b)
    out = aligned_empty(data[key + ".out"].shape, np.int64)
    lib[key.split("@")[0]](*[ffi.from_dlpack(a) for a in arrays], ffi.from_dlpack(out))
    results[key] = out
np.savez(out_path, **results)
'''


def test_aarch64_kernels_bit_identical_under_qemu(tvm, arm_rootfs, tmp_path):  # noqa: F811 (the fixture)
    """rpi5 (sdot) and rpi4 (plain NEON) libraries, run by the TVM runtime in arm64 python under qemu."""
    require_tool("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")
    from edgellm.compiler.tvm_build import cross_compiler
    from edgellm.compiler.tvm_int_matmul import kernel_isa
    from edgellm.devices.targets import get_target
    specs = cases(rows=24, cols=256, seed=20, isa="sdot")             # ARM kernels read the stored layout
    specs.update(cases(16, 256, seed=60, formats=("w4g32",), make=quantized_wide, tag="wide", isa="sdot"))
    script = tmp_path / "run_arm.py"
    script.write_text(ARM_SCRIPT)
    procs = {}
    for isa, name in ARM.items():
        target = get_target(name).tvm_target
        assert kernel_isa(target) == isa
        lib = build(tvm, specs, target, isa)
        so = tmp_path / f"{name}.so"
        lib.export_library(str(so), cc=cross_compiler(target))
        feed = {}
        for case, (x8, w, _, (rows, *_)) in specs.items():
            for mode, x in (("decode", x8[3:4]), ("prefill", x8)):
                key = f"{case}_{mode}@{len(x)}"
                args = (x, *w, *identity(len(x), rows))
                feed.update({f"{key}.{i}": a for i, a in enumerate(args)})
                feed[f"{key}.n"], feed[f"{key}.out"] = np.array(len(args)), np.zeros((len(x), rows), np.int64)
        np.savez(tmp_path / f"{name}.in.npz", **feed)
        procs[name] = start_on_arm(arm_rootfs, [str(script), str(so), str(tmp_path / f"{name}.in.npz"),
                                                str(tmp_path / f"{name}.out.npz")])
    for name, proc in procs.items():
        finish_on_arm(proc)
        with np.load(tmp_path / f"{name}.out.npz") as got:
            assert len(got.files) == 2 * len(specs)
            for key in got.files:
                case, mode = key.split("@")[0].rsplit("_", 1)
                ref = specs[case][2][3:4] if mode == "decode" else specs[case][2]
                assert np.array_equal(got[key], ref), (name, key)
