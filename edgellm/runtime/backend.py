"""Backends run the forward pass. `numpy` is the reference; compiled backends (tvm, onnxruntime) come later."""
from __future__ import annotations

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


BACKENDS = {"numpy": NumpyBackend}
PLANNED = {"tvm": "needs a compiled bundle (edgellm compile, not built yet)",
           "onnxruntime": "needs a compiled bundle (edgellm compile, not built yet)"}


def make_backend(name: str, cfg: ModelConfig, weights: WeightStore, threads: int | None) -> Backend:
    if name in BACKENDS:
        return BACKENDS[name](cfg, weights, threads)
    if name in PLANNED:
        raise EdgeLLMError(f"backend {name!r} is not available yet: {PLANNED[name]}", "use backend='numpy'")
    raise EdgeLLMError(f"unknown backend {name!r}", f"choose one of: {', '.join(BACKENDS)}")
