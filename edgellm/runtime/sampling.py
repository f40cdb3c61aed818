"""Token sampling with llama.cpp's default chain: repeat penalty -> top-k -> top-p -> min-p -> temperature."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import EdgeLLMError


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise EdgeLLMError(f"temperature={self.temperature} is negative", "use 0 for greedy or a positive value")
        if not 0.0 <= self.top_p <= 1.0 or not 0.0 <= self.min_p <= 1.0:
            raise EdgeLLMError("top_p and min_p must be within [0, 1]", "pass values such as top_p=0.95 min_p=0.05")
        if self.top_k < 0 or self.repeat_penalty <= 0:
            raise EdgeLLMError("top_k must be >= 0 and repeat_penalty > 0", "use top_k=40, repeat_penalty=1.0")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        p = self.p
        logits = np.asarray(logits, dtype=np.float32)       # no copy unless penalized: a decode step's 50k
        if p.repeat_penalty != 1.0 and history:             # logits cost ~20-60 us to copy
            logits = logits.copy()
            recent = np.unique(np.asarray(history[-p.repeat_last_n:]))
            lv = logits[recent]
            logits[recent] = np.where(lv > 0, lv / p.repeat_penalty, lv * p.repeat_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        idx = np.argsort(-logits, kind="stable")
        if p.top_k > 0:
            idx = idx[: p.top_k]
        z = logits[idx]
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            idx, z = idx[:keep], z[:keep]
            probs = probs[:keep]
        if p.min_p > 0:
            keep = probs >= p.min_p * probs[0]
            idx, z = idx[keep], z[keep]
        z = z / p.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        return int(idx[self.rng.choice(len(idx), p=probs)])
