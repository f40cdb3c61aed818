"""`edgellm compile --with-wheels`: put the device's Python wheels into the bundle for an offline install.

pip resolves the runtime's dependencies for the target's platform (aarch64 manylinux wheels for a Pi or a
Jetson) and the device then runs `pip install --no-index --find-links wheels/ edgellm[...]`.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import edgellm

from ..devices.targets import Target
from ..errors import EdgeLLMError

RUNTIME_REQUIREMENTS = ["numpy", "psutil", "gguf", "tokenizers", "jinja2", "tqdm", "threadpoolctl", "platformdirs"]
BACKEND_REQUIREMENTS = {"tvm": ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1"],
                        "onnxruntime": ["onnxruntime"]}
BACKEND_REQUIREMENTS["tvm-relax"] = BACKEND_REQUIREMENTS["tvm"]
PLATFORMS = {"aarch64-linux-gnu": ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64",
                                   "linux_aarch64"],
             "x86_64-linux-gnu": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                  "linux_x86_64"]}


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        err = next((ln for ln in r.stderr.splitlines() if ln.startswith("ERROR")), r.stderr.strip()[-300:])
        raise EdgeLLMError(f"{what} failed: {err}",
                           "check the network / package index, or compile without --with-wheels")


def download_wheels(target: Target, out_dir: Path, backends: list[str], python_version: str = "3.11") -> list[Path]:
    """Download wheels for `target` (and build edgellm's own wheel) into out_dir; returns the files."""
    platforms = PLATFORMS.get(target.triple)
    if platforms is None:
        raise EdgeLLMError(f"--with-wheels has no wheel platform for target {target.name} ({target.triple})",
                           f"supported triples: {', '.join(PLATFORMS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    reqs = list(RUNTIME_REQUIREMENTS)
    for b in backends:
        reqs += BACKEND_REQUIREMENTS.get(b, [])
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", python_version,
           "--implementation", "cp", "-d", str(out_dir), "-q"]
    for p in platforms:
        cmd += ["--platform", p]
    _run(cmd + reqs, f"pip download for {target.name}")
    root = Path(edgellm.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise EdgeLLMError("cannot build edgellm's own wheel: this edgellm is not installed from a source tree",
                           "run the compiler from an edgellm checkout (pip install -e .)")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out_dir), str(root)],
         "building the edgellm wheel")
    return sorted(out_dir.iterdir())
