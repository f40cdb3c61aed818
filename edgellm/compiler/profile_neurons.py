"""`edgellm compile --profile-neurons`: rank FFN neurons and train activation predictors on calibration text.

SwiGLU neurons are never exactly zero, so "active" means |silu(gate.h) * up.h| above a per-layer
threshold chosen so that a target fraction of activations falls below it (CATS / TEAL). Running
calibration text through the numpy reference gives, per layer, each neuron's activation frequency
(the hot-first ranking a budgeted runtime keeps resident) and (FFN input h, active mask) pairs on
which a low-rank linear predictor is fitted by reduced-rank least squares (LLM in a flash uses a
low-rank predictor the same way). Its per-layer bias is then lowered until it recalls `recall` of
the truly active neurons on the calibration tokens. The result is a NeuronProfile (neurons.npz).

Calibration must not include the evaluation text: the default corpus is the Shakespeare plays
except Hamlet, which the perplexity benchmarks hold out.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError
from ..runtime.memory.neuron_profile import PROFILE_FILE, NeuronProfile
from ..runtime.model import Transformer, silu
from ..runtime.weights import ResidentStore

HELD_OUT = ("hamlet",)


def calibration_texts(path: str | Path, exclude: tuple[str, ...] = HELD_OUT, max_files: int = 16) -> list[str]:
    """Texts of a file or of the *.txt files of a directory (sorted), skipping names containing `exclude`."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.glob("*.txt") if not any(x in f.name.lower() for x in exclude))
    if not files:
        raise EdgeLLMError(f"no calibration text found at {p}",
                           "pass a .txt file or a directory of .txt files (e.g. the Shakespeare plays)")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files[:max_files]]


class _Recorder(Transformer):
    """The reference model, keeping every layer's FFN input h and |silu(gate.h) * up.h|."""

    def __init__(self, cfg, weights):
        super().__init__(cfg, ResidentStore(weights))
        self.h = [[] for _ in range(cfg.n_layers)]
        self.a = [[] for _ in range(cfg.n_layers)]
        self._x = self._g = None

    def linear(self, x, name):
        y = super().linear(x, name)
        if name.endswith("ffn_gate.weight"):
            self._x, self._g = x, y
        elif name.endswith("ffn_up.weight"):
            i = int(name.split(".")[1])
            self.h[i].append(np.asarray(self._x, np.float32))
            self.a[i].append(np.abs(silu(self._g) * y).astype(np.float16))
        return y


def collect(loaded, texts: list[str], n_ctx: int = 256, max_tokens: int = 4096, log=print):
    """Run chunks of n_ctx tokens (one from each text in turn, from its middle) through the reference."""
    from ..runtime.kv_cache import KVCache
    rec = _Recorder(loaded.config, loaded.weights)
    tok = loaded.tokenizer
    chunks, k = [], 0
    ids = [tok.encode(t, add_bos=False) for t in texts]
    while sum(len(c) for c in chunks) < max_tokens and any(len(t) >= n_ctx for t in ids):
        t = ids[k % len(ids)]
        off = len(t) // 3 + (k // len(ids)) * n_ctx
        if off + n_ctx <= len(t):
            chunks.append(t[off:off + n_ctx])
        k += 1
        if k > 64 * len(ids):
            break
    if not chunks:
        raise EdgeLLMError(f"the calibration text has fewer than {n_ctx} tokens per file", "pass longer texts")
    t0 = time.perf_counter()
    for c in chunks:
        rec.forward(np.asarray(c), 0, KVCache(loaded.config, n_ctx), all_logits=False)
    log(f"profile-neurons: {len(chunks)} chunks x {n_ctx} tokens through the reference in {time.perf_counter() - t0:.1f} s")
    return [np.concatenate(h) for h in rec.h], [np.concatenate(a) for a in rec.a]


def fit_predictor(h: np.ndarray, mask: np.ndarray, rank: int, recall: float, ridge: float = 1e-2):
    """Reduced-rank least squares h -> (+1 active / -1 inactive); bias lowered to reach `recall`.

    Returns (A [dim, r], B [r, ffn], bias [ffn], achieved recall, predicted-active fraction).
    """
    mu_h = h.mean(axis=0)
    y = np.where(mask, 1.0, -1.0).astype(np.float32)
    mu_y = y.mean(axis=0)
    x, yc = h - mu_h, y - mu_y
    xtx = x.T @ x
    w = np.linalg.solve(xtx + ridge * len(x) * np.eye(x.shape[1], dtype=np.float32), x.T @ yc)   # [dim, ffn]
    # right singular vectors of the fitted values x @ w, via the small factor R (x^T x = R^T R): (R w)^T (R w)
    r = np.linalg.cholesky(xtx.astype(np.float64) + 1e-6 * np.trace(xtx) / len(xtx) * np.eye(len(xtx))).T
    _, _, vt = np.linalg.svd(r @ w, full_matrices=False)
    v = vt[:rank].T                                                 # [ffn, r]
    a, b = w @ v, v.T
    bias = mu_y - mu_h @ a @ b
    score = h @ a @ b + bias
    # lower the bias by one per-layer offset until `recall` of the truly active neurons are predicted
    tau = float(np.quantile(score[mask], 1.0 - recall)) if mask.any() else 0.0
    bias = bias - tau
    pred = score - tau > 0
    got = float((pred & mask).sum() / max(1, mask.sum()))
    return a.astype(np.float32), b.astype(np.float32), bias.astype(np.float32), got, float(pred.mean())


def profile_neurons(loaded, texts: list[str], sparsity: float = 0.5, rank: int = 32, recall: float = 0.95,
                    n_ctx: int = 256, max_tokens: int = 4096, log=print) -> NeuronProfile:
    """Ranking + thresholds + low-rank predictor for every layer (rank 0: ranking only)."""
    if not 0.0 < sparsity < 1.0:
        raise EdgeLLMError(f"target sparsity {sparsity} is not between 0 and 1", "pass e.g. 0.5")
    hs, acts = collect(loaded, texts, n_ctx, max_tokens, log)
    L, ffn = loaded.config.n_layers, loaded.config.ffn_dim
    ranking = np.zeros((L, ffn), np.int32)
    freq = np.zeros((L, ffn), np.float32)
    thr = np.zeros(L, np.float32)
    pa, pb, pbias, recalls, fracs = [], [], [], [], []
    for i in range(L):
        a = acts[i].astype(np.float32)
        thr[i] = np.quantile(a, sparsity)
        mask = a > thr[i]
        freq[i] = mask.mean(axis=0)
        ranking[i] = np.argsort(-freq[i], kind="stable")
        if rank > 0:
            A, B, bias, rec, frac = fit_predictor(hs[i], mask, rank, recall)
            pa.append(A), pb.append(B), pbias.append(bias), recalls.append(rec), fracs.append(frac)
    meta = {"target_sparsity": sparsity, "measured_sparsity": float(1.0 - freq.mean()), "tokens": int(len(hs[0])),
            "n_ctx": n_ctx, "rank": rank, "target_recall": recall, "definition": "|silu(gate.h)*up.h| > threshold[layer]"}
    if rank > 0:
        meta.update(recall=float(np.mean(recalls)), predicted_fraction=float(np.mean(fracs)),
                    predicted_fraction_per_layer=[round(f, 4) for f in fracs])
        log(f"profile-neurons: sparsity {meta['measured_sparsity']:.3f}, predictor rank {rank}: recall "
            f"{meta['recall']:.3f}, predicts {100 * meta['predicted_fraction']:.1f}% of neurons active (calibration)")
    return NeuronProfile(ranking, freq, thr, np.stack(pa).astype(np.float16) if rank > 0 else None,
                         np.stack(pb).astype(np.float16) if rank > 0 else None,
                         np.stack(pbias) if rank > 0 else None, meta)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--calibration", required=True, help="a .txt file or a directory of .txt files (Hamlet is skipped)")
    p.add_argument("-o", "--output", default=PROFILE_FILE)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--recall", type=float, default=0.95)
    p.add_argument("--tokens", type=int, default=4096)
    a = p.parse_args(argv)
    from ..runtime.loader import load_model
    loaded = load_model(a.model, allow_target_mismatch=True)
    prof = profile_neurons(loaded, calibration_texts(a.calibration), a.sparsity, a.rank, a.recall, max_tokens=a.tokens)
    print(prof.save(a.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
