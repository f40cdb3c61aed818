"""Perplexity exactly as llama.cpp's `llama-perplexity` computes it, so the numbers are comparable.

The text is cut into non-overlapping chunks of n_ctx tokens, each evaluated from an empty cache.
Only the second half of each chunk is scored (logits at positions n_ctx//2 .. n_ctx-2 predicting
the next token), so every scored token sees at least n_ctx//2 tokens of context. When the model
adds BOS, the first token of every chunk is replaced by BOS, as llama.cpp does.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from ..errors import EdgeLLMError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float          # mean negative log-likelihood per scored token (nats)
    n_tokens: int       # scored tokens
    chunks: int
    ppl_err: float = 0.0  # llama.cpp's "+/-": standard error of the mean NLL, scaled by ppl


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] for each row, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(x).sum(axis=-1))
    return log_z - x[np.arange(len(targets)), targets]


def perplexity(llm, tokens: list[int], n_ctx: int, max_chunks: int | None = None, progress: bool = True,
               add_bos: bool | None = None) -> PerplexityResult:
    """Perplexity of `tokens` (already tokenized, BOS included if the model adds one) in chunks of n_ctx."""
    if n_ctx < 4:
        raise EdgeLLMError(f"context size {n_ctx} is too small for perplexity", "use --ctx 64 or more")
    n_chunks = len(tokens) // n_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks < 1:
        raise EdgeLLMError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}",
                           "use a longer text or a smaller --ctx")
    tok = llm.tokenizer
    if add_bos is None:
        add_bos = bool(getattr(tok, "add_bos", False)) and getattr(tok, "bos_id", None) is not None
    first = n_ctx // 2
    nll_sum = nll2_sum = 0.0
    count = 0
    from tqdm import tqdm
    bar = tqdm(range(n_chunks), desc="perplexity", unit="chunk", disable=not progress, file=sys.stderr)
    for i in bar:
        chunk = [int(t) for t in tokens[i * n_ctx:(i + 1) * n_ctx]]
        if add_bos:
            chunk[0] = tok.bos_id
        logits = llm.logits(chunk)
        nll = token_nll(logits[first:n_ctx - 1], np.asarray(chunk[first + 1:], dtype=np.int64))
        nll_sum += float(nll.sum())
        nll2_sum += float((nll * nll).sum())
        count += len(nll)
        bar.set_postfix(ppl=f"{math.exp(nll_sum / count):.4f}")
    mean = nll_sum / count
    ppl = math.exp(mean)
    var = nll2_sum / count - mean * mean
    err = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0
    return PerplexityResult(ppl=ppl, nll=mean, n_tokens=count, chunks=n_chunks, ppl_err=err)
