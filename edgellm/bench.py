"""Side-by-side speed and memory benchmark: edgellm vs llama.cpp on the same model, prompt and threads.

Each repetition of each engine runs in a fresh child process, so peak RSS is per engine and one
engine's memory, caches or thread pools never leak into the other's numbers. Repetitions alternate
(A B A B ...) so slow drift of the machine's load hits both engines alike; medians are reported.

The child is this file loaded by path (not `import edgellm`), so a llama.cpp child pays only for
llama_cpp and numpy, not for edgellm's imports. Keep the top-level imports to the standard library.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("edgellm", "llama.cpp")
METRICS = ("load_s", "warmup_s", "prefill_tps", "decode_tps", "peak_rss_mb")

# A fixed, Shakespeare-free English paragraph (Shakespeare is the evaluation corpus elsewhere).
PROMPT_TEXT = (
    "The river that runs past the old mill is wider than it looks from the bridge. In early spring the "
    "water rises with the melting snow from the hills, and the fields on both banks turn into shallow "
    "lakes where herons wait for fish. Farmers in the valley learned long ago to plant late, after the "
    "floods have passed, and to build their barns on the higher ground near the road. The village school "
    "keeps a record of every flood since the bridge was rebuilt, written in a thick notebook that the "
    "children are allowed to read on rainy afternoons. "
)


# --- child side ---------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    On Linux this is VmHWM, not getrusage's ru_maxrss: ru_maxrss survives exec, so a child would
    inherit the peak of the parent it was spawned from.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024   # bytes on macOS, KiB elsewhere
    except ImportError:   # Windows
        import psutil
        mi = psutil.Process().memory_info()
        return getattr(mi, "peak_wset", mi.rss) / (1 << 20)


def _warm_ids(ids: list[int], vocab: int) -> list[int]:
    """A warm-up prompt of the same length (like llama-bench's warm-up) that shares no prefix with `ids`,
    so the measured run cannot reuse the warm-up's KV cache."""
    return [(t + 1) % vocab for t in ids]


def _child_edgellm(job: dict) -> dict:
    from edgellm import LLM
    ids, gen = job["ids"], job["gen_tokens"]
    t = time.perf_counter()
    llm = LLM(job["model_path"], threads=job["threads"], n_ctx=job["n_ctx"], backend=job["backend"])
    load_s = time.perf_counter() - t
    # Warm-up (a prompt of the same length + 1 decode step): first-use costs are timed apart from the run
    t = time.perf_counter()
    llm.generate(_warm_ids(ids, llm.config.vocab_size), max_tokens=2, temperature=0, ignore_eos=True)
    warmup_s = time.perf_counter() - t
    # gen+1 sampled tokens = gen single-token forward passes, the same count the llama.cpp child times
    r = llm.generate(ids, max_tokens=gen + 1, temperature=0, ignore_eos=True)
    tm = r.timings
    if tm.prompt_tokens != len(ids) or tm.decode_steps != gen:
        raise RuntimeError(f"edgellm ran {tm.prompt_tokens} prompt tokens and {tm.decode_steps} decode steps, "
                           f"expected {len(ids)} and {gen}")
    return {"load_s": load_s, "warmup_s": warmup_s, "prefill_s": tm.prefill_s, "decode_s": tm.decode_s,
            "generated": r.tokens[:gen]}


def _child_llamacpp(job: dict) -> dict:
    import llama_cpp
    import numpy as np
    ids, gen = job["ids"], job["gen_tokens"]
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=job["model_path"], n_ctx=job["n_ctx"], n_threads=job["threads"],
                          n_threads_batch=job["threads"], n_batch=512, verbose=False)
    load_s = time.perf_counter() - t
    n_vocab = llm.n_vocab()

    def greedy() -> int:                           # argmax of the last logits, like edgellm's temperature=0
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())

    t = time.perf_counter()                        # the same warm-up as the edgellm child
    llm.eval(_warm_ids(ids, n_vocab))
    llm.eval([greedy()])
    warmup_s = time.perf_counter() - t
    llm.reset()                                    # the next eval drops the warm-up's KV entries

    t = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t
    generated = []
    t = time.perf_counter()
    for _ in range(gen):
        generated.append(greedy())
        llm.eval([generated[-1]])
    decode_s = time.perf_counter() - t
    return {"load_s": load_s, "warmup_s": warmup_s, "prefill_s": prefill_s, "decode_s": decode_s,
            "generated": generated}


def _child_main(argv: list[str]) -> int:
    """`<bench.py loaded by path> JOB.json OUT.json`: run one engine once, write its measurements."""
    job = json.loads(Path(argv[0]).read_text())
    rss_before = _peak_rss_mb()
    run = _child_llamacpp if job["engine"] == "llama.cpp" else _child_edgellm
    try:
        out = run(job)
    except Exception as e:
        errors = sys.modules.get("edgellm.errors")
        if errors is None or not isinstance(e, errors.EdgeLLMError):
            raise                                  # a bug: let the parent show the traceback
        Path(argv[1]).write_text(json.dumps({"error": str(e)}))   # a user error: pass the message on
        return 3
    out["peak_rss_mb"] = _peak_rss_mb()
    out["rss_before_load_mb"] = rss_before
    out["prefill_tps"] = len(job["ids"]) / out["prefill_s"] if out["prefill_s"] else 0.0
    out["decode_tps"] = job["gen_tokens"] / out["decode_s"] if out["decode_s"] else 0.0
    Path(argv[1]).write_text(json.dumps(out))
    return 0


# Loads this file as a standalone module, so the child does not import the edgellm package up front.
_BOOT = ("import importlib.util as u, sys; s = u.spec_from_file_location('_edgellm_bench_child', sys.argv[1]); "
         "m = u.module_from_spec(s); s.loader.exec_module(m); sys.exit(m._child_main(sys.argv[2:]))")


# --- parent side --------------------------------------------------------------------------------
def _error(problem: str, fix: str | None = None):
    from edgellm.errors import EdgeLLMError
    return EdgeLLMError(problem, fix)


def prompt_ids(tokenizer, n: int) -> list[int]:
    """Exactly `n` ids: PROMPT_TEXT tokenized (with the model's BOS rule), repeated and truncated."""
    ids = tokenizer.encode(PROMPT_TEXT)
    body = tokenizer.encode(PROMPT_TEXT, add_bos=False)
    while len(ids) < n:
        ids += body
    return ids[:n]


def _run_child(engine: str, job: dict, workdir: Path, tag: str, timeout: float | None) -> dict:
    job_path, out_path = workdir / f"{tag}.job.json", workdir / f"{tag}.out.json"
    job_path.write_text(json.dumps({**job, "engine": engine}))
    pkg_root = str(Path(__file__).resolve().parent.parent)   # so the child imports this same edgellm
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p))
    try:
        proc = subprocess.run([sys.executable, "-c", _BOOT, str(Path(__file__).resolve()), str(job_path),
                               str(out_path)], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise _error(f"the {engine} benchmark process took longer than {timeout} s",
                     "pass fewer --gen-tokens or --prompt-tokens, or run on a less loaded machine") from None
    if out_path.exists() and "error" in (out := json.loads(out_path.read_text())):
        raise _error(f"{engine} could not run: {out['error']}")
    if proc.returncode != 0 or not out_path.exists():
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        raise _error(f"the {engine} benchmark process failed (exit {proc.returncode}):\n{tail}",
                     "run it again; if it keeps failing, check the model loads with that engine alone")
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    """`<commit>[+dirty]` of the edgellm checkout being measured, or None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict:
    import psutil
    import edgellm
    return {"cpu": _cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "platform": platform.platform(), "python": platform.python_version(),
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "edgellm_version": edgellm.__version__, "edgellm_git": _git_revision(), "llama_cpp_version": _version("llama-cpp-python"),
            "numpy_version": _version("numpy")}


def _busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds the whole machine spent busy, CPU seconds this process and its children used)."""
    import psutil
    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    try:
        import resource
        ours = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                      resource.getrusage(resource.RUSAGE_CHILDREN)))
    except ImportError:
        ours = sum(psutil.Process().cpu_times()[:2])
    return busy, ours


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write JSON to a temp file beside `path`, then rename it over `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_args(model_path: Path, prompt_tokens, gen_tokens, threads, reps, engines) -> None:
    for name, v in (("prompt_tokens", prompt_tokens), ("gen_tokens", gen_tokens), ("threads", threads),
                    ("reps", reps)):
        if not isinstance(v, int) or v < 1:
            raise _error(f"{name}={v!r} must be a positive integer", f"pass {name} >= 1")
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines or len(set(engines)) != len(engines):
        raise _error(f"engines {list(engines)!r} are not a list of distinct known engines",
                     f"choose from: {', '.join(ENGINES)}")
    if "llama.cpp" in engines:
        import importlib.util
        if importlib.util.find_spec("llama_cpp") is None:
            raise _error("llama-cpp-python is not installed, so llama.cpp cannot be benchmarked",
                         "pip install llama-cpp-python, or pass engines=('edgellm',) / --engines edgellm")
        if not model_path.is_file() or model_path.suffix.lower() != ".gguf":
            raise _error(f"llama.cpp needs a .gguf file but the model is {model_path}",
                         "pass a .gguf model, or benchmark edgellm alone with --engines edgellm")


def run_bench(model: str = "smollm2-135m", prompt_tokens: int = 64, gen_tokens: int = 128, threads: int = 2,
              reps: int = 3, engines=ENGINES, backend: str = "numpy", out_json=None, progress: bool = False,
              timeout: float | None = None, bundle: str | None = None) -> dict:
    """Benchmark `engines` on one model and prompt; returns every rep, the medians and the ratios.

    `backend` may list several edgellm backends ("numpy,tvm,onnxruntime"): each becomes its own engine
    "edgellm:<backend>", all run on `bundle` (a compiled bundle of the same model) when given, while llama.cpp
    runs the .gguf `model`.
    """
    from edgellm.hub import resolve_model, sha256_file
    from edgellm.runtime.loader import load_model

    engines = tuple(engines)
    model_path = resolve_model(model, progress=progress).resolve()
    _check_args(model_path, prompt_tokens, gen_tokens, threads, reps, engines)
    loaded = load_model(model_path)
    ids = prompt_ids(loaded.tokenizer, prompt_tokens)
    n_ctx = prompt_tokens + gen_tokens + 8
    if n_ctx > loaded.config.context_length:
        raise _error(f"{prompt_tokens} prompt + {gen_tokens} generated tokens exceed the model's context "
                     f"length {loaded.config.context_length}", "pass fewer --prompt-tokens or --gen-tokens")
    del loaded
    job = {"model_path": str(model_path), "ids": ids, "gen_tokens": gen_tokens, "threads": threads,
           "n_ctx": n_ctx, "backend": backend}
    backends = [b.strip() for b in backend.split(",") if b.strip()]
    edge_path = str(Path(bundle).resolve()) if bundle else str(model_path)
    per_engine = {}
    for e in engines:
        if e != "edgellm":
            per_engine[e] = {}
            continue
        for b in backends:
            per_engine["edgellm" if len(backends) == 1 else f"edgellm:{b}"] = {"backend": b, "model_path": edge_path}
    engines = tuple(per_engine)
    result = {
        "config": {"model": str(model), "model_path": str(model_path),
                   "model_sha256": sha256_file(model_path)[:16] if model_path.is_file() else None,
                   "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "threads": threads, "reps": reps,
                   "engines": list(engines), "backend": backend, "n_ctx": n_ctx,
                   "prompt_text": PROMPT_TEXT},
        "machine": {**machine_info(), "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "runs": {e: [] for e in engines},
    }
    busy0, ours0, wall0 = *_busy_cpu_s(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-") as tmp:
        for rep in range(reps):                      # A B A B ...: drift in machine load hits both alike
            for e in engines:
                if progress:
                    print(f"edgellm bench: rep {rep + 1}/{reps} {e} ...", file=sys.stderr, flush=True)
                result["runs"][e].append(_run_child(e, {**job, **per_engine[e]}, Path(tmp), f"{rep}-{e}", timeout))
    busy1, ours1, wall1 = *_busy_cpu_s(), time.perf_counter()
    # Cores kept busy by everything else on the machine while the benchmark ran (0 on a quiet machine).
    result["machine"]["other_load_cores"] = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (wall1 - wall0)
    result["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["median"], result["ratios"] = summarize(result["runs"])
    if out_json:
        write_json_atomic(out_json, result)
    return result


def summarize(runs: dict[str, list[dict]]) -> tuple[dict, dict]:
    """Per-engine medians of every metric over the reps, and the ratios of those medians."""
    medians = {e: {m: statistics.median(r[m] for r in reps) for m in METRICS} for e, reps in runs.items()}
    return medians, ratios(medians)


def ratios(medians: dict) -> dict:
    """edgellm/llama.cpp for every metric (tokens/s: >1 means edgellm is faster; s and MB: >1 means more)."""
    if "llama.cpp" not in medians:
        return {}
    b = medians["llama.cpp"]
    return {f"{e}/llama.cpp": {m: (a[m] / b[m] if b[m] else float("nan")) for m in METRICS}
            for e, a in medians.items() if e.startswith("edgellm")}


def format_report(result: dict) -> str:
    """The table and ratio lines as printed by `edgellm bench`."""
    c, mach = result["config"], result["machine"]
    head = ("engine", "load s", "warm-up s", "prefill tok/s", "decode tok/s", "peak RSS MB")
    rows = [(e, f"{m['load_s']:.2f}", f"{m['warmup_s']:.2f}", f"{m['prefill_tps']:.1f}", f"{m['decode_tps']:.1f}",
             f"{m['peak_rss_mb']:.0f}") for e, m in result["median"].items()]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: " | ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(r, widths)))
    lines = [f"model {c['model_path']} (sha256 {c['model_sha256']}), {c['prompt_tokens']}-token prompt, "
             f"{c['gen_tokens']} generated, {c['threads']} threads, median of {c['reps']} reps, "
             f"edgellm backend {c['backend']}",
             f"machine {mach['cpu']}, {mach['logical_cores']} logical cores, {mach['date']}; other processes "
             f"kept {mach['other_load_cores']:.2f} cores busy during the run", "",
             fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, rows)]
    for pair, r in result["ratios"].items():
        lines.append("")
        lines += [f"{pair} {label}: {r[m]:.3g}x" for label, m in
                  (("prefill", "prefill_tps"), ("decode", "decode_tps"), ("load", "load_s"),
                   ("peak RSS", "peak_rss_mb"))]
    return "\n".join(lines)


def build_parser(prog: str = "edgellm bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Benchmark edgellm against llama.cpp (llama-cpp-python) on "
                                "the same model, prompt and thread count; each engine runs in its own process.")
    p.add_argument("--model", "-m", default="smollm2-135m",
                   help="a .gguf file or a known model name (default smollm2-135m)")
    p.add_argument("--prompt-tokens", type=int, default=64, metavar="N", help="prompt length in tokens (default 64)")
    p.add_argument("--gen-tokens", type=int, default=128, metavar="N", help="greedy tokens to decode (default 128)")
    p.add_argument("--threads", "-t", type=int, default=2, metavar="N", help="threads for both engines (default 2)")
    p.add_argument("--reps", type=int, default=3, metavar="N", help="repetitions per engine, alternating (default 3)")
    p.add_argument("--engines", default=",".join(ENGINES), metavar="LIST",
                   help=f"comma-separated engines to run (default {','.join(ENGINES)})")
    p.add_argument("--backend", default="numpy",
                   help="edgellm backend(s), comma-separated: numpy, tvm, tvm-relax, onnxruntime (default numpy)")
    p.add_argument("--bundle", default=None, metavar="DIR",
                   help="run edgellm on this compiled bundle of --model (needed for tvm / onnxruntime)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every rep, medians and machine info here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: list[str] | None = None, prog: str = "edgellm bench") -> int:
    args = build_parser(prog).parse_args(argv)
    from edgellm.errors import EdgeLLMError
    try:
        result = run_bench(args.model, args.prompt_tokens, args.gen_tokens, args.threads, args.reps,
                           tuple(e.strip() for e in args.engines.split(",") if e.strip()), args.backend,
                           args.json, progress=not args.quiet, bundle=args.bundle)
    except EdgeLLMError as e:
        print(f"edgellm: error: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        print(f"\nwrote {args.json}")
    return 0
