"""Hugging Face directory loader: config mapping, tensor naming, safetensors parsing, and the key
claim that HF weights run with NeoX RoPE give the same logits as llama.cpp-permuted weights in GGUF."""
from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from edgellm.errors import EdgeLLMError, ModelFormatError, UnsupportedModelError
from edgellm.runtime.gguf_file import open_gguf
from edgellm.runtime.hf_loader import load_hf_dir, read_safetensors
from edgellm.runtime.kv_cache import KVCache
from edgellm.runtime.model import Transformer
from edgellm.runtime.weights import dequantize

N_LAYERS, DIM, HEADS, KV_HEADS, FFN, VOCAB = 2, 64, 4, 2, 128, 300
HEAD_DIM = DIM // HEADS
ARCH_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}


def hf_config(arch: str = "llama", **over) -> dict:
    c = {"architectures": [ARCH_CLASS[arch]], "model_type": arch, "num_hidden_layers": N_LAYERS,
         "hidden_size": DIM, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
         "intermediate_size": FFN, "vocab_size": VOCAB, "max_position_embeddings": 256,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False}
    c.update(over)
    return c


def hf_weights(seed: int = 0, bias: bool = False, tied: bool = False) -> dict[str, np.ndarray]:
    """Random HF-named float32 weights for the tiny model (scaled so activations stay O(1))."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)

    t = {"model.embed_tokens.weight": w(VOCAB, DIM, scale=1.0), "model.norm.weight": 1 + w(DIM, scale=0.1)}
    if not tied:
        t["lm_head.weight"] = w(VOCAB, DIM)
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + w(DIM, scale=0.1),
                  p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, DIM),
                  p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, DIM),
                  p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, DIM),
                  p + "self_attn.o_proj.weight": w(DIM, HEADS * HEAD_DIM),
                  p + "post_attention_layernorm.weight": 1 + w(DIM, scale=0.1),
                  p + "mlp.gate_proj.weight": w(FFN, DIM), p + "mlp.up_proj.weight": w(FFN, DIM),
                  p + "mlp.down_proj.weight": w(DIM, FFN)})
        if bias:
            for n, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                t[p + f"self_attn.{n}_proj.bias"] = w(rows * HEAD_DIM, scale=0.5)
    return t


def write_hf_dir(path, weights, config=None, **extra_files):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or hf_config()))
    if weights is not None:
        save_file(weights, str(path / "model.safetensors"))
    for name, text in extra_files.items():
        (path / name.replace("__", ".")).write_text(text)
    return path


def write_safetensors_by_hand(file, tensors: dict[str, tuple[str, tuple, bytes]], header_extra=None):
    """The safetensors layout written without the library: u64 header length, JSON header, data."""
    header, blob = dict(header_extra or {}), b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    file.write_bytes(struct.pack("<Q", len(h)) + h + blob)


def logits(cfg, store, tokens, **kw):
    return Transformer(cfg, store, **kw).forward(np.array(tokens), 0, KVCache(cfg, 32), all_logits=True)


# --- config mapping -------------------------------------------------------------------------------

def test_llama_config_mapping(tmp_path):
    d = write_hf_dir(tmp_path / "tiny-llama", hf_weights(), hf_config(rope_theta=5e5, rms_norm_eps=1e-6),
                     tokenizer_config__json=json.dumps({"chat_template": "{{ messages }}"}))
    cfg, store, info = load_hf_dir(d)
    assert (cfg.arch, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size) == \
        ("llama", N_LAYERS, DIM, HEADS, KV_HEADS, FFN, VOCAB)
    assert (cfg.context_length, cfg.norm_eps, cfg.rope_base, cfg.rope_scale) == (256, 1e-6, 5e5, 1.0)
    assert cfg.rope_neox and not cfg.attn_bias and not cfg.tied_embeddings
    assert cfg.head_dim == cfg.rope_dim == HEAD_DIM and cfg.n_rep == 2
    assert info == {"tokenizer_dir": d, "chat_template": "{{ messages }}", "name": "tiny-llama"}


def test_config_options(tmp_path):
    from edgellm.runtime.hf_loader import config_from_hf
    assert config_from_hf(hf_config(rope_scaling={"type": "linear", "factor": 4.0})).rope_scale == 4.0
    assert config_from_hf(hf_config(rope_scaling={"rope_type": "linear", "factor": 2.0})).rope_scale == 2.0
    assert config_from_hf(hf_config(rope_scaling={"rope_type": "default"})).rope_scale == 1.0
    c = config_from_hf(hf_config(head_dim=32))
    assert c.head_dim == c.rope_dim == 32
    c = config_from_hf(hf_config(num_key_value_heads=None))
    assert c.n_kv_heads == HEADS
    # Mistral's sliding window: attention is exact up to the window, so the context stops there
    c = config_from_hf(hf_config("mistral", max_position_embeddings=32768, sliding_window=4096))
    assert (c.arch, c.context_length, c.rope_neox) == ("mistral", 4096, True)
    assert config_from_hf(hf_config("qwen2")).attn_bias


@pytest.mark.parametrize("scaling", [{"type": "yarn", "factor": 4.0}, {"rope_type": "llama3", "factor": 8.0},
                                     {"type": "dynamic", "factor": 2.0}])
def test_unsupported_rope_scaling(tmp_path, scaling):
    d = write_hf_dir(tmp_path, hf_weights(), hf_config(rope_scaling=scaling))
    with pytest.raises(UnsupportedModelError, match="rope_scaling"):
        load_hf_dir(d)


def test_chat_template_list_form(tmp_path):
    tc = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    d = write_hf_dir(tmp_path, hf_weights(), tokenizer_config__json=json.dumps(tc))
    assert load_hf_dir(d)[2]["chat_template"] == "D"
    (d / "tokenizer_config.json").unlink()
    assert load_hf_dir(d)[2]["chat_template"] is None


# --- names, shapes, dtypes ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_names_agree_with_gguf_tensor_map(tmp_path, arch):
    """Every HF tensor lands on the GGUF name gguf-py's own TensorNameMap gives it, unchanged."""
    w = hf_weights(bias=arch == "qwen2")
    cfg, store, _ = load_hf_dir(write_hf_dir(tmp_path, w, hf_config(arch)))
    name_map = gguf.get_tensor_name_map(GGUF_ARCH[arch], N_LAYERS)
    expected = {name_map.get_name(k, try_suffixes=(".weight", ".bias")): v for k, v in w.items()}
    assert set(store.names()) == set(expected)
    for name, v in expected.items():
        assert store.info(name).shape == v.shape and store.qtype(name) == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(store.get(name), v)
    assert cfg.attn_bias == (arch == "qwen2")


def test_zero_copy_memory_map(tmp_path):
    _, store, _ = load_hf_dir(write_hf_dir(tmp_path, hf_weights()))
    raw = store.raw("blk.1.ffn_down.weight")
    assert isinstance(raw.base, np.memmap) or isinstance(raw, np.memmap)
    assert not raw.flags.writeable and not raw.flags.owndata
    assert store.get("blk.1.ffn_down.weight").base is not None  # F32 get is a view too, not a copy


def test_f16(tmp_path):
    w = {k: v.astype(np.float16) for k, v in hf_weights().items()}
    _, store, _ = load_hf_dir(write_hf_dir(tmp_path, w))
    assert store.qtype("blk.0.attn_q.weight") == gguf.GGMLQuantizationType.F16
    assert store.info("blk.0.attn_q.weight").nbytes == HEADS * HEAD_DIM * DIM * 2
    got = store.get("blk.0.attn_q.weight")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, w["model.layers.0.self_attn.q_proj.weight"].astype(np.float32))


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns by truncation (keeps the high 16 bits)."""
    return (x.astype(np.float32).view(np.uint32) >> 16).astype("<u2")


def test_bf16_exact(tmp_path):
    """BF16 written by hand (the numpy safetensors API cannot) is widened bit-exactly."""
    w = hf_weights(1)
    w["model.norm.weight"][:8] = [0.0, -0.0, np.inf, -1.5, 3.0e38, 2.0 ** -133, -(2.0 ** -130), 1.0]
    w = {k: (v.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32) for k, v in w.items()}  # bf16 values
    d = write_hf_dir(tmp_path, None)
    write_safetensors_by_hand(d / "model.safetensors",
                              {k: ("BF16", v.shape, _bf16_bits(v).tobytes()) for k, v in w.items()},
                              header_extra={"__metadata__": {"format": "pt"}})
    _, store, _ = load_hf_dir(d)
    norm = store.get("output_norm.weight")   # bit-exact, including -0.0, inf and subnormals
    np.testing.assert_array_equal(norm.view(np.uint32), w["model.norm.weight"].view(np.uint32))
    assert store.info("output_norm.weight").nbytes == DIM * 2
    got = store.get("blk.1.attn_k.weight")
    assert got.dtype == np.float32 and got.shape == (KV_HEADS * HEAD_DIM, DIM)
    np.testing.assert_array_equal(got, w["model.layers.1.self_attn.k_proj.weight"])
    # raw follows the GGUF BF16 convention, so gguf-py's own dequantizer agrees
    raw = store.raw("blk.1.attn_k.weight")
    assert raw.dtype == np.uint8 and raw.shape == (KV_HEADS * HEAD_DIM, 2 * DIM)
    np.testing.assert_array_equal(dequantize(raw, gguf.GGMLQuantizationType.BF16, got.shape), got)


def test_sharded_index(tmp_path):
    w = hf_weights(3)
    d = write_hf_dir(tmp_path / "sharded", None)
    names = sorted(w)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: w[k] for k in keys}, str(d / fname))
    index = {"metadata": {"total_size": sum(v.nbytes for v in w.values())},
             "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg, store, _ = load_hf_dir(d)
    single_cfg, single, _ = load_hf_dir(write_hf_dir(tmp_path / "single", w))
    assert cfg.to_dict() | {"name": ""} == single_cfg.to_dict() | {"name": ""}
    assert sorted(store.names()) == sorted(single.names())
    for n in single.names():
        np.testing.assert_array_equal(store.get(n), single.get(n))
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="model-00002-of-00002.safetensors"):
        load_hf_dir(d)


# --- the same model as GGUF (llama.cpp layout) and as HF (NeoX RoPE, no permute) --------------------

def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> interleaved ("normal") rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, w: dict[str, np.ndarray], arch: str, permute: bool, qtype=gguf.GGMLQuantizationType.F32):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(DIM)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA,
                                        N_LAYERS)
    for k, v in w.items():
        if permute and k.endswith("q_proj.weight"):
            v = llama_cpp_permute(v, HEADS, HEADS)
        elif permute and k.endswith("k_proj.weight"):
            v = llama_cpp_permute(v, HEADS, KV_HEADS)
        name = name_map.get_name(k, try_suffixes=(".weight", ".bias"))
        if qtype == gguf.GGMLQuantizationType.F32 or v.ndim == 1:      # norms and biases stay F32
            writer.add_tensor(name, np.ascontiguousarray(v))
        else:
            writer.add_tensor(name, gguf.quants.quantize(v, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_config(g):
    from edgellm.runtime.loader import config_from_gguf
    return config_from_gguf(g.metadata, g.store)


def test_hf_neox_equals_llama_cpp_permuted_gguf(tmp_path):
    w = hf_weights(4)
    write_gguf(tmp_path / "m.gguf", w, "llama", permute=True)
    g = open_gguf(tmp_path / "m.gguf")
    gcfg = gguf_config(g)
    assert not gcfg.rope_neox and gcfg.n_kv_heads == KV_HEADS
    hcfg, hstore, _ = load_hf_dir(write_hf_dir(tmp_path / "hf", w))
    toks = [5, 17, 299, 0, 42, 42, 7, 123, 250, 1]
    ref = logits(gcfg, g.store, toks)
    got = logits(hcfg, hstore, toks)
    assert ref.shape == got.shape == (len(toks), VOCAB)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # the test can fail: the HF weights read with the GGUF ("normal") RoPE layout give another model
    hcfg.rope_neox = False
    assert np.abs(logits(hcfg, hstore, toks) - ref).max() > 1e-2


def test_bf16_model(tmp_path):
    """A BF16 HF dir is the F32 model with the same values (plain float math), and matches the same
    weights stored as BF16 GGUF (llama.cpp layout) through the default llama.cpp-style activation rounding."""
    w = {k: (v.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32) for k, v in hf_weights(2).items()}
    f32 = load_hf_dir(write_hf_dir(tmp_path / "f32", w))[:2]
    d = write_hf_dir(tmp_path / "bf16", None)
    write_safetensors_by_hand(d / "model.safetensors", {k: ("BF16", v.shape, _bf16_bits(v).tobytes())
                                                        for k, v in w.items()})
    bf16 = load_hf_dir(d)[:2]
    toks = [3, 1, 4, 1, 5, 9]
    np.testing.assert_array_equal(logits(*bf16, toks, act_quant="none"), logits(*f32, toks, act_quant="none"))
    write_gguf(tmp_path / "m.gguf", w, "llama", permute=True, qtype=gguf.GGMLQuantizationType.BF16)
    g = open_gguf(tmp_path / "m.gguf")
    assert g.store.qtype("blk.0.attn_q.weight") == bf16[1].qtype("blk.0.attn_q.weight")
    np.testing.assert_allclose(logits(*bf16, toks), logits(gguf_config(g), g.store, toks), atol=1e-4, rtol=0)


def test_qwen2_biases_match_gguf(tmp_path):
    """qwen2 in llama.cpp: NeoX RoPE, unpermuted Q/K, q/k/v biases; the HF dir must give the same model."""
    w = hf_weights(5, bias=True)
    write_gguf(tmp_path / "q.gguf", w, "qwen2", permute=False)
    g = open_gguf(tmp_path / "q.gguf")
    hcfg, hstore, _ = load_hf_dir(write_hf_dir(tmp_path / "hf", w, hf_config("qwen2")))
    assert hcfg.attn_bias and "blk.0.attn_q.bias" in hstore and "blk.1.attn_v.bias" in hstore
    toks = [1, 2, 3, 200, 100]
    ref = logits(gguf_config(g), g.store, toks)
    np.testing.assert_allclose(logits(hcfg, hstore, toks), ref, atol=1e-4, rtol=0)
    hcfg.attn_bias = False                                  # the biases matter
    assert np.abs(logits(hcfg, hstore, toks) - ref).max() > 1e-2


def test_tied_embeddings(tmp_path):
    w = hf_weights(6, tied=True)
    cfg, store, _ = load_hf_dir(write_hf_dir(tmp_path / "a", w, hf_config(tie_word_embeddings=True)))
    assert cfg.tied_embeddings and "output.weight" not in store
    out = logits(cfg, store, [1, 2, 3])
    assert out.shape == (3, VOCAB)
    # a checkpoint that also stores a (here: different) lm_head: ignored, the model reads token_embd
    w2 = dict(w, **{"lm_head.weight": hf_weights(7)["lm_head.weight"]})
    cfg2, store2, _ = load_hf_dir(write_hf_dir(tmp_path / "b", w2, hf_config(tie_word_embeddings=True)))
    assert "output.weight" not in store2
    np.testing.assert_array_equal(logits(cfg2, store2, [1, 2, 3]), out)


# --- errors -----------------------------------------------------------------------------------------

def test_directory_errors(tmp_path):
    with pytest.raises(ModelFormatError, match="not a directory"):
        load_hf_dir(tmp_path / "nope")
    with pytest.raises(ModelFormatError, match="no config.json"):
        load_hf_dir(tmp_path)
    d = write_hf_dir(tmp_path / "empty", None)
    with pytest.raises(ModelFormatError, match="no \\*.safetensors"):
        load_hf_dir(d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(UnsupportedModelError, match="pytorch_model.bin.*convert to safetensors"):
        load_hf_dir(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="config.json"):
        load_hf_dir(d)


@pytest.mark.parametrize("config,match", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
    ({"architectures": ["Qwen2MoeForCausalLM"]}, "Qwen2MoeForCausalLM"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_unsupported_configs(tmp_path, config, match):
    with pytest.raises(UnsupportedModelError, match=match) as e:
        load_hf_dir(write_hf_dir(tmp_path, hf_weights(), hf_config(**config)))
    assert e.value.fix  # every error names a fix


@pytest.mark.parametrize("over,match", [
    ({"hidden_size": None}, "malformed"), ({"num_attention_heads": 0}, "malformed"),
    ({"num_key_value_heads": 3}, "head_count"), ({"num_hidden_layers": 10 ** 6}, "n_layers"),
])
def test_malformed_configs(tmp_path, over, match):
    with pytest.raises(ModelFormatError, match=match):
        load_hf_dir(write_hf_dir(tmp_path, hf_weights(), hf_config(**over)))
    c = hf_config()
    del c["intermediate_size"]
    with pytest.raises(ModelFormatError, match="intermediate_size"):
        load_hf_dir(write_hf_dir(tmp_path, hf_weights(), c))


def test_missing_and_misshapen_tensors(tmp_path):
    w = hf_weights()
    del w["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelFormatError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf_dir(write_hf_dir(tmp_path / "a", w))
    w = hf_weights()
    del w["lm_head.weight"]          # untied config, but no lm_head
    with pytest.raises(ModelFormatError, match="lm_head.weight"):
        load_hf_dir(write_hf_dir(tmp_path / "b", w))
    with pytest.raises(ModelFormatError, match="model.layers.0.self_attn.q_proj.bias"):
        load_hf_dir(write_hf_dir(tmp_path / "c", hf_weights(), hf_config("qwen2")))   # qwen2 without biases
    w = hf_weights()
    w["model.layers.0.self_attn.k_proj.weight"] = w["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(ModelFormatError, match="k_proj.weight.*shape"):
        load_hf_dir(write_hf_dir(tmp_path / "d", w))
    with pytest.raises(ModelFormatError, match="num_hidden_layers"):
        load_hf_dir(write_hf_dir(tmp_path / "e", hf_weights(), hf_config(num_hidden_layers=3)))
    w = dict(hf_weights(), **{"model.layers.0.mlp.gate_proj.lora_A": np.zeros(4, np.float32)})
    with pytest.raises(UnsupportedModelError, match="lora_A"):
        load_hf_dir(write_hf_dir(tmp_path / "f", w))
    w = dict(hf_weights(), **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32)})
    assert load_hf_dir(write_hf_dir(tmp_path / "g", w))[0].n_layers == N_LAYERS   # old checkpoints: ignored


def _good_file(tmp_path):
    f = tmp_path / "x.safetensors"
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(f))
    return f


def test_safetensors_reader_matches_library(tmp_path):
    f = _good_file(tmp_path)
    (info, arr), = read_safetensors(f).values()
    assert info.shape == (2, 3) and info.nbytes == 24
    np.testing.assert_array_equal(arr, np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("corrupt,match", [
    (lambda b: b[:5], "shorter than the 8-byte"),
    (lambda b: b[:-4], "truncated"),
    (lambda b: struct.pack("<Q", 1 << 40) + b[8:], "header length"),
    (lambda b: struct.pack("<Q", len(b)) + b[8:], "header length"),
    (lambda b: b[:8] + b"\xff" + b[9:], "not JSON"),
])
def test_corrupt_safetensors(tmp_path, corrupt, match):
    f = _good_file(tmp_path)
    f.write_bytes(corrupt(f.read_bytes()))
    with pytest.raises(ModelFormatError, match=match):
        read_safetensors(f)


@pytest.mark.parametrize("entry,exc,match", [
    ({"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}, ModelFormatError, "unknown dtype"),
    ({"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}, UnsupportedModelError, "I64"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}, ModelFormatError, "do not hold"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}, ModelFormatError, "truncated"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, ModelFormatError, "offsets"),
    ({"dtype": "F32", "shape": [2]}, ModelFormatError, "malformed"),
])
def test_bad_header_entries(tmp_path, entry, exc, match):
    h = json.dumps({"t": entry}).encode()
    f = tmp_path / "bad.safetensors"
    f.write_bytes(struct.pack("<Q", len(h)) + h + bytes(8))
    with pytest.raises(exc, match=match) as e:
        read_safetensors(f)
    assert isinstance(e.value, EdgeLLMError)
