"""Side-by-side speed and memory benchmark: edgellm vs llama.cpp on the same model, prompt and threads.

Each repetition of each engine runs in a fresh child process, so peak RSS is per engine and one
engine's memory, caches or thread pools never leak into the other's numbers. Repetitions alternate
(A B A B ...) so slow drift of the machine's load hits both engines alike; medians are reported.

The child is this file loaded by path (not `import edgellm`), so a llama.cpp child pays only for
llama_cpp and numpy, not for edgellm's imports. Keep the top-level imports to the standard library.

Issue #5 compares at the same bits per weight (`--pair q4_0|q4_1`: llama.cpp runs that GGUF type, made by
its own quantizer from the F32 weights) and sets targets for the ratios (TARGETS, printed PASS/MISS).
"Load to first token" runs from the child's import of the engine to the first greedy token of a fresh
prompt of the benchmark's length. `--context-sweep` plots tokens/s against context length; `--profile`
says where edgellm's decode time goes (cProfile), so a missed target comes with its reason.
"""
from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import math
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("edgellm", "llama.cpp")
METRICS = ("load_s", "load_to_first_token_s", "warmup_s", "prefill_tps", "decode_tps", "peak_rss_mb")

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


def _shifted(ids: list[int], k: int, vocab: int) -> list[int]:
    """`ids` with every id moved by k: a prompt of the same length that shares no prefix with `ids` (k != 0),
    so a run cannot reuse another run's KV cache (the warm-up uses k=1, like llama-bench's warm-up)."""
    return [(t + k) % vocab for t in ids]


class _EdgeEngine:
    """edgellm behind the calls a benchmark child makes (warm_up, run, profile)."""

    def __init__(self, job: dict):
        t = time.perf_counter()
        from edgellm import LLM
        self.import_s = time.perf_counter() - t
        backend = None if job["backend"] == "auto" else job["backend"]   # None: edgellm's default for the model
        self.llm = LLM(job["model_path"], threads=job["threads"], n_ctx=job["n_ctx"], backend=backend)
        self.backend = getattr(self.llm.backend, "name", job["backend"])

    def _generate(self, ids, n):
        return self.llm.generate(ids, max_tokens=n, temperature=0, ignore_eos=True)

    def warm_up(self, ids: list[int]) -> float:
        """Evaluate a fresh prompt and sample its first token, then one decode step; returns the time the
        first token was ready (perf_counter)."""
        self._generate(ids, 1)
        first = time.perf_counter()
        self._generate(ids, 2)                     # same prompt: KV reused, so one more forward + one decode step
        return first

    def run(self, ids: list[int], gen: int) -> tuple[float, float, list[int]]:
        """(prefill s, decode s, tokens) of a fresh prompt and `gen` single-token decode steps."""
        # gen+1 sampled tokens = gen single-token forward passes, the same count the llama.cpp child times
        r = self._generate(ids, gen + 1)
        tm = r.timings
        if tm.prompt_tokens != len(ids) or tm.decode_steps != gen:
            raise RuntimeError(f"edgellm ran {tm.prompt_tokens} prompt tokens and {tm.decode_steps} decode steps, "
                               f"expected {len(ids)} and {gen}")
        return tm.prefill_s, tm.decode_s, r.tokens[:gen]

    def profile(self, ids: list[int], gen: int, top: int) -> dict:
        """cProfile over `gen` decode steps only (the prompt is evaluated first, outside the profiler)."""
        import cProfile
        import pstats
        tok = self._generate(ids, 1).tokens[0]
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        self._generate(ids + [tok], gen)           # KV reused: gen single-token forward passes
        prof.disable()
        wall = time.perf_counter() - t
        stats = pstats.Stats(prof).stats           # {(file, line, func): (prim calls, calls, tottime, cumtime, ..)}
        rows = [{"function": _func_name(k), "ncalls": v[1], "tottime_s": v[2], "cumtime_s": v[3]}
                for k, v in stats.items()]
        return {"backend": self.backend, "decode_steps": gen,
                "wall_s": wall, "by_tottime": sorted(rows, key=lambda x: -x["tottime_s"])[:top],
                "by_cumtime": sorted(rows, key=lambda x: -x["cumtime_s"])[:top]}


def _func_name(key: tuple) -> str:
    """pstats key -> 'edgellm/runtime/backend.py:120(forward)' or '<built-in method numpy.matmul>'."""
    file, line, func = key
    if file == "~":
        return func
    parts = Path(file).parts
    short = "/".join(parts[parts.index("edgellm"):]) if "edgellm" in parts else Path(file).name
    return f"{short}:{line}({func})"


class _LlamaCppEngine:
    """llama.cpp (llama-cpp-python) behind the same calls, greedy like edgellm's temperature=0."""

    def __init__(self, job: dict):
        t = time.perf_counter()
        import llama_cpp
        import numpy as np
        self.import_s = time.perf_counter() - t
        self.llm = llama_cpp.Llama(model_path=job["model_path"], n_ctx=job["n_ctx"], n_threads=job["threads"],
                                   n_threads_batch=job["threads"], n_batch=512, verbose=False)
        self.backend = "llama.cpp"
        n_vocab = self.llm.n_vocab()
        self._logits = lambda: np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1),
                                                     shape=(n_vocab,))

    def _greedy(self) -> int:                      # argmax of the last logits
        return int(self._logits().argmax())

    def warm_up(self, ids: list[int]) -> float:
        self.llm.reset()
        self.llm.eval(ids)
        tok = self._greedy()
        first = time.perf_counter()
        self.llm.eval([tok])
        self._greedy()
        return first

    def run(self, ids: list[int], gen: int) -> tuple[float, float, list[int]]:
        self.llm.reset()                           # the next eval drops earlier KV entries
        t = time.perf_counter()
        self.llm.eval(ids)
        prefill_s = time.perf_counter() - t
        generated = []
        t = time.perf_counter()
        for _ in range(gen):
            generated.append(self._greedy())
            self.llm.eval([generated[-1]])
        return prefill_s, time.perf_counter() - t, generated


def _speeds(n_prompt: int, gen: int, prefill_s: float, decode_s: float) -> dict:
    return {"prefill_s": prefill_s, "decode_s": decode_s, "prefill_tps": n_prompt / prefill_s if prefill_s else 0.0,
            "decode_tps": gen / decode_s if decode_s else 0.0}


def _child_job(job: dict) -> dict:
    """One child's work: kind "run" (load, time to first token, one timed run), "sweep" (one timed run per
    context length) or "profile" (cProfile over edgellm's decode loop)."""
    t0 = time.perf_counter()                       # "load to first token" counts the engine's import too
    engine = (_LlamaCppEngine if job["engine"] == "llama.cpp" else _EdgeEngine)(job)
    t_loaded = time.perf_counter()
    first = engine.warm_up(job["warm_ids"])        # a same-length prompt: first-use costs are timed apart
    warm_end = time.perf_counter()
    gen = job["gen_tokens"]
    if job["kind"] == "profile":
        return {"profile": engine.profile(job["ids"], gen, job.get("top", 25))}
    if job["kind"] == "sweep":
        points = []
        for p in job["sweep"]:
            prefill_s, decode_s, _ = engine.run(p["ids"], gen)
            points.append({"context": len(p["ids"]), **_speeds(len(p["ids"]), gen, prefill_s, decode_s)})
        return {"backend": engine.backend, "points": points}
    prefill_s, decode_s, generated = engine.run(job["ids"], gen)
    return {"backend": engine.backend, "import_s": engine.import_s, "load_s": t_loaded - t0 - engine.import_s,
            "load_to_first_token_s": first - t0,
            "warmup_s": warm_end - t_loaded, **_speeds(len(job["ids"]), gen, prefill_s, decode_s),
            "generated": generated}


def _child_main(argv: list[str]) -> int:
    """`<bench.py loaded by path> JOB.json OUT.json`: run one engine once, write its measurements."""
    job = json.loads(Path(argv[0]).read_text())
    rss_before = _peak_rss_mb()
    try:
        out = _child_job(job)
    except Exception as e:
        errors = sys.modules.get("edgellm.errors")
        if errors is None or not isinstance(e, errors.EdgeLLMError):
            raise                                  # a bug: let the parent show the traceback
        Path(argv[1]).write_text(json.dumps({"error": str(e)}))   # a user error: pass the message on
        return 3
    out["peak_rss_mb"] = _peak_rss_mb()
    out["rss_before_load_mb"] = rss_before
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


def _write_atomic(path: str | os.PathLike, write, binary: bool = False) -> Path:
    """Call write(file) on a temp file beside `path`, then rename it over `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb" if binary else "x") as f:         # "x", not mkstemp: the file gets the umask's usual mode
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    return _write_atomic(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"))


# --- same bits per weight ------------------------------------------------------------------------
PAIR_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")    # llama.cpp types --pair accepts (LLAMA_FTYPE_MOSTLY_*)
FLOAT_TYPES = {"F32", "F16", "BF16"}
# One llama_model_quantize call in a child process: llama.cpp logs every tensor on the C stderr.
_QUANTIZE = ("import sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
             "p.ftype = getattr(llama_cpp, sys.argv[3]); p.allow_requantize = sys.argv[4] == '1'; "
             "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")


def _gguf_block_matrices(path: Path) -> list:
    """TensorInfo of the transformer blocks' 2-D weights (what bits per weight is counted over)."""
    from edgellm.runtime.gguf_file import open_gguf
    store = open_gguf(path).store
    return _block_matrices(store)


def _block_matrices(store) -> list:
    infos = (store.info(n) for n in store.names() if n.startswith("blk."))
    return [i for i in infos if len(i.shape) == 2]


def _llama_quantize(src: Path, dst: Path, ftype: str, allow_requantize: bool, progress: bool) -> Path:
    """llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize), written to a temp file, renamed."""
    if progress:
        print(f"edgellm bench: llama.cpp quantizes {src.name} -> {dst.name} ...", file=sys.stderr, flush=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        proc = subprocess.run([sys.executable, "-c", _QUANTIZE, str(src), str(tmp), ftype,
                               "1" if allow_requantize else "0"], capture_output=True, text=True)
        if proc.returncode or not tmp.is_file():
            tail = "\n".join((proc.stderr or "").strip().splitlines()[-8:])
            raise _error(f"llama.cpp could not quantize {src} to {ftype} (exit {proc.returncode}):\n{tail}",
                         f"check that {dst.parent} is writable and has room for the file")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def paired_gguf(model_path: str | os.PathLike, qtype: str, progress: bool = False) -> Path:
    """The GGUF llama.cpp runs for `--pair qtype`: the model itself if its block matrices already are `qtype`
    (the shipped Q4_1 file), else llama.cpp's quantization of the model's F32 weights, cached next to it.

    A quantized model's F32 weights are its exact dequantization `<stem>.dequantized-F32.gguf` (the file the
    tests' smollm2_f32_path fixture uses), made with llama.cpp (ALL_F32, allow_requantize) when missing.
    """
    model_path, qtype = Path(model_path), _check_pair(qtype)
    types = {i.qtype.name for i in _gguf_block_matrices(model_path)}
    if types == {qtype}:
        return model_path
    src = model_path
    if not types <= FLOAT_TYPES:
        src = model_path.with_name(f"{model_path.stem}.dequantized-F32.gguf")
        if not src.is_file():
            _llama_quantize(model_path, src, "LLAMA_FTYPE_ALL_F32", True, progress)
    dst = src.with_name(f"{src.stem}.{qtype}.gguf")
    if not dst.is_file():
        _llama_quantize(src, dst, f"LLAMA_FTYPE_MOSTLY_{qtype}", False, progress)
    return dst


def _check_pair(pair: str) -> str:
    q = str(pair).upper()
    if q not in PAIR_TYPES:
        raise _error(f"--pair {pair!r} is not a llama.cpp type the benchmark can pair with",
                     f"choose one of: {', '.join(t.lower() for t in PAIR_TYPES)} (q4_0 = 4.5 bits per weight, "
                     "q4_1 = 5.0)")
    return q


def bits_per_weight(path: str | os.PathLike) -> dict:
    """Bits per weight of the transformer blocks' matrices, scales and minimums included (Q4_0 4.5, Q4_1 5.0).

    A bundle's manifest `quant.bits_per_weight` wins; else the stored tensor types (GGUF, bundle or Hugging Face
    directory).
    """
    from edgellm.runtime.bundle import is_bundle, read_manifest
    from edgellm.runtime.loader import load_model
    path = Path(path)
    if is_bundle(path):
        q = read_manifest(path).get("quant") or {}
        bpw = q.get("bits_per_weight")
        if isinstance(bpw, (int, float)):
            return {"bits_per_weight": float(bpw), "source": "bundle manifest quant.bits_per_weight",
                    "scheme": q.get("scheme")}
        if isinstance(q.get("file"), str):         # an integer model: weights.bin's types are not what runs
            return {"bits_per_weight": None, "source": "the bundle manifest has no quant.bits_per_weight",
                    "scheme": q.get("scheme")}
    infos = _gguf_block_matrices(path) if path.suffix.lower() == ".gguf" else _block_matrices(load_model(path).weights)
    n = sum(math.prod(i.shape) for i in infos)
    types = collections.Counter(i.qtype.name for i in infos)
    return {"bits_per_weight": 8.0 * sum(i.nbytes for i in infos) / n if n else None, "source": "tensor types",
            "scheme": "+".join(sorted(types))}


# --- arguments -----------------------------------------------------------------------------------
def _check_args(model_path: Path, ints: dict, engines) -> None:
    for name, v in ints.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
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


def parse_contexts(spec) -> list[int]:
    """"64,256,512" (or a list of ints) -> sorted distinct positive context lengths; None/"" -> []."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        values = [int(str(x).strip()) for x in items if str(x).strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise _error(f"context sweep {spec!r} is not a comma-separated list of positive token counts",
                     "pass e.g. --context-sweep 64,256,512,1024")
    return sorted(set(values))


def _matplotlib():
    """matplotlib's Figure and Agg canvas (no pyplot, no global backend switch), or a clear error."""
    try:
        import matplotlib  # noqa: F401  (imported first so a missing package is caught here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise _error("matplotlib is not installed, so the tokens/s-against-context plot cannot be drawn",
                     "pip install matplotlib (or pip install 'edgellm[bench]'), or drop --context-sweep") from None
    return Figure, FigureCanvasAgg


def _fits(tokens: int, context_length: int, what: str, fix: str) -> None:
    if tokens > context_length:
        raise _error(f"{what} need {tokens} tokens of context but the model's context length is {context_length}",
                     fix)


# --- the run -------------------------------------------------------------------------------------
def run_bench(model: str = "smollm2-135m", prompt_tokens: int = 64, gen_tokens: int = 128, threads: int = 2,
              reps: int = 3, engines=ENGINES, backend: str = "auto", out_json=None, progress: bool = False,
              timeout: float | None = None, bundle: str | None = None, pair: str | None = None,
              context_sweep=None, sweep_gen_tokens: int = 32, plot=None, profile: bool = False) -> dict:
    """Benchmark `engines` on one model and prompt; returns every rep, the medians, the ratios and the targets.

    `backend` may list several edgellm backends ("auto,numpy,tvm"; "auto" is edgellm's default for the model):
    each becomes its own engine "edgellm:<backend>". `pair` ("q4_0", "q4_1") makes llama.cpp run the model at
    that type (see paired_gguf); edgellm runs `bundle` when given, else the same GGUF as llama.cpp.
    `context_sweep` (e.g. "64,256,512,1024") adds decode tok/s at each context length (a prompt of that many
    tokens, then `sweep_gen_tokens` decode steps) and plots it to `plot` (PNG; default: beside `out_json`, else
    edgellm-bench-context.png). `profile` adds a cProfile of edgellm's decode loop.
    """
    from edgellm.hub import resolve_model, sha256_file
    from edgellm.runtime.loader import load_model

    engines = tuple(engines)
    model_path = resolve_model(model, progress=progress).resolve()
    _check_args(model_path, {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "threads": threads,
                             "reps": reps, "sweep_gen_tokens": sweep_gen_tokens}, engines)
    pair = _check_pair(pair) if pair else None
    contexts = parse_contexts(context_sweep)
    if contexts:
        _matplotlib()                                # fail now, not after minutes of measuring
        plot = Path(plot) if plot else (Path(out_json).with_suffix(".png") if out_json
                                        else Path("edgellm-bench-context.png"))
    if profile and "edgellm" not in engines:
        raise _error("--profile profiles edgellm's decode loop, but edgellm is not among the engines",
                     "add edgellm to --engines or drop --profile")
    loaded = load_model(model_path)
    ctx_len, vocab = loaded.config.context_length, loaded.config.vocab_size
    _fits(prompt_tokens + gen_tokens + 8, ctx_len, f"{prompt_tokens} prompt + {gen_tokens} generated tokens",
          "pass fewer --prompt-tokens or --gen-tokens")
    if contexts:
        _fits(contexts[-1] + sweep_gen_tokens + 8, ctx_len,
              f"the context sweep's longest point ({contexts[-1]} + {sweep_gen_tokens} decode tokens)",
              f"sweep context lengths up to {ctx_len - sweep_gen_tokens - 8}, or pass fewer --sweep-gen-tokens")
    ids = prompt_ids(loaded.tokenizer, prompt_tokens)
    sweep_ids = [prompt_ids(loaded.tokenizer, n) for n in contexts]
    del loaded
    llama_path = paired_gguf(model_path, pair, progress) if pair else model_path
    edge_path = Path(bundle).resolve() if bundle else llama_path
    backends = [b.strip() for b in backend.split(",") if b.strip()]
    per_engine = {}
    for e in engines:
        if e != "edgellm":
            per_engine[e] = {"model_path": str(llama_path), "backend": "llama.cpp"}
            continue
        for b in backends:
            per_engine["edgellm" if len(backends) == 1 else f"edgellm:{b}"] = {"backend": b,
                                                                               "model_path": str(edge_path)}
    engines = tuple(per_engine)
    result = {
        "config": {"model": str(model), "model_path": str(model_path),
                   "model_sha256": sha256_file(model_path)[:16] if model_path.is_file() else None,
                   "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "threads": threads, "reps": reps,
                   "engines": list(engines), "backend": backend, "n_ctx": prompt_tokens + gen_tokens + 8,
                   "pair": pair, "model_paths": {e: j["model_path"] for e, j in per_engine.items()},
                   "context_sweep": contexts, "sweep_gen_tokens": sweep_gen_tokens, "prompt_text": PROMPT_TEXT},
        "machine": {**machine_info(), "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "bits_per_weight": {e: bits_per_weight(j["model_path"]) for e, j in per_engine.items()},
        "runs": {e: [] for e in engines},
    }
    base = {"threads": threads, "timeout": timeout, "progress": progress, "reps": reps}
    busy0, ours0, wall0 = *_busy_cpu_s(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-") as tmp:
        run_job = {"kind": "run", "ids": ids, "warm_ids": _shifted(ids, 1, vocab), "gen_tokens": gen_tokens,
                   "n_ctx": result["config"]["n_ctx"]}
        result["runs"] = _alternate(per_engine, run_job, Path(tmp), **base)
        if contexts:
            sweep_job = {"kind": "sweep", "warm_ids": _shifted(sweep_ids[0], 1, vocab),
                         "sweep": [{"ids": _shifted(s, k + 2, vocab)} for k, s in enumerate(sweep_ids)],
                         "gen_tokens": sweep_gen_tokens, "n_ctx": contexts[-1] + sweep_gen_tokens + 8}
            result["context_sweep"] = summarize_sweep(_alternate(per_engine, sweep_job, Path(tmp), **base))
        if profile:
            edges = {e: j for e, j in per_engine.items() if e.startswith("edgellm")}
            prof = _alternate(edges, {**run_job, "kind": "profile"}, Path(tmp), **{**base, "reps": 1})
            result["profile"] = {e: runs[0]["profile"] for e, runs in prof.items()}
    busy1, ours1, wall1 = *_busy_cpu_s(), time.perf_counter()
    # Cores kept busy by everything else on the machine while the benchmark ran (0 on a quiet machine).
    result["machine"]["other_load_cores"] = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (wall1 - wall0)
    result["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["median"], result["ratios"] = summarize(result["runs"], result["bits_per_weight"])
    result["targets"] = check_targets(result["ratios"])
    if contexts:
        result["context_sweep"]["plot"] = str(plot_context_sweep(result, plot))
    if out_json:
        write_json_atomic(out_json, result)
    return result


def _alternate(per_engine: dict, job: dict, workdir: Path, threads: int, timeout, progress: bool,
               reps: int) -> dict[str, list[dict]]:
    """`reps` children per engine, A B A B ...: slow drift in the machine's load hits every engine alike."""
    runs = {e: [] for e in per_engine}
    for rep in range(reps):
        for e, spec in per_engine.items():
            if progress:
                print(f"edgellm bench: {job['kind']} {rep + 1}/{reps} {e} ...", file=sys.stderr, flush=True)
            runs[e].append(_run_child(e, {**job, **spec, "threads": threads}, workdir,
                                      f"{job['kind']}-{rep}-{e.replace(':', '_')}", timeout))
    return runs


# --- summaries -----------------------------------------------------------------------------------
# Issue #5's targets for edgellm/llama.cpp at the same bits per weight: (metric, op, threshold, label)
TARGETS = (("decode_tps", ">=", 1.3, "decode tok/s"), ("prefill_tps", ">=", 1.0, "prefill tok/s"),
           ("peak_rss_mb", "<=", 1.0, "peak RSS"), ("load_to_first_token_s", "<=", 1.5, "load to first token"),
           ("bits_per_weight", "<=", 1.0, "bits per weight"))


def summarize(runs: dict[str, list[dict]], bpw: dict | None = None) -> tuple[dict, dict]:
    """Per-engine medians of every metric over the reps, and the ratios of those medians."""
    medians = {e: {m: statistics.median(r[m] for r in reps) for m in METRICS} for e, reps in runs.items()}
    for e, b in (bpw or {}).items():
        medians[e]["bits_per_weight"] = b.get("bits_per_weight")
    return medians, ratios(medians)


def ratios(medians: dict) -> dict:
    """edgellm/llama.cpp for every metric (tokens/s: >1 means edgellm is faster; s, MB, bits: >1 means more)."""
    if "llama.cpp" not in medians:
        return {}
    b = medians["llama.cpp"]
    return {f"{e}/llama.cpp": {m: (a[m] / b[m] if a.get(m) is not None and b.get(m) else float("nan"))
                               for m in b if m in a}
            for e, a in medians.items() if e.startswith("edgellm")}


def check_targets(ratios: dict) -> dict:
    """Each ratio next to issue #5's target for it: PASS or MISS (a missing or NaN ratio is a MISS)."""
    out = {}
    for pair, r in ratios.items():
        rows = []
        for metric, op, target, label in TARGETS:
            if metric not in r:
                continue
            v = r[metric]
            ok = math.isfinite(v) and (v >= target if op == ">=" else v <= target)
            rows.append({"metric": metric, "label": label, "ratio": v, "op": op, "target": target,
                         "status": "PASS" if ok else "MISS"})
        out[pair] = rows
    return out


def summarize_sweep(runs: dict[str, list[dict]]) -> dict:
    """Medians per engine and context length of the sweep children's points."""
    median = {}
    for e, reps in runs.items():
        contexts = [p["context"] for p in reps[0]["points"]]
        median[e] = [{"context": n, **{m: statistics.median(r["points"][i][m] for r in reps)
                                       for m in ("prefill_tps", "decode_tps")}} for i, n in enumerate(contexts)]
    return {"contexts": [p["context"] for p in next(iter(median.values()))], "median": median,
            "runs": {e: [r["points"] for r in reps] for e, reps in runs.items()}}


def plot_context_sweep(result: dict, path: str | os.PathLike) -> Path:
    """PNG of decode (and prefill) tokens/s against context length, one line per engine (matplotlib, Agg)."""
    Figure, FigureCanvasAgg = _matplotlib()
    sweep, c = result["context_sweep"], result["config"]
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, metric, label in zip(fig.subplots(1, 2), ("decode_tps", "prefill_tps"),
                                 (f"decode tokens/s ({c['sweep_gen_tokens']} tokens)", "prefill tokens/s")):
        for engine, points in sweep["median"].items():
            ax.plot([p["context"] for p in points], [p[metric] for p in points], marker="o", label=engine)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sweep["contexts"], [str(n) for n in sweep["contexts"]])
        ax.set_xlabel("context length (prompt tokens in the KV cache)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    pair = f", llama.cpp at {c['pair']}" if c.get("pair") else ""
    fig.suptitle(f"{Path(c['model_path']).name}{pair}, {c['threads']} threads, median of {c['reps']} reps")
    return _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)


# --- report --------------------------------------------------------------------------------------
def _table(head: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: " | ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(r, widths)))
    return [fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, rows)]


def format_report(result: dict) -> str:
    """The tables, targets, context sweep and profile as printed by `edgellm bench`."""
    c, mach = result["config"], result["machine"]
    backends = {e: r[0].get("backend") for e, r in result["runs"].items() if r and e != "llama.cpp"}
    lines = [f"model {c['model_path']} (sha256 {c['model_sha256']}), {c['prompt_tokens']}-token prompt, "
             f"{c['gen_tokens']} generated, {c['threads']} threads, median of {c['reps']} reps, "
             f"edgellm backend {c['backend']} ({', '.join(f'{e}: {b}' for e, b in backends.items())})"
             + (f", paired at llama.cpp {c['pair']}" if c.get("pair") else ""),
             f"machine {mach['cpu']}, {mach['logical_cores']} logical cores, {mach['date']}; other processes "
             f"kept {mach['other_load_cores']:.2f} cores busy during the run", ""]
    bpw = result.get("bits_per_weight", {})
    fmt_bpw = lambda e: (f"{bpw[e]['bits_per_weight']:.2f} ({bpw[e]['scheme']}, {bpw[e]['source']})"
                         if e in bpw and bpw[e]["bits_per_weight"] is not None else "unknown")
    lines += _table(("engine", "load s", "load->1st token s", "warm-up s", "prefill tok/s", "decode tok/s",
                     "peak RSS MB"),
                    [(e, f"{m['load_s']:.2f}", f"{m['load_to_first_token_s']:.2f}", f"{m['warmup_s']:.2f}",
                      f"{m['prefill_tps']:.1f}",
                      f"{m['decode_tps']:.1f}", f"{m['peak_rss_mb']:.0f}") for e, m in result["median"].items()])
    lines += ["", "bits per weight of the transformer blocks' matrices, and the file each engine ran:"]
    lines += [f"  {e}: {fmt_bpw(e)}, {c.get('model_paths', {}).get(e, c['model_path'])}" for e in bpw]
    missed = set()
    for pair, rows in result.get("targets", {}).items():
        lines += ["", f"{pair} against issue #5's targets:"]
        for t in rows:
            lines.append(f"  {t['label']:<20} {t['ratio']:7.3g}x   target {t['op']} {t['target']:g}x   {t['status']}")
            if t["status"] == "MISS":
                missed.add(t["label"])
    sweep = result.get("context_sweep")
    if sweep:
        engines = list(sweep["median"])
        lines += ["", f"tokens/s against context length (a prompt of that many tokens, then {c['sweep_gen_tokens']} "
                      f"decode steps): decode tok/s (prefill tok/s)"]
        lines += _table(("context", *engines), [
            (str(n), *(f"{sweep['median'][e][i]['decode_tps']:.1f} ({sweep['median'][e][i]['prefill_tps']:.0f})"
                       for e in engines)) for i, n in enumerate(sweep["contexts"])])
        lines.append(f"plot: {sweep['plot']}")
    for e, prof in result.get("profile", {}).items():
        lines += ["", f"where {e}'s decode time goes ({prof['backend']} backend, cProfile over {prof['decode_steps']} "
                      f"decode steps: {1000 * prof['wall_s'] / prof['decode_steps']:.1f} ms/step under the profiler), "
                      "top functions by own time:"]
        lines += _table(("function", "own s", "share", "cumulative s", "calls"),
                        [(r["function"], f"{r['tottime_s']:.3f}", f"{100 * r['tottime_s'] / prof['wall_s']:.0f}%",
                          f"{r['cumtime_s']:.3f}", str(r["ncalls"])) for r in prof["by_tottime"][:15]])
    if missed:
        lines += ["", f"missed: {', '.join(sorted(missed))}. " + (
            "Where edgellm's decode time goes: the profile above." if result.get("profile")
            else "Run again with --profile to see where edgellm's decode time goes.")]
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
    p.add_argument("--backend", default="auto",
                   help="edgellm backend(s), comma-separated: auto (edgellm's default for the model), numpy, int, "
                        "tvm, tvm-relax, onnxruntime (default auto)")
    p.add_argument("--bundle", default=None, metavar="DIR",
                   help="run edgellm on this compiled bundle of --model (needed for tvm / onnxruntime / int)")
    p.add_argument("--pair", default=None, metavar="TYPE",
                   help="compare at the same bits per weight: llama.cpp runs --model at this type "
                        f"({', '.join(t.lower() for t in PAIR_TYPES)}; made from the F32 weights with llama.cpp's "
                        "quantizer and cached next to the model unless the model already is that type); edgellm "
                        "runs --bundle, or the same file")
    p.add_argument("--context-sweep", default=None, metavar="LIST",
                   help="also measure tokens/s at these context lengths, e.g. 64,256,512,1024, and plot them (PNG)")
    p.add_argument("--sweep-gen-tokens", type=int, default=32, metavar="N",
                   help="decode steps timed at each context length of the sweep (default 32)")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="where the sweep's PNG goes (default: the --json path with .png, else "
                        "edgellm-bench-context.png)")
    p.add_argument("--profile", action="store_true",
                   help="also profile edgellm's decode loop (cProfile, one extra run) and print the top functions")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every rep, medians and machine info here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: list[str] | None = None, prog: str = "edgellm bench") -> int:
    args = build_parser(prog).parse_args(argv)
    from edgellm.errors import EdgeLLMError
    try:
        result = run_bench(args.model, args.prompt_tokens, args.gen_tokens, args.threads, args.reps,
                           tuple(e.strip() for e in args.engines.split(",") if e.strip()), args.backend,
                           args.json, progress=not args.quiet, bundle=args.bundle, pair=args.pair,
                           context_sweep=args.context_sweep, sweep_gen_tokens=args.sweep_gen_tokens, plot=args.plot,
                           profile=args.profile)
    except EdgeLLMError as e:
        print(f"edgellm: error: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        print(f"\nwrote {args.json}")
    return 0
