#!/usr/bin/env python3
"""Where the tvm-int backend's time goes: ms per kernel per decode token (and per prompt token of a prefill),
kernel calls per token, and prefill / decode tok/s, optionally next to llama.cpp on the same GGUF at Q4_0
(4.5 bits per weight), measured alternately in the same run.

    python tools/profile_tvm_int.py --qmodel M.npz --library int.so [--threads 2] [--tokens 32]
                                    [--llama ~/.cache/edgellm/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf]

The library comes from edgellm.compiler.tvm_int.build_int_kernels. Profiling wraps every kernel call in a
timer (a few microseconds each) and so times the 9-call plan of a layer (the decode token kernel, one call
for all layers, cannot be split); tok/s is measured separately, without the wrappers and with the token kernel. Timings mean little
on a loaded machine: the load average is printed next to every number.
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


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


def prompt(vocab: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(0).integers(3, vocab, n)]


def _reset(be: TvmIntBackend) -> None:
    for stat in (be.profile or {}).values():
        stat[:] = [0, 0.0]


def edgellm_run(be: TvmIntBackend, ids: list[int], gen: int,
                prefill_profile: dict | None = None) -> tuple[float, float]:
    """Seconds of the prefill of ids and of `gen` greedy decode steps after it. The profile (if any) keeps the
    decode steps only; the prefill's goes to `prefill_profile`."""
    kv = be.new_cache(len(ids) + gen + 1)
    _reset(be)
    t0 = time.perf_counter()
    logits = be.forward(ids, 0, kv)
    t1 = time.perf_counter()
    if prefill_profile is not None:
        prefill_profile.update({n: list(v) for n, v in be.profile.items()})
    _reset(be)
    for i in range(gen):
        logits = be.forward([int(np.argmax(logits[-1]))], len(ids) + i, kv)
    return t1 - t0, time.perf_counter() - t1


def llama_run(llm, ids: list[int], gen: int) -> tuple[float, float]:
    import llama_cpp
    n_vocab = llm.n_vocab()
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    for _ in range(gen):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        llm.eval([int(logits.argmax())])
    return t1 - t0, time.perf_counter() - t1


def table(title: str, prof: dict, tokens: int) -> None:
    per_tok = {n: (c / tokens, s * 1e3 / tokens) for n, (c, s) in prof.items() if c}
    total = sum(ms for _, ms in per_tok.values())
    print(title)
    print(f"  {'kernel':34s} {'calls':>6s} {'ms':>8s} {'%':>6s}")
    for n, (calls, ms) in sorted(per_tok.items(), key=lambda kv: -kv[1][1]):
        print(f"  {n:34s} {calls:6.2f} {ms:8.3f} {100 * ms / total:5.1f}%")
    calls = sum(c for c, _ in per_tok.values())
    kernels = sum(c for n, (c, _) in per_tok.items() if not n.startswith("numpy"))
    print(f"  {'total':34s} {calls:6.1f} {total:8.3f}   ({kernels:.1f} kernel calls per token)")


def profile(args, ids: list[int]) -> None:
    be = TvmIntBackend(args.qmodel, args.library, args.threads, chunk=args.chunk, profile=True)
    edgellm_run(be, ids, 2)                             # warm-up
    pre: dict = {}
    edgellm_run(be, ids, args.tokens, pre)
    table(f"per decode token ({args.tokens} tokens, {be.threads_used} threads, load {load()}):", be.profile,
          args.tokens)
    table(f"per prompt token (prefill of {len(ids)}, chunk {be.chunk}):", pre, len(ids))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/profile_tvm_int.py", description=__doc__.splitlines()[0])
    ap.add_argument("--qmodel", required=True, help="QuantizedModel .npz")
    ap.add_argument("--library", required=True, help="integer kernel library (.so)")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores (llama.cpp's -t)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="alternating measurements per engine")
    ap.add_argument("--llama", help="GGUF for llama.cpp (run at Q4_0, made by edgellm.bench.paired_gguf)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--chunk", type=int, default=32, help="prefill chunk (tokens per kernel call)")
    a = ap.parse_args(argv)
    be = TvmIntBackend(a.qmodel, a.library, a.threads, chunk=a.chunk)
    be.prepare()
    a.threads = be.threads_used
    ids = prompt(be.cfg.vocab_size, a.prompt_tokens)
    if not a.no_profile:
        profile(a, ids)
    engines = {"edgellm tvm-int": lambda: edgellm_run(be, ids, a.tokens)}
    if a.llama:
        import llama_cpp
        from edgellm.bench import paired_gguf
        path = paired_gguf(a.llama, "q4_0")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + a.tokens + 8, n_threads=a.threads,
                              n_threads_batch=a.threads, verbose=False)
        engines[f"llama.cpp {path.name}"] = lambda: llama_run(llm, ids, a.tokens)
    for run in engines.values():
        run()                                             # warm-up
    times = {n: [] for n in engines}
    for _ in range(a.rounds):
        for n, run in engines.items():
            times[n].append(run())
    print(f"tok/s ({len(ids)}-token prompt, then {a.tokens} decode tokens, {a.threads} threads, median of "
          f"{a.rounds} alternating rounds, load {load()}):")
    rate = {}
    for phase, i, n_tok in (("prefill", 0, len(ids)), ("decode", 1, a.tokens)):
        for n, ts in times.items():
            rate[phase, n] = n_tok / statistics.median(t[i] for t in ts)
            print(f"  {phase:8s} {n:48s} {rate[phase, n]:8.1f} tok/s   (rounds: "
                  + ", ".join(f"{n_tok / t[i]:.1f}" for t in ts) + ")")
    if a.llama:
        ours, theirs = list(times)
        print("  ratio edgellm / llama.cpp: " + ", ".join(
            f"{phase} {rate[phase, ours] / rate[phase, theirs]:.2f}x" for phase in ("prefill", "decode")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
