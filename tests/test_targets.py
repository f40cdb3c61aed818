"""Targets: the registry, cross-compiler checks, and the runtime's "does this bundle fit the host" test."""
from __future__ import annotations

import os
import platform
import stat

import pytest

from edgellm.devices import targets as T
from edgellm.errors import EdgeLLMError

from conftest import require


def test_registry_has_the_issue_targets_with_consistent_tvm_dicts():
    assert list(T.TARGETS) == ["x86-64", "rpi4", "rpi5", "jetson-orin", "android-arm64"]
    for t in T.TARGETS.values():
        assert t.tvm_target == {"kind": "llvm", "mtriple": t.triple, "mcpu": t.cpu, "mattr": t.mattr}
        assert t.arch in ("x86_64", "aarch64") and t.triple.startswith(t.arch)
    assert T.get_target("rpi4").cpu == "cortex-a72" and "+dotprod" not in T.get_target("rpi4").mattr
    assert T.get_target("rpi5").cpu == "cortex-a76" and {"+neon", "+dotprod"} <= set(T.get_target("rpi5").mattr)
    assert T.get_target("jetson-orin").cpu == "cortex-a78ae"
    assert any("sm_87" in n for n in T.get_target("jetson-orin").notes)
    assert T.get_target("android-arm64").triple == "aarch64-linux-android"


def test_every_target_dict_is_accepted_by_tvm():
    tvm = require("tvm", "the compiler builds kernels with TVM")
    for t in T.TARGETS.values():
        tt = tvm.target.Target(t.tvm_target)
        assert str(tt.attrs["mtriple"]) == t.triple and str(tt.attrs["mcpu"]) == t.cpu


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(EdgeLLMError) as e:
        T.get_target("rpi3")
    msg = str(e.value)
    assert "rpi3" in msg and all(name in msg for name in T.TARGETS)


def test_x86_feature_detection_from_cpuinfo_flags():
    cpu, mattr = T._x86_host_features({"avx2", "fma", "bmi2", "f16c"})
    assert cpu == "x86-64-v3" and "+avx512f" not in mattr and "+avx2" in mattr
    flags = {"avx2", "fma", "bmi2", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512_vnni"}
    cpu, mattr = T._x86_host_features(flags)
    assert cpu == "x86-64-v4" and "+avx512vnni" in mattr
    assert T._x86_host_features({"sse2"}) == ("x86-64", [])


def test_cpuinfo_parsing(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert T._cpuinfo_flags(str(f)) == {"fpu", "avx2", "fma"}
    f.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert T._cpuinfo_flags(str(f)) == {"fp", "asimd", "asimddp"}
    assert T._cpuinfo_flags(str(tmp_path / "missing")) == set()


def _path_with(tmp_path, *exes: str) -> str:
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name in exes:
        p = d / name
        p.write_text("#!/bin/sh\nexit 0\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return str(d)


@pytest.mark.parametrize("name", ["rpi4", "rpi5", "jetson-orin"])
def test_missing_cross_compiler_names_the_debian_package(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _path_with(tmp_path))
    with pytest.raises(EdgeLLMError) as e:
        T.check_toolchain(name)
    msg = str(e.value)
    assert "aarch64-linux-gnu-gcc" in msg and "apt-get install gcc-aarch64-linux-gnu" in msg and name in msg


def test_cross_compiler_found_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _path_with(tmp_path, "aarch64-linux-gnu-gcc"))
    assert T.check_toolchain("rpi5") == os.path.join(tmp_path, "bin", "aarch64-linux-gnu-gcc")
    assert T.check_toolchain("x86-64") is None  # the host compiler builds host kernels


def test_android_needs_the_ndk(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _path_with(tmp_path))
    for var in ("ANDROID_NDK_HOME", "ANDROID_NDK_ROOT", "ANDROID_NDK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(EdgeLLMError, match="ANDROID_NDK_HOME"):
        T.check_toolchain("android-arm64")
    ndk = tmp_path / "ndk"
    bindir = ndk / "toolchains" / "llvm" / "prebuilt" / "linux-x86_64" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "aarch64-linux-android24-clang").write_text("")
    monkeypatch.setenv("ANDROID_NDK_HOME", str(ndk))
    assert T.check_toolchain("android-arm64") == str(bindir / "aarch64-linux-android24-clang")


def test_host_target_matches_the_host_and_other_arch_does_not():
    host = T.host_target()
    ok, reason = T.host_matches(host.name)
    assert ok, reason
    other = "rpi5" if host.arch == "x86_64" else "x86-64"
    ok, reason = T.host_matches(other)
    assert not ok and other in reason and T.normalize_arch(platform.machine()) in reason
    # a manifest's target dict works the same as a name
    assert T.host_matches(T.get_target(other).to_dict())[0] is False


def test_missing_cpu_feature_is_a_mismatch(monkeypatch):
    monkeypatch.setattr(T.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(T, "_is_android", lambda: False)
    monkeypatch.setattr(T, "_cpuinfo_flags", lambda path="/proc/cpuinfo": {"avx2", "fma"})
    t = {"name": "x86-vnni", "arch": "x86_64", "triple": "x86_64-linux-gnu", "mattr": ["+avx2", "+avx512vnni"]}
    ok, reason = T.host_matches(t)
    assert not ok and "+avx512vnni" in reason
    assert T.host_matches({**t, "mattr": ["+avx2", "+fma"]})[0]


def test_aarch64_host_uses_hwcap(monkeypatch):
    """Under qemu-user /proc/cpuinfo is the x86 host's, so dotprod comes from AT_HWCAP in /proc/self/auxv."""
    monkeypatch.setattr(T.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(T, "_is_android", lambda: False)
    monkeypatch.setattr(T, "_cpuinfo_flags", lambda path="/proc/cpuinfo": set())
    monkeypatch.setattr(T, "_auxv_hwcap", lambda path="/proc/self/auxv": (1 << 1) | (1 << 20))
    assert T.host_matches("rpi5")[0] and T.host_matches("rpi4")[0] and T.host_matches("jetson-orin")[0]
    assert T.host_target().name == "rpi5"
    ok, reason = T.host_matches("android-arm64")
    assert not ok and "aarch64-linux-android" in reason
    ok, reason = T.host_matches("x86-64")
    assert not ok and "x86_64" in reason
    monkeypatch.setattr(T, "_auxv_hwcap", lambda path="/proc/self/auxv": 1 << 1)  # NEON only: a Pi 4
    ok, reason = T.host_matches("rpi5")
    assert not ok and "+dotprod" in reason
    assert T.host_matches("rpi4")[0] and T.host_target().name == "rpi4"


def test_auxv_parsing(tmp_path):
    import struct
    f = tmp_path / "auxv"
    f.write_bytes(struct.pack("<8Q", 6, 4096, 16, 0xABC, 25, 1, 0, 0))
    assert T._auxv_hwcap(str(f)) == 0xABC
    assert T._auxv_hwcap(str(tmp_path / "missing")) is None


def test_targets_table_lists_every_target_and_its_settings():
    text = T.targets_table()
    for t in T.TARGETS.values():
        assert t.name in text and t.cpu in text and t.triple in text
    assert "gcc-aarch64-linux-gnu" in text and "(this host)" in text
