"""`edgellm compile`: import -> ONNX graph + passes -> TVM kernels -> bundle, timing every stage.

Each stage writes into a scratch directory; the bundle writer copies the results into a bundle that
appears at the destination only when complete.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..devices.targets import check_toolchain, get_target
from .bundle_writer import write_bundle
from ..errors import EdgeLLMError
from ..runtime.backend import KERNEL_LIBRARY, ONNX_DIR
from ..runtime.loader import load_model

ALL_BACKENDS = ("onnxruntime", "tvm", "tvm-relax")
QUANT_SCHEMES = ("gguf-native",)
PLANNED_SCHEMES = ("w8a8", "w4a8", "w4a16", "w8a16")   # numerics exist (runtime/intref.py), not yet bundled


@dataclass
class CompileResult:
    bundle: Path
    stage_seconds: dict = field(default_factory=dict)
    report: list[str] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(self.stage_seconds.values())


def _bundle_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def compile_model(model: str | os.PathLike, target: str = "x86-64", out: str | os.PathLike | None = None,
                  backends: tuple[str, ...] = ALL_BACKENDS, quant: str = "gguf-native", report: bool = False,
                  with_wheels: bool = False, device_python: str = "3.11", profile_neurons: bool = False,
                  calibration: str | os.PathLike | None = None, sparsity: float = 0.5, log=print) -> CompileResult:
    """Compile `model` for `target` into a bundle directory (default: <model name>.<target>.bundle)."""
    t = get_target(target)
    unknown = set(backends) - set(ALL_BACKENDS)
    if unknown:
        raise EdgeLLMError(f"unknown backend(s) {', '.join(sorted(unknown))}",
                           f"choose from: {', '.join(ALL_BACKENDS)}")
    if quant in PLANNED_SCHEMES:
        raise EdgeLLMError(f"quantization scheme {quant!r} is not available in edgellm compile yet (its accuracy "
                           "can be measured with tools/quant_accuracy.py)",
                           f"use --quant {QUANT_SCHEMES[0]} (weights keep their GGUF types)")
    if quant not in QUANT_SCHEMES:
        raise EdgeLLMError(f"unknown quantization scheme {quant!r}",
                           f"valid: {', '.join(QUANT_SCHEMES + PLANNED_SCHEMES)} "
                           f"({', '.join(PLANNED_SCHEMES)} are not available in compile yet)")
    if profile_neurons and calibration is None:
        raise EdgeLLMError("--profile-neurons needs calibration text",
                           "pass --calibration FILE_OR_DIR (plain .txt; held-out evaluation text is skipped)")
    if {"tvm", "tvm-relax"} & set(backends):
        check_toolchain(t)                       # fail before any long work if the cross compiler is missing
    res = CompileResult(bundle=Path())
    clock = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        res.stage_seconds[name] = now - clock
        clock = now
        log(f"edgellm compile: {name} done in {res.stage_seconds[name]:.1f} s")

    loaded = load_model(model)
    stage("import")
    out = Path(out) if out else Path(f"{Path(loaded.path).stem}.{t.name}.bundle")
    with tempfile.TemporaryDirectory(prefix=".edgellm-compile-", dir=out.absolute().parent) as scratch:
        scratch = Path(scratch)
        extra: dict[str, Path] = {}
        if "onnxruntime" in backends:
            from .onnx_export import build_onnx, save_onnx
            from .passes import ORT_FUSION_PASSES, format_report, run_passes
            # quantized weights (QDQ) fused into onnxruntime's contrib ops: MatMulNBits, GQA with RoPE, skip-RMSNorm
            graph, reports = run_passes(build_onnx(loaded.config, loaded.weights, "decode", weights_format="qdq"),
                                        ORT_FUSION_PASSES)
            save_onnx(graph, scratch / ONNX_DIR / "decode.onnx")
            extra[ONNX_DIR] = scratch / ONNX_DIR
            if report:
                res.report.append(format_report(reports))
            stage("onnx")
        if "tvm" in backends:
            from .tvm_build import build_kernels_report
            built = build_kernels_report(loaded.config, t.tvm_target, scratch / KERNEL_LIBRARY)
            extra[KERNEL_LIBRARY] = built.path
            if report:
                res.report.append(f"tvm kernels for {t.name}: {len(built.names)} functions: {', '.join(built.names)}")
            stage("tvm")
        if "tvm" in backends and t.name == "jetson-orin":
            from .tvm_build import build_cuda_kernels
            try:      # the GPU kernels as CUDA source + library; the CPU kernels above run either way
                cu = build_cuda_kernels(loaded.config, scratch / "kernels" / "cuda" / "model.so", "sm_87", t.name)
                extra["kernels/cuda"] = cu.path.parent
                res.report.append(f"cuda sm_87 kernels emitted: {len(cu.names)} functions (kernels/cuda/model.cu); "
                                  "the tvm backend does not run them yet")
            except EdgeLLMError as e:
                log(f"edgellm compile: note: {e}")
                res.report.append(f"cuda sm_87 kernels not built: {e}")
            stage("cuda")
        if "tvm-relax" in backends:
            from ..runtime.relax_backend import RELAX_LIBRARY
            from .relax_build import build_relax
            rb = build_relax(loaded.config, t.tvm_target, scratch / RELAX_LIBRARY)
            extra[RELAX_LIBRARY] = rb.path
            if report:
                res.report.append(f"tvm relax for {t.name}: {', '.join(rb.functions)}; {rb.kernels_per_token} kernels "
                                  f"per decode call; FuseOps/FuseTIR fused: {', '.join(rb.fused)}; "
                                  f"residual add + RMSNorm fused by hand")
            stage("tvm-relax")
        if profile_neurons:
            from .profile_neurons import calibration_texts
            from .profile_neurons import profile_neurons as profile
            prof = profile(loaded, calibration_texts(calibration), sparsity=sparsity, log=log)
            extra["neurons.npz"] = prof.save(scratch / "neurons.npz")
            stage("profile-neurons")
        if with_wheels:
            from .wheels import download_wheels
            download_wheels(t, scratch / "wheels", list(backends), device_python)
            extra["wheels"] = scratch / "wheels"
            stage("wheels")
        res.bundle = write_bundle(loaded, out, t, extra)
        stage("bundle")
    res.report.append(f"bundle {res.bundle}: {_bundle_bytes(res.bundle) / 2**20:.1f} MiB, "
                      f"compiled in {res.total_seconds:.1f} s "
                      f"({', '.join(f'{k} {v:.1f} s' for k, v in res.stage_seconds.items())})")
    return res
