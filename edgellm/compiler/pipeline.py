"""`edgellm compile`: import -> [integer quantization] -> ONNX graph + passes -> TVM kernels -> bundle, timed.

Each stage writes into a scratch directory; the bundle writer copies the results into a bundle that
appears at the destination only when complete. Every option is checked before the first long stage, so
a bad flag fails in a second and leaves nothing behind.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..devices.targets import INTEGER_ONLY_SCHEMES, QUANT_SCHEMES, check_quant, check_toolchain, get_target
from .bundle_writer import write_bundle
from ..errors import EdgeLLMError
from ..runtime.backend import KERNEL_LIBRARY, ONNX_DIR
from ..runtime.bundle import QUANT_MODEL, describe_quant
from ..runtime.intref import QuantConfig
from ..runtime.loader import load_model

ALL_BACKENDS = ("onnxruntime", "tvm", "tvm-relax")
INTEGER_SCHEMES = tuple(q for q in QUANT_SCHEMES if q != "gguf-native")
QUANT_BACKENDS: tuple[str, ...] = ("onnxruntime", "tvm")   # compiled backends built for integer schemes (QUANTIZED STAGES)


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


def quant_config(quant: str = "gguf-native", group_size: int | None = None, asym: bool = False,
                 integer_only: bool = False, kv_int8: bool = False, act: str = "dynamic",
                 calib_tokens: int = 2048, zero: str | None = None) -> QuantConfig | None:
    """The QuantConfig of `--quant` and its options (None for gguf-native), or a clear error naming valid ones."""
    q = str(quant).lower()
    if q == "gguf-native":
        extra = [f for f, on in (("--group-size", group_size is not None), ("--asym", asym),
                                 ("--integer-only", integer_only), ("--kv-int8", kv_int8),
                                 (f"--act {act}", act != "dynamic"), (f"--zero {zero}", zero is not None)) if on]
        if extra:
            raise EdgeLLMError(f"{', '.join(extra)} {'applies' if len(extra) == 1 else 'apply'} only to integer "
                               "quantization, not to --quant gguf-native",
                               f"pass --quant {' or '.join(INTEGER_SCHEMES)}, or drop {', '.join(extra)}")
        return None
    if q not in QUANT_SCHEMES and not re.fullmatch(r"w\d+a4", q):     # w?a4 gets QuantConfig's int4-activation error
        raise EdgeLLMError(f"unknown quantization scheme {quant!r}", f"choose --quant from: {', '.join(QUANT_SCHEMES)}")
    if zero is not None and not asym:
        raise EdgeLLMError(f"--zero {zero} sets the zero point of asymmetric groups", "add --asym, or drop --zero")
    qc = QuantConfig(q, group_size=group_size, symmetric=not asym, zero=zero or "int", act=act,
                     kv_int8=kv_int8 or integer_only, calib_tokens=calib_tokens)
    if qc.a_bits != 8 and integer_only:
        raise EdgeLLMError(f"--integer-only needs int8 activations, and {qc.scheme} keeps float activations",
                           f"use --quant {' or '.join(INTEGER_ONLY_SCHEMES)} with --integer-only, or drop "
                           f"--integer-only ({qc.scheme} then runs in mixed mode)")
    if qc.a_bits != 8 and act != "dynamic":
        raise EdgeLLMError(f"--act {act} sets how int8 activations are scaled, and {qc.scheme} keeps float "
                           "activations", f"drop --act, or use --quant {' or '.join(INTEGER_ONLY_SCHEMES)}")
    return qc


def _calibration_files(calibration) -> tuple[list[Path], int]:
    """(files, header chars to skip): a directory's plays (held-out ones dropped, Gutenberg headers skipped),
    or one text file read whole."""
    from .quantize import calibration_files
    p = Path(calibration)
    if p.is_dir():
        return calibration_files(p), 3000
    if not p.is_file():
        raise EdgeLLMError(f"calibration text {p} does not exist", "pass --calibration FILE_OR_DIR (.txt)")
    return [p], 0


def _check_backends(backends, qc: QuantConfig | None) -> tuple[str, ...]:
    """The compiled backends to build: unknown ones refused; an integer scheme builds only QUANT_BACKENDS."""
    if backends is None:
        return ALL_BACKENDS if qc is None else tuple(b for b in QUANT_BACKENDS if b != "tvm" or qc.a_bits == 8)
    backends = tuple(backends)
    unknown = set(backends) - set(ALL_BACKENDS)
    if unknown:
        raise EdgeLLMError(f"unknown backend(s) {', '.join(sorted(unknown))}",
                           f"choose from: {', '.join(ALL_BACKENDS)}")
    float_only = [b for b in backends if b not in QUANT_BACKENDS]
    if qc is not None and float_only:
        raise EdgeLLMError(f"backend(s) {', '.join(float_only)} are not built for quantized bundles yet (the ONNX "
                           f"graph and TVM kernels are float; --quant {qc.scheme} bundles run on the int backend)",
                           f"drop --backends (or pass --backends \"\"), or compile with --quant gguf-native "
                           f"for {','.join(float_only)}")
    if qc is not None and qc.a_bits != 8 and "tvm" in backends:
        raise EdgeLLMError(f"TVM integer kernels need int8 activations, and {qc.scheme} keeps them float",
                           "use --quant w8a8 or w4a8 for --backends tvm, or --backends onnxruntime for weight-only")
    return backends


def compile_model(model: str | os.PathLike, target: str = "x86-64", out: str | os.PathLike | None = None,
                  backends: tuple[str, ...] | None = None, quant: str = "gguf-native", report: bool = False,
                  with_wheels: bool = False, device_python: str = "3.11", profile_neurons: bool = False,
                  calibration: str | os.PathLike | None = None, sparsity: float = 0.5,
                  neuron_options: dict | None = None,
                  group_size: int | None = None, asym: bool = False, integer_only: bool = False,
                  kv_int8: bool = False, act: str = "dynamic", calib_tokens: int = 2048, zero: str | None = None,
                  progress: bool = False, log=print) -> CompileResult:
    """Compile `model` for `target` into a bundle directory (default: <model name>.<target>.bundle).

    backends None: onnxruntime, tvm and tvm-relax for gguf-native; none for an integer `quant` (w8a8, w4a8,
    w4a16, w8a16), whose quantized model (calibrated on `calibration` text) runs on the runtime's int backend.
    neuron_options: overrides of profile_neurons's defaults (max_tokens, recall, val_fraction) for --profile-neurons.
    """
    t = get_target(target)
    qc = quant_config(quant, group_size, asym, integer_only, kv_int8, act, calib_tokens, zero)
    check_quant(t, "gguf-native" if qc is None else qc.scheme, integer_only)
    backends = _check_backends(backends, qc)
    if (profile_neurons or qc is not None) and calibration is None:
        why = "--profile-neurons" if qc is None else f"--quant {qc.scheme}"
        raise EdgeLLMError(f"{why} needs calibration text",
                           "pass --calibration FILE_OR_DIR (plain .txt; held-out evaluation text is skipped)")
    calib = _calibration_files(calibration) if qc is not None else None
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
        quant_manifest = None
        if qc is not None:
            qm = _quantize(loaded, qc, calibration, calib, progress)
            extra[QUANT_MODEL] = qm.save(scratch / "quant-model.npz")
            quant_manifest = _quant_manifest(qm, integer_only)
            if report:
                from .quantize import format_quant_report
                res.report.extend(format_quant_report(qm.report, quant_manifest["bits_per_weight"],
                                                      quant_manifest["model_bytes"], describe_quant(quant_manifest, sizes=False)))
            stage("quantize")
            # ---- QUANTIZED STAGES: compiled backends for the integer model, reading `qm` and adding their files
            # to `extra` (each listed in QUANT_BACKENDS); _check_backends refuses the float stages below for it.
            if "onnxruntime" in backends:
                from .onnx_quant import export_quant_onnx
                # standard integer ops (MatMulInteger on int8 x int8), float norms/softmax: mixed mode
                export_quant_onnx(qm, scratch / ONNX_DIR / "decode.onnx")
                extra[ONNX_DIR] = scratch / ONNX_DIR
                stage("onnx-quant")
            if "tvm" in backends and qc.a_bits == 8:
                from ..runtime.tvm_int_backend import INT_LIBRARY
                from .tvm_int import build_int_kernels
                # integer-only kernels (int8 matmuls, integer norm/softmax/SiLU/RoPE), bit-identical to intref
                built = build_int_kernels(qm, t.tvm_target, scratch / INT_LIBRARY)
                extra[INT_LIBRARY] = built.path
                if report:
                    res.report.append(f"tvm integer kernels for {t.name}: {len(built.names)} functions")
                stage("tvm-int")
        float_backends = backends if qc is None else ()
        if "onnxruntime" in float_backends:
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
        if "tvm" in float_backends:
            from .tvm_build import build_kernels_report
            built = build_kernels_report(loaded.config, t.tvm_target, scratch / KERNEL_LIBRARY)
            extra[KERNEL_LIBRARY] = built.path
            if report:
                res.report.append(f"tvm kernels for {t.name}: {len(built.names)} functions: {', '.join(built.names)}")
            stage("tvm")
        if "tvm" in float_backends and t.name == "jetson-orin":
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
        if "tvm-relax" in float_backends:
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
            prof = profile(loaded, calibration_texts(calibration), sparsity=sparsity, log=log, **(neuron_options or {}))
            extra["neurons.npz"] = prof.save(scratch / "neurons.npz")
            stage("profile-neurons")
        if with_wheels:
            from .wheels import download_wheels
            download_wheels(t, scratch / "wheels", list(backends), device_python)
            extra["wheels"] = scratch / "wheels"
            stage("wheels")
        res.bundle = write_bundle(loaded, out, t, extra, quant_manifest)
        stage("bundle")
    res.report.append(f"bundle {res.bundle}: {_bundle_bytes(res.bundle) / 2**20:.1f} MiB, "
                      f"compiled in {res.total_seconds:.1f} s "
                      f"({', '.join(f'{k} {v:.1f} s' for k, v in res.stage_seconds.items())})")
    return res


def _quantize(loaded, qc: QuantConfig, calibration, calib: tuple[list[Path], int], progress: bool):
    """Calibration chunks (n_ctx = min(512, the model's context)) -> quantize_model."""
    from .quantize import calibration_chunks, quantize_model
    files, skip = calib
    n_ctx = min(512, loaded.config.context_length)
    try:
        chunks = calibration_chunks(loaded.tokenizer, files, qc.calib_tokens, n_ctx=n_ctx, skip_chars=skip)
    except EdgeLLMError as e:
        more = " (--calib-tokens N sets how many are used: default 2048, at least 256)" if "tokens" in e.problem else ""
        raise EdgeLLMError(f"--calibration {calibration}: {e.problem}", f"{e.fix}{more}") from None
    return quantize_model(loaded.config, loaded.weights, qc, chunks, progress=progress)


def _quant_manifest(qm, integer_only: bool) -> dict:
    """The manifest's quant section for an integer model (runtime.bundle documents the fields)."""
    qc = qm.qconfig
    return {"scheme": qc.scheme, "label": qc.label, "file": QUANT_MODEL, "group_size": qc.group_size,
            "symmetric": qc.symmetric, "act": qc.act, "integer_only": bool(integer_only), "kv_int8": qc.kv_int8,
            "bits_per_weight": round(qm.block_bits_per_weight(), 4), "model_bytes": int(qm.nbytes()),
            "calib_tokens": int(qm.report.get("calib_tokens", 0))}

