#!/usr/bin/env python3
"""Decode speed of the tvm-int backend with one optimization on and off, side by side in one process:
alternating rounds (A B A B ...) of a prompt then greedy decode steps, medians, the ratio, and whether both
produced the same logits (they must: every option is the same integer arithmetic).

    python tools/ab_decode.py --bundle smol.w4a8g32 --option token_kernel [--threads 2] [--rounds 8]

Options: token_kernel (one launch for all layers instead of 9 kernel calls per layer), huge_pages (weights in a
transparent-huge-page arena instead of 4 KB pages).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's edgellm, installed or not

from edgellm.runtime.tvm_int_backend import TvmIntBackend  # noqa: E402

OPTIONS = ("token_kernel", "huge_pages")


def decode_tps(be: TvmIntBackend, ids: list[int], gen: int) -> tuple[float, np.ndarray]:
    kv = be.new_cache(len(ids) + gen + 1)
    logits = be.forward(ids, 0, kv)
    t0 = time.perf_counter()
    for i in range(gen):
        logits = be.forward([int(np.argmax(logits[-1]))], len(ids) + i, kv)
    return gen / (time.perf_counter() - t0), logits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="a bundle compiled with --integer-only --backends tvm")
    ap.add_argument("--option", required=True, choices=OPTIONS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args(argv)
    bundle = Path(a.bundle)
    qmodel, library = bundle / "quant" / "model.npz", bundle / "kernels" / "int.so"
    for p in (qmodel, library):
        if not p.is_file():
            print(f"error: {p} does not exist; compile the bundle with --integer-only --backends tvm", file=sys.stderr)
            return 2
    engines = {flag: TvmIntBackend(qmodel, library, threads=a.threads, **{a.option: flag}) for flag in (False, True)}
    ids = [int(t) for t in np.random.default_rng(0).integers(3, engines[True].cfg.vocab_size, a.prompt_tokens)]
    speeds = {flag: [] for flag in engines}
    same = True
    decode_tps(engines[False], ids, 4), decode_tps(engines[True], ids, 4)      # warm up both
    for _ in range(a.rounds):
        outs = {flag: decode_tps(be, ids, a.tokens) for flag, be in engines.items()}
        for flag, (tps, _) in outs.items():
            speeds[flag].append(tps)
        same = same and np.array_equal(outs[False][1], outs[True][1])
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    for flag in (False, True):
        v = speeds[flag]
        print(f"{a.option}={flag!s:5s} decode tok/s: " + " ".join(f"{x:6.1f}" for x in v) +
              f"   median {statistics.median(v):6.1f}")
    pairs = [on / off for off, on in zip(speeds[False], speeds[True])]
    print(f"ratio on/off: {statistics.median(speeds[True]) / statistics.median(speeds[False]):.3f} (medians), "
          f"{statistics.median(pairs):.3f} (median of {len(pairs)} alternating pairs); same logits: {same}; "
          f"{a.threads} threads, {a.prompt_tokens}-token prompt + {a.tokens} tokens, load {load}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
