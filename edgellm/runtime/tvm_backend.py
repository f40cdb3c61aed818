"""The `tvm` backend: the model's forward pass through kernels compiled by edgellm.compiler.tvm_build.

Needs only the TVM runtime (tvm_ffi + libtvm_runtime.so, loaded lazily; the `tvm` compiler package is never
imported), so it runs on a device without the compiler. Weights are dequantized to float32 once; weights,
activations, RoPE tables and the KV cache live in preallocated 64-byte-aligned numpy arrays wrapped once as
TVM tensors (DLPack, zero copy), so glue steps (embedding lookup, residual adds, biases, KV writes) cost no
copies and no per-token allocation.
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

KERNEL_ABI = 2          # bump when a kernel's arguments or semantics change


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
    """The contract between compiler and runtime: which function of the library does what.

    "decode" kernels take one row (fixed shapes); "prefill" kernels take T rows (T from the arguments).
    """
    decode = {"matmul": {(n, k): f"matmul_{n}x{k}" for n, k in matmul_shapes(cfg)},
              "rms_norm": f"rms_norm_{cfg.dim}",
              "swiglu": f"swiglu_{cfg.ffn_dim}",
              "rope_q": f"rope_{cfg.n_heads}x{cfg.head_dim}",
              "rope_k": f"rope_{cfg.n_kv_heads}x{cfg.head_dim}",
              "attention": "attention"}
    prefill = {k: ({s: f"{n}_prefill" for s, n in v.items()} if isinstance(v, dict) else f"{v}_prefill")
               for k, v in decode.items()}
    return {"signature": f"edgellm_kernels_{kernel_signature(cfg)}", "decode": decode, "prefill": prefill}


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


HUGE_PAGE = 1 << 21


class HugePageArena:
    """Arrays carved from one anonymous mapping advised for transparent huge pages (madvise MADV_HUGEPAGE,
    which Linux honours in its default "madvise" THP mode): decode streams every weight once per token, and
    in 4 KB pages that is ~22,000 TLB misses per token for SmolLM2; in 2 MB pages ~45. Interleaved on the
    AVX2 host: decode +3.5-6% with one launch per layer, within the noise (+0-2%) with the token kernel. The
    mapping is virtual address space until touched; where madvise or THP is
    missing the arrays are ordinary pages. An array larger than what is left comes from numpy instead."""

    def __init__(self, nbytes: int):
        import mmap
        self._map = mmap.mmap(-1, int(nbytes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            self._map.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError, ValueError):      # no madvise / no THP: plain pages, same arrays
            pass
        self._buf = np.frombuffer(self._map, np.uint8)
        self._top = (-self._buf.ctypes.data) % HUGE_PAGE  # start on a huge-page boundary

    def empty(self, shape, dtype, align: int = 64) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        start = self._top + (-self._top) % align
        if start + nbytes > len(self._buf):
            return aligned_empty(shape, dtype, align)
        self._top = start + nbytes
        return self._buf[start:start + nbytes].view(dtype).reshape(shape)


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

    __slots__ = ("np", "t", "_rows")

    def __init__(self, shape_or_array):
        if isinstance(shape_or_array, np.ndarray):
            self.np = aligned_empty(shape_or_array.shape)
            self.np[...] = shape_or_array
        else:
            self.np = aligned_empty(shape_or_array)
            self.np[...] = 0
        self.t = _runtime().from_dlpack(self.np)
        self._rows: dict[int, Buffer] = {}

    def row_slice(self, start: int, stop: int) -> "Buffer":
        """Rows start..stop-1, as a Buffer sharing this memory (the caller keeps them 64-byte aligned)."""
        b = Buffer.__new__(Buffer)
        b.np = self.np[start:stop]
        b.t = _runtime().from_dlpack(b.np)
        b._rows = {}
        return b

    def rows(self, n: int) -> "Buffer":
        """The first n rows, as a Buffer sharing this memory (made once per n, then reused)."""
        if n == self.np.shape[0]:
            return self
        b = self._rows.get(n)
        if b is None:
            if len(self._rows) > 16:
                self._rows.clear()
            b = self._rows[n] = self.row_slice(0, n)
        return b


class TvmKVCache(KVCache):
    """A KVCache in aligned memory that the attention kernel reads in place (k/v stay numpy arrays)."""

    def __init__(self, cfg: ModelConfig, n_ctx: int):
        shape = (cfg.n_layers, n_ctx, cfg.n_kv_heads, cfg.head_dim)
        self.n_ctx = n_ctx
        self._k, self._v = Buffer(shape), Buffer(shape)
        self.k, self.v = self._k.np, self._v.np
        self.tk, self.tv = self._k.t, self._v.t
        self.length = 0


LAYER_WEIGHTS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")


class _Kernels:
    """The library functions of one mode ("decode" or "prefill"), looked up once."""

    def __init__(self, fn, names: dict):
        self.mm = {shape: fn(n) for shape, n in names["matmul"].items()}
        self.rms = fn(names["rms_norm"])
        self.swiglu = fn(names["swiglu"])
        self.rope_q = fn(names["rope_q"])
        self.rope_k = fn(names["rope_k"])
        self.attn = fn(names["attention"])


class LibraryBackend(Backend):
    """A backend running a compiled TVM library: prompts in chunks of up to `chunk` tokens."""

    def __init__(self, cfg: ModelConfig, weights: WeightStore, library: str | os.PathLike,
                 threads: int | None = None, chunk: int = 32):
        self.cfg = cfg
        self.weights = weights
        self.threads = threads
        self.chunk = max(1, int(chunk))
        self.library = Path(library)
        self.lib = load_library(library)
        self._ready = False

    def _checked(self, tokens, pos: int, kv) -> np.ndarray:
        """Validate a forward call (own cache, room in the context, ids in the vocabulary); prepare once."""
        if not isinstance(kv, TvmKVCache):
            raise EdgeLLMError(f"the {self.name} backend needs a KV cache from its own new_cache()",
                               "create the cache with backend.new_cache(n_ctx)")
        self.prepare()
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if pos + len(tokens) > kv.n_ctx:
            raise EdgeLLMError(f"context full: {pos + len(tokens)} tokens do not fit in n_ctx={kv.n_ctx}",
                               "pass a larger n_ctx (--ctx) or a shorter prompt / max_tokens")
        if (tokens < 0).any() or (tokens >= self.cfg.vocab_size).any():
            raise EdgeLLMError(f"token id out of range 0..{self.cfg.vocab_size - 1}", "check the tokenizer")
        return tokens

    def _run(self, tokens: np.ndarray, pos: int, kv, want: str | None) -> np.ndarray | None:
        """One chunk through the library: logits of "all" its positions, of the "last" one, or None."""
        raise NotImplementedError

    def forward(self, tokens, pos, kv, all_logits=False):
        """Tokens at positions pos..: logits [T, vocab] (all_logits) or [1, vocab] for the last position."""
        tokens = self._checked(tokens, pos, kv)
        out = []
        for start in range(0, len(tokens), self.chunk):
            chunk = tokens[start:start + self.chunk]
            last = start + len(chunk) == len(tokens)
            want = "all" if all_logits else ("last" if last else None)
            logits = self._run(chunk, pos + start, kv, want)
            if logits is not None:
                out.append(logits)
        return np.concatenate(out, axis=0)


class TvmBackend(LibraryBackend):
    """Runs the Llama-family forward pass with a compiled kernel library through the TVM runtime.

    Decode (one token) uses the fixed-shape kernels; a prompt runs in chunks of up to `chunk` tokens
    through the prefill kernels, so each weight matrix is read once per chunk rather than once per token.
    """

    name = "tvm"


    # ---------------------------------------------------------------- setup
    def _fn(self, name: str):
        try:
            return self.lib[name]
        except Exception:  # noqa: BLE001 - a missing function is an AttributeError or a TVM error
            raise EdgeLLMError(f"kernel library {self.library} has no function {name!r}",
                               "it was compiled for another model configuration; recompile it for this model") from None

    def _set_threads(self, ffi) -> None:
        """Threads for the kernels: `threads`, else the physical cores (llama.cpp's -t semantics).

        TVM's pool sizes itself from TVM_NUM_THREADS when the process first runs a parallel kernel (and on
        x86 otherwise assumes hyper-threading and uses half the CPUs), so set it before that, then configure.
        """
        n = self.threads
        if not n:
            import psutil
            n = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        n = int(n)
        os.environ["TVM_NUM_THREADS"] = str(n)
        ffi.get_global_func("runtime.config_threadpool")(1, n)   # 1 = kBig: all cores of the big cluster
        self.threads_used = int(ffi.get_global_func("runtime.NumThreads")())

    def _weight(self, name: str) -> Buffer:
        return Buffer(np.asarray(self.weights.get(name), dtype=np.float32))

    def prepare(self) -> None:
        """Look up every kernel, copy the weights (dequantized to float32) and allocate activations, once."""
        if self._ready:
            return
        ffi = _runtime()
        self._set_threads(ffi)
        c = self.cfg
        names = kernel_names(c)
        try:
            self.lib[names["signature"]]
        except Exception:  # noqa: BLE001
            raise EdgeLLMError(f"kernel library {self.library} was not compiled for this model configuration "
                               f"(no {names['signature']})", "recompile the kernels for this model") from None
        self.decode_k = _Kernels(self._fn, names["decode"])
        self.prefill_k = _Kernels(self._fn, names["prefill"])

        self.layers = []
        for i in range(c.n_layers):
            p = f"blk.{i}."
            L = {n: self._weight(p + n + ".weight").t for n in LAYER_WEIGHTS}
            L["bias"] = {n: self.weights.get(p + n + ".bias") for n in ("attn_q", "attn_k", "attn_v")
                         if c.attn_bias and (p + n + ".bias") in self.weights}
            self.layers.append(L)
        embd = self._weight("token_embd.weight")
        self.embd = embd.np
        self.w_out = embd.t if c.tied_embeddings else self._weight("output.weight").t
        self.w_out_norm = self._weight("output_norm.weight").t

        qd, kvd, R = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, self.chunk
        self.acts = {n: Buffer((R, width)) for n, width in
                     (("x", c.dim), ("h", c.dim), ("o", c.dim), ("q", qd), ("qr", qd), ("a", qd), ("k", kvd),
                      ("kr", kvd), ("v", kvd), ("g", c.ffn_dim), ("u", c.ffn_dim), ("gu", c.ffn_dim),
                      ("logits", c.vocab_size))}
        self.last = Buffer((1, c.dim))          # the last position's hidden state, for last-only logits
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

    def _run(self, tokens: np.ndarray, pos: int, kv: TvmKVCache, logits: str | None) -> np.ndarray | None:
        """One chunk of T tokens through every layer; logits of "all" rows, of the "last" row, or None."""
        c, T = self.cfg, len(tokens)
        K = self.decode_k if T == 1 else self.prefill_k
        a = {n: b.rows(T) for n, b in self.acts.items()}
        x, h, o, q, k, v = a["x"], a["h"], a["o"], a["q"], a["k"], a["v"]
        qd, kvd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        cos, sin = self._rope(kv.n_ctx)
        kv_shape = (T, c.n_kv_heads, c.head_dim)
        x.np[:] = self.embd[tokens]
        for i, L in enumerate(self.layers):
            K.rms(x.t, L["attn_norm"], h.t)
            K.mm[(qd, c.dim)](h.t, L["attn_q"], q.t)
            K.mm[(kvd, c.dim)](h.t, L["attn_k"], k.t)
            K.mm[(kvd, c.dim)](h.t, L["attn_v"], v.t)
            if L["bias"]:
                q.np += L["bias"]["attn_q"]
                k.np += L["bias"]["attn_k"]
                v.np += L["bias"]["attn_v"]
            K.rope_q(q.t, cos, sin, pos, a["qr"].t)
            K.rope_k(k.t, cos, sin, pos, a["kr"].t)
            kv.update(i, pos, a["kr"].np.reshape(kv_shape), v.np.reshape(kv_shape))
            K.attn(a["qr"].t, kv.tk, kv.tv, i, pos, a["a"].t)
            K.mm[(c.dim, qd)](a["a"].t, L["attn_output"], o.t)
            x.np += o.np
            K.rms(x.t, L["ffn_norm"], h.t)
            K.mm[(c.ffn_dim, c.dim)](h.t, L["ffn_gate"], a["g"].t)
            K.mm[(c.ffn_dim, c.dim)](h.t, L["ffn_up"], a["u"].t)
            K.swiglu(a["g"].t, a["u"].t, a["gu"].t)
            K.mm[(c.dim, c.ffn_dim)](a["gu"].t, L["ffn_down"], o.t)
            x.np += o.np
        if logits is None:
            return None
        if logits == "all":
            K.rms(x.t, self.w_out_norm, h.t)
            K.mm[(c.vocab_size, c.dim)](h.t, self.w_out, a["logits"].t)
            return a["logits"].np.copy()
        self.last.np[0] = x.np[-1]
        d, hl, lg = self.decode_k, self.acts["h"].rows(1), self.acts["logits"].rows(1)
        d.rms(self.last.t, self.w_out_norm, hl.t)
        d.mm[(c.vocab_size, c.dim)](hl.t, self.w_out, lg.t)
        return lg.np.copy()



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


def smoke_main(backend_cls, prog: str, argv=None) -> int:
    """`python -m PROG --model M --library L --prompt P`: greedy ids as JSON.

    A device smoke test of the kernels alone (no bundle needed); tests run it under qemu for ARM."""
    import argparse
    import json
    import platform
    import time

    from .loader import load_model
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--model", required=True)
    ap.add_argument("--library", required=True)
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("-n", "--n-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    m = load_model(a.model)
    be = backend_cls(m.config, m.weights, a.library, a.threads)
    be.prepare()
    t1 = time.perf_counter()
    prompt = m.tokenizer.encode(a.prompt)
    ids = greedy(be, prompt, a.n_tokens)
    print(json.dumps({"machine": platform.machine(), "prompt_ids": [int(t) for t in prompt], "ids": ids,
                      "text": m.tokenizer.decode(ids), "load_s": round(t1 - t0, 3),
                      "generate_s": round(time.perf_counter() - t1, 3)}))
    return 0


def main(argv=None) -> int:
    return smoke_main(TvmBackend, "python -m edgellm.runtime.tvm_backend", argv)


if __name__ == "__main__":
    raise SystemExit(main())
