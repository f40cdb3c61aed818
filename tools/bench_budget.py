"""Benchmark running under a memory budget: decode tok/s, bytes read per token and perplexity.

For each budget (share of the bundle's weight bytes) and each mode: the naive baseline (whole
layers, read in full every token when not resident), neuron streaming without the predictor (hot
neurons resident, every other neuron read every token) and neuron streaming with the predictor +
windowing + prefetch. Decode runs on the real disk with the page cache evicted, and optionally
again under an emulated storage device (labelled EMULATED). Perplexity is llama.cpp-style on a
held-out Hamlet excerpt (calibration never reads Hamlet). --split-devices cpu adds the predictor
configuration with the hot/cold split (hot neurons on a second CPU worker), --direct-io reads with
O_DIRECT, --plot writes tokens/s against budget as a PNG (matplotlib, imported only then).

    python tools/bench_budget.py --bundle B --profile neurons.npz --hamlet .../hamlet_gut.txt --plot budget.png
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from edgellm.runtime.backend import NumpyBackend
from edgellm.runtime.bundle import load_bundle
from edgellm.runtime.memory import PROFILE_FILE, STORAGE_PROFILES, bundle_profile, load_profile, make_budgeted_model
from edgellm.runtime.perplexity import perplexity


class _Scorer:
    """What runtime.perplexity needs from an LLM: a tokenizer and full-sequence logits."""

    def __init__(self, backend, tokenizer, n_ctx):
        self.backend, self.tokenizer, self.n_ctx = backend, tokenizer, n_ctx

    def logits(self, tokens):
        return self.backend.forward(np.asarray(tokens), 0, self.backend.new_cache(self.n_ctx), all_logits=True)


def decode_speed(backend, prompt: list[int], n: int) -> dict:
    kv = backend.new_cache(len(prompt) + n + 1)
    logits = backend.forward(np.asarray(prompt), 0, kv)
    stats = getattr(backend, "stats", None)
    if stats is not None:
        stats.reset()
    tok = int(np.argmax(logits[-1]))
    t = time.perf_counter()
    for j in range(n):
        logits = backend.forward(np.asarray([tok]), len(prompt) + j, kv)
        tok = int(np.argmax(logits[-1]))
    dt = time.perf_counter() - t
    out = {"decode_tok_s": n / dt}
    if stats is not None:
        s = stats.summary()
        out.update(bytes_per_token=s["bytes_per_token"], hit_rate=s["neuron_hit_rate"],
                   loaded_fraction=s["loaded_neuron_fraction"], computed_fraction=s["computed_neuron_fraction"],
                   compute_s=s["compute_s"] / n, io_wait_s=s["io_wait_s"] / n, read_requests=s["read_requests"] / n,
                   storage=s["storage"])
        # I/O time per token each device would need for these reads (a model: bandwidth + per-request latency)
        out["modelled_io_s"] = {k: m.read_seconds(0) * out["read_requests"] + out["bytes_per_token"] / (m.read_mb_s * 1e6)
                                for k, m in STORAGE_PROFILES.items()}
    return out


def plot(rows: list[dict], path: str, key: str = "decode_tok_s", title: str = "decode tokens/s vs memory budget") -> Path:
    """tokens/s against budget, one line per mode (PNG, or SVG/PDF by the file's extension), with matplotlib.

    matplotlib is imported here, with the Agg backend, so the benchmark runs without it unless a plot is asked for.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = list(dict.fromkeys(r["mode"] for r in rows if r["budget"].endswith("%")))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for m in modes:
        pts = sorted((float(r["budget"][:-1]), r[key]) for r in rows if r["mode"] == m and key in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    dense = [r[key] for r in rows if not r["budget"].endswith("%") and key in r]
    if dense:
        ax.axhline(dense[0], color="gray", linestyle="--", label="dense (all weights resident)")
    ax.set_xlabel("memory budget (% of weight bytes)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--profile", help=f"neuron profile (default: the bundle's {PROFILE_FILE})")
    p.add_argument("--hamlet", required=True, help="held-out text for perplexity")
    p.add_argument("--budgets", default="100,75,50,35")
    p.add_argument("--decode", type=int, default=6, help="decode steps timed per configuration")
    p.add_argument("--ppl-ctx", type=int, default=256)
    p.add_argument("--ppl-chunks", type=int, default=1)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--emulate", default="microsd", help="storage device to emulate as well ('' for none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="bench_budget.json")
    p.add_argument("--plot", default="", help="write tokens/s against budget to this PNG (matplotlib)")
    p.add_argument("--split-devices", default="off", help="also run the predictor config with the hot/cold split "
                   "on this second device ('cpu': a CPU worker thread; 'off': skip)")
    p.add_argument("--direct-io", action="store_true", help="read with O_DIRECT instead of buffered + fadvise")
    a = p.parse_args(argv)

    b = load_bundle(a.bundle, verify=False, allow_target_mismatch=True)
    prof = load_profile(a.profile) if a.profile else bundle_profile(a.bundle)
    total = b.weights.stored_bytes()
    text = Path(a.hamlet).read_text(encoding="utf-8", errors="replace")
    ids = b.tokenizer.encode(text[len(text) // 2:], add_bos=False)[:a.ppl_ctx * a.ppl_chunks]
    prompt = b.tokenizer.encode("To be, or not to be, that is the question:", add_bos=False)
    ref = NumpyBackend(b.config, b.weights, threads=a.threads)
    ref.prepare()
    dense = perplexity(_Scorer(ref, b.tokenizer, a.ppl_ctx), ids, a.ppl_ctx, progress=False, add_bos=False)
    rows = [{"budget": "dense (all weights resident, float32)", "mode": "numpy reference", "ppl": dense.ppl,
             **decode_speed(ref, prompt, a.decode)}]
    print(f"# weights {total / 1e6:.2f} MB; {'profile ' + json.dumps({k: v for k, v in prof.meta.items() if 'layer' not in k}) if prof else 'no profile'}")
    print(f"# dense reference: ppl {dense.ppl:.4f} over {dense.n_tokens} scored tokens, {rows[0]['decode_tok_s']:.2f} tok/s")
    configs = [("naive", dict(mode="naive")), ("neuron, no predictor", dict(mode="neuron", profile=prof)),
               (f"neuron + predictor + window {a.window} + prefetch", dict(mode="neuron", predictor=prof, window=a.window))]
    if a.split_devices != "off":
        configs.append((f"same + hot/cold split ({a.split_devices} device)",
                        dict(mode="neuron", predictor=prof, window=a.window, split_devices=a.split_devices)))
    for pct in [float(x) for x in a.budgets.split(",")]:
        for name, kw in configs:
            if kw.get("predictor", 0) is None or (prof is not None and not prof.has_predictor and "predictor" in kw):
                continue
            kw = {**kw, "direct_io": a.direct_io}
            row = {"budget": f"{pct:g}%", "mode": name}
            try:
                t = time.perf_counter()
                be = make_budgeted_model(b, f"{pct}%", threads=a.threads, **kw)
                row["load_s"] = time.perf_counter() - t
            except Exception as e:  # noqa: BLE001 - reported in the table
                row["error"] = str(e).splitlines()[0]
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            row["resident_MB"] = be.store.resident_bytes() / 1e6
            row["float_cache_MB"] = be.store.compute_cache_bytes() / 1e6
            row.update(decode_speed(be, prompt, a.decode))
            r = perplexity(_Scorer(be, b.tokenizer, a.ppl_ctx), ids, a.ppl_ctx, progress=False, add_bos=False)
            row["ppl"], row["ppl_vs_dense"] = r.ppl, r.ppl / dense.ppl - 1
            be.close()
            if a.emulate:
                be = make_budgeted_model(b, f"{pct}%", threads=a.threads, storage=a.emulate, **kw)
                em = decode_speed(be, prompt, a.decode)
                row["emulated"] = {k: em[k] for k in ("decode_tok_s", "bytes_per_token", "io_wait_s", "compute_s", "storage")}
                be.close()
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.plot:
        print(f"# plot: {plot(rows, a.plot)}")
    print("\n| budget | mode | decode tok/s (real disk) | MB read/token | reads/token | hit rate | neurons computed | "
          f"ppl (vs dense) | decode tok/s {a.emulate or ''} (EMULATED) | modelled I/O s/token microSD / eMMC / UFS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['budget']} | {r['mode']} | {r['error']} | | | | | | | |")
            continue
        em = r.get("emulated", {})
        rel = f" ({100 * r['ppl_vs_dense']:+.2f}%)" if "ppl_vs_dense" in r else ""
        io = r.get("modelled_io_s", {})
        print(f"| {r['budget']} | {r['mode']} | {r['decode_tok_s']:.2f} | {r.get('bytes_per_token', 0) / 1e6:.2f} | "
              f"{r.get('read_requests', 0):.0f} | {100 * r.get('hit_rate', 1):.0f}% | "
              f"{100 * r.get('computed_fraction', 1):.0f}% | {r['ppl']:.3f}{rel} | "
              + (f"{em['decode_tok_s']:.2f}" if em else "—") + " | "
              f"{' / '.join(f'{io.get(k, 0):.3f}' for k in ('microsd', 'emmc', 'ufs'))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
