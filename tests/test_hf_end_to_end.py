"""A Hugging Face directory runs end to end through edgellm.LLM and generates what llama.cpp generates
from the same weights converted to GGUF (Q/K permuted the way llama.cpp's converter does)."""
from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import save_file

import edgellm
from conftest import require_llama_cpp
from edgellm.runtime.gguf_file import open_gguf
from edgellm.runtime.hf_loader import hf_name
from edgellm.runtime.loader import load_model
from tinymodels import TinySpec, write_tiny_gguf


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's LlamaModel.permute: interleaved ("normal") RoPE rows -> HF rotate-half rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf_dir(gguf_path, out):
    m = load_model(gguf_path)
    c = m.config
    out.mkdir()
    tensors = {}
    for name in m.weights.names():
        w = m.weights.get(name)
        if name.endswith("attn_q.weight"):
            w = unpermute(w, c.n_heads)
        elif name.endswith("attn_k.weight"):
            w = unpermute(w, c.n_kv_heads)
        tensors[hf_name(name)] = np.ascontiguousarray(w)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": c.n_layers,
        "hidden_size": c.dim, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "intermediate_size": c.ffn_dim, "vocab_size": c.vocab_size, "max_position_embeddings": c.context_length,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_base, "hidden_act": "silu",
        "tie_word_embeddings": c.tied_embeddings}))
    m.tokenizer.hf.save(str(out / "tokenizer.json"))
    tok = m.tokenizer
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tok.tokens[tok.bos_id], "eos_token": tok.tokens[tok.eos_id], "add_bos_token": tok.add_bos}))
    return out


def test_hf_directory_generates_like_llamacpp_on_the_gguf(tmp_path):
    llama_cpp = require_llama_cpp()
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(n_layers=3, seed=7))
    hf_dir = gguf_to_hf_dir(gguf_path, tmp_path / "hf")
    llm = edgellm.LLM(hf_dir, threads=2)
    assert llm.config.rope_neox and llm.config.arch == "llama"
    prompt = "the cat sat on the mat"
    ids = llm.tokenize(prompt)
    ref = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=128, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False)
    assert ids == ref.tokenize(prompt.encode(), add_bos=False, special=True)
    expected = []
    for t in ref.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        expected.append(t)
        if len(expected) == 24:
            break
    got = llm.generate(prompt, max_tokens=24, temperature=0, ignore_eos=True)
    assert got.tokens == expected
    assert open_gguf(gguf_path).store.info("blk.0.attn_q.weight").shape == (llm.config.dim, llm.config.dim)
