"""Tiny random Llama-family models written with the `gguf` writer, for fast tests against llama.cpp.

The vocabulary is GPT-2 byte-level: the 256 byte symbols plus a few merges and special tokens, so
llama.cpp can load the file and both engines tokenize the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

from edgellm.runtime.tokenizer import _bytes_to_unicode


MERGES = ["Ġ t", "h e", "i n", "Ġt he", "e r", "o n", "Ġ a", "r e", "a t", "o r"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    table = _bytes_to_unicode()
    tokens = list(SPECIALS) + [table[b] for b in range(256)]
    for m in MERGES:
        tokens.append(m.replace(" ", ""))
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, MERGES


@dataclass
class TinySpec:
    arch: str = "llama"
    n_layers: int = 2
    dim: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 128
    context_length: int = 256
    rope_base: float = 10000.0
    rope_scale: float = 1.0
    tied: bool = False
    qtype: str = "F32"       # type of the 2-D weight matrices
    seed: int = 0


def write_tiny_gguf(path: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a random model of `spec` to `path` (numpy-quantizable types only: F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1)."""
    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    tokens, types, merges = tiny_vocab()
    vocab = len(tokens)
    hd = spec.dim // spec.n_heads
    a = spec.arch
    w = GGUFWriter(str(path), a)
    w.add_name(f"tiny-{a}")
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.ffn_dim)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(spec.rope_base)
    w.add_rope_dimension_count(hd)
    if spec.rope_scale != 1.0:
        from gguf import RopeScalingType
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec.rope_scale)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    qt = GGMLQuantizationType[spec.qtype]

    def mat(name, rows, cols, scale=None):
        x = (rng.standard_normal((rows, cols)) * (scale or cols ** -0.5)).astype(np.float32)
        if qt == GGMLQuantizationType.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, quants.quantize(x, qt), raw_dtype=qt)

    def vec(name, n, base=1.0, jitter=0.1):
        w.add_tensor(name, (base + jitter * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", vocab, spec.dim, 1.0)
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", spec.dim)
        mat(p + "attn_q.weight", spec.n_heads * hd, spec.dim)
        mat(p + "attn_k.weight", spec.n_kv_heads * hd, spec.dim)
        mat(p + "attn_v.weight", spec.n_kv_heads * hd, spec.dim)
        if a == "qwen2":
            vec(p + "attn_q.bias", spec.n_heads * hd, 0.0, 0.5)
            vec(p + "attn_k.bias", spec.n_kv_heads * hd, 0.0, 0.5)
            vec(p + "attn_v.bias", spec.n_kv_heads * hd, 0.0, 0.5)
        mat(p + "attn_output.weight", spec.dim, spec.n_heads * hd)
        vec(p + "ffn_norm.weight", spec.dim)
        mat(p + "ffn_gate.weight", spec.ffn_dim, spec.dim)
        mat(p + "ffn_up.weight", spec.ffn_dim, spec.dim)
        mat(p + "ffn_down.weight", spec.dim, spec.ffn_dim)
    vec("output_norm.weight", spec.dim)
    if not spec.tied:
        mat("output.weight", vocab, spec.dim)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def check_forward_errors(backend, foreign_cache, vocab_size: int) -> None:
    """A compiled backend refuses another backend's KV cache, a full context and out-of-range token ids."""
    import pytest
    from edgellm.errors import EdgeLLMError
    with pytest.raises(EdgeLLMError, match="new_cache"):
        backend.forward([1], 0, foreign_cache)
    with pytest.raises(EdgeLLMError, match="context full"):
        backend.forward(list(range(9)), 0, backend.new_cache(8))
    with pytest.raises(EdgeLLMError, match="out of range"):
        backend.forward([vocab_size], 0, backend.new_cache(8))
