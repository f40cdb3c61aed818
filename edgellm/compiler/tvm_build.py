"""Compile a model's per-op kernels with Apache TVM (TE + hand TensorIR schedules) into one shared library.

The kernels are float32, each built twice: for one decode token (fixed shapes) and for a prefill chunk
of T tokens (T symbolic): y = x @ W.T for each distinct weight shape, RMSNorm, SwiGLU, RoPE and causal
GQA attention over the KV cache. Hand schedules (parallel + vectorize) keep the whole build to seconds
(dlight's CPU rules take minutes). The runtime side (edgellm.runtime.tvm_backend) loads the library with
only the TVM runtime; the two sides share the kernel names and a config signature from there.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..devices import targets
from ..errors import EdgeLLMError
from ..runtime.config import ModelConfig
from ..runtime.tvm_backend import kernel_names, matmul_shapes


def _tvm():
    try:
        import tvm
        from tvm import te  # noqa: F401
        import tvm.s_tir  # noqa: F401
    except ImportError as e:
        raise EdgeLLMError(f"the TVM compiler is not installed ({e})",
                           "pip install 'apache-tvm==0.27.*' (the edgellm[compiler] extra)") from None
    return tvm


def host_target() -> dict:
    """The TVM target dict of this machine (edgellm.devices.targets' host target, features detected)."""
    return dict(targets.host_target().tvm_target)


def resolve_target(target: str | dict | targets.Target) -> dict:
    """A target name (`edgellm targets`), a Target, or a TVM target dict -> TVM target dict."""
    if isinstance(target, dict):
        return dict(target)
    return dict(targets.get_target(target).tvm_target)


def export_atomic(lib, out_path: Path, cc: str | None) -> None:
    """Export a compiled TVM module to out_path via a temp file, so a half-written library never appears."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp.so")
    try:
        lib.export_library(str(tmp), **({"cc": cc} if cc else {}))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def cross_compiler(target: dict) -> str | None:
    """The C compiler that links a library for TVM target `target`; None when the host's own will do."""
    triple = str(target.get("mtriple", ""))
    if not triple:
        return None
    arch = targets.normalize_arch(triple.split("-")[0])
    android = "android" in triple
    if arch == targets.normalize_arch(platform.machine()) and android == targets._is_android():
        return None
    for t in targets.TARGETS.values():       # the named targets know their compilers and Debian packages
        if t.triple == triple.rstrip("0123456789") and t.cross_cc:
            return targets.check_toolchain(t)
    raise EdgeLLMError(f"no cross compiler is known for target triple {triple!r}",
                       f"use one of the targets {', '.join(targets.TARGETS)} (see `edgellm targets`)")


# ---------------------------------------------------------------- kernels (TE compute + schedule)

def _rows(T):
    """Row count of a kernel: 1 (decode, loops fold away) or a symbolic T (prefill chunks of any length)."""
    from tvm import te
    return te.var("T") if T is None else T


def _matmul(N: int, K: int, T=1, cpu: bool = True, lanes: int = 16, rows: int = 4):
    """y[T, N] = x[T, K] @ w[N, K].T. CPU schedule: blocks of `rows` weight rows split over threads, each
    block reused for every token row while in cache, the K reduction vectorized by rfactor into `lanes`."""
    from tvm import te
    import tvm.s_tir as s_tir
    T = _rows(T)
    x = te.placeholder((T, K), "float32", name="x")
    w = te.placeholder((N, K), "float32", name="w")
    k = te.reduce_axis((0, K), name="k")
    y = te.compute((T, N), lambda t, n: te.sum(x[t, k] * w[n, k], axis=k), name="y")
    if not cpu:
        return te.create_prim_func([x, w, y])
    sch = s_tir.Schedule(te.create_prim_func([x, w, y]))
    b = sch.get_sblock("y")
    _, n, kk = sch.get_loops(b)
    if K % lanes:
        lanes = 1
    if N % rows:
        rows = 1
    _, ki = sch.split(kk, [None, lanes])
    rf = sch.rfactor(ki, 2)
    t, n, ko, ki = sch.get_loops(rf)
    no, ni = sch.split(n, [None, rows])
    sch.reorder(no, t, ni, ko, ki)
    sch.parallel(no)
    sch.vectorize(ki)
    sch.reverse_compute_at(b, ni)
    return sch.mod["main"]


def _rms_norm(D: int, eps: float, T=1):
    """y = x / sqrt(mean(x^2) + eps) * w, for each of T rows of D."""
    from tvm import te
    T = _rows(T)
    x = te.placeholder((T, D), "float32", name="x")
    w = te.placeholder((D,), "float32", name="w")
    k = te.reduce_axis((0, D), name="k")
    ss = te.compute((T,), lambda t: te.sum(x[t, k] * x[t, k], axis=k), name="ss")
    y = te.compute((T, D), lambda t, i: x[t, i] / te.sqrt(ss[t] / float(D) + eps) * w[i], name="y")
    return te.create_prim_func([x, w, y])


def _swiglu(F: int, T=1):
    """out = silu(g) * u = g / (1 + exp(-g)) * u."""
    from tvm import te
    T = _rows(T)
    g = te.placeholder((T, F), "float32", name="g")
    u = te.placeholder((T, F), "float32", name="u")
    y = te.compute((T, F), lambda t, i: g[t, i] / (1.0 + te.exp(-g[t, i])) * u[t, i], name="y")
    return te.create_prim_func([g, u, y])


def _rope(H: int, d: int, rd: int, neox: bool, T=1):
    """Rotate x[T, H*d] (H heads of d; row t at position pos + t) with cos/sin tables [n_ctx, rd/2].

    Normal layout rotates pairs (2i, 2i+1), NeoX pairs (i, i + rd/2); dims past rd pass through.
    Index clamps keep the untaken branch of each select inside the buffers.
    """
    from tvm import te
    T = _rows(T)
    x = te.placeholder((T, H * d), "float32", name="x")
    n_ctx = te.var("n_ctx")
    cos = te.placeholder((n_ctx, rd // 2), "float32", name="cos")
    sin = te.placeholder((n_ctx, rd // 2), "float32", name="sin")
    pos = te.var("pos")
    half = rd // 2

    def f(t, n):
        h, j = n // d, n % d
        base = h * d
        if neox:
            i = te.min(te.if_then_else(j < half, j, j - half), half - 1)
            c, s = cos[pos + t, i], sin[pos + t, i]
            a = x[t, base + i]
            b = x[t, base + te.min(i + half, d - 1)]
            rot = te.if_then_else(j < half, a * c - b * s, a * s + b * c)
        else:
            i = te.min(j // 2, half - 1)
            c, s = cos[pos + t, i], sin[pos + t, i]
            a = x[t, base + te.min(2 * i, d - 1)]
            b = x[t, base + te.min(2 * i + 1, d - 1)]
            rot = te.if_then_else(j % 2 == 0, a * c - b * s, a * s + b * c)
        return te.if_then_else(j < rd, rot, x[t, n])

    y = te.compute((T, H * d), f, name="y")
    return te.create_prim_func([x, cos, sin, pos, y])


def _attention(cfg: ModelConfig, T=1, cpu: bool = True):
    """Causal GQA attention of q[T, H*d] (row t at position pos + t) over positions 0..pos+T-1 of layer
    `layer` in the KV cache (already holding this chunk's keys and values); out [T, H*d]."""
    from tvm import te
    import tvm.s_tir as s_tir
    H, KVH, d, rep = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_rep
    T = _rows(T)
    n_ctx = te.var("n_ctx")
    q = te.placeholder((T, H * d), "float32", name="q")
    kc = te.placeholder((cfg.n_layers, n_ctx, KVH, d), "float32", name="k_cache")
    vc = te.placeholder((cfg.n_layers, n_ctx, KVH, d), "float32", name="v_cache")
    layer, pos = te.var("layer"), te.var("pos")
    L = pos + T
    scale = 1.0 / float(d) ** 0.5
    j = te.reduce_axis((0, d), name="j")
    s = te.compute((T, H, L), lambda t, h, l: te.sum(q[t, h * d + j] * kc[layer, l, h // rep, j] * scale, axis=j),
                   name="s")
    l1 = te.reduce_axis((0, L), name="l1")
    ninf = te.min_value("float32")
    m = te.compute((T, H), lambda t, h: te.max(te.if_then_else(l1 <= pos + t, s[t, h, l1], ninf), axis=l1), name="m")
    e = te.compute((T, H, L), lambda t, h, l: te.if_then_else(l <= pos + t, te.exp(s[t, h, l] - m[t, h]), 0.0),
                   name="e")
    l2 = te.reduce_axis((0, L), name="l2")
    z = te.compute((T, H), lambda t, h: te.sum(e[t, h, l2], axis=l2), name="z")
    l3 = te.reduce_axis((0, L), name="l3")
    o = te.compute((T, H, d), lambda t, h, c: te.sum(e[t, h, l3] * vc[layer, l3, h // rep, c], axis=l3), name="o")
    out = te.compute((T, H * d), lambda t, i: o[t, i // d, i % d] / z[t, i // d], name="out")
    if not cpu:
        return te.create_prim_func([q, kc, vc, layer, pos, out])
    sch = s_tir.Schedule(te.create_prim_func([q, kc, vc, layer, pos, out]))
    for name in ("s", "e"):
        loops = sch.get_loops(sch.get_sblock(name))
        sch.parallel(sch.fuse(loops[0], loops[1]))
    t, h, c, l = sch.get_loops(sch.get_sblock("o"))
    sch.reorder(t, h, l, c)               # stream each cached V row once, contiguous in c
    sch.parallel(sch.fuse(t, h))
    sch.vectorize(c)
    return sch.mod["main"]


def _signature():
    """A no-op marker function: its name carries the hash of the config the kernels were built for."""
    from tvm import te
    out = te.compute((1,), lambda i: te.const(1, "int32"), name="out")
    return te.create_prim_func([out])


@dataclass
class BuildResult:
    path: Path
    names: list[str]
    seconds: float
    target: dict = field(default_factory=dict)


def build_module(cfg: ModelConfig, cpu: bool = True):
    """The IRModule holding every kernel of `cfg`, named as edgellm.runtime.tvm_backend.kernel_names says:
    each op once for decode (one row, fixed shapes) and once for prefill (T rows, T symbolic).
    cpu=False leaves matmul and attention unscheduled, for GPU rule schedules."""
    tvm = _tvm()
    names = kernel_names(cfg)
    funcs = {names["signature"]: _signature()}
    for mode, T in (("decode", 1), ("prefill", None)):
        n = names[mode]
        for (N, K) in matmul_shapes(cfg):
            funcs[n["matmul"][(N, K)]] = _matmul(N, K, T, cpu)
        funcs[n["rms_norm"]] = _rms_norm(cfg.dim, cfg.norm_eps, T)
        funcs[n["swiglu"]] = _swiglu(cfg.ffn_dim, T)
        funcs[n["rope_q"]] = _rope(cfg.n_heads, cfg.head_dim, cfg.rope_dim, cfg.rope_neox, T)
        if n["rope_k"] != n["rope_q"]:
            funcs[n["rope_k"]] = _rope(cfg.n_kv_heads, cfg.head_dim, cfg.rope_dim, cfg.rope_neox, T)
        funcs[n["attention"]] = _attention(cfg, T, cpu)
    return tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})


def build_kernels(cfg: ModelConfig, target: str | dict, out_path: str | os.PathLike) -> Path:
    """Compile the model's kernels for `target` (a name from `edgellm targets`, or a TVM target dict) into
    one shared library at `out_path`, linked with the target's cross compiler when it is not the host."""
    return build_kernels_report(cfg, target, out_path).path


def build_kernels_report(cfg: ModelConfig, target: str | dict, out_path: str | os.PathLike) -> BuildResult:
    """build_kernels, also returning the kernel names, the build time and the resolved target."""
    tvm = _tvm()
    target = resolve_target(target)
    out_path = Path(out_path)
    cc = cross_compiler(target)           # fail early, before compiling, if the linker is missing
    t0 = time.perf_counter()
    mod = build_module(cfg)
    lib = tvm.compile(mod, target=tvm.target.Target(target))
    export_atomic(lib, out_path, cc)
    names = sorted(str(gv.name_hint) for gv in mod.get_global_vars())
    return BuildResult(out_path, names, time.perf_counter() - t0, dict(target))


# Jetson Orin's GPU: Ampere, compute capability 8.7
CUDA_LIMITS = {"max_shared_memory_per_block": 49152, "max_threads_per_block": 1024, "thread_warp_size": 32}


def build_cuda_kernels(cfg: ModelConfig, out_path: str | os.PathLike, arch: str = "sm_87",
                       host: str | dict = "jetson-orin") -> BuildResult:
    """The same kernels as CUDA for `arch` (dlight GPU rule schedules), host code for the `host` CPU target.

    Writes the library (host stubs + the compiled CUDA module, loadable by a CUDA-enabled TVM runtime) at
    `out_path` and the generated CUDA source next to it (`.cu`). If this TVM build cannot generate or compile
    CUDA, a clear error says so; the CPU kernels of the same bundle still run on the device's CPU.
    """
    tvm = _tvm()
    from tvm.s_tir import dlight as dl
    host = resolve_target(host)
    out_path = Path(out_path)
    cc = cross_compiler(host)
    t0 = time.perf_counter()
    try:
        cuda = tvm.target.Target({"kind": "cuda", "arch": arch, **CUDA_LIMITS}, host=host)
        mod = build_module(cfg, cpu=False)
        with cuda:
            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.RMSNorm(),
                                          dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
        lib = tvm.compile(mod, target=cuda)
        source = "\n".join(m.inspect_source() for m in lib.mod.imports if m.kind == "cuda")
    except Exception as e:  # noqa: BLE001 - TVM raises many error types here
        raise EdgeLLMError(f"this TVM build cannot generate CUDA {arch} kernels: {str(e).strip()[:500]}",
                           "build the CPU kernels only (they run on the device's CPU cores), or install a "
                           "CUDA-enabled apache-tvm with the CUDA toolkit") from None
    export_atomic(lib, out_path, cc)
    out_path.with_suffix(".cu").write_text(source)
    names = sorted(str(gv.name_hint) for gv in mod.get_global_vars())
    return BuildResult(out_path, names, time.perf_counter() - t0, {"kind": "cuda", "arch": arch, "host": host})
