"""Memory budgets: parse "60MB" / "35%" and compute the minimum resident set a budget must cover.

The budget counts stored weight bytes (the bundle's quantized bytes) held in process memory across
tokens. Some tensors cannot be streamed usefully: the output matrix is read in full for every token
(and so is the token embedding when tied to it; an untied one is read a row per token instead),
norms are tiny, and neuron mode needs ffn_down's per-block shared bits (scales, minimums) to decode
any single down column. Those make up the minimum resident set.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ...errors import EdgeLLMError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SPEC = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*$")


def fmt_bytes(n: int | float) -> str:
    """Decimal megabytes (what `--memory-budget 60MB` means)."""
    return f"{n / 1e6:.2f} MB"


def parse_budget(spec: str | int | float, total_bytes: int) -> int:
    """Budget in bytes from an int (bytes), "60MB"/"60MiB"/"1.5GB"/"500k" or "35%" of `total_bytes`.

    MB/GB are decimal (10^6, 10^9); MiB/GiB binary.
    """
    if isinstance(spec, bool):
        raise EdgeLLMError(f"memory budget {spec!r} is not a size", 'pass e.g. "60MB", "512MiB" or "35%"')
    if isinstance(spec, (int, float)):
        if spec <= 0 or not math.isfinite(spec):
            raise EdgeLLMError(f"memory budget {spec!r} must be a positive number of bytes", 'pass e.g. "60MB" or "35%"')
        return int(spec)
    m = _SPEC.match(str(spec))
    unit = m.group(2).lower() if m else None
    if not m or (unit != "%" and unit not in _UNITS):
        raise EdgeLLMError(f"cannot read memory budget {spec!r}",
                           'write a size such as "60MB", "512MiB", "1.5GB" or a share of the weights such as "35%"')
    value = float(m.group(1))
    if value <= 0:
        raise EdgeLLMError(f"memory budget {spec!r} must be positive", 'pass e.g. "60MB" or "35%"')
    if unit == "%":
        return int(total_bytes * value / 100.0)
    return int(value * _UNITS[unit])


@dataclass
class ResidentMinimum:
    """Bytes that must stay resident, by kind (embeddings/output, norms, ffn_down shared bits, predictor)."""

    parts: dict[str, int] = field(default_factory=dict)
    total_weights: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.parts.items() if v)


def _kind(name: str) -> str:
    if not name.startswith("blk."):
        return "embeddings/output"
    if name.endswith("norm.weight"):
        return "norms"
    if ".ffn_" in name:
        return "ffn"
    return "attention"


def embedding_on_demand(bundle) -> bool:
    """An untied model's token embedding is only indexed (a row per token): it is read by rows, not kept resident."""
    return "token_embd.weight" in bundle and "output.weight" in bundle


def minimum_resident_set(bundle, mode: str, predictor_bytes: int = 0) -> ResidentMinimum:
    """The minimum resident set of a BundleStore for `mode` ("naive" streams whole layers, "neuron" single records).

    naive: tensors outside the layers (output matrix, output norm, and the token embedding when it is tied to
    the output); a layer is streamed as one region.
    neuron: that, plus every layer's norms and ffn_down shared bits, plus the predictor.
    """
    parts = {"embeddings/output": 0}
    total = 0
    rows_only = embedding_on_demand(bundle)
    for n in bundle.names():
        nb = bundle.info(n).nbytes
        total += nb
        if rows_only and n == "token_embd.weight":
            continue
        k = _kind(n)
        if k == "embeddings/output" or (mode == "neuron" and k == "norms"):
            parts[k] = parts.get(k, 0) + nb
    if mode == "neuron":
        parts["ffn_down shared bits"] = sum(int(bundle.ffn_layout(i)["down_shared"]["nbytes"]) for i in bundle.layers)
        parts["predictor"] = int(predictor_bytes)
    return ResidentMinimum(parts, total)


def check_budget(budget: int, minimum: ResidentMinimum, spec=None) -> None:
    """Raise a clear error when `budget` cannot hold the minimum resident set (the message states the minimum)."""
    if budget >= minimum.total:
        return
    pct = 100.0 * minimum.total / minimum.total_weights if minimum.total_weights else 0.0
    given = f"{spec} = {fmt_bytes(budget)}" if spec is not None and str(spec) != str(budget) else fmt_bytes(budget)
    need_mb = math.ceil(minimum.total / 1e6 * 100) / 100
    raise EdgeLLMError(
        f"memory budget {given} is below the minimum resident set of {fmt_bytes(minimum.total)} "
        f"({pct:.1f}% of the {fmt_bytes(minimum.total_weights)} of weights: {minimum.describe()})",
        f"pass --memory-budget {need_mb:.2f}MB or more (or {math.ceil(pct)}%)")
