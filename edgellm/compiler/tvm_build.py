"""Compile a model's per-op kernels with Apache TVM (TE + hand TensorIR schedules) into one shared library.

The kernels are float32 and sized for one decode token (T=1; prefill loops over tokens): y = x @ W.T for
each distinct weight shape, RMSNorm, SwiGLU, RoPE and causal GQA attention over the KV cache. Hand
schedules (parallel + vectorize) keep the whole build to seconds; dlight's CPU rules take minutes.
The runtime side (edgellm.runtime.tvm_backend) loads the library with only the TVM runtime.
"""
from __future__ import annotations

import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EdgeLLMError
from ..runtime.config import ModelConfig
from ..runtime.tvm_backend import kernel_names, matmul_shapes

# cross compilers by target triple prefix, with the Debian package that provides each
CROSS_CC = {"aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
            "arm": ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf")}


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
    """The llvm target of this machine (CPU name and triple as LLVM sees them)."""
    tvm = _tvm()
    cpu = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()
    return {"kind": "llvm", "mtriple": f"{platform.machine()}-linux-gnu", "mcpu": str(cpu)}


def _is_cross(target: dict) -> bool:
    triple = target.get("mtriple", "")
    return bool(triple) and triple.split("-")[0] != platform.machine()


def cross_compiler(target: dict) -> str | None:
    """The C compiler that links a library for `target`, or None when it is the host (TVM's default)."""
    if not _is_cross(target):
        return None
    arch = target["mtriple"].split("-")[0]
    if arch not in CROSS_CC:
        raise EdgeLLMError(f"no cross compiler known for target triple {target['mtriple']!r}",
                           f"supported cross triples start with: {', '.join(CROSS_CC)}")
    cc, package = CROSS_CC[arch]
    if shutil.which(cc) is None:
        raise EdgeLLMError(f"the cross compiler {cc} for {target['mtriple']} is not installed",
                           f"apt-get install {package}")
    return cc


# ---------------------------------------------------------------- kernels (TE compute + schedule)

def _matmul(N: int, K: int, lanes: int = 16, rows: int = 4):
    """y[1, N] = x[1, K] @ w[N, K].T: rows split over threads, the K reduction vectorized by rfactor."""
    from tvm import te
    import tvm.s_tir as s_tir
    x = te.placeholder((1, K), "float32", name="x")
    w = te.placeholder((N, K), "float32", name="w")
    k = te.reduce_axis((0, K), name="k")
    y = te.compute((1, N), lambda t, n: te.sum(x[t, k] * w[n, k], axis=k), name="y")
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


def _rms_norm(D: int, eps: float):
    """y = x / sqrt(mean(x^2) + eps) * w, for one row of D."""
    from tvm import te
    x = te.placeholder((1, D), "float32", name="x")
    w = te.placeholder((D,), "float32", name="w")
    k = te.reduce_axis((0, D), name="k")
    ss = te.compute((1,), lambda t: te.sum(x[t, k] * x[t, k], axis=k), name="ss")
    y = te.compute((1, D), lambda t, i: x[t, i] / te.sqrt(ss[t] / float(D) + eps) * w[i], name="y")
    return te.create_prim_func([x, w, y])


def _swiglu(F: int):
    """out = silu(g) * u = g / (1 + exp(-g)) * u."""
    from tvm import te
    g = te.placeholder((1, F), "float32", name="g")
    u = te.placeholder((1, F), "float32", name="u")
    y = te.compute((1, F), lambda t, i: g[t, i] / (1.0 + te.exp(-g[t, i])) * u[t, i], name="y")
    return te.create_prim_func([g, u, y])


def _rope(H: int, d: int, rd: int, neox: bool):
    """Rotate x[1, H*d] (H heads of d) at position `pos` with cos/sin tables [n_ctx, rd/2].

    Normal layout rotates pairs (2i, 2i+1), NeoX pairs (i, i + rd/2); dims past rd pass through.
    Index clamps keep the untaken branch of each select inside the buffers.
    """
    from tvm import te
    x = te.placeholder((1, H * d), "float32", name="x")
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
            c, s = cos[pos, i], sin[pos, i]
            a = x[t, base + i]
            b = x[t, base + te.min(i + half, d - 1)]
            rot = te.if_then_else(j < half, a * c - b * s, a * s + b * c)
        else:
            i = te.min(j // 2, half - 1)
            c, s = cos[pos, i], sin[pos, i]
            a = x[t, base + te.min(2 * i, d - 1)]
            b = x[t, base + te.min(2 * i + 1, d - 1)]
            rot = te.if_then_else(j % 2 == 0, a * c - b * s, a * s + b * c)
        return te.if_then_else(j < rd, rot, x[t, n])

    y = te.compute((1, H * d), f, name="y")
    return te.create_prim_func([x, cos, sin, pos, y])


def _attention(cfg: ModelConfig):
    """Decode attention: q[1, H*d] against the first L cached positions of layer `layer`; out [1, H*d]."""
    from tvm import te
    import tvm.s_tir as s_tir
    H, KVH, d, rep = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_rep
    n_ctx = te.var("n_ctx")
    q = te.placeholder((1, H * d), "float32", name="q")
    kc = te.placeholder((cfg.n_layers, n_ctx, KVH, d), "float32", name="k_cache")
    vc = te.placeholder((cfg.n_layers, n_ctx, KVH, d), "float32", name="v_cache")
    layer, L = te.var("layer"), te.var("L")
    scale = 1.0 / float(d) ** 0.5
    j = te.reduce_axis((0, d), name="j")
    s = te.compute((H, L), lambda h, l: te.sum(q[0, h * d + j] * kc[layer, l, h // rep, j] * scale, axis=j), name="s")
    l1 = te.reduce_axis((0, L), name="l1")
    m = te.compute((H,), lambda h: te.max(s[h, l1], axis=l1), name="m")
    e = te.compute((H, L), lambda h, l: te.exp(s[h, l] - m[h]), name="e")
    l2 = te.reduce_axis((0, L), name="l2")
    z = te.compute((H,), lambda h: te.sum(e[h, l2], axis=l2), name="z")
    l3 = te.reduce_axis((0, L), name="l3")
    o = te.compute((H, d), lambda h, c: te.sum(e[h, l3] * vc[layer, l3, h // rep, c], axis=l3), name="o")
    out = te.compute((1, H * d), lambda t, i: o[i // d, i % d] / z[i // d], name="out")
    sch = s_tir.Schedule(te.create_prim_func([q, kc, vc, layer, L, out]))
    for name in ("s", "e"):
        sch.parallel(sch.get_loops(sch.get_sblock(name))[0])
    c = sch.get_loops(sch.get_sblock("o"))
    sch.reorder(c[0], c[2], c[1])         # h, l, c: stream each cached V row once, contiguous in c
    sch.parallel(c[0])
    sch.vectorize(c[1])
    return sch.mod["main"]


def _signature():
    """A no-op marker function: its name carries the hash of the config the kernels were built for."""
    from tvm import te
    out = te.compute((1,), lambda i: te.const(1, "int32"), name="out")
    return te.create_prim_func([out])


@dataclass
class BuildResult:
    path: Path
    kernels: list[str]
    seconds: float
    target: dict = field(default_factory=dict)


def build_module(cfg: ModelConfig):
    """The IRModule holding every kernel of `cfg`, named as edgellm.runtime.tvm_backend.kernel_names says."""
    tvm = _tvm()
    names = kernel_names(cfg)
    funcs = {names["signature"]: _signature()}
    for (N, K) in matmul_shapes(cfg):
        funcs[names["matmul"][(N, K)]] = _matmul(N, K)
    funcs[names["rms_norm"]] = _rms_norm(cfg.dim, cfg.norm_eps)
    funcs[names["swiglu"]] = _swiglu(cfg.ffn_dim)
    funcs[names["rope_q"]] = _rope(cfg.n_heads, cfg.head_dim, cfg.rope_dim, cfg.rope_neox)
    if names["rope_k"] != names["rope_q"]:
        funcs[names["rope_k"]] = _rope(cfg.n_kv_heads, cfg.head_dim, cfg.rope_dim, cfg.rope_neox)
    funcs[names["attention"]] = _attention(cfg)
    return tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})


def build_kernels(cfg: ModelConfig, target: dict, out_path: str | os.PathLike) -> Path:
    """Compile the model's kernels for `target` (a TVM target dict) into one shared library at `out_path`."""
    return build_kernels_report(cfg, target, out_path).path


def build_kernels_report(cfg: ModelConfig, target: dict, out_path: str | os.PathLike) -> BuildResult:
    tvm = _tvm()
    out_path = Path(out_path)
    cc = cross_compiler(target)           # fail early, before compiling, if the linker is missing
    t0 = time.perf_counter()
    mod = build_module(cfg)
    lib = tvm.compile(mod, target=tvm.target.Target(target))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp.so")
    if cc:
        lib.export_library(str(tmp), cc=cc)
    else:
        lib.export_library(str(tmp))
    os.replace(tmp, out_path)
    names = sorted(str(gv.name_hint) for gv in mod.get_global_vars())
    return BuildResult(out_path, names, time.perf_counter() - t0, dict(target))
