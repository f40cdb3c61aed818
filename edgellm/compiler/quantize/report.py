"""`edgellm compile --quant ... --report`: the quantizer's per-linear error table as text.

quantize_model records, for every linear, the scale migration it chose (SmoothQuant / AWQ / none), the mean
clip ratio, the calibrated input max |x| and the relative output error on calibration tokens; this lays that
out one line per linear, then the worst layers and the model's size, so a bad layer is visible at a glance.
"""
from __future__ import annotations


def format_quant_report(report: dict, bits_per_weight: float, model_bytes: int, label: str | None = None,
                        worst: int = 5) -> list[str]:
    """Lines of the quantization report: header, one row per linear, the `worst` layers, size."""
    layers = list(report.get("layers") or [])
    label = label or report.get("scheme", "?")
    lines = [f"quantization {label}: {len(layers)} linears, calibrated on {report.get('calib_tokens', '?')} tokens"]
    if layers:
        w = max(len("layer"), *(len(r["name"]) for r in layers))
        lines.append(f"  {'layer':<{w}}  {'bits':>4}  {'scales':<10}{'clip':>7}{'act max':>11}{'rel err':>10}")
        for r in layers:        # bits: 8 where mixed precision promoted a linear of a 4-bit scheme
            lines.append(f"  {r['name']:<{w}}  {r.get('bits', '-'):>4}  {r['scales']:<10}{r['clip']:>7.3f}"
                         f"{r['act_max']:>11.3g}{r['rel_err']:>10.5f}")
        bad = sorted(layers, key=lambda r: -r["rel_err"])[:worst]
        lines.append(f"worst {len(bad)}: " + ", ".join(f"{r['name']} {r['rel_err']:.5f}" for r in bad))
    lines.append(f"bits per weight {bits_per_weight:.3f} (transformer blocks, scales included), "
                 f"quantized model {model_bytes / 2**20:.2f} MiB ({model_bytes:,} bytes)")
    return lines
