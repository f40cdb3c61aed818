"""The `tvm` backend: the model's forward pass through kernels compiled by edgellm.compiler.tvm_build.

Needs only the TVM runtime (tvm_ffi + libtvm_runtime.so, loaded lazily; the `tvm` compiler package is never
imported), so it runs on a device without the compiler. Weights are dequantized to float32 once; weights,
activations, RoPE tables and the KV cache live in preallocated 64-byte-aligned numpy arrays wrapped once as
TVM tensors (DLPack, zero copy), so glue steps (embedding lookup, residual adds, biases, KV writes) cost no
copies and no per-token allocation. One token at a time: prefill loops over the decode kernels.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import platform
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError
from .backend import Backend
from .config import ModelConfig
from .kv_cache import KVCache
from .model import rope_tables
from .weights import WeightStore

KERNEL_ABI = 1          # bump when a kernel's arguments or semantics change


def matmul_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """Distinct (out, in) weight shapes of the model, each one compiled GEMV kernel."""
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = [(qd, cfg.dim), (kvd, cfg.dim), (cfg.dim, qd), (cfg.ffn_dim, cfg.dim), (cfg.dim, cfg.ffn_dim),
              (cfg.vocab_size, cfg.dim)]
    return list(dict.fromkeys(shapes))


def kernel_signature(cfg: ModelConfig) -> str:
    """Hash of every config field baked into the kernels; the library exports a function named after it."""
    fields = (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size,
              float(cfg.norm_eps), cfg.rope_dim, bool(cfg.rope_neox), KERNEL_ABI)
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]


def kernel_names(cfg: ModelConfig) -> dict:
    """The contract between compiler and runtime: which function of the library does what."""
    return {"signature": f"edgellm_kernels_{kernel_signature(cfg)}",
            "matmul": {(n, k): f"matmul_{n}x{k}" for n, k in matmul_shapes(cfg)},
            "rms_norm": f"rms_norm_{cfg.dim}",
            "swiglu": f"swiglu_{cfg.ffn_dim}",
            "rope_q": f"rope_{cfg.n_heads}x{cfg.head_dim}",
            "rope_k": f"rope_{cfg.n_kv_heads}x{cfg.head_dim}",
            "attention": "attention"}


_RUNTIME_LIB = "libtvm_runtime.so"
_ffi = None


def _runtime_library() -> Path | None:
    """libtvm_runtime.so: $EDGELLM_TVM_RUNTIME, else the one in the installed `tvm` package (found, not imported)."""
    env = os.environ.get("EDGELLM_TVM_RUNTIME")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("tvm")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("lib", ""):
            cand = Path(loc) / sub / _RUNTIME_LIB
            if cand.is_file():
                return cand
    return None


def _runtime():
    """tvm_ffi plus libtvm_runtime.so (the kernels' thread pool and workspace), never the TVM compiler."""
    global _ffi
    if _ffi is not None:
        return _ffi
    try:
        import tvm_ffi
    except ImportError as e:
        raise EdgeLLMError(f"the TVM runtime is not installed ({e})",
                           "pip install apache-tvm (or use backend='numpy')") from None
    lib = _runtime_library()
    if lib is None or not lib.is_file():
        raise EdgeLLMError(f"{_RUNTIME_LIB} not found (looked in the apache-tvm package and $EDGELLM_TVM_RUNTIME)",
                           "pip install apache-tvm, or set EDGELLM_TVM_RUNTIME to the library's path")
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    _ffi = tvm_ffi
    return _ffi


def aligned_empty(shape, dtype=np.float32, align: int = 64) -> np.ndarray:
    """A C-contiguous array whose data starts on an `align`-byte boundary (TVM kernels assume it)."""
    shape = tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + align, np.uint8)
    off = (-buf.ctypes.data) % align
    return buf[off:off + nbytes].view(dtype).reshape(shape)


ELF_MACHINES = {3: "i686", 40: "armv7l", 62: "x86_64", 183: "aarch64", 243: "riscv64"}


def elf_machine(path: str | os.PathLike) -> int | None:
    """The ELF e_machine field of a shared library (62 x86-64, 183 aarch64), or None if it is not ELF."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def load_library(path: str | os.PathLike):
    """Load a compiled kernel library (a .so exported by tvm_build) through the TVM runtime."""
    path = Path(path)
    if not path.is_file():
        raise EdgeLLMError(f"kernel library {path} does not exist",
                           "compile the model first (edgellm.compiler.tvm_build.build_kernels)")
    machine = elf_machine(path)
    arch = ELF_MACHINES.get(machine, f"ELF machine {machine}") if machine is not None else "a non-ELF format"
    if arch != platform.machine():
        raise EdgeLLMError(f"kernel library {path} is built for {arch}, this machine is {platform.machine()}",
                           "compile the model for this machine's target, or run the bundle on its device")
    ffi = _runtime()
    try:
        return ffi.load_module(str(path.resolve()))
    except Exception as e:  # noqa: BLE001 - TVM raises its own error types
        raise EdgeLLMError(f"cannot load kernel library {path}: {e}",
                           "it may be built for another CPU or OS; compile it for this target") from None


class Buffer:
    """One preallocated float32 array seen both ways: `.np` (numpy) and `.t` (TVM tensor), same memory."""

    __slots__ = ("np", "t")

    def __init__(self, shape_or_array):
        if isinstance(shape_or_array, np.ndarray):
            self.np = aligned_empty(shape_or_array.shape)
            self.np[...] = shape_or_array
        else:
            self.np = aligned_empty(shape_or_array)
            self.np[...] = 0
        self.t = _runtime().from_dlpack(self.np)


class TvmKVCache(KVCache):
    """A KVCache in aligned memory that the attention kernel reads in place (k/v stay numpy arrays)."""

    def __init__(self, cfg: ModelConfig, n_ctx: int):
        shape = (cfg.n_layers, n_ctx, cfg.n_kv_heads, cfg.head_dim)
        self.n_ctx = n_ctx
        self._k, self._v = Buffer(shape), Buffer(shape)
        self.k, self.v = self._k.np, self._v.np
        self.tk, self.tv = self._k.t, self._v.t
        self.length = 0


class TvmBackend(Backend):
    """Runs the Llama-family forward pass with a compiled kernel library through the TVM runtime."""

    name = "tvm"

    def __init__(self, cfg: ModelConfig, weights: WeightStore, library: str | os.PathLike,
                 threads: int | None = None):
        self.cfg = cfg
        self.weights = weights
        self.threads = threads
        self.library = Path(library)
        self.lib = load_library(library)
        self._ready = False

    # ---------------------------------------------------------------- setup
    def _fn(self, name: str):
        try:
            return self.lib[name]
        except Exception:  # noqa: BLE001 - a missing function is an AttributeError or a TVM error
            raise EdgeLLMError(f"kernel library {self.library} has no function {name!r}",
                               "it was compiled for another model configuration; recompile it for this model") from None

    def _weight(self, name: str) -> Buffer:
        return Buffer(np.asarray(self.weights.get(name), dtype=np.float32))

    def prepare(self) -> None:
        """Look up every kernel, copy the weights (dequantized to float32) and allocate activations, once."""
        if self._ready:
            return
        ffi = _runtime()
        if self.threads:
            ffi.get_global_func("runtime.config_threadpool")(1, int(self.threads))  # 1: all (big) cores
        c = self.cfg
        names = kernel_names(c)
        try:
            self.lib[names["signature"]]
        except Exception:  # noqa: BLE001
            raise EdgeLLMError(f"kernel library {self.library} was not compiled for this model configuration "
                               f"(no {names['signature']})", "recompile the kernels for this model") from None
        self.k_mm = {shape: self._fn(n) for shape, n in names["matmul"].items()}
        self.k_rms = self._fn(names["rms_norm"])
        self.k_swiglu = self._fn(names["swiglu"])
        self.k_rope_q = self._fn(names["rope_q"])
        self.k_rope_k = self._fn(names["rope_k"])
        self.k_attn = self._fn(names["attention"])

        self.layers = []
        for i in range(c.n_layers):
            p = f"blk.{i}."
            L = {n: self._weight(p + n + ".weight").t for n in
                 ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
            L["bias"] = {n: self.weights.get(p + n + ".bias") for n in ("attn_q", "attn_k", "attn_v")
                         if c.attn_bias and (p + n + ".bias") in self.weights}
            self.layers.append(L)
        embd = self._weight("token_embd.weight")
        self.embd = embd.np
        self.w_out = embd.t if c.tied_embeddings else self._weight("output.weight").t
        self.w_out_norm = self._weight("output_norm.weight").t

        qd, kvd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        self.x, self.h, self.o = Buffer((1, c.dim)), Buffer((1, c.dim)), Buffer((1, c.dim))
        self.q, self.qr, self.a = Buffer((1, qd)), Buffer((1, qd)), Buffer((1, qd))
        self.k, self.kr, self.v = Buffer((1, kvd)), Buffer((1, kvd)), Buffer((1, kvd))
        self.g, self.u, self.gu = Buffer((1, c.ffn_dim)), Buffer((1, c.ffn_dim)), Buffer((1, c.ffn_dim))
        self.logits = Buffer((1, c.vocab_size))
        self._rope_n = 0
        self._ready = True

    def _rope(self, n_ctx: int) -> tuple[object, object]:
        """cos/sin tables for positions 0..n_ctx-1 (the reference's own rope_tables), grown on demand."""
        if n_ctx > self._rope_n:
            cos, sin = rope_tables(self.cfg, np.arange(n_ctx))
            self.cos, self.sin = Buffer(cos), Buffer(sin)
            self._rope_n = n_ctx
        return self.cos.t, self.sin.t

    # ---------------------------------------------------------------- forward
    def new_cache(self, n_ctx: int) -> KVCache:
        return TvmKVCache(self.cfg, n_ctx)

    def _step(self, token: int, pos: int, kv: TvmKVCache) -> None:
        """One token through every layer; the residual stream ends in self.x."""
        c, mm = self.cfg, self.k_mm
        qd, kvd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        x, h, o, q, k, v = self.x, self.h, self.o, self.q, self.k, self.v
        cos, sin = self._rope(kv.n_ctx)
        x.np[0] = self.embd[token]
        for i, L in enumerate(self.layers):
            self.k_rms(x.t, L["attn_norm"], h.t)
            mm[(qd, c.dim)](h.t, L["attn_q"], q.t)
            mm[(kvd, c.dim)](h.t, L["attn_k"], k.t)
            mm[(kvd, c.dim)](h.t, L["attn_v"], v.t)
            if L["bias"]:
                q.np += L["bias"]["attn_q"]
                k.np += L["bias"]["attn_k"]
                v.np += L["bias"]["attn_v"]
            self.k_rope_q(q.t, cos, sin, pos, self.qr.t)
            self.k_rope_k(k.t, cos, sin, pos, self.kr.t)
            shape = (1, c.n_kv_heads, c.head_dim)
            kv.update(i, pos, self.kr.np.reshape(shape), v.np.reshape(shape))
            self.k_attn(self.qr.t, kv.tk, kv.tv, i, pos + 1, self.a.t)
            mm[(c.dim, qd)](self.a.t, L["attn_output"], o.t)
            x.np += o.np
            self.k_rms(x.t, L["ffn_norm"], h.t)
            mm[(c.ffn_dim, c.dim)](h.t, L["ffn_gate"], self.g.t)
            mm[(c.ffn_dim, c.dim)](h.t, L["ffn_up"], self.u.t)
            self.k_swiglu(self.g.t, self.u.t, self.gu.t)
            mm[(c.dim, c.ffn_dim)](self.gu.t, L["ffn_down"], o.t)
            x.np += o.np

    def _logits(self) -> np.ndarray:
        c = self.cfg
        self.k_rms(self.x.t, self.w_out_norm, self.h.t)
        self.k_mm[(c.vocab_size, c.dim)](self.h.t, self.w_out, self.logits.t)
        return self.logits.np.copy()

    def forward(self, tokens, pos, kv, all_logits=False):
        """Tokens at positions pos.. one at a time (decode kernels); logits [T, vocab] or [1, vocab]."""
        if not isinstance(kv, TvmKVCache):
            raise EdgeLLMError("the tvm backend needs a KV cache from its own new_cache()",
                               "create the cache with backend.new_cache(n_ctx)")
        self.prepare()
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if pos + len(tokens) > kv.n_ctx:
            raise EdgeLLMError(f"context full: {pos + len(tokens)} tokens do not fit in n_ctx={kv.n_ctx}",
                               "pass a larger n_ctx (--ctx) or a shorter prompt / max_tokens")
        out = []
        for j, tok in enumerate(tokens):
            self._step(int(tok), pos + j, kv)
            if all_logits or j == len(tokens) - 1:
                out.append(self._logits())
        return np.concatenate(out, axis=0)


def greedy(backend: Backend, prompt_ids, n_tokens: int, n_ctx: int | None = None) -> list[int]:
    """Greedy continuation token ids: the cross-device check (same ids on host and emulated ARM)."""
    ids = [int(t) for t in prompt_ids]
    kv = backend.new_cache(n_ctx or len(ids) + n_tokens)
    logits = backend.forward(np.asarray(ids), 0, kv)
    out = []
    for _ in range(n_tokens):
        out.append(int(np.argmax(logits[-1])))
        if len(out) == n_tokens:
            break
        logits = backend.forward(np.asarray(out[-1:]), len(ids) + len(out) - 1, kv)
    return out


def main(argv=None) -> int:
    """`python -m edgellm.runtime.tvm_backend --model M --library L --prompt P`: greedy ids as JSON (device smoke test)."""
    import argparse
    import json
    import time

    from .loader import load_model
    ap = argparse.ArgumentParser(prog="python -m edgellm.runtime.tvm_backend")
    ap.add_argument("--model", required=True)
    ap.add_argument("--library", required=True)
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("-n", "--n-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    m = load_model(a.model)
    be = TvmBackend(m.config, m.weights, a.library, a.threads)
    be.prepare()
    t1 = time.perf_counter()
    prompt = m.tokenizer.encode(a.prompt)
    ids = greedy(be, prompt, a.n_tokens)
    print(json.dumps({"machine": platform.machine(), "prompt_ids": [int(t) for t in prompt], "ids": ids,
                      "text": m.tokenizer.decode(ids), "load_s": round(t1 - t0, 3),
                      "generate_s": round(time.perf_counter() - t1, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
