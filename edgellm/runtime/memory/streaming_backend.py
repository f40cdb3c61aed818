"""The numpy backend over a StreamedStore: the reference forward pass, with a sparse FFN in neuron mode.

Same functions as model.py (rms_norm, rope, attention, silu, ggml activation rounding), so with every
weight resident, or in naive mode, or in neuron mode with every neuron active, the logits are
bit-identical to `Transformer`. With a predictor, each layer computes only the neurons it predicts
for the FFN input; the I/O thread reads the next layer's attention block and, while this layer's
attention computes, the neurons predicted from the layer input (a guess refined at FFN time; the guessed
neurons are computed too, having been read: `guess=False` reads only the FFN-time prediction, which is
what the predictor alone skips); without a predictor every neuron is needed, so it reads the next
layer's streamed neurons during this layer.
With a second compute device (devices.py), the resident hot neurons run there and the streamed cold
ones here, partial outputs summed per layer (equal to the one-device result to float tolerance).
"""
from __future__ import annotations

import time

import numpy as np

from ...errors import EdgeLLMError
from ..backend import Backend, _thread_limit
from ..config import ModelConfig
from ..kv_cache import KVCache
from ..model import apply_rope, attention, rms_norm, rope_tables, silu
from ..act_quant import quantized_matmul
from .devices import ComputeDevice
from .neuron_profile import NeuronProfile
from .sparse_ffn import down_correction, down_input, ffn_activations, sparse_ffn
from .streamed_store import StreamedStore, Tensor


class StreamingBackend(Backend):
    name = "numpy-streaming"

    def __init__(self, cfg: ModelConfig, store: StreamedStore, predictor: NeuronProfile | None = None,
                 prefetch: bool = True, act_quant: str = "ggml", threads: int | None = None,
                 device: ComputeDevice | None = None, guess: bool = True):
        self.cfg, self.store, self.predictor, self.guess = cfg, store, predictor, guess
        self.prefetch, self.act_quant, self.threads = prefetch, act_quant, threads
        self.output_name = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
        self.device = device
        if device is not None:
            if store.mode != "neuron":
                raise EdgeLLMError(f"the hot/cold device split needs neuron streaming, not {store.mode!r}",
                                   'pass mode="neuron" (or "sparse") with the split, or turn the split off')
            for i in range(cfg.n_layers):
                device.hold(i, store.slots[i], self._ffn_types(i))

    @property
    def stats(self):
        return self.store.stats

    def new_cache(self, n_ctx: int) -> KVCache:
        return KVCache(self.cfg, n_ctx)

    def linear(self, x: np.ndarray, W: dict, name: str) -> np.ndarray:
        t: Tensor = W[name]
        y = quantized_matmul(x, t.w, t.qtype, mins=t.mins) if self.act_quant == "ggml" else x @ t.w.T
        bias = name.replace(".weight", ".bias")
        if self.cfg.attn_bias and bias in W:
            y = y + W[bias].w
        return y

    def block(self, i: int, x: np.ndarray, pos: int, kv: KVCache, cos, sin) -> np.ndarray:
        c, p, st = self.cfg, f"blk.{i}.", self.store
        T = x.shape[0]
        W = st.layer(i)
        if st.mode == "neuron" and self.prefetch:    # overlap reading this layer's neurons with its attention
            if self.predictor is None:               # every neuron is needed: read the next layer's ones too
                st.prefetch_neurons(i, np.arange(c.ffn_dim))          # (no-op when already read or in flight)
                if i + 1 < c.n_layers:               # within this forward, so its reads are done when it returns
                    st.prefetch_neurons(i + 1, np.arange(c.ffn_dim))
            elif self.guess:
                guess = self.predictor.predict(i, rms_norm(x, W[p + "ffn_norm.weight"].w, c.norm_eps))
                st.prefetch_neurons(i, np.nonzero(guess.any(axis=0))[0])
        if self.prefetch:
            st.prefetch_layer((i + 1) % c.n_layers)
        h = rms_norm(x, W[p + "attn_norm.weight"].w, c.norm_eps)
        q = self.linear(h, W, p + "attn_q.weight").reshape(T, c.n_heads, c.head_dim)
        k = self.linear(h, W, p + "attn_k.weight").reshape(T, c.n_kv_heads, c.head_dim)
        v = self.linear(h, W, p + "attn_v.weight").reshape(T, c.n_kv_heads, c.head_dim)
        q = apply_rope(q, cos, sin, c.rope_neox, c.rope_dim)
        k = apply_rope(k, cos, sin, c.rope_neox, c.rope_dim)
        keys, values = kv.update(i, pos, k, v)
        a = attention(q, keys, values, pos, c.n_rep)
        x = x + self.linear(a, W, p + "attn_output.weight")
        h = rms_norm(x, W[p + "ffn_norm.weight"].w, c.norm_eps)
        if st.mode == "naive":
            g = silu(self.linear(h, W, p + "ffn_gate.weight")) * self.linear(h, W, p + "ffn_up.weight")
            return x + self.linear(g, W, p + "ffn_down.weight")
        return x + self.ffn(i, h)

    def _ffn_types(self, i: int) -> tuple:
        return tuple(self.store.info(f"blk.{i}.{f}.weight").qtype for f in ("ffn_gate", "ffn_up", "ffn_down"))

    @staticmethod
    def _mask(active, ids: np.ndarray, want: np.ndarray) -> np.ndarray | None:
        """Per-token activity of loaded neurons `ids` (prefetched-only neurons count as active), None = all."""
        if active is None:
            return None
        mask = active[:, ids] | np.isin(ids, want, invert=True)[None, :]
        return None if mask.all() else mask

    def _count(self, T: int, ids: np.ndarray, mask) -> int:
        n = T * len(ids) if mask is None else int(mask.sum())
        self.store.stats.neurons_computed += n
        return n

    def ffn(self, i: int, h: np.ndarray) -> np.ndarray:
        st, ffn_dim, T = self.store, self.cfg.ffn_dim, h.shape[0]
        active = self.predictor.predict(i, h) if self.predictor is not None else None
        want = np.arange(ffn_dim) if active is None else np.nonzero(active.any(axis=0))[0]
        st.stats.neurons_computed_total += T * ffn_dim
        if self.device is not None:
            return self.split_ffn(i, h, active, want)
        # `want` plus neurons already prefetched on a guess; in any order with a predictor (approximate anyway)
        ids, n = st.neurons(i, want, exact=self.predictor is None)
        mask = self._mask(active, ids, want)
        self._count(T, ids, mask)
        return sparse_ffn(h, ids, ffn_dim, n["gate"], n["up"], n["down"], self._ffn_types(i),
                          (n["mins_g"], n["mins_u"], n["mins_d"]), mask, self.act_quant)

    def split_ffn(self, i: int, h: np.ndarray, active, want: np.ndarray) -> np.ndarray:
        """Hot neurons on the device, cold (streamed) ones here; activations merged and rounded once, down summed."""
        st, dev, T, aq = self.store, self.device, h.shape[0], self.act_quant
        qt = self._ffn_types(i)
        hot, hot_slots, cold, load_cold = st.split_neurons(i, want)
        n_slots = len(st.slots[i].ids)
        sel = None if len(hot) == n_slots and (hot_slots == np.arange(n_slots)).all() else hot_slots
        mh, mc = self._mask(active, hot, want), self._mask(active, cold, want)
        st.stats.device_neurons += self._count(T, hot, mh)
        self._count(T, cold, mc)
        fut = dev.activations(i, h, sel, mh, aq) if len(hot) else None
        dec = load_cold()                      # read + decode the cold neurons while the device computes
        full = np.zeros((T, self.cfg.ffn_dim), np.float32)
        if len(cold):
            full[:, cold] = ffn_activations(h, dec["gate"], dec["up"], qt, (dec["mins_g"], dec["mins_u"]), mc, aq)
        if fut is not None:
            full[:, hot] = self._wait(fut)
        xr, corr = down_input(full, qt[2], aq)
        fut = dev.down(i, xr[:, hot], sel) if len(hot) else None
        y = xr[:, cold] @ dec["down"].T if len(cold) else np.zeros((T, self.cfg.dim), np.float32)
        if fut is not None:
            y = y + self._wait(fut)
        y = y + down_correction(corr, st.down_mins(i))
        changed = st.admit(i, cold, dec)       # after the device is done with this layer's slots
        if len(changed):
            dev.refresh(i, changed)
        return y

    def _wait(self, fut):
        t = time.perf_counter()
        r = fut.result()
        self.store.stats.device_wait_s += time.perf_counter() - t
        return r

    def forward(self, tokens, pos: int, kv: KVCache, all_logits: bool = False) -> np.ndarray:
        st = self.store
        t0, b0 = time.perf_counter(), st.stats.bytes_read
        with _thread_limit(self.threads):
            tokens = np.asarray(tokens, dtype=np.int64)
            x = st.embed(tokens)
            cos, sin = rope_tables(self.cfg, np.arange(pos, pos + len(tokens)))
            for i in range(self.cfg.n_layers):
                x = self.block(i, x, pos, kv, cos, sin)
            if not all_logits:
                x = x[-1:]
            x = rms_norm(x, st.resident("output_norm.weight").w, self.cfg.norm_eps)
            out = self.linear(x, {self.output_name: st.resident(self.output_name)}, self.output_name)
        st.end_forward()
        st.stats.record_forward(len(tokens), st.stats.bytes_read - b0, time.perf_counter() - t0)
        return out

    def close(self) -> None:
        if self.device is not None:
            self.device.close()
        self.store.close()
