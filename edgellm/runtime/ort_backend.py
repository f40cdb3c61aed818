"""The `onnxruntime` backend: runs an exported ONNX graph (see edgellm compile) with the KV cache fed back as I/O.

The graph takes past_key_i/past_value_i [1, n_kv_heads, past, head_dim] and returns present_* with the new
positions appended; this backend keeps those arrays between calls. onnxruntime is an optional dependency,
imported only when the backend is created, so the runtime still loads without it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError, ModelFormatError
from .backend import Backend
from .config import ModelConfig


class OrtKVCache:
    """Per-layer present_key/present_value arrays from the last run; `length` positions are valid."""

    def __init__(self, cfg: ModelConfig, n_ctx: int):
        self.n_ctx = n_ctx
        empty = np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), dtype=np.float32)
        self.k = [empty] * cfg.n_layers
        self.v = [empty] * cfg.n_layers
        self.length = 0

    def past(self, pos: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Keys and values of positions < pos, contiguous (onnxruntime wants C-ordered inputs)."""
        if pos > self.length:
            raise EdgeLLMError(f"cannot run at position {pos}: the KV cache holds only {self.length} positions",
                               "evaluate the earlier tokens first")
        cut = lambda a: a if a.shape[2] == pos else np.ascontiguousarray(a[:, :, :pos])  # noqa: E731
        return [cut(a) for a in self.k], [cut(a) for a in self.v]

    def truncate(self, length: int) -> None:
        """Forget positions >= length (keeps a shared prompt prefix for the next request)."""
        self.length = min(self.length, length)


def _resolve(path: Path) -> Path:
    """An .onnx file, or a directory (a bundle or an export dir) holding decode.onnx or onnx/decode.onnx."""
    if path.is_dir():
        for cand in (path / "decode.onnx", path / "onnx" / "decode.onnx"):
            if cand.is_file():
                return cand
    return path


class OnnxRuntimeBackend(Backend):
    """Runs `model_path` (an .onnx graph written by `edgellm compile`, or a directory holding decode.onnx or
    onnx/decode.onnx) in an onnxruntime InferenceSession. `cfg` may be None: the graph carries its config."""

    name = "onnxruntime"

    def __init__(self, cfg: ModelConfig | None, model_path: str | os.PathLike, threads: int | None = None,
                 providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise EdgeLLMError(f"the onnxruntime backend needs the onnxruntime package ({e})",
                               "pip install onnxruntime (or pip install 'edgellm[compiler]')") from None
        self.path = _resolve(Path(model_path))
        if not self.path.is_file():
            raise ModelFormatError(f"ONNX graph {self.path} does not exist", "compile the model first (edgellm compile)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ModelFormatError(f"onnxruntime cannot load {self.path}: {str(e)[:300]}",
                                   "re-export the graph (edgellm compile); the file may be truncated") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if cfg is None and "edgellm.config" in meta:
            cfg = ModelConfig.from_dict(json.loads(meta["edgellm.config"]))
        self.cfg = cfg
        if cfg is None:
            raise ModelFormatError(f"{self.path} carries no edgellm.config metadata", "pass the model config")
        self.threads = threads
        self.kind = meta.get("edgellm.kind", "decode")
        self.max_positions = int(meta.get("edgellm.max_positions", self.cfg.context_length))
        names = {i.name for i in self.session.get_inputs()}
        want = {"input_ids", "position_ids"} | {f"past_{t}_{i}" for i in range(self.cfg.n_layers)
                                                for t in ("key", "value")}
        if want - names:
            raise ModelFormatError(f"{self.path} lacks inputs {sorted(want - names)[:4]}",
                                   "the graph was exported for another model or by another tool")
        self._outputs = ["logits"] + [f"present_{t}_{i}" for i in range(self.cfg.n_layers) for t in ("key", "value")]

    def new_cache(self, n_ctx: int) -> OrtKVCache:
        return OrtKVCache(self.cfg, n_ctx)

    def forward(self, tokens: np.ndarray, pos: int, kv: OrtKVCache, all_logits: bool = False) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        end = pos + tokens.shape[1]
        if end > kv.n_ctx:
            raise EdgeLLMError(f"context full: {end} tokens do not fit in n_ctx={kv.n_ctx}",
                               "pass a larger n_ctx (--ctx) or a shorter prompt / max_tokens")
        if end > self.max_positions:
            raise EdgeLLMError(f"position {end - 1} is beyond the {self.max_positions} positions the ONNX graph covers",
                               "re-export with a larger max_positions or use a smaller n_ctx")
        if all_logits and self.kind != "decode":
            raise EdgeLLMError(f"the {self.kind!r} graph returns last-position logits only",
                               "export the 'decode' graph for all-position logits")
        keys, values = kv.past(pos)
        feeds = {"input_ids": tokens, "position_ids": np.arange(pos, end, dtype=np.int64)[None]}
        for i in range(self.cfg.n_layers):
            feeds[f"past_key_{i}"] = keys[i]
            feeds[f"past_value_{i}"] = values[i]
        out = self.session.run(self._outputs, feeds)
        kv.k, kv.v = out[1::2], out[2::2]
        kv.length = end
        logits = out[0][0]
        return logits if all_logits else logits[-1:]
