"""The `tvm-relax` backend: one Relax VM call per token (or per prompt chunk) instead of one call per kernel.

edgellm.compiler.relax_build lowers the whole forward pass (embedding, every layer, final norm, lm_head) into
Relax functions compiled into one VM executable. Weights are function parameters, bound here from the
weight store (so the library stays small); the KV cache is updated in place by the executable. Like the
`tvm` backend it needs only the TVM runtime (tvm_ffi + libtvm_runtime.so): the executable is loaded through
the library's own `vm_load_executable` entry point, never through the `tvm` compiler package.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from ..errors import EdgeLLMError
from .config import ModelConfig
from .kv_cache import KVCache
from .model import rope_tables
from .tvm_backend import Buffer, LibraryBackend, TvmKVCache, _runtime
from .weights import WeightStore

RELAX_LIBRARY = "kernels/relax.so"   # where `edgellm compile` puts the executable inside a bundle
RELAX_ABI = 1            # bump when a function's parameters or semantics change
FUNCTIONS = ("decode", "prefill", "prefill_last")   # T=1 -> [1, vocab]; T rows -> [T, vocab]; T rows -> [1, vocab]
_CPU, _POOLED = 1, 2     # DLPack kDLCPU; the VM's pooled allocator (relax.VirtualMachine's default)


def relax_signature(cfg: ModelConfig) -> str:
    """Name of a marker function in the executable: the hash of every config field baked into it."""
    fields = (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size,
              float(cfg.norm_eps), cfg.rope_dim, bool(cfg.rope_neox), bool(cfg.attn_bias),
              bool(cfg.tied_embeddings), RELAX_ABI)
    return "edgellm_relax_" + hashlib.sha256(repr(fields).encode()).hexdigest()[:16]


def weight_params(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The contract between compiler and runtime: the weight parameters of every function, in order.

    q/k/v are one merged matrix (rows q, then k, then v), gate/up one matrix (rows gate, then up), so each
    layer runs 4 GEMVs; `attn_qkv.bias` only for models with attention biases (qwen2)."""
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    out = [("token_embd", (cfg.vocab_size, cfg.dim))]
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        out += [(p + "attn_norm", (cfg.dim,)), (p + "attn_qkv", (qkv, cfg.dim))]
        if cfg.attn_bias:
            out.append((p + "attn_qkv.bias", (qkv,)))
        out += [(p + "attn_output", (cfg.dim, cfg.n_heads * cfg.head_dim)), (p + "ffn_norm", (cfg.dim,)),
                (p + "ffn_gate_up", (2 * cfg.ffn_dim, cfg.dim)), (p + "ffn_down", (cfg.dim, cfg.ffn_dim))]
    out.append(("output_norm", (cfg.dim,)))
    if not cfg.tied_embeddings:
        out.append(("output", (cfg.vocab_size, cfg.dim)))
    return out


def _weight_array(w: WeightStore, name: str, w_cfg: ModelConfig) -> np.ndarray:
    """One parameter of weight_params from the store's (dequantized) tensors; merged ones concatenated."""
    g = lambda n: np.asarray(w.get(n), dtype=np.float32)  # noqa: E731
    if name.endswith("attn_qkv"):
        return np.concatenate([g(f"{name[:-3]}{x}.weight") for x in "qkv"])
    if name.endswith("attn_qkv.bias"):
        p, c = name[:-len("qkv.bias")], w_cfg
        sizes = {"q": c.n_heads * c.head_dim, "k": c.n_kv_heads * c.head_dim, "v": c.n_kv_heads * c.head_dim}
        return np.concatenate([g(p + x + ".bias") if p + x + ".bias" in w else np.zeros(sizes[x], np.float32)
                               for x in "qkv"])
    if name.endswith("ffn_gate_up"):
        return np.concatenate([g(name[:-len("gate_up")] + "gate.weight"), g(name[:-len("gate_up")] + "up.weight")])
    return g(name + ".weight")


class RelaxBackend(LibraryBackend):
    """Runs the model with a Relax VM executable from edgellm.compiler.relax_build through the TVM runtime.

    A prompt runs in chunks of up to `chunk` tokens through `prefill` / `prefill_last` (T symbolic), a
    generated token through `decode`: one VM call each."""

    name = "tvm-relax"


    def _set_threads(self, ffi) -> None:
        """As TvmBackend: `threads`, else the physical cores; TVM reads TVM_NUM_THREADS at its first parallel run."""
        import psutil
        n = int(self.threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1)
        os.environ["TVM_NUM_THREADS"] = str(n)
        ffi.get_global_func("runtime.config_threadpool")(1, n)
        self.threads_used = int(ffi.get_global_func("runtime.NumThreads")())

    def prepare(self) -> None:
        """Create the VM, check it was built for this model, bind the weights (float32, aligned), once."""
        if self._ready:
            return
        ffi = _runtime()
        self._set_threads(ffi)
        try:
            vm = self.lib["vm_load_executable"]()
        except Exception as e:  # noqa: BLE001 - AttributeError or a TVM error
            raise EdgeLLMError(f"{self.library} is not a Relax VM executable ({e})",
                               "build it with edgellm.compiler.relax_build.build_relax") from None
        vm["vm_initialization"](_CPU, 0, _POOLED)
        self.vm = vm
        try:
            vm[relax_signature(self.cfg)]
            self.fns = {n: vm[n] for n in FUNCTIONS}
        except Exception:  # noqa: BLE001
            raise EdgeLLMError(f"Relax executable {self.library} was not compiled for this model configuration",
                               "recompile it for this model (edgellm.compiler.relax_build.build_relax)") from None
        self._w = [Buffer(_weight_array(self.weights, n, self.cfg)) for n, _ in weight_params(self.cfg)]
        self.params = [b.t for b in self._w]
        self._ids: dict[int, tuple[np.ndarray, object]] = {}
        self._rope_n = 0
        self._ready = True

    def _rope(self, n_ctx: int):
        if n_ctx > self._rope_n:
            cos, sin = rope_tables(self.cfg, np.arange(n_ctx))
            self.cos, self.sin = Buffer(cos), Buffer(sin)
            self._rope_n = n_ctx
        return self.cos.t, self.sin.t

    def _ids_tensor(self, tokens: np.ndarray):
        """An int32 tensor of the chunk's token ids (one buffer per chunk length, reused)."""
        T = len(tokens)
        if T not in self._ids:
            a = np.zeros(T, np.int32)
            self._ids[T] = (a, _runtime().from_dlpack(a))
        a, t = self._ids[T]
        a[:] = tokens
        return t

    def new_cache(self, n_ctx: int) -> KVCache:
        return TvmKVCache(self.cfg, n_ctx)

    def _call(self, fn: str, tokens: np.ndarray, pos: int, kv: TvmKVCache) -> np.ndarray:
        ffi = _runtime()
        cos, sin = self._rope(kv.n_ctx)
        out = self.fns[fn](self._ids_tensor(tokens), ffi.Shape([pos]), kv.tk, kv.tv, cos, sin, *self.params)
        return np.from_dlpack(out).copy()

    def _run(self, tokens, pos, kv, want):
        fn = "decode" if len(tokens) == 1 else ("prefill" if want == "all" else "prefill_last")
        logits = self._call(fn, tokens, pos, kv)
        kv.length = pos + len(tokens)
        return logits if want else None


def main(argv=None) -> int:
    """Device smoke test: greedy ids as JSON (see tvm_backend.smoke_main)."""
    from .tvm_backend import smoke_main
    return smoke_main(RelaxBackend, "python -m edgellm.runtime.relax_backend", argv)


if __name__ == "__main__":
    raise SystemExit(main())
