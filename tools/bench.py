#!/usr/bin/env python3
"""Benchmark edgellm against llama.cpp from a source checkout: `python tools/bench.py --model smollm2-135m`.

Same options as `edgellm bench` (see edgellm/bench.py); results go in docs/BENCHMARKS.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's edgellm, installed or not

from edgellm.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="tools/bench.py"))
