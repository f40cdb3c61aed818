"""Load a compiled bundle: the directory `edgellm compile` writes for one target (schema version 1).

Why a bundle and not the GGUF: its weight file is laid out for streaming from flash (issue 6), it
carries the target's compiled kernels and ONNX graphs, and it is checked (sha256, schema, target)
before anything runs. Loading needs nothing from the compiler package.

Layout of BUNDLE_DIR (schema_version 1)::

    manifest.json          everything below is described here
    weights.bin            the weights, bytes as in the source model (quantized blocks kept)
    tokenizer.json         the `tokenizers` tokenizer, as Tokenizer.hf serializes it
    tokenizer_config.json  bos/eos/add_bos/chat_template (HF names) + an "edgellm" section with the
                           llama.cpp token types, eog ids, flags and token texts the runtime Tokenizer needs
    kernels/, onnx/        added by the TVM and ONNX stages (listed in `files` like every other file)
    quant/model.npz        with `--quant w8a8|w4a8|w4a16|w8a16`: the integer model (runtime.intref.QuantizedModel
                           .save), run by backend "int"; the float weights stay in weights.bin for the others
    .verified.json         not part of the bundle: written by the runtime after a full sha256 check (verify_files)

manifest.json::

    schema_version 1, edgellm_version, created (UTC ISO 8601),
    model            ModelConfig.to_dict()
    target           devices.targets.Target.to_dict() (name, triple, arch, cpu, mattr, tvm_target, ...)
    quant            {scheme: "gguf-native", tensor_types: {QTYPE: count}}; an integer scheme adds
                     file ("quant/model.npz"), label (e.g. "w4a8-g32"), group_size, symmetric, act,
                     integer_only, kv_int8, bits_per_weight, model_bytes, calib_tokens
    tokenizer        {file: "tokenizer.json", config: "tokenizer_config.json"}
    chat_template    str | null
    source           {format, file name, metadata: the source's small metadata values}
    files            [{path, bytes, sha256}] for every file except manifest.json
    weights          see below

weights.bin is a sequence of regions, each starting at a multiple of `alignment` (4096, the page
size) so one region is one aligned read or mmap: "embed" (token_embd), then one region per layer
in layer order, then "output" (output_norm, output and anything else). Inside a region tensors
start at multiples of 64 bytes. `weights.tensors[name]` = {offset (absolute), nbytes, qtype,
shape (numpy order), region}; FFN tensors instead say `bundled: gate|up|down`.

FFN "bundled per neuron" (LLM in a flash): layer i's FFN is `ffn_dim` fixed-size records,
`layers[i].ffn.records` = {offset, count, stride}; record j holds, contiguous,
    gate row j  (its raw bytes: whole quantized blocks, since blocks run along the row)
    up row j    (same)
    down column j: its quant bits only.
A down column cannot be cut out of quantized blocks (a block spans 32..256 neurons of one output
row and shares its scales). So each block's bits are split: the bits that belong to one element
(its 4/5/6/8-bit quant, or all 16/32 bits of a float) go into that neuron's record, `dim` elements
x `bits` bits packed little-endian; the bits shared by the block (scales, minimums) go once per
layer into `layers[i].ffn.down_shared` {offset, nbytes} (~1 bit per weight for Q4_1, resident in a
streaming runtime). Which bit of a block belongs to which element is `weights.down_bits[QTYPE]` =
{block_size, type_size, element_bits [block_size x bits], shared_bits}; the compiler derives it
from the gguf library's dequantizer. The split is a permutation of bits, so the runtime rebuilds
the source's ffn_down bytes exactly: raw() of every tensor is byte-identical to the source and
get() equals the source dequantized. Nothing is re-quantized and the bundle is no larger.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..devices.targets import host_matches, host_target
from ..errors import EdgeLLMError, ModelFormatError
from .config import ModelConfig
from .loader import LoadedModel, check_weights, validate_config
from .weights import TensorInfo, WeightStore, dequantize

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
MANIFEST = "manifest.json"
RECOPY = "re-copy the bundle from the machine that compiled it (or compile it again)"

# tensor types stored as typed arrays (as gguf_file exposes them); all others are uint8 block rows. Keyed by
# GGMLQuantizationType's values (an IntEnum: its members look these up), so importing this needs no gguf.
TYPED = {0: "<f4", 1: "<f2", 28: "<f8", 24: "<i1", 25: "<i2", 26: "<i4", 27: "<i8"}   # F32 F16 F64 I8 I16 I32 I64


QUANT_MODEL = "quant/model.npz"   # where `edgellm compile --quant` puts the integer model inside a bundle


def bundle_quant(model) -> dict | None:
    """The manifest's quant section of a LoadedModel (or bundle path) holding an integer model, else None."""
    if not isinstance(model, (str, os.PathLike)):
        if getattr(model, "format", None) != "bundle":
            return None
        model = model.path
    q = read_manifest(model).get("quant")
    return q if isinstance(q, dict) and isinstance(q.get("file"), str) else None


def describe_quant(q: dict, sizes: bool = True) -> str:
    """One line for a manifest quant section: "w4a8-g32, integer-only, int8 KV, 4.50 bits/weight, 1.20 MiB"."""
    if not q.get("file"):
        return str(q.get("scheme", "gguf-native"))
    mode = "integer-only" if q.get("integer_only") else "mixed"
    kv = ", int8 KV" if q.get("kv_int8") else ""
    kv += f", {q['act']} int8 activations" if q.get("act", "dynamic") != "dynamic" else ""
    size = (f", {q.get('bits_per_weight', 0):.2f} bits/weight, {q.get('model_bytes', 0) / 2**20:.2f} MiB "
            f"({q['file']})") if sizes else ""
    return f"{q.get('label', q.get('scheme'))}, {mode}{kv}{size}"


def is_bundle(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """manifest.json of a bundle, with its schema version checked."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise ModelFormatError(f"{path} has no {MANIFEST}, so it is not an edgellm bundle",
                               "pass a directory written by `edgellm compile`, a .gguf file or a Hugging Face directory")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{mf} is not valid JSON ({e})", RECOPY) from None
    if not isinstance(manifest, dict):
        raise ModelFormatError(f"{mf} is not a JSON object", RECOPY)
    version = manifest.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ModelFormatError(
            f"bundle {path} has schema version {version!r}; this edgellm reads schema version(s) "
            f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}",
            "compile the bundle again with this edgellm version, or install the edgellm version that wrote it "
            f"({manifest.get('edgellm_version', 'unknown')})")
    return manifest


STAMP = ".verified.json"   # written after a full sha256 check; see verify_files


def _stamp_paths(path: Path) -> Iterator[Path]:
    """Where a bundle's verification stamp lives: inside the bundle, else (read-only bundle) in the user cache."""
    yield path / STAMP
    import platformdirs
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    yield Path(os.environ.get("EDGELLM_CACHE") or platformdirs.user_cache_dir("edgellm")) / "verified" / f"{key}.json"


def _identity(st: os.stat_result) -> list[int]:
    """What any write to a file changes: size, mtime and ctime (the kernel sets ctime on every write and on
    utime, so it cannot be put back), and inode/device (a copied bundle is a new file, checked in full again)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _stamp_matches(stamp: Path, ids: dict[str, list[int]]) -> bool:
    try:
        return json.loads(stamp.read_text(encoding="utf-8")) == ids
    except (OSError, ValueError):
        return False


def _write_stamp(path: Path, ids: dict[str, list[int]]) -> None:
    for stamp in _stamp_paths(path):
        tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(ids), encoding="utf-8")
            os.replace(tmp, stamp)
            return
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()


def verify_files(path: Path, manifest: dict, full: bool = False) -> None:
    """Size and sha256 of every file the manifest lists; the error names the first file that fails.

    Hashing ~200 MB costs 0.2-0.4 s per load, so after a full check passes a stamp records each file's
    identity (_identity); a later load whose files all still match the stamp skips the hashing. Sizes are
    always compared (a truncated file fails at once); any write to a file, a copied bundle, or `full=True`
    means a full check again. Not covered once stamped: damage that bypasses the file system (bit rot) and,
    on file systems without a change time (FAT), a same-size rewrite that puts the mtime back.
    """
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise ModelFormatError(f"{path / MANIFEST} lists no files", RECOPY)
    ids = {MANIFEST: _identity((path / MANIFEST).stat())}
    for entry in files:
        ok = isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("bytes"), int) \
            and isinstance(entry.get("sha256"), str)
        if not ok or Path(entry["path"]).is_absolute() or ".." in Path(entry["path"]).parts:
            raise ModelFormatError(f"{path / MANIFEST} has a malformed files entry {str(entry)[:80]}", RECOPY)
        f = path / entry["path"]
        if not f.is_file():
            raise ModelFormatError(f"bundle file {entry['path']} is missing from {path}", RECOPY)
        ids[entry["path"]] = _identity(f.stat())
        size = ids[entry["path"]][0]
        if size != entry["bytes"]:
            raise ModelFormatError(f"bundle file {entry['path']} has {size} bytes, the manifest says {entry['bytes']} "
                                   "(checksum check failed)", RECOPY)
    if not full and any(_stamp_matches(stamp, ids) for stamp in _stamp_paths(path)):
        return
    for entry in files:
        if sha256_file(path / entry["path"]) != entry["sha256"]:
            raise ModelFormatError(f"bundle file {entry['path']} fails its sha256 checksum (the file is damaged)",
                                   RECOPY)
    _write_stamp(path, ids)


def check_target(path: Path, manifest: dict) -> None:
    target = manifest.get("target") or {}
    ok, reason = host_matches(target)
    if not ok:
        try:
            host = host_target().name
        except EdgeLLMError:
            host = "this host"
        raise EdgeLLMError(
            f"bundle {path} was compiled for target {target.get('name', '?')}, which does not match this host "
            f"({host}): {reason}",
            f"compile the model for this host (edgellm compile MODEL --target {host}) or pass "
            "allow_target_mismatch=True to load it anyway (its weights work with the numpy backend; its kernels do not)")


# ---- FFN bit split (shared with the writer through the manifest, not through code) -------------


def unbundle_down(records: np.ndarray, shared: np.ndarray, rows: int, bits: dict) -> np.ndarray:
    """Rebuild ffn_down's block bytes [rows, n_blocks * type_size] from its per-neuron and shared bits.

    records: uint8 [n_neurons, column bytes] (the down part of every record); shared: uint8 packed bits.
    """
    block, tsize = bits["block_size"], bits["type_size"]
    elem = np.asarray(bits["element_bits"], dtype=np.intp)          # [block, b]
    shared_idx = np.asarray(bits["shared_bits"], dtype=np.intp)
    n, b = records.shape[0], elem.shape[1]
    nblocks = n // block
    q = np.unpackbits(records, axis=1, bitorder="little")[:, :rows * b]      # [n, rows*b]
    q = q.reshape(n, rows, b).transpose(1, 0, 2).reshape(rows, nblocks, block, b)
    out = np.zeros((rows, nblocks, tsize * 8), dtype=np.uint8)
    out[:, :, elem] = q
    if len(shared_idx):
        s = np.unpackbits(shared, bitorder="little")[:rows * nblocks * len(shared_idx)]
        out[:, :, shared_idx] = s.reshape(rows, nblocks, len(shared_idx))
    return np.packbits(out, axis=2, bitorder="little").reshape(rows, nblocks * tsize)


class BundleStore(WeightStore):
    """A bundle's weights.bin, memory-mapped; returns the source model's tensors unchanged.

    Non-FFN tensors are zero-copy views; FFN tensors are gathered from the neuron records on each
    raw()/get() (a streaming store reads single records instead, see `neuron_span`).
    """

    def __init__(self, path: Path, manifest: dict):
        w = manifest["weights"]
        self.path = Path(path)
        self.manifest = manifest
        self.alignment = int(w["alignment"])
        self.layers = {int(k): v for k, v in w["layers"].items()}
        self.regions = w.get("regions", {})
        self.down_bits = w.get("down_bits", {})
        self._t = w["tensors"]
        f = self.path / w["file"]
        self.file = f
        self._mm = np.memmap(f, dtype=np.uint8, mode="r") if f.stat().st_size else np.zeros(0, np.uint8)
        end = max([int(t["offset"]) + int(t["nbytes"]) for t in self._t.values() if "offset" in t] +
                  [int(r["offset"]) + int(r["nbytes"]) for r in self.layers.values()] + [0])
        if end > len(self._mm):
            raise ModelFormatError(f"{f} has {len(self._mm)} bytes but the manifest places data up to byte {end}",
                                   RECOPY)

    # ---- WeightStore ----

    @functools.cached_property
    def _infos(self) -> dict[str, TensorInfo]:
        """Built on first use: an integer bundle's run never reads the float tensors (nor imports gguf)."""
        from gguf import GGMLQuantizationType
        return {n: TensorInfo(n, GGMLQuantizationType[t["qtype"]], tuple(t["shape"]), int(t["nbytes"]))
                for n, t in self._t.items()}

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise ModelFormatError(f"the bundle has no tensor named {name!r}",
                                   "the bundle is incomplete or was compiled for another architecture") from None

    def names(self) -> Iterator[str]:
        return iter(self._t)

    def __contains__(self, name: str) -> bool:
        return name in self._t

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name]["shape"]) if name in self._t else self.info(name).shape

    def raw(self, name: str) -> np.ndarray:
        i = self.info(name)
        t = self._t[name]
        part = t.get("bundled")
        if part is None:
            data = self._mm[int(t["offset"]):int(t["offset"]) + i.nbytes]
        elif part == "down":
            data = self._down_bytes(int(t["layer"]), i)
        else:
            data = self._rows(int(t["layer"]), part)
        return self._typed(np.ascontiguousarray(data) if part else data, i)

    def get(self, name: str) -> np.ndarray:
        i = self.info(name)
        if i.qtype.name == "BF16":                # same widening as the safetensors store
            bits = self.raw(name).view("<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(i.shape)
        return dequantize(self.raw(name), i.qtype, i.shape)

    # ---- streaming access ----

    def ffn_layout(self, layer: int) -> dict:
        return self.layers[layer]["ffn"]

    def neuron_span(self, layer: int, neuron: int) -> tuple[int, int]:
        """(offset, nbytes) in weights.bin of neuron `neuron`'s record: gate row, up row, down column."""
        r = self.ffn_layout(layer)["records"]
        if not 0 <= neuron < r["count"]:
            raise IndexError(f"layer {layer} has {r['count']} FFN neurons, not {neuron + 1}")
        return int(r["offset"]) + neuron * int(r["stride"]), int(r["stride"])

    def records(self, layer: int) -> np.ndarray:
        """uint8 [ffn_dim, stride]: every neuron record of `layer` (a view of the mapped file)."""
        r = self.ffn_layout(layer)["records"]
        off, n, stride = int(r["offset"]), int(r["count"]), int(r["stride"])
        return self._mm[off:off + n * stride].reshape(n, stride)

    def down_columns(self, layer: int, neurons) -> np.ndarray:
        """float32 [dim, len(neurons)]: ffn_down's columns, read from those neurons' records only
        (plus the layer's resident shared bits): what a streaming store computes with."""
        name = f"blk.{layer}.ffn_down.weight"
        i = self.info(name)
        ffn = self.ffn_layout(layer)
        bits = self.down_bits[i.qtype.name]
        block, tsize = bits["block_size"], bits["type_size"]
        rows = i.shape[0]
        neurons = np.asarray(neurons, dtype=np.intp)
        d = ffn["down"]
        cols = self.records(layer)[neurons, d["at"]:d["at"] + d["nbytes"]]
        elem = np.asarray(bits["element_bits"], dtype=np.intp)
        q = np.unpackbits(cols, axis=1, bitorder="little")[:, :rows * elem.shape[1]].reshape(len(neurons), rows, -1)
        shared_idx = np.asarray(bits["shared_bits"], dtype=np.intp)
        nblocks = i.shape[1] // block
        s = ffn["down_shared"]
        shared = np.unpackbits(self._mm[s["offset"]:s["offset"] + s["nbytes"]], bitorder="little")
        shared = shared[:rows * nblocks * len(shared_idx)].reshape(rows, nblocks, len(shared_idx))
        # one synthetic block per (neuron, row): the block's shared bits + only this element's quant bits
        blocks = np.zeros((len(neurons), rows, tsize * 8), dtype=np.uint8)
        e = neurons % block
        blocks[:, :, shared_idx] = shared[:, neurons // block].transpose(1, 0, 2)
        idx = elem[e]                                                     # [k, b]
        np.put_along_axis(blocks, np.broadcast_to(idx[:, None, :], q.shape), q, axis=2)
        packed = np.packbits(blocks, axis=2, bitorder="little").reshape(len(neurons) * rows, tsize)
        vals = dequantize(self._typed(packed.reshape(-1), TensorInfo(name, i.qtype, (len(neurons) * rows, block),
                                                                     packed.size)),
                          i.qtype, (len(neurons), rows, block))
        return np.ascontiguousarray(vals[np.arange(len(neurons)), :, e].T)

    # ---- helpers ----

    def _rows(self, layer: int, part: str) -> np.ndarray:
        p = self.ffn_layout(layer)[part]
        return self.records(layer)[:, p["at"]:p["at"] + p["nbytes"]]

    def _down_bytes(self, layer: int, i: TensorInfo) -> np.ndarray:
        ffn = self.ffn_layout(layer)
        s = ffn["down_shared"]
        return unbundle_down(self._rows(layer, "down"), self._mm[s["offset"]:s["offset"] + s["nbytes"]],
                             i.shape[0], self.down_bits[i.qtype.name])

    @staticmethod
    def _typed(data: np.ndarray, i: TensorInfo) -> np.ndarray:
        if i.qtype in TYPED:
            return data.reshape(-1).view(TYPED[i.qtype]).reshape(i.shape)
        from gguf.quants import quant_shape_to_byte_shape
        return data.reshape(quant_shape_to_byte_shape(i.shape, i.qtype))


def _bundle_tokenizer(path: Path, manifest: dict):
    """The runtime Tokenizer from tokenizer_config.json (its edgellm section) + tokenizer.json.

    tokenizer.json is parsed on first encode (building it costs 0.2-0.5 s); ids given directly and
    token_bytes/decode need only the config, which lists every token's text (bundles written before it
    did get the texts from tokenizer.json, also on first use).
    """
    from .tokenizer import Tokenizer
    spec = manifest.get("tokenizer") or {}
    tj, tc = path / spec.get("file", "tokenizer.json"), path / spec.get("config", "tokenizer_config.json")

    def unreadable(err):
        return ModelFormatError(f"the bundle's tokenizer ({tj.name}, {tc.name}) cannot be read ({err})", RECOPY)

    def build_hf():
        from tokenizers import Tokenizer as HFTokenizer
        try:
            return HFTokenizer.from_file(str(tj))
        except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception
            raise unreadable(err) from None

    try:
        config = json.loads(tc.read_text(encoding="utf-8"))
        e = config["edgellm"]
        n, tokens = int(e["vocab_size"]), e.get("tokens")
        types = [1] * n
        for i, k in e.get("token_types", {}).items():
            types[int(i)] = int(k)
        kw = {k: e[k] for k in ("model", "byte_level", "bos_id", "eos_id", "add_bos", "add_eos", "add_space_prefix")}
        kw["eog_ids"] = set(e["eog_ids"])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise unreadable(err) from None
    if tokens is not None and len(tokens) != n:
        raise unreadable(f"the token list has {len(tokens)} entries, vocab_size is {n}")
    if not tj.is_file():
        raise unreadable(f"{tj.name} is missing")
    tok = Tokenizer(build_hf, tokens, types, vocab_size=n, chat_template=config.get("chat_template"), **kw)
    rstrip = e.get("rstrip") or {}
    if rstrip:  # llama.cpp's RSTRIP tokens (Phi-3): restore the patterns the source tokenizer built
        import re
        tok._rstrip = {k == "special": (re.compile(v) if v else None) for k, v in rstrip.items()}
    return tok


def load_bundle(path: str | os.PathLike, *, verify: bool = True, verify_full: bool = False,
                allow_target_mismatch: bool = False) -> LoadedModel:
    """Open a bundle directory: manifest checks, sha256 of every file (skipped while the verification stamp
    matches, unless verify_full), then mapped weights + tokenizer."""
    path = Path(path)
    manifest = read_manifest(path)
    if not allow_target_mismatch:
        check_target(path, manifest)
    if verify:
        verify_files(path, manifest, full=verify_full)
    try:
        cfg = ModelConfig.from_dict(manifest["model"])
        validate_config(cfg)
        store = BundleStore(path, manifest)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFormatError(f"{path / MANIFEST} is incomplete or malformed ({type(e).__name__}: {e})", RECOPY) from None
    check_weights(cfg, store)
    tok = _bundle_tokenizer(path, manifest)
    meta = dict((manifest.get("source") or {}).get("metadata") or {})
    return LoadedModel(cfg, store, tok, path, "bundle", meta)
