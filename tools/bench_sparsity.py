#!/usr/bin/env python3
"""FFN sparsity against perplexity on held-out text: the oracle bound and the neuron predictors.

The numpy reference with each layer's FFN activations masked before ffn_down (masked neurons add
nothing, as in the streaming runtime's sparse FFN, which rounds the same zero-filled vector):
  oracle K   keep, per token and layer, the (1-K) largest |silu(gate.h) * up.h|: what a predictor of
             that size that sees the true activations would keep;
  oracle-down K  the same ranked by |activation| * |ffn_down column| (the size of the neuron's
             contribution to the layer output: a tighter bound);
  threshold P  keep the activations above profile P's per-layer threshold (its definition of active:
             a predictor with perfect recall and precision for P);
  profile P  keep the neurons the profile's low-rank predictor selects from the FFN input (the
             runtime's decode also computes neurons it prefetched on a guess, so it keeps slightly more).
Prints perplexity vs dense and the fraction of neurons kept per token. Profiles can be built here
from one calibration pass (--build SPARSITY:RECALL[:TOKENS],...; TOKENS: the first that many of
the --tokens collected), on the plays except Hamlet.

    python tools/bench_sparsity.py --hamlet .../hamlet_gut.txt --oracle 0.1,0.3,0.5 --profiles a.npz
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edgellm.compiler.profile_neurons import CALIB_TOKENS, build_profile, calibration_texts, collect  # noqa: E402
from edgellm.runtime.kv_cache import KVCache  # noqa: E402
from edgellm.runtime.loader import load_model  # noqa: E402
from edgellm.runtime.memory import load_profile  # noqa: E402
from edgellm.runtime.model import Transformer  # noqa: E402
from edgellm.runtime.perplexity import perplexity  # noqa: E402
from edgellm.runtime.weights import ResidentStore  # noqa: E402


class MaskedFFN(Transformer):
    """The reference with FFN activations masked per token: by `drop` (oracle share), `threshold` (per layer)
    or `profile` (its predictor)."""

    def __init__(self, loaded, drop: float = 0.0, threshold=None, profile=None, by_output: bool = False):
        super().__init__(loaded.config, ResidentStore(loaded.weights))
        self.tokenizer = loaded.tokenizer       # with logits(), what runtime.perplexity needs
        self.drop, self.threshold, self.profile, self._h = drop, threshold, profile, None
        self.by_output = by_output              # rank by |a_j| * |down[:, j]| instead of |a_j|
        self.kept = []                          # per layer call: fraction of neurons kept per token (mean)

    def linear(self, x, name):
        if name.endswith("ffn_gate.weight"):
            self._h = x
        elif name.endswith("ffn_down.weight") and (self.drop > 0 or self.profile is not None
                                                   or self.threshold is not None):
            layer = int(name.split(".")[1])
            if self.profile is not None:
                keep = self.profile.predict(layer, self._h)
            elif self.threshold is not None:
                keep = np.abs(x) > self.threshold[layer]
            else:
                k = int(round(self.drop * x.shape[1]))
                a = np.abs(x) * (np.linalg.norm(self.w.get(name), axis=0) if self.by_output else 1.0)
                keep = a > np.partition(a, k - 1, axis=1)[:, k - 1:k]      # ties at the cut are dropped
            self.kept.append(float(keep.mean()))
            x = np.where(keep, x, np.float32(0.0))
        return super().linear(x, name)

    def logits(self, tokens):
        return self.forward(np.asarray(tokens), 0, KVCache(self.cfg, len(tokens)), all_logits=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hamlet", required=True, help="held-out evaluation text")
    p.add_argument("--ppl-ctx", type=int, default=256)
    p.add_argument("--ppl-chunks", type=int, default=5)
    p.add_argument("--oracle", default="", help="comma-separated shares of neurons to drop exactly, e.g. 0.3,0.5")
    p.add_argument("--oracle-down", default="", help="shares to drop exactly, ranked by |a| * |down column|")
    p.add_argument("--skip-threshold", action="store_true", help="do not run each profile's threshold oracle")
    p.add_argument("--max-files", type=int, default=16, help="calibration files to read (sorted by name)")
    p.add_argument("--profiles", default="", help="comma-separated neuron profiles (.npz) to evaluate")
    p.add_argument("--build", default="", help="profiles to build first, SPARSITY:RECALL[:TOKENS],...")
    p.add_argument("--calibration", help="calibration text for --build (Hamlet is skipped)")
    p.add_argument("--tokens", type=int, default=CALIB_TOKENS, help="calibration tokens for --build")
    p.add_argument("--out-dir", default=".", help="where --build writes its profiles")
    p.add_argument("--json", default="")
    a = p.parse_args()
    loaded = load_model(a.model, allow_target_mismatch=True)
    profiles = [x for x in a.profiles.split(",") if x]
    if a.build:
        hs, acts = collect(loaded, calibration_texts(a.calibration, max_files=a.max_files), max_tokens=a.tokens)
        for spec in a.build.split(","):
            s, r, *t = spec.split(":")
            n = int(t[0]) if t else a.tokens
            prof = build_profile([h[:n] for h in hs], [x[:n] for x in acts], sparsity=float(s), recall=float(r))
            path = Path(a.out_dir) / f"prof_s{s}_rec{r}_t{n}.npz"
            profiles.append(str(prof.save(path)))
            print(f"# built {path}: {json.dumps({k: v for k, v in prof.meta.items() if 'layer' not in k})}", flush=True)
    text = Path(a.hamlet).read_text(encoding="utf-8", errors="replace")
    ids = loaded.tokenizer.encode(text[len(text) // 2:], add_bos=False)[:a.ppl_ctx * a.ppl_chunks]
    runs = [("dense", {})] + [(f"oracle drop {float(d):g}", {"drop": float(d)}) for d in a.oracle.split(",") if d] \
        + [(f"oracle-down drop {float(d):g}", {"drop": float(d), "by_output": True})
           for d in a.oracle_down.split(",") if d] \
        + [(f"{kind} {Path(f).name}", {kind: prof if kind == "profile" else prof.threshold})
           for f in profiles for prof in [load_profile(f)] for kind in ("threshold", "profile")[a.skip_threshold:]]
    rows, dense = [], None
    for name, kw in runs:
        m = MaskedFFN(loaded, **kw)
        r = perplexity(m, ids, a.ppl_ctx, progress=False, add_bos=False)
        dense = dense or r.ppl
        row = {"run": name, "ppl": r.ppl, "ppl_vs_dense": r.ppl / dense - 1, "scored_tokens": r.n_tokens,
               "kept_fraction": float(np.mean(m.kept)) if m.kept else 1.0}
        if "profile" in kw:
            row["meta"] = {k: v for k, v in kw["profile"].meta.items() if "layer" not in k and k != "definition"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print("\n| run | neurons kept per token | skipped | ppl | vs dense |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {100 * r['kept_fraction']:.1f}% | {100 * (1 - r['kept_fraction']):.1f}% | "
              f"{r['ppl']:.3f} | {100 * r['ppl_vs_dense']:+.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
