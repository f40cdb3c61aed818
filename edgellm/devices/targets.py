"""Compilation targets: which CPU a bundle's kernels are built for, and whether this host can run them.

The compiler reads a Target to pick TVM's target and the cross compiler; the runtime only needs
`host_matches` to refuse a bundle built for another machine. That check uses nothing but the
standard library (platform, /proc), so the device side never imports the compiler.
"""
from __future__ import annotations

import os
import platform
import shutil
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import EdgeLLMError

# LLVM feature (mattr) -> Linux /proc/cpuinfo flag that proves the host has it
_X86_FLAGS = {
    "+avx2": "avx2", "+fma": "fma", "+f16c": "f16c", "+bmi2": "bmi2",
    "+avx512f": "avx512f", "+avx512bw": "avx512bw", "+avx512dq": "avx512dq", "+avx512vl": "avx512vl",
    "+avx512cd": "avx512cd", "+avx512vnni": "avx512_vnni", "+avxvnni": "avx_vnni",
}
# LLVM feature -> (AT_HWCAP bit, /proc/cpuinfo "Features" word) on aarch64 Linux (asm/hwcap.h)
_ARM_FEATURES = {"+neon": (1 << 1, "asimd"), "+dotprod": (1 << 20, "asimddp"), "+fp16": (1 << 9, "fphp"),
                 "+i8mm": (None, "i8mm"), "+sve": (1 << 22, "sve")}
_AT_HWCAP = 16

# what `edgellm compile --quant` accepts; the integer schemes run on any CPU through the integer reference
# (backend "int", edgellm/runtime/intref.py), so a target lists them unless its hardware says otherwise
QUANT_SCHEMES = ("gguf-native", "w8a8", "w4a8", "w4a16", "w8a16")
INTEGER_ONLY_SCHEMES = ("w8a8", "w4a8")      # int8 activations: the schemes that can run integer-only


@dataclass
class Target:
    """One deployment target. `tvm_target` is the JSON-dict form TVM 0.27's tvm.target.Target accepts."""

    name: str
    triple: str
    arch: str                       # "x86_64" | "aarch64"
    cpu: str
    mattr: list[str]
    cross_cc: str | None            # None = the host's own compiler is enough
    debian_packages: list[str]
    description: str
    tvm_target: dict
    notes: list[str] = field(default_factory=list)
    quant_schemes: list[str] = field(default_factory=lambda: list(QUANT_SCHEMES))
    integer_only: bool = True       # can run an --integer-only bundle as its integer arithmetic
    quant_note: str = ""            # why a scheme or integer-only is missing (shown in the error)

    def to_dict(self) -> dict:
        return asdict(self)


def _llvm(triple: str, cpu: str, mattr: list[str]) -> dict:
    return {"kind": "llvm", "mtriple": triple, "mcpu": cpu, "mattr": list(mattr)}


def normalize_arch(machine: str) -> str:
    m = machine.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}.get(m, m)


def _is_android() -> bool:
    return hasattr(sys, "getandroidapilevel") or "ANDROID_ROOT" in os.environ


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The first CPU's flags (x86 "flags", arm "Features"); empty if /proc is unavailable."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _x86_host_features(flags: set[str]) -> tuple[str, list[str]]:
    """(LLVM cpu, mattr) for this x86 host: the highest x86-64 microarchitecture level it fully has."""
    mattr = [f for f, flag in _X86_FLAGS.items() if flag in flags]
    v4 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}
    if v4 <= flags and {"avx2", "fma", "bmi2"} <= flags:
        cpu = "x86-64-v4"
    elif {"avx2", "fma", "bmi2", "f16c"} <= flags:
        cpu = "x86-64-v3"
    else:
        cpu = "x86-64"
    return cpu, mattr


def _x86_target() -> Target:
    notes = []
    if normalize_arch(platform.machine()) == "x86_64":
        cpu, mattr = _x86_host_features(_cpuinfo_flags())
        desc = f"this x86-64 host ({cpu}; detected {' '.join(mattr) or 'no AVX'})"
    else:
        cpu, mattr = "x86-64-v3", ["+avx2", "+fma", "+f16c", "+bmi2"]
        desc = "x86-64 with AVX2 (the host is not x86-64, so no detection)"
        notes.append("not the host: built for a generic AVX2 machine")
    return Target("x86-64", "x86_64-linux-gnu", "x86_64", cpu, mattr, None, [], desc,
                  _llvm("x86_64-linux-gnu", cpu, mattr), notes)


def _aarch64(name: str, cpu: str, mattr: list[str], desc: str, notes: list[str] | None = None) -> Target:
    triple = "aarch64-linux-gnu"
    return Target(name, triple, "aarch64", cpu, mattr, "aarch64-linux-gnu-gcc",
                  ["gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu"], desc, _llvm(triple, cpu, mattr), notes or [])


def _build_targets() -> dict[str, Target]:
    android = Target(
        "android-arm64", "aarch64-linux-android", "aarch64", "cortex-a76", ["+neon", "+dotprod"],
        "aarch64-linux-android24-clang", [], "Android phones (arm64-v8a, API 24+)",
        _llvm("aarch64-linux-android", "cortex-a76", ["+neon", "+dotprod"]),
        ["needs the Android NDK's clang: set ANDROID_NDK_HOME to the NDK directory"])
    jetson = _aarch64("jetson-orin", "cortex-a78ae", ["+neon", "+dotprod"], "NVIDIA Jetson Orin CPU (Cortex-A78AE)",
                      ["CUDA sm_87 kernels are not built yet: the CPU kernels run on the Orin's Cortex-A78AE cores"])
    jetson.integer_only = False
    jetson.quant_note = ("jetson-orin's GPU kernels (CUDA sm_87) are float32 only, so an integer-only bundle would "
                         "not run its integer arithmetic on the GPU")
    return {t.name: t for t in [
        _x86_target(),
        _aarch64("rpi4", "cortex-a72", ["+neon"], "Raspberry Pi 4 (Cortex-A72, NEON)"),
        _aarch64("rpi5", "cortex-a76", ["+neon", "+dotprod"], "Raspberry Pi 5 (Cortex-A76, NEON + dotprod)"),
        jetson,
        android,
    ]}


TARGETS: dict[str, Target] = _build_targets()


def get_target(name: str) -> Target:
    if isinstance(name, Target):
        return name
    try:
        return TARGETS[name]
    except KeyError:
        raise EdgeLLMError(f"unknown target {name!r}",
                           f"choose one of: {', '.join(TARGETS)} (see `edgellm targets`)") from None


def check_quant(target: Target | str, scheme: str, integer_only: bool = False) -> None:
    """Refuse a quantization scheme (or integer-only mode) the target cannot run, naming what it can."""
    t = get_target(target)
    why = f" ({t.quant_note})" if t.quant_note else ""
    if scheme not in t.quant_schemes:
        raise EdgeLLMError(f"target {t.name} cannot run --quant {scheme}{why}",
                           f"choose --quant from: {', '.join(t.quant_schemes)}")
    if integer_only and not t.integer_only:
        others = [n for n, o in TARGETS.items() if o.integer_only and scheme in o.quant_schemes]
        raise EdgeLLMError(f"target {t.name} cannot run --integer-only{why}",
                           f"drop --integer-only (the int backend then runs {scheme} in mixed mode on the "
                           f"{t.name} CPU), or compile integer-only for one of: {', '.join(others)}")


def host_target() -> Target:
    """The target that describes this machine (x86-64 hosts get their detected features)."""
    if normalize_arch(platform.machine()) == "x86_64":
        return TARGETS["x86-64"]
    if normalize_arch(platform.machine()) == "aarch64":
        if _is_android():
            return TARGETS["android-arm64"]
        return TARGETS["rpi5"] if "+dotprod" in (host_features() or set()) else TARGETS["rpi4"]
    raise EdgeLLMError(f"this host's architecture {platform.machine()!r} is not a supported target",
                       "edgellm runs on x86-64 and aarch64 (arm64)")


def _ndk_compiler(t: Target) -> str | None:
    for var in ("ANDROID_NDK_HOME", "ANDROID_NDK_ROOT", "ANDROID_NDK"):
        root = os.environ.get(var)
        if root:
            for cc in sorted(Path(root).glob(f"toolchains/llvm/prebuilt/*/bin/{t.cross_cc}")):
                return str(cc)
    return shutil.which(t.cross_cc)


def check_toolchain(target: Target | str) -> str | None:
    """Path of the C compiler that links the target's kernel library (None: the host's own)."""
    t = get_target(target)
    if t.cross_cc is None:
        return None
    if t.triple.endswith("android"):
        cc = _ndk_compiler(t)
        if cc is None:
            raise EdgeLLMError(f"target {t.name} needs the Android NDK compiler {t.cross_cc}, which was not found",
                               "install the Android NDK (r25 or newer) and set ANDROID_NDK_HOME to its directory")
        return cc
    cc = shutil.which(t.cross_cc)
    if cc is None:
        raise EdgeLLMError(f"target {t.name} needs the cross compiler {t.cross_cc}, which is not on PATH",
                           f"install it with: apt-get install {' '.join(t.debian_packages)}")
    return cc


# ---- host matching (runtime side: stdlib only) ----------------------------------------------------


def _auxv_hwcap(path: str = "/proc/self/auxv") -> int | None:
    """AT_HWCAP from the auxiliary vector (also right under qemu-user, whose /proc/cpuinfo is the host's)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    for key, value in struct.iter_unpack("<QQ", data[: len(data) // 16 * 16]):
        if key == _AT_HWCAP:
            return value
    return None


def host_features() -> set[str] | None:
    """LLVM-style features (+avx2, +dotprod, ...) this host has; None if they cannot be read."""
    arch = normalize_arch(platform.machine())
    if arch == "x86_64":
        flags = _cpuinfo_flags()
        return {f for f, flag in _X86_FLAGS.items() if flag in flags} if flags else None
    if arch == "aarch64":
        hwcap = _auxv_hwcap()
        words = _cpuinfo_flags()
        if hwcap is None and not words:
            return None
        return {f for f, (bit, word) in _ARM_FEATURES.items()
                if (hwcap is not None and bit is not None and hwcap & bit) or word in words}
    return None


def host_matches(target: str | dict | Target) -> tuple[bool, str]:
    """Can this host run kernels built for `target` (a name, a Target, or a bundle manifest's target dict)?"""
    if isinstance(target, str):
        target = get_target(target)
    t = target.to_dict() if isinstance(target, Target) else dict(target)
    name = t.get("name", "?")
    host = normalize_arch(platform.machine())
    want = normalize_arch(str(t.get("arch", "")))
    if want != host:
        return False, f"target {name} is {want or 'unknown'} but this host is {host}"
    triple = str(t.get("triple", ""))
    if triple.endswith("android") != _is_android():
        where = "Android" if _is_android() else "GNU/Linux"
        return False, f"target {name} is for {triple} but this host runs {where}"
    feats = host_features()
    need = [f for f in t.get("mattr", []) if f.startswith("+")]
    if feats is None:
        return True, f"target {name} matches this {host} host (CPU features could not be read, not checked)"
    known = _X86_FLAGS if host == "x86_64" else _ARM_FEATURES
    missing = [f for f in need if f in known and f not in feats]
    if missing:
        return False, f"target {name} needs CPU features {' '.join(missing)} that this {host} host lacks"
    return True, f"target {name} matches this {host} host"


def targets_table() -> str:
    """The `edgellm targets` listing: one block per target with its settings."""
    host = host_target().name if normalize_arch(platform.machine()) in ("x86_64", "aarch64") else None
    lines = []
    for t in TARGETS.values():
        mark = "  (this host)" if t.name == host else ""
        lines.append(f"{t.name}{mark}: {t.description}")
        lines.append(f"    triple {t.triple}  cpu {t.cpu}  mattr {','.join(t.mattr) or '-'}")
        cc = t.cross_cc or "host compiler"
        pk = f"  (apt-get install {' '.join(t.debian_packages)})" if t.debian_packages else ""
        lines.append(f"    compiler {cc}{pk}")
        io = "integer-only too" if t.integer_only else "not integer-only"
        lines.append(f"    quant {', '.join(t.quant_schemes)} ({io})")
        for n in t.notes:
            lines.append(f"    note: {n}")
    return "\n".join(lines)
