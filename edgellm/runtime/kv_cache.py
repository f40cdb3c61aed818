"""KV cache: per-layer key/value rows for every position seen so far, preallocated once."""
from __future__ import annotations

import numpy as np

from ..errors import EdgeLLMError
from .config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, n_ctx: int, dtype=np.float32):
        self.n_ctx = n_ctx
        shape = (cfg.n_layers, n_ctx, cfg.n_kv_heads, cfg.head_dim)
        self.k = np.zeros(shape, dtype=dtype)
        self.v = np.zeros(shape, dtype=dtype)
        self.length = 0  # positions filled (valid for every layer after a full forward)

    def update(self, layer: int, pos: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write k, v [T, KVH, d] at positions pos.., return all keys and values up to pos+T."""
        end = pos + k.shape[0]
        if end > self.n_ctx:
            raise EdgeLLMError(f"context full: {end} tokens do not fit in n_ctx={self.n_ctx}",
                               "pass a larger n_ctx (--ctx) or a shorter prompt / max_tokens")
        self.k[layer, pos:end] = k
        self.v[layer, pos:end] = v
        if layer == self.k.shape[0] - 1:
            self.length = end
        return self.k[layer, :end], self.v[layer, :end]

    def truncate(self, length: int) -> None:
        """Forget positions >= length (keeps a shared prompt prefix for the next request)."""
        self.length = min(self.length, length)
