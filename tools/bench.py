#!/usr/bin/env python3
"""Benchmark edgellm against llama.cpp from a source checkout: `python tools/bench.py --model smollm2-135m`.

Same options as `edgellm bench` (see edgellm/bench.py); results go in docs/BENCHMARKS.md. Issue #5's figures
(same bits per weight as llama.cpp, targets PASS/MISS, tokens/s against context, decode profile), on a quiet machine:

    python tools/bench.py --pair q4_0 --bundle BUNDLE --reps 5 --context-sweep 64,256,512,1024 --profile \
        --json docs/bench-q4_0.json     # then --pair q4_1 with a <= 5.0 bits/weight bundle
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's edgellm, installed or not

from edgellm.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="tools/bench.py"))
