"""Backend "int": a quantized model (edgellm.compiler.quantize) run by the integer reference.

mode="integer" is integer-only after the embedding lookup (the oracle for integer NPU/FPGA/TVM kernels);
mode="mixed" keeps norms, softmax, SiLU and RoPE in float. Logits come back as float32 either way.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import weakref
import zipfile
from collections.abc import MutableMapping
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError
from .backend import Backend, _thread_limit
from .config import ModelConfig
from .intref import IntTransformer, QuantConfig, QuantizedModel


# numpy's own header for a plain array: version 1.0, one 128-byte block (magic, length, dict, space padding)
_PLAIN_HEADER = re.compile(rb"\x93NUMPY\x01\x00\x76\x00\{'descr': '(?P<descr>[<>|][a-z]\d+)', 'fortran_order': "
                           rb"(?P<fortran>True|False), 'shape': \((?P<shape>[\d, ]*)\), \} *\n")


class NpzTensors(MutableMapping):
    """The arrays of an uncompressed .npz (QuantizedModel.save), each read from the file when asked for, or
    straight into a caller's buffer (read_into): a backend that lays the weights out its own way then holds
    one copy of them, never the whole file besides. Assigned arrays shadow the file's."""

    def __init__(self, path: str | Path):
        self.path, self._index, self._set, self._fd = Path(path), {}, {}, None
        fmt = np.lib.format
        readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
        with zipfile.ZipFile(self.path) as z, open(self.path, "rb") as f:
            for info in z.infolist():
                if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                    raise ValueError(f"member {info.filename} is compressed or not an array")
                f.seek(info.header_offset)
                head = f.read(30)
                if head[:4] != b"PK\x03\x04":
                    raise zipfile.BadZipFile(f"no local header for {info.filename}")
                start = info.header_offset + 30 + sum(struct.unpack("<HH", head[26:30]))   # after name and extra
                f.seek(start)
                npy = f.read(128)                     # what numpy writes for a plain array fits one 128-byte header
                plain = _PLAIN_HEADER.fullmatch(npy) if len(npy) == 128 else None
                if plain:                             # skips ast.literal_eval: 1500 members of a model in ~10 ms
                    dims, fortran = plain["shape"].decode().replace(",", " ").split(), plain["fortran"] == b"True"
                    shape, dtype = tuple(int(v) for v in dims), np.dtype(plain["descr"].decode())
                else:
                    f.seek(start)
                    read = readers.get(fmt.read_magic(f))
                    if read is None:
                        raise ValueError(f"member {info.filename} has an unsupported .npy version")
                    shape, fortran, dtype = read(f)
                if dtype.hasobject or (fortran and len(shape) > 1):
                    raise ValueError(f"member {info.filename} is not a C-order numeric array")
                data = start + 128 if plain else f.tell()
                if data - start + math.prod(shape) * dtype.itemsize > info.file_size:
                    raise ValueError(f"member {info.filename} is shorter than its array")
                self._index[info.filename[:-4]] = (data, shape, dtype)

    def header(self, name: str) -> tuple[tuple, np.dtype]:
        """(shape, dtype) without reading the data."""
        if name in self._set:
            return self._set[name].shape, self._set[name].dtype
        return self._index[name][1:]

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Fill C-contiguous `out` (the array's shape and dtype) from the file, with no intermediate copy."""
        if name in self._set:
            out[...] = self._set[name]
            return
        off, shape, dtype = self._index[name]
        if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"{name} is {dtype}{list(shape)}, not {out.dtype}{list(out.shape)}")
        if self._fd is None:                          # one descriptor for every read, closed with the object
            self._fd = os.open(self.path, os.O_RDONLY)
            weakref.finalize(self, os.close, self._fd)
        if os.preadv(self._fd, [memoryview(out.reshape(-1)).cast("B")], off) != out.nbytes:
            raise ModelFormatError(f"{self.path} ends inside tensor {name}", "re-copy the bundle")

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._set:
            return self._set[name]
        shape, dtype = self._index[name][1:]
        out = np.empty(shape, dtype)
        self.read_into(name, out)
        return out

    def __contains__(self, name) -> bool:
        return name in self._set or name in self._index

    def __setitem__(self, name: str, a: np.ndarray) -> None:
        self._set[name] = a

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._set.pop(name, None)
        self._index.pop(name, None)

    def __iter__(self):
        return iter(dict.fromkeys([*self._index, *self._set]))

    def __len__(self) -> int:
        return len(set(self._index) | set(self._set))


def tensor_header(t, name: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of a tensor of a plain dict or an NpzTensors (which reads nothing)."""
    if isinstance(t, NpzTensors):
        return t.header(name)
    return t[name].shape, t[name].dtype


def read_into(t, name: str, out: np.ndarray) -> None:
    """out[...] = t[name], straight from the file for an NpzTensors."""
    if isinstance(t, NpzTensors):
        t.read_into(name, out)
    else:
        out[...] = t[name]


def load_quantized(path: str | Path, lazy: bool = False) -> QuantizedModel:
    """QuantizedModel.load with a clear error for a missing, truncated or foreign file. lazy: its tensors are
    an NpzTensors (read on use) when the file allows it (QuantizedModel.save writes uncompressed members)."""
    try:
        if lazy:
            try:
                t = NpzTensors(path)
            except ValueError:
                return QuantizedModel.load(path)
            meta = json.loads(bytes(t.pop("__meta__")).decode())
            return QuantizedModel(ModelConfig.from_dict(meta["config"]), QuantConfig(**meta["qconfig"]), t,
                                  meta["report"])
        return QuantizedModel.load(path)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise ModelFormatError(f"{path} is not a readable quantized model ({type(e).__name__}: {e})",
                               "re-copy the bundle, or compile it again with edgellm compile --quant") from None


class IntBackend(Backend):
    name = "int"

    def __init__(self, qmodel: QuantizedModel | str | Path, mode: str = "integer", threads: int | None = None):
        if not isinstance(qmodel, QuantizedModel):
            qmodel = load_quantized(qmodel)
        self.qmodel = qmodel
        self.cfg = qmodel.config
        self.threads = threads
        self.model = IntTransformer(qmodel, mode)

    @property
    def mode(self) -> str:
        return self.model.mode

    def prepare(self) -> None:
        with _thread_limit(self.threads):
            self.model.prepare()

    def new_cache(self, n_ctx: int):
        return self.model.new_cache(n_ctx)

    def forward(self, tokens, pos, kv, all_logits=False) -> np.ndarray:
        with _thread_limit(self.threads):
            return self.model.forward(np.asarray(tokens, dtype=np.int64), pos, kv, all_logits)
