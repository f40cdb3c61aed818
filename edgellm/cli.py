"""The `edgellm` command: run, chat, inspect and perplexity.

Every problem a user can fix ends as one line, `edgellm: error: ...`, and exit status 2, never a
traceback; Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

from .errors import EdgeLLMError
from .hub import DEFAULT_MODEL, REGISTRY, resolve_model


class UsageError(Exception):
    """A bad command line (raised instead of argparse's print-usage-and-exit)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --- shared options -------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def _model_options(p: argparse.ArgumentParser, positional: bool = False) -> None:
    known = ", ".join(sorted(REGISTRY))
    help_ = f"a .gguf file, a Hugging Face model directory, or a known model name ({known}); default {DEFAULT_MODEL}"
    if positional:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL", help=help_)
    else:
        p.add_argument("-m", "--model", default=DEFAULT_MODEL, metavar="PATH|NAME", help=help_)
    p.add_argument("-t", "--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads (default: physical cores)")
    p.add_argument("-c", "--ctx", type=_positive_int, default=None, metavar="N", help="context size in tokens")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="hold at most SIZE of weights in memory (e.g. 60MB or 50%%), streaming the rest from "
                        "the bundle's weights.bin (needs a compiled bundle)")
    p.add_argument("--stream-mode", default="neuron", choices=["naive", "neuron", "sparse"],
                   help="with --memory-budget: naive (whole layers), neuron (per-neuron reads, default) or "
                        "sparse (neurons the bundle's predictor selects; compile with --profile-neurons)")
    p.add_argument("--storage", default=None, choices=["microsd", "emmc", "ufs", "nvme"],
                   help="with --memory-budget: throttle reads to EMULATE this storage device")
    p.add_argument("--split-devices", default=None, choices=["off", "cpu", "inline"],
                   help="with --memory-budget: compute the resident hot neurons on a second device (PowerInfer "
                        "hot/cold split; 'cpu' = a second CPU worker, 'inline' = same thread)")
    p.add_argument("--direct-io", action="store_true",
                   help="with --memory-budget: read streamed weights with O_DIRECT (bypass the page cache)")
    p.add_argument("--backend", default=None,
                   help="numpy (float reference; the default), or for a compiled bundle: tvm, tvm-relax, onnxruntime, "
                        "int (integer model of a --quant bundle; the default for such a bundle), "
                        "tvm-int (compiled integer-only kernels; the default for an --integer-only bundle)")
    p.add_argument("--verbose", action="store_true", help="print loading details")


def _gen_options(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--max-tokens", type=int, default=max_tokens, metavar="N",
                   help=f"tokens to generate (default {max_tokens})")
    g.add_argument("--temperature", "--temp", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="default 40; 0 = off")
    g.add_argument("--top-p", type=float, default=0.95, help="default 0.95; 1 = off")
    g.add_argument("--min-p", type=float, default=0.05, help="default 0.05; 0 = off")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="default 1.0 = off")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=None, metavar="S", help="stop at this text (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating after end-of-sequence")


def _gen_kwargs(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop,
                ignore_eos=args.ignore_eos)


def _load(args, n_ctx: int | None = None):
    from .runtime.llm import LLM
    path = resolve_model(args.model)
    return LLM(path, threads=args.threads, n_ctx=n_ctx or args.ctx, backend=args.backend, verbose=args.verbose,
               memory_budget=args.memory_budget, stream_mode=args.stream_mode, storage=args.storage,
               split_devices=args.split_devices, direct_io=args.direct_io)


def _err(msg: str) -> None:
    print(f"edgellm: {msg}", file=sys.stderr, flush=True)


# --- run ------------------------------------------------------------------------------------------

def cmd_run(args) -> int:
    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise EdgeLLMError("no prompt given", "pass PROMPT as an argument or pipe text on stdin")
        prompt = sys.stdin.read()
    if args.system and not args.chat:
        raise EdgeLLMError("--system only applies with --chat", "add --chat or drop --system")
    llm = _load(args)
    gen = _gen_kwargs(args)
    out = sys.stdout
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        max_tokens = gen.pop("max_tokens")
        for chunk in llm.create_chat_completion(messages, stream=True, max_tokens=max_tokens, **gen):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                out.write(piece)
                out.flush()
    else:
        for piece in llm.stream(prompt, **gen):
            out.write(piece)
            out.flush()
    out.write("\n")
    out.flush()
    r = llm.last_result
    t = r.timings
    _err(f"{len(r.prompt_tokens)} prompt tokens, {len(r.tokens)} generated | "
         f"prefill {t.prefill_tps:.1f} tok/s, decode {t.decode_tps:.1f} tok/s")
    if args.stats:
        import psutil
        rss = psutil.Process().memory_info().rss / 2**20
        _err(f"load {t.load_s:.2f} s, prefill {t.prefill_s:.3f} s, decode {t.decode_s:.3f} s "
             f"({t.decode_steps} steps), finish: {r.finish_reason}, backend {llm.backend.name}, "
             f"threads {llm.threads}, n_ctx {llm.n_ctx}, RSS {rss:.0f} MiB")
        store, stats = getattr(llm.backend, "store", None), getattr(llm.backend, "stats", None)
        if stats is not None and hasattr(store, "describe"):      # memory-budget streaming
            _err(store.describe())
            _err(stats.format())
    return 0


# --- chat -----------------------------------------------------------------------------------------

def cmd_chat(args) -> int:
    llm = _load(args)
    gen = _gen_kwargs(args)
    max_tokens = gen.pop("max_tokens")
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    _err(f"chatting with {llm.config.name or llm.path.name}; /reset clears the history, /exit or Ctrl-D quits")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(base)
            _err("history cleared")
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for chunk in llm.create_chat_completion(messages, stream=True, max_tokens=max_tokens, **gen):
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    reply.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            _err("(interrupted)")
        except EdgeLLMError as e:
            messages.pop()
            _err(f"error: {_one_line(e)} (/reset clears the history)")
            continue
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


# --- inspect --------------------------------------------------------------------------------------

def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _or_dash(v) -> str:
    return "-" if v is None else str(v)


def _file_size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def cmd_inspect(args) -> int:
    from .runtime.loader import load_model
    path = resolve_model(args.model)
    m = load_model(path)
    cfg, store, meta = m.config, m.weights, m.metadata
    infos = [store.info(n) for n in store.names()]
    n_params = sum(math.prod(i.shape) for i in infos)
    stored = sum(i.nbytes for i in infos)
    rows = [
        ("file", f"{path} ({_mib(_file_size(path))})"),
        ("format", m.format),
        ("architecture", cfg.arch),
        ("name", cfg.name or "-"),
        ("layers", cfg.n_layers),
        ("dim", cfg.dim),
        ("heads", f"{cfg.n_heads} (kv heads {cfg.n_kv_heads}, head dim {cfg.head_dim}, GQA group {cfg.n_rep})"),
        ("ffn dim", cfg.ffn_dim),
        ("vocab", cfg.vocab_size),
        ("context", cfg.context_length),
        ("rope", f"base {cfg.rope_base:g}, scale {cfg.rope_scale:g}, layout {'neox' if cfg.rope_neox else 'normal'}, "
                 f"dims {cfg.rope_dim}"),
        ("norm eps", f"{cfg.norm_eps:g}"),
        ("tied embeddings", "yes" if cfg.tied_embeddings else "no"),
        ("attention bias", "yes" if cfg.attn_bias else "no"),
        ("parameters", f"{n_params:,} ({n_params / 1e6:.1f} M)"),
        ("tensors", f"{len(infos)}, {_mib(stored)}"),
        ("bits per weight", f"{8 * stored / n_params:.2f}" if n_params else "-"),
    ]
    tok = m.tokenizer
    tok_model = meta.get("tokenizer.ggml.model") or getattr(tok, "model", None) or "-"
    pre = meta.get("tokenizer.ggml.pre")
    bos, eos = (_or_dash(getattr(tok, k, None)) for k in ("bos_id", "eos_id"))
    rows.append(("tokenizer", f"{tok_model}" + (f" (pre {pre})" if pre else "") +
                 f", bos {bos}, eos {eos}, add bos {'yes' if getattr(tok, 'add_bos', False) else 'no'}"))
    template = getattr(tok, "chat_template", None) or meta.get("tokenizer.chat_template")
    rows.append(("chat template", f"yes ({len(template)} chars)" if template else "no"))
    if m.format == "bundle":
        from .runtime.bundle import bundle_quant, describe_quant, read_manifest
        q = bundle_quant(m)
        rows.append(("quantization", describe_quant(q or read_manifest(path).get("quant") or {})
                     + ("; runs on backend int by default (--backend numpy runs the float weights)" if q else "")))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k + ':':<{width + 2}}{v}")
    hist: Counter = Counter()
    size: Counter = Counter()
    for i in infos:
        hist[i.qtype.name] += 1
        size[i.qtype.name] += i.nbytes
    print("tensor types:")
    for q, c in sorted(hist.items(), key=lambda kv: -size[kv[0]]):
        print(f"  {q:<8}{c:>5} tensors  {_mib(size[q]):>12}")
    if args.tensors:
        w = max(len(i.name) for i in infos)
        print(f"{'name':<{w}}  {'type':<6}  {'shape':<16}  {'bytes':>12}")
        for i in infos:
            shape = "x".join(map(str, i.shape))
            print(f"{i.name:<{w}}  {i.qtype.name:<6}  {shape:<16}  {i.nbytes:>12}")
    return 0


# --- perplexity -----------------------------------------------------------------------------------

def cmd_perplexity(args) -> int:
    from .runtime.perplexity import perplexity
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EdgeLLMError(f"{args.text} is not UTF-8 text ({e.reason} at byte {e.start})",
                           "convert it to UTF-8") from None
    llm = _load(args, n_ctx=args.ctx)
    tokens = llm.tokenize(text, special=False)
    n_chunks = len(tokens) // args.ctx
    if args.max_chunks is not None:
        n_chunks = min(n_chunks, args.max_chunks)
    if n_chunks:
        _err(f"{len(tokens)} tokens, scoring {n_chunks} chunks of {args.ctx}")
    t0 = time.perf_counter()
    r = perplexity(llm, tokens, args.ctx, max_chunks=args.max_chunks, progress=not args.quiet)
    dt = time.perf_counter() - t0
    _err(f"{r.n_tokens} tokens scored in {dt:.1f} s ({r.chunks * args.ctx / dt:.1f} tok/s evaluated)")
    print(f"PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}")
    return 0


# --- main -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgellm", description="On-device LLM inference.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("run", help="generate text from a prompt",
                       description="Stream a completion of PROMPT to stdout.")
    p.add_argument("prompt", nargs="?", metavar="PROMPT", help="prompt text (default: read stdin)")
    _model_options(p)
    _gen_options(p)
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template as a user message")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message (with --chat)")
    p.add_argument("--stats", action="store_true", help="print load time, memory and more timings to stderr")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat",
                       description="Chat in the terminal; /reset clears the history, /exit quits.")
    _model_options(p)
    _gen_options(p, max_tokens=512)
    p.add_argument("--system", default=None, metavar="TEXT", help="system message")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="describe a model file without running it",
                       description="Print a model's architecture, config, tensor types and tokenizer.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"a .gguf file, a Hugging Face directory or a known model name (default {DEFAULT_MODEL})")
    p.add_argument("--tensors", action="store_true", help="also list every tensor (name, type, shape, bytes)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("perplexity", help="perplexity of a text file (llama.cpp's method)",
                       description="Perplexity over non-overlapping chunks, scoring the second half of each, "
                                   "like llama.cpp's llama-perplexity.")
    _model_options(p, positional=True)
    p.set_defaults(ctx=512)
    p.add_argument("--text", "-f", required=True, metavar="FILE", help="UTF-8 text file")
    p.add_argument("--max-chunks", type=_positive_int, default=None, metavar="N", help="score at most N chunks")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("compile", help="compile a model into a deployable bundle for a target",
                       description="Import a model, export ONNX with graph passes, build TVM kernels for the "
                                   "target and write a bundle directory (see `edgellm targets`).")
    p.add_argument("model", metavar="MODEL", help="a .gguf file, a Hugging Face directory or a known model name")
    p.add_argument("--target", default="x86-64", help="target name (default x86-64, the host); see `edgellm targets`")
    p.add_argument("-o", "--output", default=None, metavar="BUNDLE_DIR", help="bundle directory to write")
    p.add_argument("--backends", default=None,
                   help="compiled backends to include, comma-separated (default onnxruntime,tvm,tvm-relax; none "
                        "with an integer --quant, whose bundle runs on the int backend)")
    p.add_argument("--quant", default="gguf-native",
                   help="gguf-native (default: keep the GGUF types) or an integer scheme: w8a8, w4a8 (int8 "
                        "activations), w4a16, w8a16 (weight-only); integer schemes need --calibration")
    q = p.add_argument_group("integer quantization (with --quant w8a8|w4a8|w4a16|w8a16)")
    q.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="w4 schemes: weights per scale group, 32, 64 (default) or 128")
    q.add_argument("--asym", action="store_true", help="w4 schemes: asymmetric groups (4-bit zero points)")
    q.add_argument("--zero", default=None, choices=["int", "fp16"],
                   help="with --asym: 4-bit integer zero points (int, default) or an fp16 group minimum as "
                        "llama.cpp's Q4_1 (fp16: 5.0 bits per weight at --group-size 32)")
    q.add_argument("--integer-only", action="store_true",
                   help="w8a8/w4a8: integer arithmetic after the embedding lookup (int8 KV cache too)")
    q.add_argument("--kv-int8", action="store_true", help="int8 KV cache")
    q.add_argument("--act", default="dynamic", choices=["dynamic", "block", "static"],
                   help="int8 activation scales: per token (dynamic, default), per 32 channels of a token "
                        "(block, as llama.cpp's Q8_0 activations: most accurate), or calibrated per tensor (static)")
    q.add_argument("--calib-tokens", type=_positive_int, default=2048, metavar="N",
                   help="calibration tokens to use (default 2048, at least 256)")
    p.add_argument("--report", action="store_true",
                   help="print per-pass node counts and fused patterns; with --quant, the per-layer quantization error")
    p.add_argument("--with-wheels", action="store_true",
                   help="download the device's Python wheels into the bundle for an offline install")
    p.add_argument("--device-python", default="3.11", help="Python version on the device (with --with-wheels)")
    p.add_argument("--profile-neurons", action="store_true",
                   help="rank FFN neurons and train activation predictors on --calibration text (for "
                        "`run --memory-budget ... --stream-mode sparse`)")
    p.add_argument("--calibration", default=None, metavar="FILE_OR_DIR",
                   help="calibration text (.txt file, or a directory of .txt files; held-out Hamlet is skipped), "
                        "for --quant and --profile-neurons")
    p.add_argument("--sparsity", type=float, default=0.5, help="target FFN sparsity for --profile-neurons")
    p.add_argument("--neuron-tokens", type=_positive_int, default=None, metavar="N",
                   help="calibration tokens for --profile-neurons (default 16384)")
    p.add_argument("--neuron-recall", type=float, default=None, metavar="R",
                   help="share of the truly active FFN neurons the predictor must select on held-out calibration "
                        "chunks (default 0.99)")
    p.add_argument("--neuron-heldout", type=float, default=None, metavar="F",
                   help="share of the calibration chunks held out (not fitted) to set that recall (default 0.25)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("targets", help="list compilation targets and their settings",
                       description="Targets `edgellm compile --target` accepts: CPU, features, cross compiler.")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("bench", help="edgellm and llama.cpp side by side: tokens/s and peak RSS",
                       add_help=False, description="See `edgellm bench --help`.")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def cmd_compile(args) -> int:
    try:
        from .compiler.pipeline import compile_model
    except ImportError as e:
        raise EdgeLLMError(f"the compiler needs its extra dependencies ({e.name} is missing)",
                           "pip install 'edgellm[compiler]'") from None
    backends = None if args.backends is None else tuple(b.strip() for b in args.backends.split(",") if b.strip())
    res = compile_model(args.model, args.target, args.output, backends=backends, quant=args.quant,
                        report=args.report, with_wheels=args.with_wheels, device_python=args.device_python,
                        profile_neurons=args.profile_neurons, calibration=args.calibration, sparsity=args.sparsity,
                        neuron_options={k: v for k, v in (("max_tokens", args.neuron_tokens),
                                                          ("recall", args.neuron_recall),
                                                          ("val_fraction", args.neuron_heldout)) if v is not None},
                        group_size=args.group_size, asym=args.asym, integer_only=args.integer_only,
                        kv_int8=args.kv_int8, act=args.act, calib_tokens=args.calib_tokens, zero=args.zero,
                        progress=True,
                        log=lambda m: print(m, file=sys.stderr))
    for line in res.report:
        print(line)
    print(res.bundle)
    return 0


def cmd_targets(args) -> int:
    from .devices.targets import targets_table
    print(targets_table())
    return 0


def cmd_bench(args) -> int:
    from .bench import main as bench_main
    return bench_main(args.bench_args)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        msg = f"{e.strerror}: {e.filename}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:          # bench has its own parser (edgellm.bench) and its own error handling
        from .bench import main as bench_main
        return bench_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as e:          # --help / --version
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        _err(f"error: {_one_line(e)}")
        return 2
    except (EdgeLLMError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        _err(f"error: {_one_line(e)}")
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:          # `edgellm run ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
