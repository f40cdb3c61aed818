"""The neuron profile a bundle carries (`neurons.npz`, written by `edgellm compile --profile-neurons`).

Per layer: the FFN neurons ranked by how often calibration text activated them (hot first), the
activation threshold on |silu(gate.h) * up.h| chosen for the target sparsity (CATS/TEAL style),
and a low-rank activation predictor (LLM in a flash): score = (h @ A) @ B + bias, active if > 0.
This module only reads the file; the compiler writes it (through `save_profile`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import EdgeLLMError, ModelFormatError

PROFILE_FILE = "neurons.npz"
PROFILE_FLAG = "--profile-neurons"


@dataclass
class NeuronProfile:
    ranking: np.ndarray            # int32 [L, ffn]: neuron ids, most often active first
    frequency: np.ndarray          # float32 [L, ffn]: fraction of calibration tokens where the neuron was active
    threshold: np.ndarray          # float32 [L]: |silu(g)*u| above this counts as active
    pred_a: np.ndarray | None      # float16 [L, dim, r]
    pred_b: np.ndarray | None      # float16 [L, r, ffn]
    pred_bias: np.ndarray | None   # float32 [L, ffn]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self._a32 = self._b32 = None

    @property
    def has_predictor(self) -> bool:
        return self.pred_a is not None

    @property
    def predictor_bytes(self) -> int:
        """Stored bytes of the predictor (what a memory budget must hold resident)."""
        if not self.has_predictor:
            return 0
        return int(self.pred_a.nbytes + self.pred_b.nbytes + self.pred_bias.nbytes)

    def predict(self, layer: int, h: np.ndarray) -> np.ndarray:
        """bool [T, ffn]: the neurons the predictor expects token rows of h [T, dim] to activate."""
        if self._a32 is None:    # float32 working copies (compute overhead, 2x the stored float16)
            self._a32 = [a.astype(np.float32) for a in self.pred_a]
            self._b32 = [b.astype(np.float32) for b in self.pred_b]
        return (h @ self._a32[layer]) @ self._b32[layer] + self.pred_bias[layer] > 0

    def save(self, path: str | Path) -> Path:
        arrays = {"ranking": self.ranking.astype(np.int32), "frequency": self.frequency.astype(np.float32),
                  "threshold": self.threshold.astype(np.float32),
                  "meta": np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8)}
        if self.has_predictor:
            arrays.update(pred_a=self.pred_a.astype(np.float16), pred_b=self.pred_b.astype(np.float16),
                          pred_bias=self.pred_bias.astype(np.float32))
        np.savez(path, **arrays)
        return Path(path)


def load_profile(path: str | Path) -> NeuronProfile:
    try:
        with np.load(path) as z:
            get = lambda k: z[k] if k in z.files else None  # noqa: E731
            meta = json.loads(bytes(z["meta"]).decode()) if "meta" in z.files else {}
            return NeuronProfile(z["ranking"], z["frequency"], z["threshold"], get("pred_a"), get("pred_b"),
                                 get("pred_bias"), meta)
    except (OSError, KeyError, ValueError) as e:
        raise ModelFormatError(f"the neuron profile {path} cannot be read ({e})",
                               f"recompile the bundle with `edgellm compile MODEL {PROFILE_FLAG}`") from None


def bundle_profile(bundle_dir: str | Path, need_predictor: bool = False) -> NeuronProfile | None:
    """The bundle's neuron profile; None if it has none, or an error naming the compile flag if one is needed."""
    p = Path(bundle_dir) / PROFILE_FILE
    if not p.is_file():
        if need_predictor:
            raise EdgeLLMError(f"sparse (predictor) mode needs the bundle's neuron profile, and {bundle_dir} was "
                               f"compiled without one (no {PROFILE_FILE})",
                               f"recompile it with profiling: edgellm compile MODEL {PROFILE_FLAG} -o BUNDLE_DIR")
        return None
    prof = load_profile(p)
    if need_predictor and not prof.has_predictor:
        raise EdgeLLMError(f"the neuron profile of {bundle_dir} has a ranking but no activation predictor",
                           f"recompile it with `edgellm compile MODEL {PROFILE_FLAG}` (predictor rank > 0)")
    return prof
