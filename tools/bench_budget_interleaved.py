#!/usr/bin/env python3
"""Decode speed at one budget with the configurations interleaved token by token (fair under changing load).

    python tools/bench_budget_interleaved.py BUNDLE PROFILE.npz[,PROFILE2.npz...] 50% 10 [--baseline OLD_EDGELLM_DIR]
        [--configs naive,neuron,neuron+pred+win4]

Several profiles (comma-separated) repeat the predictor configurations once per profile, named after the
file; --configs keeps only the named configurations (default: all). The table also gives the share of
FFN neurons each configuration computed per decode token (the rest are skipped).

--baseline adds the naive configuration run by another copy of the edgellm package (e.g. the previous
commit's: `git archive HEAD~1 edgellm | tar -x -C /tmp/old`, then --baseline /tmp/old/edgellm), imported
under another name in the same process, so old and new code share the load token by token.
"""
import argparse
import importlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edgellm.runtime.bundle import load_bundle  # noqa: E402
from edgellm.runtime.memory import load_profile, make_budgeted_model  # noqa: E402


def baseline_package(src: str):
    """Import the edgellm package at `src` as `edgellm_baseline` (its runtime imports are relative)."""
    tmp = Path(tempfile.mkdtemp(prefix="edgellm-baseline-"))
    shutil.copytree(src, tmp / "edgellm_baseline")
    sys.path.insert(0, str(tmp))
    return tuple(importlib.import_module(f"edgellm_baseline.runtime.{m}") for m in ("bundle", "memory"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("profile", help="neuron profile(s), comma-separated")
    p.add_argument("budget")
    p.add_argument("tokens", type=int)
    p.add_argument("--baseline", help="another edgellm package directory: adds its naive mode as a configuration")
    p.add_argument("--configs", default="", help="comma-separated configuration names to run (default: all)")
    a = p.parse_args()
    b = load_bundle(a.bundle, verify=False, allow_target_mismatch=True)
    files = a.profile.split(",")
    cfgs = {"naive": dict(mode="naive"), "neuron": dict(mode="neuron")}
    for f in files:
        prof, tag = load_profile(f), "" if len(files) == 1 else f" [{Path(f).stem}]"
        cfgs[f"neuron+pred+win4{tag}"] = dict(mode="neuron", predictor=prof, window=4)
        cfgs[f"neuron+pred+win4 no guess{tag}"] = dict(mode="neuron", predictor=prof, window=4, guess=False)
        cfgs[f"neuron+pred+win4+split{tag}"] = dict(mode="neuron", predictor=prof, window=4, split_devices="cpu")
    cfgs.update({"neuron+split": dict(mode="neuron", split_devices="cpu"),
                 "neuron+split inline (1 thread)": dict(mode="neuron", split_devices="inline")})
    if a.configs:
        keep = a.configs.split(",")
        cfgs = {k: v for k, v in cfgs.items() if k == "naive" or k.split(" [")[0] in keep}
    makers = {k: (b, make_budgeted_model) for k in cfgs}
    if a.baseline:
        old_bundle, old_memory = baseline_package(a.baseline)
        cfgs = {"naive (baseline code)": dict(mode="naive"), **cfgs}
        makers["naive (baseline code)"] = (old_bundle.load_bundle(a.bundle, verify=False, allow_target_mismatch=True),
                                           old_memory.make_budgeted_model)
    prompt = b.tokenizer.encode("To be, or not to be, that is the question:", add_bos=False)
    st = {}
    for k, kw in cfgs.items():
        bundle, make = makers[k]
        be = make(bundle, a.budget, threads=1, **kw)
        kv = be.new_cache(len(prompt) + a.tokens + 2)
        tok = int(np.argmax(be.forward(np.asarray(prompt), 0, kv)[-1]))
        be.stats.reset()
        st[k] = [be, kv, tok, len(prompt), [], []]
    for j in range(a.tokens):
        for k, s in st.items():
            be, kv, tok, pos = s[:4]
            w, c = time.perf_counter(), time.process_time()
            tok = int(np.argmax(be.forward(np.asarray([tok]), pos, kv)[-1]))
            s[4].append(time.perf_counter() - w)
            s[5].append(time.process_time() - c)
            s[2], s[3] = tok, pos + 1
    base = np.median(st["naive"][4])
    old = np.median(st["naive (baseline code)"][4]) if a.baseline else None
    print(f"budget {a.budget}, {a.tokens} decode tokens per config, interleaved; medians")
    print("| config | wall s/token | tok/s | vs naive | " + ("vs baseline naive | " if old else "")
          + "CPU s/token (all threads) | MB read/token | neurons computed/token |")
    print("|---|---|---|---|---|---|---|" + ("---|" if old else ""))
    for k, s in st.items():
        w, c = np.median(s[4]), np.median(s[5])
        print(f"| {k} | {w:.3f} | {1 / w:.2f} | {base / w:.2f}x | " + (f"{old / w:.2f}x | " if old else "")
              + f"{c:.3f} | {s[0].stats.bytes_per_token / 1e6:.1f} | {100 * s[0].stats.computed_fraction:.1f}% |")
        s[0].close()


if __name__ == "__main__":
    main()
