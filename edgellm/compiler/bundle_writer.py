"""Write a loaded model as a bundle directory (layout: see edgellm/runtime/bundle.py, schema version 1).

Written into a temporary directory beside the destination and renamed into place only when every
file is complete, so an interrupted compile never leaves a half bundle where a good one was.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from tqdm import tqdm

from ..devices.targets import Target, get_target
from ..errors import EdgeLLMError, UnsupportedModelError
from ..runtime.bundle import MANIFEST, SCHEMA_VERSION, TYPED, sha256_file
from ..runtime.loader import LoadedModel

PAGE = 4096
TENSOR_ALIGN = 64
FFN = ("ffn_gate", "ffn_up", "ffn_down")
_SKIP_META = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


@functools.lru_cache(maxsize=None)
def element_bits(qtype: GGMLQuantizationType, trials: int = 8) -> dict:
    """Which bits of one block belong to which element, found by flipping each bit and dequantizing.

    A bit that only ever changes one element's value is that element's quant bit; every other bit
    (scales, minimums) is shared by the block. Each block type of the supported set (floats, Q4_0..Q8_0,
    K-quants) gives every element the same number of bits; codebook types (IQ*) do not and are refused.
    """
    block, tsize = GGML_QUANT_SIZES[qtype]
    nbits = tsize * 8
    rng = np.random.default_rng(0)
    touched = [set() for _ in range(nbits)]
    for _ in range(trials):
        base = np.unpackbits(rng.integers(0, 256, tsize, dtype=np.uint8), bitorder="little")
        flips = np.repeat(base[None], nbits + 1, axis=0)
        flips[np.arange(nbits), np.arange(nbits)] ^= 1
        blocks = np.packbits(flips, axis=1, bitorder="little")
        with np.errstate(all="ignore"):
            if qtype in TYPED:
                out = blocks.reshape(-1).view(TYPED[qtype]).astype(np.float32)
            else:
                out = quants.dequantize(blocks, qtype)
        out = np.ascontiguousarray(out, dtype=np.float32).reshape(nbits + 1, block).view(np.uint32)
        changed = out[:-1] != out[-1]
        for b in np.nonzero(changed.any(axis=1))[0]:
            touched[b].update(np.nonzero(changed[b])[0].tolist())
    elems: list[list[int]] = [[] for _ in range(block)]
    shared = []
    for b, t in enumerate(touched):
        if len(t) == 1:
            elems[next(iter(t))].append(b)
        else:
            shared.append(b)
    if len({len(e) for e in elems}) != 1 or not elems[0]:
        raise UnsupportedModelError(f"ffn_down of type {qtype.name} cannot be split per neuron (its elements do not "
                                    "own separate bits)", "re-quantize the model to Q4_0/Q4_1/Q5_x/Q8_0 or a K-quant")
    return {"block_size": block, "type_size": tsize, "element_bits": elems, "shared_bits": shared}


def _le_bytes(arr: np.ndarray) -> np.ndarray:
    """A tensor's stored bytes, little-endian, as flat uint8."""
    a = np.asarray(arr)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def bundle_down(raw: np.ndarray, qtype: GGMLQuantizationType, rows: int, bits: dict) -> tuple[np.ndarray, np.ndarray]:
    """ffn_down bytes [rows, n_blocks*type_size] -> (per-neuron column bits [n, col_bytes], shared bits, packed)."""
    block, tsize = bits["block_size"], bits["type_size"]
    elem = np.asarray(bits["element_bits"], dtype=np.intp)
    shared_idx = np.asarray(bits["shared_bits"], dtype=np.intp)
    b8 = np.unpackbits(_le_bytes(raw).reshape(rows, -1, tsize), axis=2, bitorder="little")   # [rows, nb, tsize*8]
    nblocks = b8.shape[1]
    q = b8[:, :, elem].reshape(rows, nblocks * block, elem.shape[1]).transpose(1, 0, 2)     # [n, rows, b]
    cols = np.packbits(q.reshape(q.shape[0], -1), axis=1, bitorder="little")
    shared = np.packbits(b8[:, :, shared_idx].reshape(-1), bitorder="little")
    return cols, shared


class _Writer:
    """Lays out weights.bin (sizes first, then bytes) and records everything in the manifest."""

    def __init__(self, loaded: LoadedModel, f, bar):
        self.m, self.store, self.f, self.bar = loaded, loaded.weights, f, bar
        self.tensors: dict[str, dict] = {}
        self.layers: dict[str, dict] = {}
        self.regions: dict[str, dict] = {}
        self.down_bits: dict[str, dict] = {}

    def pad_to(self, align: int) -> None:
        pos = self.f.tell()
        if pos % align:
            self.f.write(b"\0" * (_align(pos, align) - pos))

    def put(self, name: str, region: str) -> None:
        self.pad_to(TENSOR_ALIGN)
        i = self.store.info(name)
        data = _le_bytes(self.store.raw(name))
        if data.size != i.nbytes:
            raise EdgeLLMError(f"tensor {name!r} has {data.size} bytes, its info says {i.nbytes}",
                               "the source model is inconsistent: re-convert it")
        self.tensors[name] = {"offset": self.f.tell(), "nbytes": i.nbytes, "qtype": i.qtype.name,
                              "shape": list(i.shape), "region": region}
        self.f.write(data.tobytes())
        self.bar.update(i.nbytes)

    def region(self, key: str, names: list[str]) -> dict:
        self.pad_to(PAGE)
        start = self.f.tell()
        for n in names:
            self.put(n, key)
        return {"offset": start, "nbytes": self.f.tell() - start}

    def layer(self, i: int, names: list[str]) -> None:
        write_layer(self, i, names)


def write_layer(w: _Writer, i: int, names: list[str]) -> None:
    """One page-aligned layer region: attention and norm tensors, ffn_down's shared bits, neuron records."""
    p = f"blk.{i}."
    key = f"blk.{i}"
    w.pad_to(PAGE)
    start = w.f.tell()
    for n in names:
        if not any(n == p + f + ".weight" for f in FFN):
            w.put(n, key)
    st = w.store
    gate, up, down = (p + f + ".weight" for f in FFN)
    gi, ui, di = st.info(gate), st.info(up), st.info(down)
    n = gi.shape[0]
    g = _le_bytes(st.raw(gate)).reshape(n, -1)
    u = _le_bytes(st.raw(up)).reshape(n, -1)
    bits = element_bits(di.qtype)
    w.down_bits[di.qtype.name] = bits
    cols, shared = bundle_down(st.raw(down), di.qtype, di.shape[0], bits)
    w.pad_to(TENSOR_ALIGN)
    shared_at = w.f.tell()
    w.f.write(shared.tobytes())
    w.pad_to(TENSOR_ALIGN)
    rec_at = w.f.tell()
    records = np.concatenate([g, u, cols], axis=1)
    w.f.write(records.tobytes())
    w.bar.update(gi.nbytes + ui.nbytes + di.nbytes)
    for name, info, part in ((gate, gi, "gate"), (up, ui, "up"), (down, di, "down")):
        w.tensors[name] = {"nbytes": info.nbytes, "qtype": info.qtype.name, "shape": list(info.shape),
                           "region": key, "bundled": part, "layer": i}
    w.layers[str(i)] = {
        "offset": start, "nbytes": w.f.tell() - start,
        "ffn": {"records": {"offset": rec_at, "count": n, "stride": records.shape[1]},
                "gate": {"at": 0, "nbytes": g.shape[1]},
                "up": {"at": g.shape[1], "nbytes": u.shape[1]},
                "down": {"at": g.shape[1] + u.shape[1], "nbytes": cols.shape[1], "bits": len(bits["element_bits"][0])},
                "down_shared": {"offset": shared_at, "nbytes": int(shared.size)}}}


def _group(loaded: LoadedModel) -> tuple[list[str], dict[int, list[str]], list[str]]:
    embed, layers, rest = [], {i: [] for i in range(loaded.config.n_layers)}, []
    for n in loaded.weights.names():
        if n.startswith("token_embd."):
            embed.append(n)
        elif n.startswith("blk."):
            layers[int(n.split(".")[1])].append(n)
        else:
            rest.append(n)
    for i, names in layers.items():
        missing = [f for f in FFN if f"blk.{i}.{f}.weight" not in names]
        if missing:
            raise UnsupportedModelError(f"layer {i} has no {', '.join(missing)}: only SwiGLU FFN models can be bundled",
                                        "use a llama/mistral/qwen2 model")
    return embed, layers, rest


def _tokenizer_json(hf) -> str:
    """tokenizer.json with BPE merges as "a b" strings when no part holds a space: `tokenizers` parses
    [a, b] pairs through a buffered untagged enum, which costs ~20 MB more peak memory at each load (49k merges)."""
    data = json.loads(hf.to_str())
    merges = (data.get("model") or {}).get("merges")
    if merges and all(isinstance(m, list) and " " not in m[0] + m[1] for m in merges):
        data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(data, ensure_ascii=False)


def _tokenizer_files(tok, out: Path) -> None:
    (out / "tokenizer.json").write_text(_tokenizer_json(tok.hf), encoding="utf-8")
    rstrip = {("special" if k else "plain"): (v.pattern if v is not None else None)
              for k, v in getattr(tok, "_rstrip", {}).items()}
    name = lambda i: tok.tokens[i] if i is not None else None  # noqa: E731
    config = {
        "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id),
        "add_bos_token": tok.add_bos, "add_eos_token": tok.add_eos, "chat_template": tok.chat_template,
        "edgellm": {
            "model": tok.model, "byte_level": tok.byte_level, "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "eog_ids": sorted(tok.eog_ids),
            "add_bos": tok.add_bos, "add_eos": tok.add_eos, "add_space_prefix": tok.add_space_prefix,
            "token_types": {str(i): int(k) for i, k in enumerate(tok.token_types) if int(k) != 1},
            "rstrip": rstrip if any(rstrip.values()) else {},
            "tokens": list(tok.tokens),   # so ids and text round-trip without building tokenizer.json's tokenizer
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


def _small_metadata(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        if k in _SKIP_META or k.startswith("GGUF."):
            continue
        if isinstance(v, (list, tuple)) and len(v) > 64:
            continue
        if isinstance(v, (str, int, float, bool, list, tuple)) or v is None:
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _copy_extra(extra: dict[str, Path], out: Path) -> None:
    for rel, src in extra.items():
        dst = out / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or rel == MANIFEST:
            raise EdgeLLMError(f"extra bundle file name {rel!r} is not a plain relative path", "use e.g. 'kernels/lib.so'")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)


def _edgellm_version() -> str:
    try:
        from importlib.metadata import version
        return version("edgellm")
    except Exception:  # noqa: BLE001 - not installed (source checkout)
        return "0+unknown"


def _write_contents(loaded: LoadedModel, out: Path, target: Target, extra: dict[str, Path],
                    quant: dict | None = None) -> None:
    embed, layers, rest = _group(loaded)
    store = loaded.weights
    total = sum(store.info(n).nbytes for n in store.names())
    with open(out / "weights.bin", "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc="bundle weights",
                                                    disable=None, leave=False) as bar:
        w = _Writer(loaded, f, bar)
        w.regions["embed"] = w.region("embed", embed)
        for i in range(loaded.config.n_layers):
            w.layer(i, layers[i])
        w.regions["output"] = w.region("output", rest)
        w.pad_to(PAGE)
    _tokenizer_files(loaded.tokenizer, out)
    _copy_extra(extra, out)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    types = Counter(store.info(n).qtype.name for n in store.names())
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "edgellm_version": _edgellm_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": loaded.config.to_dict(),
        "target": target.to_dict(),
        "quant": {"scheme": "gguf-native", **(quant or {}), "tensor_types": dict(types)},
        "tokenizer": {"file": "tokenizer.json", "config": "tokenizer_config.json"},
        "chat_template": loaded.tokenizer.chat_template,
        "source": {"format": loaded.format, "file": Path(loaded.path).name,
                   "metadata": _small_metadata(loaded.metadata or {})},
        "files": [{"path": p.relative_to(out).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                  for p in files],
        "weights": {"file": "weights.bin", "alignment": PAGE, "byte_order": "little", "ffn_bundled": True,
                    "regions": w.regions, "layers": w.layers, "tensors": w.tensors, "down_bits": w.down_bits},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")


def write_bundle(loaded: LoadedModel, out_dir: str | os.PathLike, target: Target | str,
                 extra_files: dict[str, Path] | None = None, quant: dict | None = None) -> Path:
    """Write `loaded` as a bundle for `target` at out_dir; an existing out_dir is replaced only on success.

    extra_files maps a path inside the bundle (e.g. "kernels/model.so", "onnx") to a file or directory to copy.
    quant updates the manifest's quant section (an integer scheme: its file in extra_files, label, sizes).
    """
    out = Path(out_dir).absolute()
    target = get_target(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _write_contents(loaded, tmp, target, dict(extra_files or {}), quant)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is an ordinary directory
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "b")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "b", out)  # put the previous bundle back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
