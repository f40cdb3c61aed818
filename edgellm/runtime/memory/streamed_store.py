"""A weight store that holds at most a memory budget of weight bytes and streams the rest from weights.bin.

Resident (read once, kept): the output matrix and the token embedding (an untied one is read a row
per token when the budget is short; a tied one is the output matrix, needed whole every token), plus
in neuron mode every layer's norms and ffn_down shared bits. The rest of the budget goes, in naive mode, to whole layers in layer order; in neuron
mode first to whole attention blocks (every token needs all of them), then to FFN neuron slots,
filled hot-first from the bundle's neuron ranking (else neuron order). Anything not resident is
read from storage when a token needs it: naive mode reads a layer's whole region; neuron mode reads
only the needed neurons' records (gate row + up row + down column, one contiguous record each),
merging records closer than `coalesce_bytes` into one read. With `window=k`, neurons read for a
token replace slots whose neurons no token of the last k used (LLM in a flash's sliding window).

Reads use os.pread and posix_fadvise(DONTNEED) on what was read, so the next read of the same bytes
comes from the device, not the page cache, or with `direct_io` O_DIRECT (whole aligned pages, never
cached; see direct_io.py); an optional StorageModel stretches reads to an emulated
device. Streamed bytes are dequantized again every token, which is where a streamed token's CPU time
goes: dequant.py does it exactly (bit-identical to gguf) in few long numpy passes, straight into the
arrays the FFN computes on. Budget accounting counts the stored (quantized) bytes of what is resident;
the numpy backend also keeps float32 working copies of them (reported by `compute_cache_bytes`), which a
quantized-kernel backend would not need. Transient staging (at most the layer being computed and
the one being prefetched) is outside the budget and reported as fixed overhead.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import quant_shape_to_byte_shape

from ...errors import EdgeLLMError
from ..act_quant import MIN_TYPES, block_mins
from ..bundle import TYPED, BundleStore, unbundle_down
from ..weights import TensorInfo, WeightStore
from .budget import check_budget, embedding_on_demand, fmt_bytes, minimum_resident_set
from .dequant import dequantize_rows, down_columns, down_scales, shared_is_header
from .direct_io import DIRECT_FLAG, DirectIOUnsupported, DirectReader, open_direct
from .stats import StreamStats
from .storage_model import StorageModel, get_storage_model

MODES = ("naive", "neuron")
EMBED = "token_embd.weight"
FFN_PARTS = ("ffn_gate", "ffn_up", "ffn_down")


@dataclass
class Tensor:
    """A decoded weight ready for the numpy backend: float32 values, type and Q4_1/Q5_1 block minimums."""

    w: np.ndarray
    qtype: Q
    mins: np.ndarray | None


def _typed(data: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    data = np.ascontiguousarray(data).reshape(-1)
    if qtype in TYPED:
        return data.view(TYPED[qtype]).reshape(shape)
    return data.reshape(quant_shape_to_byte_shape(shape, qtype))


def decode(raw: np.ndarray, qtype: Q, shape: tuple[int, ...], out: np.ndarray | None = None) -> Tensor:
    """Stored bytes -> Tensor (what BundleStore.get returns, plus the block minimums); into `out` if given."""
    r = _typed(raw, qtype, shape)
    if qtype == Q.BF16:
        w = (r.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
        if out is not None:
            out[...] = w
            w = out
        mins = None
    else:
        mins = np.empty((shape[0], shape[1] // 32), np.float32) if len(shape) == 2 and qtype in MIN_TYPES else None
        w = dequantize_rows(r, qtype, shape, out, mins)
    return Tensor(w, qtype, mins)


class _Reader:
    """pread from weights.bin, evicting what was read from the page cache (or bypassing it: O_DIRECT);
    optional device emulation."""

    def __init__(self, path, stats: StreamStats, storage: StorageModel | None, evict: bool, direct: bool = False):
        self.fd = os.open(path, os.O_RDONLY)
        self.stats, self.storage, self.evict = stats, storage, evict and hasattr(os, "posix_fadvise")
        self.lock = threading.Lock()
        self.direct: DirectReader | None = None
        self.direct_refused: str | None = None
        if direct:
            try:
                self.direct = DirectReader(open_direct(path))
            except DirectIOUnsupported as e:
                self._refuse(e)
        if self.evict:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _refuse(self, e: OSError) -> None:
        """Fall back to buffered reads (with page-cache eviction) and say so once."""
        if self.direct is not None:
            os.close(self.direct.fd)
            self.direct = None
        self.evict = hasattr(os, "posix_fadvise")
        self.direct_refused = e.strerror or str(e)
        warnings.warn(f"direct I/O is not available: {self.direct_refused}; reading through the page cache and "
                      f"evicting what was read instead (put the bundle on a disk filesystem such as ext4/xfs for "
                      f"{DIRECT_FLAG})", RuntimeWarning, stacklevel=3)

    def _pread(self, offset: int, n: int) -> tuple[np.ndarray, int]:
        if self.direct is not None:
            try:
                return self.direct.read(offset, n)
            except DirectIOUnsupported as e:
                self._refuse(e)
        buf = np.empty(n, np.uint8)            # not zero-filled: every byte is read into
        view, got = memoryview(buf), 0
        while got < n:
            k = os.preadv(self.fd, [view[got:]], offset + got)
            if k <= 0:
                break
            got += k
        if self.evict:
            os.posix_fadvise(self.fd, offset, n, os.POSIX_FADV_DONTNEED)
        return buf[:got], got

    def read(self, offset: int, n: int, prefetch: bool = False) -> np.ndarray:
        t = time.perf_counter()
        data, moved = self._pread(offset, n)
        if len(data) < n:
            raise EdgeLLMError(f"weights.bin ended {n - len(data)} bytes early at offset {offset + len(data)}",
                               "the bundle is damaged: re-copy it or compile it again")
        if self.storage is not None:
            self.storage.throttle(moved, time.perf_counter() - t)
        with self.lock:
            s = self.stats
            s.bytes_read += moved
            s.read_requests += 1
            s.io_read_s += time.perf_counter() - t
            if prefetch:
                s.prefetch_bytes += moved
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.direct is not None:
            os.close(self.direct.fd)
            self.direct = None


class _NeuronSlots:
    """One layer's resident FFN neurons: decoded rows in fixed slots, which neuron is where, when last used."""

    def __init__(self, n_slots: int, ffn: int, dim: int, rows: int, nb_g: int, nb_u: int):
        self.ids = np.full(n_slots, -1, dtype=np.int64)
        self.slot_of = np.full(ffn, -1, dtype=np.int64)
        self.last_used = np.full(n_slots, -(1 << 40), dtype=np.int64)
        self.gate = np.zeros((n_slots, dim), np.float32)
        self.up = np.zeros((n_slots, dim), np.float32)
        self.down = np.zeros((rows, n_slots), np.float32)     # down columns, as in ffn_down [rows, ffn]
        self.mins_g = np.zeros((n_slots, nb_g), np.float32) if nb_g else None
        self.mins_u = np.zeros((n_slots, nb_u), np.float32) if nb_u else None

    def put(self, slots: np.ndarray, ids: np.ndarray, dec: dict) -> None:
        old = self.ids[slots]
        self.slot_of[old[old >= 0]] = -1
        self.ids[slots] = ids
        self.slot_of[ids] = slots
        self.gate[slots], self.up[slots] = dec["gate"], dec["up"]
        self.down[:, slots] = dec["down"]
        if self.mins_g is not None:
            self.mins_g[slots] = dec["mins_g"]
        if self.mins_u is not None:
            self.mins_u[slots] = dec["mins_u"]

    @property
    def filled(self) -> int:
        return int((self.ids >= 0).sum())

    @property
    def nbytes_float(self) -> int:
        return sum(a.nbytes for a in (self.gate, self.up, self.down, self.mins_g, self.mins_u) if a is not None)


class StreamedStore(WeightStore):
    """Weights of a bundle under a memory budget (see the module docstring)."""

    def __init__(self, bundle: BundleStore, budget: int, mode: str = "naive", ranking: np.ndarray | None = None,
                 window: int = 0, extra_resident: dict[str, int] | None = None,
                 storage: StorageModel | str | None = None, evict_page_cache: bool = True,
                 coalesce_bytes: int | None = None, prefetch: bool = True, spec=None, direct_io: bool = False):
        if mode not in MODES:
            raise EdgeLLMError(f"unknown streaming mode {mode!r}", f"choose one of: {', '.join(MODES)}")
        if not isinstance(bundle, BundleStore):
            raise EdgeLLMError("a memory budget needs a compiled bundle (its weights.bin has the streaming layout)",
                               "compile the model first: edgellm compile MODEL -o BUNDLE_DIR, then run the bundle")
        self.b, self.mode, self.budget, self.window = bundle, mode, int(budget), int(window)
        storage = get_storage_model(storage)
        if coalesce_bytes is None:   # merge reads across a gap when reading it costs less than one more request
            coalesce_bytes = int(storage.latency_us * 1e-6 * storage.read_mb_s * 1e6) if storage else 4096
        self.coalesce_bytes = int(coalesce_bytes)
        self.extra = dict(extra_resident or {})
        self.minimum = minimum_resident_set(bundle, mode, self.extra.get("predictor", 0))
        check_budget(self.budget, self.minimum, spec)
        self.n_layers = len(bundle.layers)
        self.stats = StreamStats(emulated=storage.label if storage else None)
        if not isinstance(direct_io, bool):
            raise EdgeLLMError(f"direct_io={direct_io!r} is not on/off",
                               f"pass True or False ({DIRECT_FLAG} on the command line)")
        self.io = _Reader(bundle.file, self.stats, storage, evict_page_cache, direct_io)
        self.stats.io_mode = self.io_mode
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgellm-prefetch") if prefetch else None
        self._pending: dict[tuple, Future] = {}
        self.step = 0
        self._layer_names = {i: [] for i in range(self.n_layers)}
        fixed = []
        # an untied embedding costs a row per token when streamed: only worth keeping if everything fits
        self.embed_on_demand = embedding_on_demand(bundle) and self.budget < bundle.stored_bytes()
        for n in bundle.names():
            if n.startswith("blk."):
                self._layer_names[int(n.split(".")[1])].append(n)
            elif not (n == EMBED and self.embed_on_demand):
                fixed.append(n)
        if mode == "neuron":
            fixed += [n for i in range(self.n_layers) for n in self._layer_names[i] if n.endswith("norm.weight")]
        self._res: dict[str, Tensor] = {n: self._read_tensor(n) for n in fixed}
        self._res_bytes = sum(bundle.info(n).nbytes for n in fixed) + sum(self.extra.values())
        self._shared: dict[int, np.ndarray] = {}
        self._down_mins: dict[int, np.ndarray | None] = {}
        self._affine: dict[int, tuple] = {}
        left = self.budget - self._res_bytes
        self.resident_layers: set[int] = set()     # naive: whole layer; neuron: attention block
        self.slots: dict[int, _NeuronSlots] = {}
        if mode == "naive":
            for i in range(self.n_layers):
                nb = sum(bundle.info(n).nbytes for n in self._layer_names[i])
                if nb <= left:
                    self._res.update(self._load_layer(i))
                    self._res_bytes += nb
                    self.resident_layers.add(i)
                    left -= nb
        else:
            for i in range(self.n_layers):
                s = bundle.ffn_layout(i)["down_shared"]
                self._shared[i] = self.io.read(int(s["offset"]), int(s["nbytes"]))
                self._res_bytes += int(s["nbytes"])
                self._down_mins[i] = self._shared_mins(i)
            left = self.budget - self._res_bytes
            for i in range(self.n_layers):
                names = self._attention_names(i)
                nb = sum(bundle.info(n).nbytes for n in names)
                if nb <= left:
                    self._keep_layer(i, names)
                    left -= nb
            per_layer = left // self.n_layers
            for i in range(self.n_layers):
                self._fill_slots(i, per_layer, None if ranking is None else np.asarray(ranking[i]))
        assert self.resident_bytes() <= self.budget, "budget accounting error"
        self.stats.reset()
        self.stats.peak_resident = self.resident_bytes()

    @property
    def io_mode(self) -> str:
        """How reads reach the device (printed with the statistics)."""
        if self.io.direct is not None:
            return "real, O_DIRECT (page cache bypassed)"
        why = f"O_DIRECT refused: {self.io.direct_refused}; " if self.io.direct_refused else ""
        return f"real ({why}page cache evicted)" if self.io.evict else f"real ({why}page cache kept)"

    # ---- planning helpers ----

    def _attention_names(self, i: int) -> list[str]:
        return [n for n in self._layer_names[i] if not n.endswith("norm.weight") and "bundled" not in self.b._t[n]]

    def _keep_layer(self, i: int, names: list[str]) -> None:
        dec = self._read_span(names)
        self._res.update(dec)
        self._res_bytes += sum(self.b.info(n).nbytes for n in names)
        self.resident_layers.add(i)

    def _ffn_meta(self, i: int):
        p = f"blk.{i}."
        return [self.b.info(p + f + ".weight") for f in FFN_PARTS]

    def _fill_slots(self, i: int, nbytes: int, ranking: np.ndarray | None) -> None:
        gi, ui, di = self._ffn_meta(i)
        stride = self.b.neuron_span(i, 0)[1]
        ffn = gi.shape[0]
        n = int(min(ffn, max(0, nbytes // stride)))
        nb = lambda t: block_mins(np.zeros(quant_shape_to_byte_shape((1, t.shape[1]), t.qtype), np.uint8)  # noqa: E731
                                  if t.qtype not in TYPED else np.zeros(0), t.qtype, 1)
        mg, mu = nb(gi), nb(ui)
        self.slots[i] = s = _NeuronSlots(n, ffn, gi.shape[1], di.shape[0], 0 if mg is None else mg.shape[1],
                                         0 if mu is None else mu.shape[1])
        if n:
            ids = np.sort((ranking if ranking is not None else np.arange(ffn))[:n]).astype(np.int64)
            s.put(np.arange(n), ids, self._decode_records(i, ids, self._read_records(i, ids)))
            self._res_bytes += n * stride

    # ---- WeightStore ----

    def info(self, name: str) -> TensorInfo:
        return self.b.info(name)

    def names(self) -> Iterator[str]:
        return self.b.names()

    def __contains__(self, name: str) -> bool:
        return name in self.b

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes, read from storage (only the backend's decoded copies stay resident)."""
        return self._raw_from_file(name)

    def get(self, name: str) -> np.ndarray:
        t = self._res.get(name)
        if t is not None:
            return t.w
        return self._read_tensor(name).w

    def resident_bytes(self) -> int:
        """Stored bytes of the weights held across tokens (always <= the budget)."""
        return self._res_bytes

    def compute_cache_bytes(self) -> int:
        """float32 working copies the numpy backend keeps of the resident weights (outside the budget)."""
        n = sum(t.w.nbytes + (t.mins.nbytes if t.mins is not None else 0) for t in self._res.values())
        n += sum(s.nbytes_float for s in self.slots.values())
        n += sum(m.nbytes for m in self._down_mins.values() if m is not None)
        n += sum(a.nbytes for dm in self._affine.values() for a in dm if a is not None)
        return n

    def describe(self) -> str:
        ffn_total = sum(self.slots[i].filled for i in self.slots)
        parts = [f"{self.mode} streaming, budget {fmt_bytes(self.budget)}, resident {fmt_bytes(self.resident_bytes())}",
                 f"minimum {fmt_bytes(self.minimum.total)} ({self.minimum.describe()})"]
        if self.mode == "naive":
            parts.append(f"{len(self.resident_layers)}/{self.n_layers} layers resident")
        else:
            parts.append(f"{len(self.resident_layers)}/{self.n_layers} attention blocks and {ffn_total} FFN neurons "
                         f"resident" + (f", window {self.window} tokens" if self.window else ""))
        if self.embed_on_demand:
            parts.append("token embedding rows read on demand (untied output matrix)")
        parts.append(self.stats.emulated or self.io_mode)
        return "; ".join(parts)

    # ---- reading ----

    def _raw_from_file(self, name: str) -> np.ndarray:
        i = self.b.info(name)
        t = self.b._t[name]
        if "bundled" in t:
            layer = int(t["layer"])
            return _typed(self._ffn_raw(layer, self._read_ffn(layer))[t["bundled"]], i.qtype, i.shape)
        return _typed(self.io.read(int(t["offset"]), i.nbytes), i.qtype, i.shape)

    def _read_tensor(self, name: str) -> Tensor:
        i = self.b.info(name)
        t = self.b._t[name]
        if "bundled" in t:
            layer = int(t["layer"])
            raw = self._ffn_raw(layer, self._read_ffn(layer))[t["bundled"]]
            return decode(raw, i.qtype, i.shape)
        return decode(self.io.read(int(t["offset"]), i.nbytes), i.qtype, i.shape)

    def _read_span(self, names: list[str], prefetch: bool = False, raw: bool = False):
        """Read non-FFN tensors stored next to each other with one read and decode them (raw: just the bytes)."""
        if not names:
            return (0, np.zeros(0, np.uint8), []) if raw else {}
        ts = [self.b._t[n] for n in names]
        lo = min(int(t["offset"]) for t in ts)
        hi = max(int(t["offset"]) + int(t["nbytes"]) for t in ts)
        data = self.io.read(lo, hi - lo, prefetch)
        if raw:
            return lo, data, names
        out = {}
        for n, t in zip(names, ts):
            i = self.b.info(n)
            out[n] = decode(data[int(t["offset"]) - lo:int(t["offset"]) - lo + i.nbytes], i.qtype, i.shape)
        return out

    def _read_ffn(self, layer: int, prefetch: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """A layer's ffn_down shared bits and all its neuron records, in one read."""
        ffn = self.b.ffn_layout(layer)
        r, s = ffn["records"], ffn["down_shared"]
        lo = min(int(r["offset"]), int(s["offset"]))
        hi = max(int(r["offset"]) + int(r["count"]) * int(r["stride"]), int(s["offset"]) + int(s["nbytes"]))
        data = self.io.read(lo, hi - lo, prefetch)
        shared = data[int(s["offset"]) - lo:int(s["offset"]) - lo + int(s["nbytes"])]
        ro = int(r["offset"]) - lo
        return shared, data[ro:ro + int(r["count"]) * int(r["stride"])].reshape(int(r["count"]), int(r["stride"]))

    def _ffn_raw(self, layer: int, shared_records) -> dict[str, np.ndarray]:
        shared, rec = shared_records
        ffn = self.b.ffn_layout(layer)
        di = self._ffn_meta(layer)[2]
        part = lambda p: np.ascontiguousarray(rec[:, ffn[p]["at"]:ffn[p]["at"] + ffn[p]["nbytes"]])  # noqa: E731
        down = unbundle_down(part("down"), shared, di.shape[0], self.b.down_bits[di.qtype.name])
        return {"gate": part("gate"), "up": part("up"), "down": down}

    def _read_covering(self, layer: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prefetch: the records of sorted ids and of every neuron a merged read passes over (they come free)."""
        r = self.b.ffn_layout(layer)["records"]
        base, stride = int(r["offset"]), int(r["stride"])
        gap = max(1, self.coalesce_bytes // stride)
        breaks = np.nonzero(np.diff(ids) > gap)[0] + 1
        got_ids, got = [], []
        start = 0
        for end in [*breaks.tolist(), len(ids)]:
            a, b = int(ids[start]), int(ids[end - 1])
            got.append(self.io.read(base + a * stride, (b - a + 1) * stride, True).reshape(-1, stride))
            got_ids.append(np.arange(a, b + 1))
            start = end
        if len(got) == 1:                       # one merged read (no predictor): no copy
            return got_ids[0], got[0]
        return np.concatenate(got_ids), np.concatenate(got)

    def _read_records(self, layer: int, ids: np.ndarray, prefetch: bool = False) -> np.ndarray:
        """uint8 [len(ids), stride]: the records of sorted neuron ids, neighbours merged into one read."""
        r = self.b.ffn_layout(layer)["records"]
        base, stride = int(r["offset"]), int(r["stride"])
        out = np.empty((len(ids), stride), np.uint8)
        if not len(ids):
            return out
        gap = max(1, self.coalesce_bytes // stride)        # merge when fewer than `gap` records lie between
        breaks = np.nonzero(np.diff(ids) > gap)[0] + 1
        start = 0
        for end in [*breaks.tolist(), len(ids)]:
            a, b = int(ids[start]), int(ids[end - 1])
            data = self.io.read(base + a * stride, (b - a + 1) * stride, prefetch).reshape(-1, stride)
            out[start:end] = data[ids[start:end] - a]
            start = end
        return out

    def _down_scales(self, layer: int, shared: np.ndarray) -> tuple | None:
        """ffn_down's block scales (d, m) [rows, blocks] read off its shared bits, when the bundle's bit split is
        the affine gguf layout (then `down_columns` decodes columns directly); else None."""
        di = self._ffn_meta(layer)[2]
        if not shared_is_header(di.qtype, self.b.down_bits[di.qtype.name]):
            return None
        return down_scales(shared, di.qtype, di.shape[0], di.shape[1] // 32)

    def _shared_mins(self, layer: int) -> np.ndarray | None:
        """ffn_down's block minimums [rows, blocks] from the resident shared bits; also caches the block
        scales/minimums of affine types (Q4_0, Q4_1, Q8_0) for `down_columns`."""
        di = self._ffn_meta(layer)[2]
        aff = self._down_scales(layer, self._shared[layer])
        if aff is not None:
            self._affine[layer] = aff
            return aff[1]                   # Q4_1's minimums; Q4_0 and Q8_0 have none
        if di.qtype not in MIN_TYPES:
            return None
        rows = di.shape[0]
        zeros = np.zeros((di.shape[1], self.b.ffn_layout(layer)["down"]["nbytes"]), np.uint8)
        shared_only = unbundle_down(zeros, self._shared[layer], rows, self.b.down_bits[di.qtype.name])
        return block_mins(shared_only.reshape(rows, -1), di.qtype, rows)

    def _decode_records(self, layer: int, ids: np.ndarray, rec: np.ndarray, out: dict | None = None,
                        aff: tuple | None = None) -> dict:
        """Neuron records -> float gate/up rows [k, dim], down columns [rows, k] and gate/up block minimums.

        out: arrays (or views) to decode gate/up/down into; aff: ffn_down's block scales (default: the cached ones).
        """
        gi, ui, di = self._ffn_meta(layer)
        ffn = self.b.ffn_layout(layer)
        k, out = len(ids), out or {}
        part = lambda p: rec[:, ffn[p]["at"]:ffn[p]["at"] + ffn[p]["nbytes"]]  # noqa: E731
        g = decode(part("gate"), gi.qtype, (k, gi.shape[1]), out.get("gate"))
        u = decode(part("up"), ui.qtype, (k, ui.shape[1]), out.get("up"))
        aff = aff or self._affine.get(layer)
        if aff is not None:
            down = down_columns(part("down"), ids, di.qtype, di.shape[0], *aff, out=out.get("down"))
        else:
            down = np.ascontiguousarray(decode_down(part("down"), ids, self._shared[layer],
                                                    self.b.down_bits[di.qtype.name], di.qtype, di.shape[0],
                                                    di.shape[1]).T)
            if out.get("down") is not None:
                out["down"][...] = down
                down = out["down"]
        return {"gate": g.w, "up": u.w, "down": down, "mins_g": g.mins, "mins_u": u.mins}

    # ---- what the backend calls ----

    def _take(self, key):
        fut = self._pending.pop(key, None)
        if fut is None:
            return None
        t = time.perf_counter()
        r = fut.result()
        self.stats.io_wait_s += time.perf_counter() - t
        return r

    def _sync(self, fn, *args):
        t = time.perf_counter()
        r = fn(*args)
        self.stats.io_wait_s += time.perf_counter() - t
        return r

    def prefetch_layer(self, i: int) -> None:
        """Start reading layer i's streamed part (naive: the whole region; neuron: its attention block)."""
        if self._pool is None or i in self.resident_layers or ("layer", i) in self._pending:
            return
        self._pending[("layer", i)] = self._pool.submit(self._read_layer, i, True)

    def _read_layer(self, i: int, prefetch: bool = False):
        """The bytes of layer i's streamed part (the I/O thread's job; decoding is compute, done by the caller)."""
        names = self._attention_names(i) if self.mode == "neuron" else \
            [n for n in self._layer_names[i] if "bundled" not in self.b._t[n]]
        span = self._read_span(names, prefetch, raw=True)
        return span, (self._read_ffn(i, prefetch) if self.mode == "naive" else None)

    def _decode_layer(self, i: int, data) -> dict[str, Tensor]:
        (lo, blob, names), ffn = data
        dec = {}
        for n in names:
            t, info = self.b._t[n], self.b.info(n)
            dec[n] = decode(blob[int(t["offset"]) - lo:int(t["offset"]) - lo + info.nbytes], info.qtype, info.shape)
        if ffn is not None:
            names = [f"blk.{i}.{part}.weight" for part in FFN_PARTS]
            aff = self._down_scales(i, ffn[0])
            if aff is None:                 # other types: re-pack ffn_down's blocks from its bit split
                raw = self._ffn_raw(i, ffn)
                for n, part, info in zip(names, FFN_PARTS, self._ffn_meta(i)):
                    dec[n] = decode(raw[part[4:]], info.qtype, info.shape)
                return dec
            rec = ffn[1]
            r = self._decode_records(i, np.arange(len(rec)), rec, aff=aff)
            qt = [info.qtype for info in self._ffn_meta(i)]
            dec[names[0]], dec[names[1]] = Tensor(r["gate"], qt[0], r["mins_g"]), Tensor(r["up"], qt[1], r["mins_u"])
            dec[names[2]] = Tensor(r["down"], qt[2], aff[1])
        return dec

    def _load_layer(self, i: int) -> dict[str, Tensor]:
        return self._decode_layer(i, self._read_layer(i))

    def layer(self, i: int) -> dict[str, Tensor]:
        """Decoded tensors of layer i: resident ones, plus the streamed part (prefetched or read now)."""
        if i in self.resident_layers:
            return self._res
        data = self._take(("layer", i))
        if data is None:
            data = self._sync(self._read_layer, i)
        return {**self._res, **self._decode_layer(i, data)}

    def resident(self, name: str) -> Tensor:
        return self._res[name]

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Token embeddings [T, dim]: from the resident matrix, or (untied models) only the tokens' rows, read now."""
        if not self.embed_on_demand:
            return self._res[EMBED].w[tokens]
        info, t = self.b.info(EMBED), self.b._t[EMBED]
        vocab, row = info.shape[0], info.nbytes // info.shape[0]
        uniq, inv = np.unique(tokens, return_inverse=True)
        if uniq.min() < 0 or uniq.max() >= vocab:
            raise EdgeLLMError(f"token id {int(uniq.max() if uniq.max() >= vocab else uniq.min())} is outside the "
                               f"vocabulary of {vocab}", "encode the text with this model's tokenizer")
        raw = np.stack([self._sync(self.io.read, int(t["offset"]) + int(u) * row, row) for u in uniq])
        return decode(raw, info.qtype, (len(uniq), *info.shape[1:])).w[inv.reshape(-1)]

    def down_mins(self, layer: int) -> np.ndarray | None:
        """ffn_down's block minimums (resident shared bits), None for types without minimums."""
        return self._down_mins[layer]

    def prefetch_neurons(self, layer: int, ids: np.ndarray) -> None:
        """Start reading the records of those of `ids` that are not resident (a speculative guess)."""
        if self._pool is None or ("neurons", layer) in self._pending:
            return
        ids = np.asarray(ids, dtype=np.int64)
        miss = ids[self.slots[layer].slot_of[ids] < 0]
        if len(miss):
            self._pending[("neurons", layer)] = self._pool.submit(self._read_covering, layer, miss)

    def _lookup(self, layer: int, ids: np.ndarray):
        """Sorted `ids` plus any prefetched neurons; their slots, which are resident, which to load, the prefetch."""
        ids = want_ids = np.asarray(ids, dtype=np.int64)
        s = self.slots[layer]
        st = self.stats
        pre = self._take(("neurons", layer))
        if pre is not None:
            ids = _merge(ids, pre[0])
            st.prefetch_wasted += len(ids) - len(want_ids)
        slots = s.slot_of[ids]
        hit = slots >= 0
        s.last_used[slots[hit]] = self.step
        miss = ids[~hit]
        st.neuron_hits += int(hit.sum())
        st.neuron_misses += len(miss)
        st.neurons_needed += len(ids)
        st.neurons_total += len(s.slot_of)
        return ids, slots, hit, miss, pre

    def _load(self, layer: int, miss: np.ndarray, pre, out: dict | None = None) -> dict:
        """Decoded records of the non-resident neurons `miss` (into `out` if given): from the prefetch where it
        has them, else read now."""
        if pre is not None and len(pre[0]) == len(miss) and np.array_equal(pre[0], miss):
            return self._decode_records(layer, miss, pre[1], out)      # the prefetch read exactly these
        rec = np.empty((len(miss), self.b.neuron_span(layer, 0)[1]), np.uint8)
        have = np.zeros(len(miss), bool)
        if pre is not None and len(miss):
            pids, prec = pre
            pos = np.minimum(np.searchsorted(pids, miss), len(pids) - 1)
            have = pids[pos] == miss
            rec[have] = prec[pos[have]]
        if (~have).any():
            rec[~have] = self._sync(self._read_records, layer, miss[~have])
        return self._decode_records(layer, miss, rec, out)

    def neurons(self, layer: int, ids: np.ndarray, exact: bool = True) -> tuple[np.ndarray, dict]:
        """Decoded neurons of `layer`: the sorted `ids` plus any neurons the I/O thread already read for it.

        Returns (loaded ids, {gate, up [k, dim], down [dim, k], mins_g, mins_u, mins_d}). Neurons that
        were prefetched on a guess are returned too: they cost no more I/O, so the FFN computes them.
        The resident neurons come first and the streamed ones after them (decoded in place), each group in
        id order; with `exact`, only where that is id order (else as sorted ids, gathered), since the order of
        the down product's sum sets its rounding.
        """
        ids, slots, hit, miss, pre = self._lookup(layer, ids)
        s = self.slots[layer]
        k = len(ids)
        if not len(miss) and k == len(s.ids) and (slots == np.arange(k)).all():
            # the whole layer is resident in id order: compute on the slots themselves, no copies
            return ids, {"gate": s.gate, "up": s.up, "down": s.down, "mins_g": s.mins_g, "mins_u": s.mins_u,
                         "mins_d": self._down_mins[layer]}
        if not hit.any():                  # nothing resident (small budgets): the decoded records as they are
            dec = self._load(layer, miss, pre)
            self.admit(layer, miss, dec)
            return ids, {**dec, "mins_d": self._down_mins[layer]}
        hot, hs = ids[hit], slots[hit]
        if not exact or not len(miss) or hot[-1] < miss[0]:
            ids, hit = np.concatenate([hot, miss]), np.arange(k) < len(hot)
        dim, rows = s.gate.shape[1], s.down.shape[0]
        out = {"gate": np.empty((k, dim), np.float32), "up": np.empty((k, dim), np.float32),
               "down": np.empty((rows, k), np.float32),
               "mins_g": None if s.mins_g is None else np.empty((k, s.mins_g.shape[1]), np.float32),
               "mins_u": None if s.mins_u is None else np.empty((k, s.mins_u.shape[1]), np.float32)}
        at = lambda key, pos: (slice(None), pos) if key == "down" else pos  # noqa: E731  (down: columns)
        hp, hs, cp = _run(np.nonzero(hit)[0]), _run(hs), _run(np.nonzero(~hit)[0])
        src = {"gate": s.gate, "up": s.up, "down": s.down, "mins_g": s.mins_g, "mins_u": s.mins_u}
        for key, a in src.items():
            if a is not None:
                out[key][at(key, hp)] = a[at(key, hs)] if isinstance(hs, slice) else \
                    np.take(a, hs, axis=1 if key == "down" else 0)
        if len(miss):
            direct = ("gate", "up", "down") if isinstance(cp, slice) else ()    # decoded straight into `out`
            dec = self._load(layer, miss, pre, {key: out[key][at(key, cp)] for key in direct})
            for key in src:
                if out[key] is not None and key not in direct:
                    out[key][at(key, cp)] = dec[key]
            self.admit(layer, miss, dec)
        out["mins_d"] = self._down_mins[layer]
        return ids, out

    def split_neurons(self, layer: int, ids: np.ndarray):
        """For the hot/cold split: (hot ids, their slots, cold ids, a function decoding the cold records).

        The hot neurons stay in the slots (the device computes on them while the caller has the cold ones
        read and decoded); the caller then calls `admit` (windowing), once the device is done with the slots.
        """
        ids, slots, hit, miss, pre = self._lookup(layer, ids)
        return ids[hit], slots[hit], miss, lambda: self._load(layer, miss, pre) if len(miss) else None

    def admit(self, layer: int, ids: np.ndarray, dec: dict | None) -> np.ndarray:
        """Windowing: keep just-read neurons resident (returns the refilled slots; none without a window)."""
        if self.window <= 0 or dec is None or not len(ids):
            return np.zeros(0, np.int64)
        return self._admit(self.slots[layer], ids, dec)

    def _admit(self, s: _NeuronSlots, ids: np.ndarray, dec: dict) -> np.ndarray:
        """Windowing: put just-read neurons into slots no token of the last `window` tokens used (oldest first)."""
        free = np.nonzero(s.last_used <= self.step - self.window)[0]
        if not len(free):
            return free
        free = free[np.argsort(s.last_used[free], kind="stable")][:len(ids)]
        take = np.arange(len(free))
        s.put(free, ids[take], {k: None if v is None else v[:, take] if k == "down" else v[take] for k, v in dec.items()})
        s.last_used[free] = self.step
        return free

    def end_forward(self) -> None:
        self.step += 1
        r = self.resident_bytes()
        if r > self.budget:      # cannot happen: slots are fixed at load time; kept as a hard guard
            raise EdgeLLMError(f"resident weights {r} exceed the budget {self.budget}", "report this bug")
        self.stats.peak_resident = max(self.stats.peak_resident, r)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.io.close()


def decode_down(cols: np.ndarray, ids: np.ndarray, shared: np.ndarray, bits: dict, qtype: Q, rows: int,
                n_neurons: int) -> np.ndarray:
    """ffn_down columns of neurons `ids` as float32 [k, rows], from their records' element bits + the shared bits.

    Builds one block per (row, block holding a needed neuron) with the shared bits and every needed
    element's bits, and dequantizes it with the gguf library: values equal the full matrix's exactly.
    """
    block, tsize = bits["block_size"], bits["type_size"]
    elem = np.asarray(bits["element_bits"], dtype=np.intp)             # [block, b]
    shared_idx = np.asarray(bits["shared_bits"], dtype=np.intp)
    k, b = len(ids), elem.shape[1]
    ublk, inv = np.unique(ids // block, return_inverse=True)
    q = np.unpackbits(cols, axis=1, bitorder="little")[:, :rows * b].reshape(k, rows, b)
    blocks = np.zeros((rows, len(ublk), tsize * 8), dtype=np.uint8)
    if len(shared_idx):
        nsh = len(shared_idx)
        sb = np.unpackbits(shared, bitorder="little")[:rows * (n_neurons // block) * nsh].reshape(rows, -1, nsh)
        blocks[:, :, shared_idx] = sb[:, ublk]
    e = ids % block
    blocks[:, inv[:, None], elem[e]] = q.transpose(1, 0, 2)
    packed = np.packbits(blocks, axis=2, bitorder="little").reshape(-1)
    vals = decode(packed, qtype, (rows * len(ublk), block)).w.reshape(rows, len(ublk), block)
    return np.ascontiguousarray(vals[:, inv, e].T)


def _run(idx: np.ndarray) -> np.ndarray | slice:
    """Positions as a slice when they are one increasing run (copies become block copies), else as they are."""
    if len(idx) and (np.diff(idx) == 1).all():
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted union of sorted unique id arrays (np.union1d, without its sort when b adds nothing to a)."""
    pos = np.minimum(np.searchsorted(a, b), max(len(a) - 1, 0))
    new = b if not len(a) else b[a[pos] != b]
    return a if not len(new) else np.union1d(a, new)
