"""Backends run the forward pass: `numpy` (the float reference), the compiled `tvm` / `tvm-relax` / `onnxruntime`,
and `int` (the integer reference over a bundle's quantized model, see int_backend.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from threadpoolctl import ThreadpoolController

from ..errors import EdgeLLMError
from .config import ModelConfig
from .kv_cache import KVCache
from .model import Transformer
from .weights import ResidentStore, WeightStore

_controller = None


def _thread_limit(threads: int | None):
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=threads) if threads else _controller.limit(limits=None)


class Backend:
    """Runs tokens through the model, writing the KV cache, returning logits."""

    name = "abstract"

    def prepare(self) -> None:
        """Do load-time work (dequantize, upload, compile) now rather than inside the first forward."""

    def new_cache(self, n_ctx: int) -> KVCache:
        raise NotImplementedError

    def forward(self, tokens: np.ndarray, pos: int, kv: KVCache, all_logits: bool = False) -> np.ndarray:
        raise NotImplementedError


class NumpyBackend(Backend):
    """float32 numpy reference over a resident (dequantized-once) weight store."""

    name = "numpy"

    def __init__(self, cfg: ModelConfig, weights: WeightStore, threads: int | None = None,
                 act_quant: str = "ggml"):
        self.cfg = cfg
        self.threads = threads
        self.model = Transformer(cfg, ResidentStore(weights), act_quant)

    def prepare(self) -> None:
        self.model.prepare()

    def new_cache(self, n_ctx: int) -> KVCache:
        return KVCache(self.cfg, n_ctx)

    def forward(self, tokens, pos, kv, all_logits=False):
        with _thread_limit(self.threads):
            return self.model.forward(tokens, pos, kv, all_logits)


KERNEL_LIBRARY = "kernels/model.so"   # where `edgellm compile` puts the TVM kernels inside a bundle
ONNX_DIR = "onnx"                      # and the exported graphs


def _needs_bundle(name: str, model, artifact: str) -> Path:
    if model.format != "bundle":
        raise EdgeLLMError(f"backend {name!r} runs a compiled bundle, and {model.path} is a {model.format} model",
                           f"compile it first: edgellm compile {model.path} --target x86-64 -o BUNDLE_DIR")
    path = Path(model.path) / artifact
    if not path.exists():
        raise EdgeLLMError(f"the bundle {model.path} has no {artifact}",
                           f"recompile it with the {name} backend enabled (edgellm compile ... --backends {name})")
    return path


def _tvm(model, threads):
    """The whole-model Relax executable when the bundle has one (one VM call per token), else per-op kernels;
    on a quantized bundle with integer kernels, those."""
    from .relax_backend import RELAX_LIBRARY
    if model.format == "bundle" and (Path(model.path) / "kernels" / "int.so").exists():
        return _tvm_int(model, threads)
    if model.format == "bundle" and (Path(model.path) / RELAX_LIBRARY).exists():
        return _tvm_relax(model, threads)
    from .tvm_backend import TvmBackend   # lazy: imports the TVM runtime
    return TvmBackend(model.config, model.weights, _needs_bundle("tvm", model, KERNEL_LIBRARY), threads=threads)


def _tvm_relax(model, threads):
    from .relax_backend import RELAX_LIBRARY, RelaxBackend
    return RelaxBackend(model.config, model.weights, _needs_bundle("tvm-relax", model, RELAX_LIBRARY),
                        threads=threads)


def _onnxruntime(model, threads):
    from .ort_backend import OnnxRuntimeBackend   # lazy: imports onnxruntime
    return OnnxRuntimeBackend(model.config, _needs_bundle("onnxruntime", model, ONNX_DIR), threads)


def _quant_of(name: str, model) -> dict:
    """The bundle's manifest "quant" section, or an error naming `edgellm compile --quant`."""
    from .bundle import bundle_quant
    q = bundle_quant(model)
    if q is None:
        what = "a bundle without a quantized model" if model.format == "bundle" else f"a {model.format} model"
        raise EdgeLLMError(f"backend {name!r} runs a quantized bundle, and {model.path} is {what}",
                           f"compile it with an integer scheme: edgellm compile {model.path} --quant w8a8 "
                           "--calibration TEXT -o BUNDLE_DIR (or run it with --backend numpy)")
    return q


def _int(model, threads):
    """The bundle's quantized model on the integer reference: integer-only if compiled so, else mixed mode."""
    from .int_backend import IntBackend   # lazy: int_backend imports this module
    q = _quant_of("int", model)
    return IntBackend(Path(model.path) / q["file"], mode="integer" if q.get("integer_only") else "mixed",
                      threads=threads)


def _tvm_int(model, threads):
    """Compiled integer-only kernels (bit-identical to the `int` backend in integer mode)."""
    from .tvm_int_backend import INT_LIBRARY, TvmIntBackend   # lazy: imports the TVM runtime
    q = _quant_of("tvm-int", model)
    return TvmIntBackend(Path(model.path) / q["file"], _needs_bundle("tvm-int", model, INT_LIBRARY), threads)


BACKENDS = {"numpy": lambda model, threads: NumpyBackend(model.config, model.weights, threads),
            "tvm": _tvm, "tvm-relax": _tvm_relax, "onnxruntime": _onnxruntime, "int": _int, "tvm-int": _tvm_int}


def default_backend(model) -> str:
    """For a bundle compiled with an integer --quant scheme: "tvm-int" when it is integer-only and has the
    compiled integer kernels, else "int"; "numpy" for everything else."""
    from .bundle import bundle_quant
    q = bundle_quant(model)
    if q is None:
        return "numpy"
    fast = q.get("integer_only") and (Path(model.path) / "kernels" / "int.so").exists()
    return "tvm-int" if fast else "int"


def make_backend(name: str | None, model, threads: int | None) -> Backend:
    """Backend `name` for a LoadedModel (compiled backends need a bundle made by `edgellm compile`);
    None picks default_backend(model)."""
    if name is None:
        name = default_backend(model)
    if name not in BACKENDS:
        raise EdgeLLMError(f"unknown backend {name!r}", f"choose one of: {', '.join(BACKENDS)}")
    return BACKENDS[name](model, threads)
