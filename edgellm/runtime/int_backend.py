"""Backend "int": a quantized model (edgellm.compiler.quantize) run by the integer reference.

mode="integer" is integer-only after the embedding lookup (the oracle for integer NPU/FPGA/TVM kernels);
mode="mixed" keeps norms, softmax, SiLU and RoPE in float. Logits come back as float32 either way.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError
from .backend import Backend, _thread_limit
from .intref import IntTransformer, QuantizedModel


def load_quantized(path: str | Path) -> QuantizedModel:
    """QuantizedModel.load with a clear error for a missing, truncated or foreign file."""
    try:
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
