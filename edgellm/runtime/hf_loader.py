"""Load a Hugging Face model directory (config.json + safetensors) as a ModelConfig and a WeightStore.

Tensors are memory-mapped straight out of the safetensors files (zero-copy) and renamed to the
GGUF names the model code uses. Q/K stay in Hugging Face's rotate-half layout, so the config says
`rope_neox=True` instead of permuting them the way llama.cpp's converter does: same model, no copy.
The safetensors header is parsed here (it is tiny) because the `safetensors` numpy API has no BF16.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import ModelFormatError, UnsupportedModelError
from .config import SUPPORTED_ARCHS, ModelConfig
from .loader import validate_config
from .weights import MappedStore, TensorInfo

HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}

# safetensors dtype -> (numpy dtype of the mapped view, bytes per value, GGML type). BF16 has no
# numpy dtype: it is mapped as bytes, two per value, the way GGUF readers expose it.
DTYPES = {
    "F32": (np.dtype("<f4"), 4, GGMLQuantizationType.F32),
    "F16": (np.dtype("<f2"), 2, GGMLQuantizationType.F16),
    "BF16": (np.dtype(np.uint8), 2, GGMLQuantizationType.BF16),
}
# Valid safetensors dtypes that edgellm does not run (a different error than a corrupt header).
OTHER_SAFETENSORS_DTYPES = {"F64", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
                            "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}
MAX_HEADER_BYTES = 100 * 1024 * 1024   # the safetensors spec's own limit

GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm.weight": "attn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
               "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
               "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
               "post_attention_layernorm.weight": "ffn_norm.weight",
               "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight",
               "mlp.down_proj.weight": "ffn_down.weight"}
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # old checkpoints; recomputed
LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
BLK_RE = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_name(src: str) -> str | None:
    """Hugging Face tensor name -> GGUF tensor name (None if unknown)."""
    if src in GLOBAL_NAMES:
        return GLOBAL_NAMES[src]
    m = LAYER_RE.fullmatch(src)
    if m and m.group(2) in LAYER_NAMES:
        return f"blk.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    return None


def hf_name(name: str) -> str:
    """GGUF tensor name -> Hugging Face tensor name (for error messages)."""
    for hf, g in GLOBAL_NAMES.items():
        if g == name:
            return hf
    m = BLK_RE.fullmatch(name)
    for hf, g in LAYER_NAMES.items():
        if m and g == m.group(2):
            return f"model.layers.{m.group(1)}.{hf}"
    return name


class SafetensorsStore(MappedStore):
    """Tensors memory-mapped from safetensors files; F16/BF16 are widened to float32 on each `get`.

    `raw` follows the GGUF store's convention: F32/F16 as float arrays, BF16 as uint8 rows (2 bytes
    per value), so `weights.dequantize(raw, qtype, shape)` works on either store.
    """

    def get(self, name: str) -> np.ndarray:
        i = self.info(name)
        if i.qtype == GGMLQuantizationType.BF16:  # bf16 bits are the high half of a float32
            bits = self._arrays[name].view("<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(i.shape)
        return super().get(name)


def read_safetensors(path: str | os.PathLike) -> dict[str, tuple[TensorInfo, np.ndarray]]:
    """Parse and validate one safetensors file; return name -> (info, zero-copy memmap view)."""
    path = Path(path)
    size = path.stat().st_size
    bad = f"{path} is not a valid safetensors file"
    fix = "re-download it (it may be truncated) or re-save the model with safetensors"
    if size < 8:
        raise ModelFormatError(f"{bad}: only {size} bytes, shorter than the 8-byte header length", fix)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ModelFormatError(f"{bad}: header length {n} is impossible for a {size}-byte file", fix)
        raw_header = f.read(n)
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{bad}: header is not JSON ({e})", fix) from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{bad}: header is not a JSON object", fix)
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    mm = np.memmap(path, dtype=np.uint8, mode="r") if header else None
    out = {}
    for name, h in header.items():
        try:
            dtype_name, shape, (begin, end) = h["dtype"], tuple(int(d) for d in h["shape"]), h["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{bad}: malformed header entry for tensor {name!r}", fix) from None
        if dtype_name not in DTYPES:
            if dtype_name in OTHER_SAFETENSORS_DTYPES:
                raise UnsupportedModelError(f"tensor {name!r} in {path.name} has dtype {dtype_name}",
                                            "edgellm reads F32, F16 and BF16 safetensors; re-save the model "
                                            "in one of those (e.g. torch_dtype=bfloat16)")
            raise ModelFormatError(f"{bad}: tensor {name!r} has unknown dtype {dtype_name!r}", fix)
        dtype, itemsize, qtype = DTYPES[dtype_name]
        nbytes = math.prod(shape) * itemsize
        if min(shape, default=1) < 0 or not 0 <= begin <= end or end - begin != nbytes:
            raise ModelFormatError(f"{bad}: tensor {name!r} has offsets [{begin}, {end}) that do not hold "
                                   f"shape {list(shape)} of {dtype_name}", fix)
        if end > data_size:
            raise ModelFormatError(f"{bad}: tensor {name!r} ends at byte {end} of a {data_size}-byte "
                                   "data section (the file is truncated)", fix)
        arr = mm[data_start + begin:data_start + end].view(dtype)
        if qtype == GGMLQuantizationType.BF16:  # byte rows: the last axis holds 2 bytes per value
            arr = arr.reshape((*shape[:-1], 2 * shape[-1]) if shape else (2,))
        else:
            arr = arr.reshape(shape)
        out[name] = (TensorInfo(name, qtype, shape, nbytes), arr)
    return out


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a model directory: the sharded index's files, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({path / f for f in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFormatError(f"{index} is not a valid safetensors index ({e!r})",
                                   "re-download the model") from None
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelFormatError(f"{index.name} lists shard(s) missing from {path}: {', '.join(missing)}",
                                   "download every model-*.safetensors shard of the model")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if files:
        return files
    legacy = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if legacy:
        raise UnsupportedModelError(
            f"{path} holds PyTorch pickle weights ({', '.join(legacy)}), which are not supported",
            "convert to safetensors, e.g. AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(dir, safe_serialization=True) with transformers")
    raise ModelFormatError(f"no *.safetensors weights in {path}",
                           "download the model's safetensors files next to its config.json")


def _rope_scale(rs: dict | None) -> float:
    """Linear scaling factor from rope_scaling (or transformers 5's rope_parameters)."""
    if not rs:
        return 1.0
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return 1.0
    if kind == "linear":
        return float(rs["factor"])
    raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported",
                                "only linear RoPE scaling is implemented; use a model without "
                                "rope_scaling or with {'type': 'linear'}")


def config_from_hf(hf: dict, name: str = "") -> ModelConfig:
    """Map a Hugging Face config.json (llama / mistral / qwen2) to a ModelConfig."""
    archs = hf.get("architectures") or []
    arch = next((HF_ARCHS[a] for a in archs if a in HF_ARCHS), None)
    if arch is None and not archs and hf.get("model_type") in SUPPORTED_ARCHS:
        arch = hf["model_type"]
    if arch is None:
        found = ", ".join(archs) or f"model_type={hf.get('model_type')!r}"
        raise UnsupportedModelError(f"architecture {found} is not supported",
                                    f"use a model of one of: {', '.join(HF_ARCHS)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported", "only SiLU (SwiGLU) MLPs run")
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=True is not supported", "use a model without MLP biases")
    try:
        n_heads = int(hf["num_attention_heads"])
        ctx = int(hf.get("max_position_embeddings", 2048))
        window = hf.get("sliding_window") if (arch == "mistral" or hf.get("use_sliding_window")) else None
        if window:  # attention is exact (no window needed) as long as the context fits in the window
            ctx = min(ctx, int(window))
        rope_params = hf.get("rope_parameters") or {}
        return ModelConfig(
            arch=arch,
            n_layers=int(hf["num_hidden_layers"]),
            dim=int(hf["hidden_size"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            ffn_dim=int(hf["intermediate_size"]),
            vocab_size=int(hf["vocab_size"]),
            context_length=ctx,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_base=float(hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
            rope_scale=_rope_scale(hf.get("rope_scaling") or rope_params),
            rope_neox=True,
            head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
            tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attn_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
            name=name,
            extra={"hf_architecture": archs[0] if archs else arch, "sliding_window": window},
        )
    except KeyError as e:
        raise ModelFormatError(f"config.json has no {e.args[0]!r}", "re-download the model's config.json") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ModelFormatError(f"config.json has a malformed value ({e})", "re-download the model's config.json") from None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF name -> numpy shape of every tensor the model needs (qwen2: with q/k/v biases)."""
    q, kv, d, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.dim, cfg.ffn_dim
    shapes = {"token_embd.weight": (cfg.vocab_size, d), "output_norm.weight": (d,)}
    if not cfg.tied_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (d,), p + "attn_q.weight": (q, d), p + "attn_k.weight": (kv, d),
                       p + "attn_v.weight": (kv, d), p + "attn_output.weight": (d, q), p + "ffn_norm.weight": (d,),
                       p + "ffn_gate.weight": (f, d), p + "ffn_up.weight": (f, d), p + "ffn_down.weight": (d, f)})
        if cfg.arch == "qwen2":
            shapes.update({p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)})
    return shapes


def _chat_template(path: Path) -> str | None:
    """The chat template from chat_template.jinja or tokenizer_config.json (the 'default' one if named)."""
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    tc = path / "tokenizer_config.json"
    if not tc.exists():
        return None
    try:
        t = json.loads(tc.read_text()).get("chat_template")
    except (ValueError, AttributeError) as e:
        raise ModelFormatError(f"{tc} is not valid JSON ({e})", "re-download tokenizer_config.json") from None
    if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) else None


def load_hf_dir(path: str | os.PathLike) -> tuple[ModelConfig, SafetensorsStore, dict[str, Any]]:
    """Open a Hugging Face model directory: (config, memory-mapped weights, {tokenizer_dir, chat_template, name})."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFormatError(f"{path} is not a directory", "pass a Hugging Face model directory (with config.json)")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelFormatError(f"{path} has no config.json",
                               "download the whole Hugging Face model repository, not only the weights")
    try:
        hf = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ModelFormatError(f"{cfg_file} is not valid JSON ({e})", "re-download config.json") from None
    if not isinstance(hf, dict):
        raise ModelFormatError(f"{cfg_file} is not a JSON object", "re-download config.json")
    cfg = config_from_hf(hf, name=path.name)
    validate_config(cfg)

    infos, arrays, unknown = {}, {}, []
    for f in safetensors_files(path):
        for src, (info, arr) in read_safetensors(f).items():
            name = gguf_name(src)
            if name is None:
                if not IGNORED.fullmatch(src):
                    unknown.append(src)
                continue
            if name in infos:
                raise ModelFormatError(f"tensor {src!r} appears in more than one safetensors file in {path}",
                                       "remove stray *.safetensors files that are not part of the model")
            infos[name] = TensorInfo(name, info.qtype, info.shape, info.nbytes)
            arrays[name] = arr
    if unknown:
        raise UnsupportedModelError(f"{path} has tensors a {cfg.arch} model does not use: {', '.join(unknown[:5])}"
                                    + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""),
                                    "the checkpoint is a variant edgellm does not run (or mislabeled in config.json)")
    if cfg.tied_embeddings:  # some checkpoints store the tied lm_head anyway; the model reads token_embd
        infos.pop("output.weight", None)
        arrays.pop("output.weight", None)
    for name, shape in expected_shapes(cfg).items():
        if name not in infos:
            raise ModelFormatError(f"{path} has no tensor {hf_name(name)!r} (config.json promises it)",
                                   "download every safetensors shard, or fix num_hidden_layers / "
                                   "tie_word_embeddings in config.json")
        if infos[name].shape != shape:
            raise ModelFormatError(f"tensor {hf_name(name)!r} has shape {list(infos[name].shape)}, config.json "
                                   f"implies {list(shape)}", "the weights and config.json belong to different models")
    return cfg, SafetensorsStore(infos, arrays), {
        "tokenizer_dir": path, "chat_template": _chat_template(path), "name": path.name}
