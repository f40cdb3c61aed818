#!/usr/bin/env python3
"""Decode speed at one budget with the configurations interleaved token by token (fair under changing load).

    python tools/bench_budget_interleaved.py BUNDLE PROFILE.npz 50% 10
"""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edgellm.runtime.bundle import load_bundle  # noqa: E402
from edgellm.runtime.memory import load_profile, make_budgeted_model  # noqa: E402
b = load_bundle(sys.argv[1], verify=False, allow_target_mismatch=True)
prof = load_profile(sys.argv[2]); budget = sys.argv[3]; n = int(sys.argv[4])
cfgs = {"naive": dict(mode="naive"), "neuron": dict(mode="neuron"),
        "neuron+pred+win4": dict(mode="neuron", predictor=prof, window=4),
        "neuron+pred+win4+split": dict(mode="neuron", predictor=prof, window=4, split_devices="cpu"),
        "neuron+split": dict(mode="neuron", split_devices="cpu"),
        "neuron+split inline (1 thread)": dict(mode="neuron", split_devices="inline")}
prompt = b.tokenizer.encode("To be, or not to be, that is the question:", add_bos=False)
st = {}
for k, kw in cfgs.items():
    be = make_budgeted_model(b, budget, threads=1, **kw)
    kv = be.new_cache(len(prompt) + n + 2)
    tok = int(np.argmax(be.forward(np.asarray(prompt), 0, kv)[-1]))
    be.stats.reset()
    st[k] = [be, kv, tok, len(prompt), [], []]
for j in range(n):
    for k, s in st.items():
        be, kv, tok, pos = s[:4]
        w, c = time.perf_counter(), time.process_time()
        tok = int(np.argmax(be.forward(np.asarray([tok]), pos, kv)[-1]))
        s[4].append(time.perf_counter() - w); s[5].append(time.process_time() - c)
        s[2], s[3] = tok, pos + 1
base = np.median(st["naive"][4])
print(f"budget {budget}, {n} decode tokens per config, interleaved; medians")
print("| config | wall s/token | tok/s | vs naive | CPU s/token (all threads) | MB read/token |")
print("|---|---|---|---|---|---|")
for k, s in st.items():
    w, c = np.median(s[4]), np.median(s[5])
    print(f"| {k} | {w:.3f} | {1 / w:.2f} | {base / w:.2f}x | {c:.3f} | {s[0].stats.bytes_per_token / 1e6:.1f} |")
    s[0].close()
