#!/usr/bin/env python3
"""Where a quantized model's mixed-mode perplexity goes: the same QuantizedModel with one rounding switched at a time.

    python tools/quant_ablation.py --qmodel /tmp/edgellm_quant/SmolLM2-135M-Instruct.Q4_1.w4a8-g32-fmin-block.c2048.npz \
        --variants token/token,token/none,none/none,block/block

A variant is BODY/HEAD: how the block linears' inputs and the lm_head's input are rounded to int8 in mixed mode:
"token" (one scale per token), "block" (one per 32 channels), "none" (float). The weights stay as quantized, so
"none/none" is the weight-only cost. Scored like tools/quant_accuracy.py (same Hamlet tokens and rule), whose
--cache holds the quantized models.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_accuracy import Scorer, default_texts  # noqa: E402

from edgellm.runtime.intref import ACT_BLOCK, IntTransformer, QuantizedModel, fake_quant_tokens  # noqa: E402
from edgellm.runtime.loader import load_model  # noqa: E402
from edgellm.runtime.perplexity import perplexity  # noqa: E402

ROUNDING = {"none": lambda x: x, "token": fake_quant_tokens, "block": lambda x: fake_quant_tokens(x, block=ACT_BLOCK)}


class Ablated(IntTransformer):
    """Mixed mode with the int8 rounding of the linears' inputs (body) and of the head's input chosen separately."""

    def __init__(self, qm: QuantizedModel, body: str, head: str):
        super().__init__(qm, "mixed")
        self.body, self.head_round = ROUNDING[body], ROUNDING[head]

    def _lin(self, x, name):
        return self.body(x) @ self.w[name].T

    def _head_mixed(self, h):
        return self.head_round(h) @ self.w["head"].T


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qmodel", required=True, help="a QuantizedModel .npz (quant/model.npz of a bundle, or the cache)")
    ap.add_argument("--variants", default="token/token,token/none,none/none,block/block")
    ap.add_argument("--model", default=None, help="GGUF for the tokenizer and the float reference (default smollm2-135m)")
    ap.add_argument("--texts", default=default_texts())
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args(argv)
    if args.model is None:
        from edgellm.hub import fetch_model
        args.model = str(fetch_model("smollm2-135m"))
    tok = load_model(args.model).tokenizer
    text = (Path(args.texts) / "hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")
    tokens = tok.encode(text[text.find("SCENE"):])[:args.chunks * args.ctx]
    qm = QuantizedModel.load(args.qmodel)
    print(f"{Path(args.qmodel).name}: mixed mode, {args.chunks} x {args.ctx} Hamlet tokens\n")
    print("| linear inputs | head input | ppl |\n| --- | --- | ---: |")
    for v in args.variants.split(","):
        body, head = v.split("/")
        if body not in ROUNDING or head not in ROUNDING:
            raise SystemExit(f"unknown variant {v!r}: BODY/HEAD from {', '.join(ROUNDING)}")
        r = perplexity(Scorer(Ablated(qm, body, head), tok, args.ctx), tokens, n_ctx=args.ctx,
                       max_chunks=args.chunks, progress=False)
        print(f"| {body} | {head} | {r.ppl:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
