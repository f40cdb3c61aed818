"""Turn a model path (GGUF file or Hugging Face directory) into config + weight store + tokenizer."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError, UnsupportedModelError
from .config import SUPPORTED_ARCHS, ModelConfig
from .weights import WeightStore

# absurd-value guards: far above any real model, far below what would exhaust memory
_LIMITS = {"n_layers": 1024, "dim": 1 << 16, "n_heads": 1024, "ffn_dim": 1 << 18, "vocab_size": 1 << 22}


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: WeightStore
    tokenizer: Any
    path: Path
    format: str
    metadata: dict = field(default_factory=dict)


def _req(meta: dict, key: str):
    if key not in meta:
        raise ModelFormatError(f"GGUF metadata key {key!r} is missing", "the file is incomplete or not a llama-family model")
    return meta[key]


def config_from_gguf(meta: dict, store: WeightStore | None = None) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch is None:
        raise ModelFormatError("GGUF metadata has no general.architecture", "the file is not a model GGUF")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"architecture {arch!r} is not supported",
                                    f"supported architectures: {', '.join(SUPPORTED_ARCHS)}")
    a = arch
    n_heads = int(_req(meta, f"{a}.attention.head_count"))
    dim = int(_req(meta, f"{a}.embedding_length"))
    vocab = meta.get(f"{a}.vocab_size")
    if vocab is None:
        vocab = len(meta.get("tokenizer.ggml.tokens", [])) or None
    if vocab is None and store is not None and "token_embd.weight" in store:
        vocab = store.info("token_embd.weight").shape[0]
    head_dim = meta.get(f"{a}.attention.key_length")
    scaling = meta.get(f"{a}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UnsupportedModelError(f"RoPE scaling type {scaling!r} is not supported", "supported: none, linear")
    factor = float(meta.get(f"{a}.rope.scaling.factor", 1.0) or 1.0) if scaling == "linear" else 1.0
    tied = store is not None and "output.weight" not in store
    cfg = ModelConfig(
        arch=arch,
        n_layers=int(_req(meta, f"{a}.block_count")),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=int(meta.get(f"{a}.attention.head_count_kv", n_heads)),
        ffn_dim=int(_req(meta, f"{a}.feed_forward_length")),
        vocab_size=int(vocab or 0),
        context_length=int(meta.get(f"{a}.context_length", 2048)),
        norm_eps=float(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=float(meta.get(f"{a}.rope.freq_base", 10000.0)),
        rope_scale=factor,
        rope_neox=(arch == "qwen2"),   # llama.cpp: LLM_ARCH_QWEN2 uses NeoX rope, llama/mistral normal
        rope_dim=int(meta[f"{a}.rope.dimension_count"]) if f"{a}.rope.dimension_count" in meta else None,
        head_dim=int(head_dim) if head_dim else None,
        tied_embeddings=tied,
        attn_bias=store is not None and "blk.0.attn_q.bias" in store,
        name=str(meta.get("general.name", "")),
    )
    validate_config(cfg)
    return cfg


def validate_config(cfg: ModelConfig) -> None:
    for k, hi in _LIMITS.items():
        v = getattr(cfg, k)
        if not 0 < v <= hi:
            raise ModelFormatError(f"model config {k}={v} is outside the plausible range 1..{hi}",
                                   "the model metadata is corrupt")
    if cfg.n_heads % cfg.n_kv_heads or cfg.n_kv_heads <= 0:
        raise ModelFormatError(f"head_count {cfg.n_heads} is not a multiple of head_count_kv {cfg.n_kv_heads}",
                               "the model metadata is corrupt")
    if cfg.rope_dim > cfg.head_dim or cfg.rope_dim % 2:
        raise ModelFormatError(f"rope dimension {cfg.rope_dim} does not fit head_dim {cfg.head_dim}",
                               "the model metadata is corrupt")


def check_weights(cfg: ModelConfig, store: WeightStore) -> None:
    """Every tensor the forward pass needs exists with the shape the config implies."""
    d, hd, kvd = cfg.dim, cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    want = {"token_embd.weight": (cfg.vocab_size, d), "output_norm.weight": (d,)}
    if not cfg.tied_embeddings:
        want["output.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        want.update({p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,),
                     p + "attn_q.weight": (cfg.n_heads * hd, d), p + "attn_k.weight": (kvd, d),
                     p + "attn_v.weight": (kvd, d), p + "attn_output.weight": (d, cfg.n_heads * hd),
                     p + "ffn_gate.weight": (cfg.ffn_dim, d), p + "ffn_up.weight": (cfg.ffn_dim, d),
                     p + "ffn_down.weight": (d, cfg.ffn_dim)})
    for name, shape in want.items():
        if name not in store:
            raise ModelFormatError(f"tensor {name!r} is missing", "the model file is incomplete or for another architecture")
        got = tuple(store.shape(name))
        if got != shape:
            raise ModelFormatError(f"tensor {name!r} has shape {got}, expected {shape} from the model config",
                                   "the model file is corrupt or its metadata does not match its tensors")


def load_model(spec: str | os.PathLike, allow_target_mismatch: bool = False) -> LoadedModel:
    """Load a .gguf file, a Hugging Face directory or a compiled bundle (registry names resolve through edgellm.hub)."""
    path = Path(spec)
    if not path.exists():
        from ..hub import resolve_model
        path = resolve_model(str(spec))
    if path.is_dir():
        if (path / "manifest.json").is_file():
            from .bundle import load_bundle
            return load_bundle(path, allow_target_mismatch=allow_target_mismatch)
        if (path / "config.json").exists():
            from .hf_loader import load_hf_dir
            from .tokenizer import Tokenizer
            cfg, store, info = load_hf_dir(path)
            validate_config(cfg)
            check_weights(cfg, store)
            tok = Tokenizer.from_hf_dir(info.get("tokenizer_dir", path))
            if info.get("chat_template") and not tok.chat_template:
                tok.chat_template = info["chat_template"]
            return LoadedModel(cfg, store, tok, path, "hf", info)
        raise ModelFormatError(f"{path} is a directory without config.json or manifest.json",
                               "pass a .gguf file, a Hugging Face model directory or an edgellm bundle")
    from .gguf_file import open_gguf
    from .tokenizer import Tokenizer
    g = open_gguf(path)
    cfg = config_from_gguf(g.metadata, g.store)
    check_weights(cfg, g.store)
    tok = Tokenizer.from_gguf_metadata(g.metadata)
    return LoadedModel(cfg, g.store, tok, path, "gguf", g.metadata)
