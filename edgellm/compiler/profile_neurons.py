"""`edgellm compile --profile-neurons`: rank FFN neurons and train activation predictors on calibration text.

SwiGLU neurons are never exactly zero, so "active" means |silu(gate.h) * up.h| above a per-layer
threshold chosen so that a target fraction of activations falls below it (CATS / TEAL). Running
calibration text through the numpy reference gives, per layer, each neuron's activation frequency
(the hot-first ranking a budgeted runtime keeps resident) and (FFN input h, active mask) pairs on
which a low-rank linear predictor is fitted by reduced-rank least squares (LLM in a flash uses a
low-rank predictor the same way). Its per-layer bias is then lowered until it recalls `recall` of
the truly active neurons on held-out calibration tokens (a quarter of the chunks, not fitted on).
The result is a NeuronProfile (neurons.npz).

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
# 16384 calibration tokens (4 chunks from each of 16 files: 8 plays, two spellings), recall set on the held-out
# quarter of the chunks: on held-out Hamlet (1270 scored tokens) the rank-32, 50%, 99%-recall predictor then costs
# +0.9% perplexity, against +1.6% with 4096 tokens (docs/BENCHMARKS.md; tools/bench_sparsity.py measures it)
CALIB_TOKENS = 16384


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


def collect(loaded, texts: list[str], n_ctx: int = 256, max_tokens: int = CALIB_TOKENS, log=print):
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


def recall_offset(score: np.ndarray, mask: np.ndarray, recall: float, weight: np.ndarray | None = None) -> float:
    """The score offset above which `recall` of the active entries (weighted: of their activation mass) lie."""
    if not mask.any():
        return 0.0
    if weight is None:
        return float(np.quantile(score[mask], 1.0 - recall))
    s, w = score[mask], weight[mask].astype(np.float64)
    order = np.argsort(s, kind="stable")
    dropped = np.cumsum(w[order]) / w.sum()                 # mass lost when dropping everything up to here
    k = int(np.searchsorted(dropped, 1.0 - recall, side="right"))
    return float(s[order[k - 1]]) if k > 0 else float(s.min()) - 1.0


def fit_predictor(h: np.ndarray, mask: np.ndarray, rank: int, recall: float, ridge: float = 1e-2,
                  val: tuple | None = None, weight: np.ndarray | None = None):
    """Reduced-rank least squares h -> (+1 active / -1 inactive); bias lowered to reach `recall`.

    val: (h, mask, weight) of held-out calibration tokens on which the per-layer bias offset is chosen
    (default: the fitting tokens, whose recall is optimistic); weight: |activation| to make `recall` a
    share of activation mass rather than of the count of active neurons.
    Returns (A [dim, r], B [r, ffn], bias [ffn], achieved recall, predicted-active fraction) on the val tokens.
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
    # the factors as the profile stores them (float16), so the recall is chosen for what the runtime computes
    a, b = (m.astype(np.float16).astype(np.float32) for m in (w @ v, v.T))
    bias = mu_y - mu_h @ a @ b
    hv, mv, wv = val if val is not None else (h, mask, weight)
    proj = hv @ a @ b
    # lower the bias by one per-layer offset until `recall` of the truly active neurons are predicted
    tau = recall_offset(proj + bias, mv, recall, wv)
    bias = (bias - tau).astype(np.float32)
    pred = proj + bias > 0                                          # as NeuronProfile.predict computes it
    got = float((pred & mv).sum() / max(1, mv.sum()))
    return a, b, bias, got, float(pred.mean())


def profile_neurons(loaded, texts: list[str], sparsity: float = 0.5, rank: int = 32, recall: float = 0.99,
                    n_ctx: int = 256, max_tokens: int = CALIB_TOKENS, log=print, val_fraction: float = 0.25,
                    recall_by: str = "count") -> NeuronProfile:
    """Ranking + thresholds + low-rank predictor for every layer (rank 0: ranking only).

    The predictor is fitted on the first (1 - val_fraction) of the calibration tokens and its per-layer
    bias offset chosen on the rest for `recall` (recall_by "count": of active neurons, "mass": of their
    summed |activation|, which weighs a missed large activation more than a missed marginal one).
    """
    if not 0.0 < sparsity < 1.0:
        raise EdgeLLMError(f"target sparsity {sparsity} is not between 0 and 1", "pass e.g. 0.5")
    if not 0.0 < recall <= 1.0:
        raise EdgeLLMError(f"target recall {recall} is not in (0, 1]", "pass e.g. 0.95")
    if not 0.0 <= val_fraction < 1.0:
        raise EdgeLLMError(f"validation fraction {val_fraction} is not in [0, 1)", "pass e.g. 0.25")
    if recall_by not in ("count", "mass"):
        raise EdgeLLMError(f"unknown recall measure {recall_by!r}", 'pass "count" or "mass"')
    hs, acts = collect(loaded, texts, n_ctx, max_tokens, log)
    return build_profile(hs, acts, sparsity, rank, recall, n_ctx, log, val_fraction, recall_by)


def build_profile(hs: list, acts: list, sparsity: float = 0.5, rank: int = 32, recall: float = 0.99, n_ctx: int = 256,
                  log=print, val_fraction: float = 0.25, recall_by: str = "count") -> NeuronProfile:
    """The NeuronProfile from collected per-layer FFN inputs `hs` and |activations| `acts` (see profile_neurons)."""
    L, ffn = len(hs), acts[0].shape[1]
    n_val = (int(len(hs[0]) * val_fraction) // n_ctx) * n_ctx     # whole chunks, so no text is in both parts
    cut = len(hs[0]) - n_val
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
            weight = a if recall_by == "mass" else None
            val = (hs[i][cut:], mask[cut:], None if weight is None else weight[cut:]) if n_val else None
            A, B, bias, rec, frac = fit_predictor(hs[i][:cut], mask[:cut], rank, recall, val=val,
                                                  weight=None if weight is None else weight[:cut])
            pa.append(A), pb.append(B), pbias.append(bias), recalls.append(rec), fracs.append(frac)
    meta = {"target_sparsity": sparsity, "measured_sparsity": float(1.0 - freq.mean()), "tokens": int(len(hs[0])),
            "n_ctx": n_ctx, "rank": rank, "target_recall": recall, "recall_by": recall_by,
            "validation_tokens": n_val, "definition": "|silu(gate.h)*up.h| > threshold[layer]"}
    if rank > 0:
        meta.update(recall=float(np.mean(recalls)), predicted_fraction=float(np.mean(fracs)),
                    predicted_fraction_per_layer=[round(f, 4) for f in fracs], recall_per_layer=recalls)
        log(f"profile-neurons: sparsity {meta['measured_sparsity']:.3f}, predictor rank {rank}: recall "
            f"{meta['recall']:.3f} (count, on {n_val or len(hs[0])} {'held-out ' if n_val else ''}calibration tokens), "
            f"predicts {100 * meta['predicted_fraction']:.1f}% of neurons active")
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
    p.add_argument("--recall", type=float, default=0.99)
    p.add_argument("--tokens", type=int, default=CALIB_TOKENS)
    p.add_argument("--val-fraction", type=float, default=0.25, help="calibration tokens held out to set the recall")
    p.add_argument("--recall-by", choices=["count", "mass"], default="count")
    a = p.parse_args(argv)
    from ..runtime.loader import load_model
    loaded = load_model(a.model, allow_target_mismatch=True)
    prof = profile_neurons(loaded, calibration_texts(a.calibration), a.sparsity, a.rank, a.recall, max_tokens=a.tokens,
                           val_fraction=a.val_fraction, recall_by=a.recall_by)
    print(prof.save(a.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
