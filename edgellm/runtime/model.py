"""The numpy reference forward pass of Llama-family decoders (llama, mistral, qwen2).

This is the oracle every faster backend is compared with: written for clarity, in float32, one
function per concept. Weights are fetched from the weight store by GGUF name at each use.
"""
from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .kv_cache import KVCache
from .weights import WeightStore


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm: scale by 1/sqrt(mean(x^2) + eps), then by the learned weight."""
    ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(ms + eps)) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope_tables(cfg: ModelConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of angle pos * base^(-2i/rope_dim) for each rotated pair i, with linear scaling."""
    n = cfg.rope_dim
    inv_freq = cfg.rope_base ** (-np.arange(0, n, 2, dtype=np.float64) / n)
    ang = np.outer(positions.astype(np.float64) / cfg.rope_scale, inv_freq)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool, rope_dim: int) -> np.ndarray:
    """Rotate pairs of dims of x [T, heads, head_dim]. Normal layout pairs (2i, 2i+1); NeoX pairs (i, i+n/2)."""
    out = x.copy()
    c, s = cos[:, None, :], sin[:, None, :]
    if neox:
        h = rope_dim // 2
        a, b = x[..., :h], x[..., h:rope_dim]
        out[..., :h] = a * c - b * s
        out[..., h:rope_dim] = a * s + b * c
    else:
        a, b = x[..., 0:rope_dim:2], x[..., 1:rope_dim:2]
        out[..., 0:rope_dim:2] = a * c - b * s
        out[..., 1:rope_dim:2] = a * s + b * c
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int, n_rep: int) -> np.ndarray:
    """Causal GQA attention. q [T, H, d] at positions pos..pos+T-1; k, v [pos+T, KVH, d] from the KV cache."""
    T, H, d = q.shape
    S = k.shape[0]
    qg = q.reshape(T, H // n_rep, n_rep, d).transpose(1, 2, 0, 3)           # [KVH, rep, T, d]
    kt = k.transpose(1, 2, 0)                                                  # [KVH, d, S]
    scores = (qg @ kt[:, None]) * np.float32(1.0 / np.sqrt(d))                 # [KVH, rep, T, S]
    if T > 1:
        mask = np.arange(S)[None, :] > (pos + np.arange(T))[:, None]
        scores = np.where(mask, np.float32(-np.inf), scores)
    p = softmax(scores)
    out = p @ v.transpose(1, 0, 2)[:, None]                                    # [KVH, rep, T, d]
    return out.transpose(2, 0, 1, 3).reshape(T, H * d)


class Transformer:
    """Llama-family decoder over a weight store. `forward` fills the KV cache and returns logits."""

    def __init__(self, cfg: ModelConfig, weights: WeightStore, act_quant: str = "ggml"):
        self.cfg = cfg
        self.w = weights
        self.output_name = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
        self.act_quant = act_quant      # "ggml": round activations as llama.cpp does; "none": plain float
        self._mins: dict[str, np.ndarray | None] = {}

    def prepare(self) -> None:
        """Fetch every weight (and its block minimums) once, so load-time work stays out of the first token."""
        for name in self.w.names():
            w = self.w.get(name)
            if self.act_quant == "ggml" and w.ndim == 2:
                self._block_mins(name, w.shape[0])

    def _block_mins(self, name: str, rows: int) -> np.ndarray | None:
        from .act_quant import block_mins      # imports gguf (~0.1 s): only float GGUF models pay for it
        if name not in self._mins:
            self._mins[name] = block_mins(self.w.raw(name), self.w.qtype(name), rows)
        return self._mins[name]

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        w = self.w.get(name)
        if self.act_quant == "ggml":
            from .act_quant import quantized_matmul
            y = quantized_matmul(x, w, self.w.qtype(name), mins=self._block_mins(name, w.shape[0]))
        else:
            y = x @ w.T
        bias = name.replace(".weight", ".bias")
        if self.cfg.attn_bias and bias in self.w:
            y = y + self.w.get(bias)
        return y

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return self.w.get("token_embd.weight")[tokens]

    def block(self, i: int, x: np.ndarray, pos: int, kv: KVCache, cos, sin) -> np.ndarray:
        c, p = self.cfg, f"blk.{i}."
        T = x.shape[0]
        h = rms_norm(x, self.w.get(p + "attn_norm.weight"), c.norm_eps)
        q = self.linear(h, p + "attn_q.weight").reshape(T, c.n_heads, c.head_dim)
        k = self.linear(h, p + "attn_k.weight").reshape(T, c.n_kv_heads, c.head_dim)
        v = self.linear(h, p + "attn_v.weight").reshape(T, c.n_kv_heads, c.head_dim)
        q = apply_rope(q, cos, sin, c.rope_neox, c.rope_dim)
        k = apply_rope(k, cos, sin, c.rope_neox, c.rope_dim)
        keys, values = kv.update(i, pos, k, v)
        a = attention(q, keys, values, pos, c.n_rep)
        x = x + self.linear(a, p + "attn_output.weight")
        h = rms_norm(x, self.w.get(p + "ffn_norm.weight"), c.norm_eps)
        g = silu(self.linear(h, p + "ffn_gate.weight")) * self.linear(h, p + "ffn_up.weight")
        return x + self.linear(g, p + "ffn_down.weight")

    def forward(self, tokens: np.ndarray, pos: int, kv: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions pos.. through the model; logits [T, vocab] or [1, vocab] (last only)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        x = self.embed(tokens)
        cos, sin = rope_tables(self.cfg, np.arange(pos, pos + len(tokens)))
        for i in range(self.cfg.n_layers):
            x = self.block(i, x, pos, kv, cos, sin)
        if not all_logits:
            x = x[-1:]
        x = rms_norm(x, self.w.get("output_norm.weight"), self.cfg.norm_eps)
        return self.linear(x, self.output_name)
