#!/usr/bin/env python3
"""Where the tvm-int backend's decode time goes: ms per kernel per token, kernel calls per token, and decode
tok/s, optionally next to llama.cpp on the same GGUF at Q4_0 (4.5 bits per weight), measured alternately in
the same run.

    python tools/profile_tvm_int.py --qmodel M.npz --library int.so [--threads 2] [--tokens 32]
                                    [--llama ~/.cache/edgellm/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf]

The library comes from edgellm.compiler.tvm_int.build_int_kernels. Profiling wraps every kernel call in a
timer (a few microseconds each), so tok/s is measured separately, without the wrappers. Timings mean little
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


def edgellm_decode(be: TvmIntBackend, ids: list[int], gen: int) -> float:
    """Seconds of `gen` greedy decode steps after a prefill of ids (neither timed nor profiled)."""
    kv = be.new_cache(len(ids) + gen + 1)
    logits = be.forward(ids, 0, kv)
    for stat in (be.profile or {}).values():
        stat[:] = [0, 0.0]
    t0 = time.perf_counter()
    for i in range(gen):
        logits = be.forward([int(np.argmax(logits[-1]))], len(ids) + i, kv)
    return time.perf_counter() - t0


def llama_decode(llm, ids: list[int], gen: int) -> float:
    import llama_cpp
    n_vocab = llm.n_vocab()
    llm.reset()
    llm.eval(ids)
    t0 = time.perf_counter()
    for _ in range(gen):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        llm.eval([int(logits.argmax())])
    return time.perf_counter() - t0


def profile(args, ids: list[int]) -> None:
    be = TvmIntBackend(args.qmodel, args.library, args.threads, profile=True)
    edgellm_decode(be, ids, 2)                          # warm-up
    edgellm_decode(be, ids, args.tokens)
    per_tok = {n: (c / args.tokens, s * 1e3 / args.tokens) for n, (c, s) in be.profile.items()}
    total = sum(ms for _, ms in per_tok.values())
    print(f"per decode token ({args.tokens} tokens, {be.threads_used} threads, load {load()}):")
    print(f"  {'kernel':34s} {'calls':>6s} {'ms':>8s} {'%':>6s}")
    for n, (calls, ms) in sorted(per_tok.items(), key=lambda kv: -kv[1][1]):
        print(f"  {n:34s} {calls:6.0f} {ms:8.3f} {100 * ms / total:5.1f}%")
    calls = sum(c for c, _ in per_tok.values())
    kernels = sum(c for n, (c, _) in per_tok.items() if not n.startswith("numpy"))
    print(f"  {'total':34s} {calls:6.0f} {total:8.3f}   ({kernels:.0f} kernel calls per token)")


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
    a = ap.parse_args(argv)
    be = TvmIntBackend(a.qmodel, a.library, a.threads)
    be.prepare()
    a.threads = be.threads_used
    ids = prompt(be.cfg.vocab_size, a.prompt_tokens)
    if not a.no_profile:
        profile(a, ids)
    engines = {"edgellm tvm-int": lambda: edgellm_decode(be, ids, a.tokens)}
    if a.llama:
        import llama_cpp
        from edgellm.bench import paired_gguf
        path = paired_gguf(a.llama, "q4_0")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + a.tokens + 8, n_threads=a.threads,
                              n_threads_batch=a.threads, verbose=False)
        engines[f"llama.cpp {path.name}"] = lambda: llama_decode(llm, ids, a.tokens)
    for run in engines.values():
        run()                                             # warm-up
    times = {n: [] for n in engines}
    for _ in range(a.rounds):
        for n, run in engines.items():
            times[n].append(run())
    print(f"decode tok/s ({a.tokens} tokens after a {len(ids)}-token prompt, {a.threads} threads, median of "
          f"{a.rounds} alternating rounds, load {load()}):")
    for n, ts in times.items():
        print(f"  {n:48s} {a.tokens / statistics.median(ts):8.1f} tok/s   (rounds: "
              + ", ".join(f"{a.tokens / t:.1f}" for t in ts) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
