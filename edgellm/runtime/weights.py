"""The weight-store interface: the only way model code reads weights.

Backends ask a store for a tensor by its GGUF name every time they need it. What the store does
behind that call (keep everything dequantized in RAM, map the file and dequantize on demand, or
stream rows from flash under a memory budget) is invisible to the model code, so streaming, neuron
splitting and expert offloading plug in as new stores.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ..errors import ModelFormatError

if TYPE_CHECKING:                 # gguf costs ~0.1 s to import: loaded where a tensor is decoded
    from gguf import GGMLQuantizationType


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives. `shape` is in numpy order (rows = output features)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    nbytes: int


class WeightStore(ABC):
    """Read-only access to a model's weights by GGUF tensor name."""

    @abstractmethod
    def info(self, name: str) -> TensorInfo: ...

    @abstractmethod
    def names(self) -> Iterator[str]: ...

    @abstractmethod
    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (quantized blocks as uint8 rows, or a float array)."""

    @abstractmethod
    def get(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, in numpy shape."""

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def qtype(self, name: str) -> GGMLQuantizationType:
        return self.info(name).qtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def stored_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self.names())

    def resident_bytes(self) -> int:
        """Bytes of weight data this store holds in process memory (not counting the page cache)."""
        return 0


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Stored tensor -> float32 array of `shape`, through the gguf library's dequantizers."""
    from gguf import GGMLQuantizationType, quants
    if qtype == GGMLQuantizationType.F32:
        out = np.asarray(raw, dtype=np.float32)
    else:
        try:
            out = quants.dequantize(raw, qtype)
        except NotImplementedError as e:
            raise ModelFormatError(f"tensor type {qtype.name} cannot be dequantized",
                                   "convert the model to F16, Q8_0, Q4_0/1, Q5_0/1 or Q4_K/Q5_K/Q6_K") from e
    return np.ascontiguousarray(out.reshape(shape), dtype=np.float32)


class MappedStore(WeightStore):
    """Tensors memory-mapped from a file; dequantized on every `get` (nothing held in the heap)."""

    def __init__(self, infos: dict[str, TensorInfo], arrays: dict[str, np.ndarray]):
        self._infos = infos
        self._arrays = arrays

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise ModelFormatError(f"the model has no tensor named {name!r}",
                                   "the file is incomplete or was converted for another architecture") from None

    def names(self) -> Iterator[str]:
        return iter(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def raw(self, name: str) -> np.ndarray:
        self.info(name)
        return self._arrays[name]

    def get(self, name: str) -> np.ndarray:
        i = self.info(name)
        return dequantize(self._arrays[name], i.qtype, i.shape)


class ResidentStore(WeightStore):
    """Dequantizes each tensor once, on first use, and keeps the float32 copy in RAM."""

    def __init__(self, source: WeightStore):
        self.source = source
        self._cache: dict[str, np.ndarray] = {}

    def info(self, name: str) -> TensorInfo:
        return self.source.info(name)

    def names(self) -> Iterator[str]:
        return self.source.names()

    def __contains__(self, name: str) -> bool:
        return name in self.source

    def raw(self, name: str) -> np.ndarray:
        return self.source.raw(name)

    def get(self, name: str) -> np.ndarray:
        w = self._cache.get(name)
        if w is None:
            w = self._cache[name] = self.source.get(name)
        return w

    def resident_bytes(self) -> int:
        return sum(a.nbytes for a in self._cache.values())
