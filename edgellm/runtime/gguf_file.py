"""Open a GGUF file: a small bounds-checked parser for the header, then np.memmap views of the tensors.

Why not `gguf.GGUFReader`: it builds two numpy views per array element (e.g. 49152 tokens plus
48900 merges), so opening SmolLM2-135M takes ~6 s, and it trusts every count and length it reads:
a corrupt count makes it loop for a very long time or stop with a bare numpy/KeyError/ValueError.
The GGUF header layout is small and fixed (gguf-py docs/gguf.md), so we parse it here with
`struct`, checking each count and length against the bytes left in the file before using it.
Everything else comes from the gguf library: the magic, the value and ggml type enums, the numpy
type of each value type, GGML_QUANT_SIZES and the quantized byte shape. The result is the same
metadata values and tensor arrays GGUFReader gives (tests/test_malformed.py compares the two).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS, GGUFReader
from gguf.quants import quant_shape_to_byte_shape

from ..errors import ModelFormatError, UnsupportedModelError
from .weights import MappedStore, TensorInfo

MAX_DIMS = 4  # GGML_MAX_DIMS
HEADER_BYTES = 24  # magic u32, version u32, n_tensors u64, n_kv u64
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
REDOWNLOAD = "re-download the model (the file is incomplete or damaged) or re-convert it with llama.cpp"

# Tensor types GGUFReader exposes as typed arrays; every other type is exposed as uint8 rows.
_TYPED = {
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}
_SCALAR_FMT = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
# Well-known files people mistake for GGUF, recognised by their first bytes.
_LOOKALIKES = [
    (b"version https://git-lfs", "a Git LFS pointer, not the model: run `git lfs pull` or download the file itself"),
    (b"PK\x03\x04", "a zip archive (PyTorch checkpoint?): convert it with llama.cpp's convert_hf_to_gguf.py"),
    (b"lmgg", "a legacy GGML file: convert it to GGUF with a current llama.cpp"),
    (b"fmgg", "a legacy GGMF file: convert it to GGUF with a current llama.cpp"),
    (b"tjgg", "a legacy GGJT file: convert it to GGUF with a current llama.cpp"),
    (b"<", "an HTML/XML page (a failed download?): download the .gguf file again"),
    (b"{", "a JSON file: pass the .gguf model file instead"),
]


@dataclass
class GGUFFile:
    """A parsed GGUF: metadata (GGUF.* header fields left out) and memory-mapped tensors."""

    path: Path
    version: int
    metadata: dict[str, Any]
    store: MappedStore


class _Header:
    """Bounds-checked little/big-endian reads from the mapped file."""

    def __init__(self, buf: memoryview, path: Path, endian: str):
        self.buf, self.path, self.endian = buf, path, endian
        self.pos, self.size = 0, len(buf)
        self.u32 = struct.Struct(endian + "I")
        self.u64 = struct.Struct(endian + "Q")

    def fail(self, problem: str, fix: str = REDOWNLOAD) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {problem}", fix)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated: {what} at byte {self.pos} needs {n} bytes "
                            f"but the file ends at byte {self.size}")

    def read(self, st: struct.Struct, what: str) -> Any:
        self.need(st.size, what)
        value = st.unpack_from(self.buf, self.pos)[0]
        self.pos += st.size
        return value

    def string(self, what: str) -> bytes:
        n = self.read(self.u64, f"the length of {what}")
        if n > self.size - self.pos:
            raise self.fail(f"truncated or corrupt: {what} at byte {self.pos} claims {n} bytes "
                            f"but only {self.size - self.pos} bytes are left in the file")
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def string_array(self, count: int, what: str) -> list[str]:
        """The hot loop (vocabularies, merges): plain struct reads, no per-element numpy objects."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, self.u64.unpack_from
        out = []
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"the length of element {i} of {what}")
            n = unpack(buf, pos)[0]
            pos += 8
            if n > size - pos:
                self.pos = pos
                raise self.fail(f"truncated or corrupt: element {i} of {what} at byte {pos} claims {n} "
                                f"bytes but only {size - pos} bytes are left in the file")
            out.append(str(buf[pos:pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int, key: str) -> Any:
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise self.fail(f"metadata key {key!r} has unknown value type id {vtype}") from None
        if vtype == GGUFValueType.STRING:
            return self.string(f"the value of {key!r}").decode("utf-8", "replace")
        if vtype == GGUFValueType.ARRAY:
            return self.array(key)
        st = struct.Struct(self.endian + _SCALAR_FMT[vtype])
        return self.read(st, f"the value of {key!r}")

    def array(self, key: str) -> list:
        itype = self.read(self.u32, f"the element type of {key!r}")
        count = self.read(self.u64, f"the length of {key!r}")
        what = f"array {key!r}"
        try:
            itype = GGUFValueType(itype)
        except ValueError:
            raise self.fail(f"{what} has unknown element type id {itype}") from None
        if itype == GGUFValueType.ARRAY:
            raise self.fail(f"{what} is an array of arrays, which GGUF readers (llama.cpp, gguf-py) do not support",
                            "re-convert the model with a current llama.cpp")
        min_item = 8 if itype == GGUFValueType.STRING else struct.calcsize(_SCALAR_FMT[itype])
        if count > (self.size - self.pos) // min_item:
            raise self.fail(f"truncated or corrupt: {what} at byte {self.pos} claims {count} elements "
                            f"(at least {min_item} bytes each) but only {self.size - self.pos} bytes are left")
        if itype == GGUFValueType.STRING:
            return self.string_array(count, what)
        dtype = np.dtype(GGUFReader.gguf_scalar_to_np[itype]).newbyteorder(self.endian)
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += values.nbytes
        return values.tolist()


def _check_file(path: Path) -> int:
    """Size of a readable regular file, or a ModelFormatError saying what `path` is instead."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelFormatError(f"model file {path} does not exist",
                               "check the path, or download the model first") from None
    except OSError as e:
        raise ModelFormatError(f"cannot read model file {path} ({e.strerror})", "check the path and its permissions") from None
    if path.is_dir():
        raise ModelFormatError(f"{path} is a directory, not a GGUF file", "pass the path of the .gguf file inside it")
    if not path.is_file():
        raise ModelFormatError(f"{path} is not a regular file", "pass the path of a .gguf model file")
    if st.st_size == 0:
        raise ModelFormatError(f"model file {path} is empty (0 bytes)", REDOWNLOAD)
    if not os.access(path, os.R_OK):
        raise ModelFormatError(f"cannot read model file {path} (permission denied)", "check the file's permissions")
    return st.st_size


def _check_magic(path: Path, head: bytes) -> None:
    if head[:4] == struct.pack("<I", GGUF_MAGIC):
        return
    for prefix, what in _LOOKALIKES:
        if head.startswith(prefix):
            problem, fix = what.split(": ", 1)
            raise ModelFormatError(f"{path} is not a GGUF file: it looks like {problem}", fix)
    if len(head) < 4:
        raise ModelFormatError(f"{path} is too short to be a GGUF file ({len(head)} bytes)", REDOWNLOAD)
    raise ModelFormatError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')",
                           "pass a .gguf model file (convert other formats with llama.cpp's convert_hf_to_gguf.py)")


def _version(path: Path, raw: bytes) -> tuple[int, str]:
    """GGUF version and byte order; like GGUFReader, a version with zero low bits means byte-swapped."""
    endian = "<"
    version = struct.unpack("<I", raw)[0]
    if version & 0xFFFF == 0:
        endian, version = ">", struct.unpack(">I", raw)[0]
    if version not in READER_SUPPORTED_VERSIONS:
        if version == 1:
            fix = "GGUF v1 is obsolete: re-convert the model with a current llama.cpp"
        else:
            fix = "the file was written by a newer tool or is damaged: update edgellm and the gguf package, or re-convert"
        raise ModelFormatError(f"{path} uses GGUF version {version}; only versions "
                               f"{', '.join(map(str, READER_SUPPORTED_VERSIONS))} are supported", fix)
    return version, endian


def _read_metadata(h: _Header, n_kv: int) -> tuple[dict[str, Any], dict[str, GGUFValueType]]:
    """Key -> python value, and key -> value type (needed to check general.alignment's type)."""
    metadata: dict[str, Any] = {}
    types: dict[str, GGUFValueType] = {}
    for i in range(n_kv):
        raw_key = h.string(f"the key of metadata pair {i}")
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            raise h.fail(f"metadata key {i} ({raw_key[:40]!r}) is not valid UTF-8") from None
        if key in metadata:
            raise h.fail(f"metadata key {key!r} appears twice")
        vtype = h.read(h.u32, f"the value type of {key!r}")
        metadata[key] = h.value(vtype, key)
        types[key] = GGUFValueType(vtype)
    return metadata, types


def _alignment(h: _Header, metadata: dict[str, Any], types: dict[str, GGUFValueType]) -> int:
    if "general.alignment" not in metadata:
        return GGUF_DEFAULT_ALIGNMENT
    a = metadata["general.alignment"]
    if types["general.alignment"] != GGUFValueType.UINT32 or a == 0 or a & (a - 1):
        raise h.fail(f"general.alignment must be a non-zero power of two stored as uint32, got {a!r}")
    return a


@dataclass
class _RawTensor:
    name: str
    dims: tuple[int, ...]  # GGUF order: ne0 (row length) first
    qtype: GGMLQuantizationType
    offset: int
    at: int  # byte of its tensor info, for messages


def _read_tensor_infos(h: _Header, n_tensors: int) -> list[_RawTensor]:
    if n_tensors > (h.size - h.pos) // MIN_TENSOR_INFO_BYTES:
        raise h.fail(f"the header claims {n_tensors} tensors but only {h.size - h.pos} bytes are left "
                     f"for their descriptions (at least {MIN_TENSOR_INFO_BYTES} bytes each): the file is truncated or corrupt")
    tensors, seen = [], set()
    for i in range(n_tensors):
        at = h.pos
        raw_name = h.string(f"the name of tensor {i}")
        name = raw_name.decode("utf-8", "replace")
        if name in seen:
            raise h.fail(f"tensor name {name!r} appears twice", "re-convert the model with llama.cpp")
        seen.add(name)
        n_dims = h.read(h.u32, f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise h.fail(f"tensor {name!r} has {n_dims} dimensions; GGML tensors have 1 to {MAX_DIMS}")
        h.need(8 * n_dims, f"the shape of tensor {name!r}")
        dims = struct.unpack_from(f"{h.endian}{n_dims}Q", h.buf, h.pos)
        h.pos += 8 * n_dims
        if 0 in dims:
            raise h.fail(f"tensor {name!r} has a zero-sized dimension (shape {list(dims)} in GGUF order)")
        if int(np.prod(dims, dtype=object)) >= 2 ** 63:
            raise h.fail(f"tensor {name!r} has shape {list(dims)}, whose element count overflows int64")
        type_id = h.read(h.u32, f"the type of tensor {name!r}")
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise UnsupportedModelError(
                f"{h.path}: tensor {name!r} has ggml type id {type_id}, which this gguf library does not know",
                "update the gguf package (pip install -U gguf), or re-quantize the model to a common type "
                "such as Q4_0, Q4_K_M or Q8_0") from None
        tensors.append(_RawTensor(name, dims, qtype, h.read(h.u64, f"the data offset of tensor {name!r}"), at))
    return tensors


def _map_tensors(h: _Header, data: np.memmap, tensors: list[_RawTensor], data_start: int,
                 alignment: int) -> tuple[dict[str, TensorInfo], dict[str, np.ndarray]]:
    infos: dict[str, TensorInfo] = {}
    arrays: dict[str, np.ndarray] = {}
    spans = []
    for t in tensors:
        block_size, type_size = GGML_QUANT_SIZES[t.qtype]
        if t.dims[0] % block_size:
            raise h.fail(f"tensor {t.name!r} has rows of {t.dims[0]} values, not a multiple of the "
                         f"{t.qtype.name} block size {block_size}")
        n_elems = int(np.prod(t.dims, dtype=object))
        nbytes = n_elems // block_size * type_size
        start = data_start + t.offset
        if t.offset % alignment:
            raise h.fail(f"tensor {t.name!r} data offset {t.offset} is not a multiple of the alignment {alignment}")
        if nbytes > h.size:
            raise h.fail(f"tensor {t.name!r} ({t.qtype.name}, shape {list(t.dims)}) claims {nbytes} bytes, "
                         f"more than the whole file ({h.size} bytes): its tensor info is corrupt")
        if start + nbytes > h.size:
            if h.size <= data_start:
                problem = (f"the file ends at byte {h.size}, before its tensor data section (byte {data_start}): "
                           f"the header is complete but all tensor data is missing")
            else:
                problem = (f"tensor {t.name!r} occupies bytes {start}..{start + nbytes} but the file ends at "
                           f"byte {h.size}: the tensor data is truncated")
            raise h.fail(problem)
        spans.append((t.offset, nbytes, t.name))
        shape = tuple(int(d) for d in reversed(t.dims))
        infos[t.name] = TensorInfo(t.name, t.qtype, shape, nbytes)
        if t.qtype in _TYPED:
            dtype, np_shape = np.dtype(_TYPED[t.qtype]).newbyteorder(h.endian), shape
        else:
            dtype, np_shape = np.dtype(np.uint8), quant_shape_to_byte_shape(shape, t.qtype)
        arrays[t.name] = data[start:start + nbytes].view(dtype).reshape(np_shape)
    spans.sort()
    for (off_a, size_a, a), (off_b, _, b) in zip(spans, spans[1:]):
        if off_a + size_a > off_b:
            raise h.fail(f"tensors {a!r} and {b!r} overlap in the data section")
    return infos, arrays


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate a GGUF v2/v3 file; tensors stay on disk as read-only memory maps."""
    path = Path(path)
    size = _check_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise ModelFormatError(f"cannot read model file {path} ({e.strerror})", "check the file and its permissions") from None
    _check_magic(path, head)
    if len(head) < 8:
        raise ModelFormatError(f"{path}: truncated: the file is {size} bytes, too short to hold a GGUF version", REDOWNLOAD)
    version, endian = _version(path, head[4:8])
    if len(head) < HEADER_BYTES:
        raise ModelFormatError(f"{path}: truncated header: the file is {size} bytes, a GGUF header needs "
                               f"{HEADER_BYTES}", REDOWNLOAD)
    n_tensors, n_kv = struct.unpack(endian + "QQ", head[8:24])
    room = size - HEADER_BYTES
    if n_kv > room // MIN_KV_BYTES:
        raise ModelFormatError(f"{path}: the header claims {n_kv} metadata pairs but the file has room for at most "
                               f"{room // MIN_KV_BYTES}: the header is corrupt", REDOWNLOAD)
    if n_tensors > room // MIN_TENSOR_INFO_BYTES:
        raise ModelFormatError(f"{path}: the header claims {n_tensors} tensors but the file has room for at most "
                               f"{room // MIN_TENSOR_INFO_BYTES}: the header is corrupt", REDOWNLOAD)

    data = np.memmap(path, dtype=np.uint8, mode="r")
    with memoryview(data) as buf:
        h = _Header(buf, path, endian)
        h.pos = HEADER_BYTES
        try:
            metadata, types = _read_metadata(h, n_kv)
            alignment = _alignment(h, metadata, types)
            tensors = _read_tensor_infos(h, n_tensors)
        except (struct.error, ValueError, OverflowError) as e:  # a check above missed a case: still no traceback
            raise h.fail(f"corrupt GGUF header near byte {h.pos} ({e})") from None
    data_start = -(-h.pos // alignment) * alignment
    infos, arrays = _map_tensors(h, data, tensors, data_start, alignment)
    metadata = {k: v for k, v in metadata.items() if not k.startswith("GGUF.")}
    return GGUFFile(path, version, metadata, MappedStore(infos, arrays))
