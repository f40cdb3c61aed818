"""The numpy reference against llama.cpp (the golden reference) on tiny models of every architecture and tensor type."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import require_llama_cpp
from edgellm.runtime.backend import NumpyBackend
from edgellm.runtime.loader import load_model
from tinymodels import TinySpec, write_tiny_gguf

TOKENS = [5, 80, 200, 17, 263, 99, 3, 150, 150, 42, 7, 260, 33, 120, 64, 11]


def llamacpp_logits(path, tokens, n_ctx=64):
    llama_cpp = require_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          flash_attn=False, verbose=False)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def edgellm_logits(path, tokens, act_quant="ggml"):
    m = load_model(path)
    b = NumpyBackend(m.config, m.weights, threads=2, act_quant=act_quant)
    kv = b.new_cache(64)
    # prefill half, then decode the rest one token at a time: exercises the KV cache path too
    h = len(tokens) // 2
    first = b.forward(np.array(tokens[:h]), 0, kv, all_logits=True)
    rest = [b.forward(np.array([t]), h + i, kv)[0] for i, t in enumerate(tokens[h:])]
    return np.vstack([first, np.array(rest)])


def quantize_with_llamacpp(src, dst, ftype_name):
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    assert rc == 0, f"llama.cpp quantize failed ({rc})"
    return dst


def assert_close(ours, ref, tol, min_exact=1.0):
    """Every position within `tol` (relative to the largest logit), or, where llama.cpp's rounding of some
    rows is not reproduced yet, at least `min_exact` of positions within tol and all within 5e-2."""
    err = np.abs(ours - ref).max(-1) / np.abs(ref).max()
    exact = (err < tol).mean()
    assert exact >= min_exact, f"{exact:.0%} of positions within {tol:.0e}; errors {np.round(err, 6)}"
    assert err.max() < (tol if min_exact == 1.0 else 5e-2), f"max relative error {err.max():.2e}"
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


CASES = {
    "llama-F32": TinySpec(),
    "llama-F16": TinySpec(qtype="F16"),
    "llama-BF16": TinySpec(qtype="BF16"),
    "llama-Q8_0": TinySpec(qtype="Q8_0"),
    "llama-Q4_0": TinySpec(qtype="Q4_0"),
    "llama-Q4_1": TinySpec(qtype="Q4_1"),
    "llama-Q5_0": TinySpec(qtype="Q5_0"),
    "llama-Q5_1": TinySpec(qtype="Q5_1"),
    "llama-MQA-tied-ropescale": TinySpec(n_kv_heads=1, tied=True, rope_scale=4.0, rope_base=500000.0),
    "llama-MHA": TinySpec(n_kv_heads=4, qtype="Q8_0"),
    # Mistral GGUFs use general.architecture "llama" (llama.cpp has no "mistral" GGUF arch): GQA 4:1, big rope base
    "mistral-shape-Q4_0": TinySpec(n_heads=8, n_kv_heads=2, qtype="Q4_0", rope_base=1e6),
    "qwen2-F32": TinySpec(arch="qwen2"),
    "qwen2-Q8_0": TinySpec(arch="qwen2", qtype="Q8_0", tied=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_model_logits_match_llamacpp(case, tmp_path):
    path = write_tiny_gguf(tmp_path / f"{case}.gguf", CASES[case])
    ref = llamacpp_logits(path, TOKENS)
    # F16 matmuls differ from llama.cpp's summation order at ~1e-4; everything else agrees to ~1e-6 except
    # Q5_1 (known gap: on some positions llama.cpp's Q5_1 x Q8_1 path rounds differently from this emulation)
    assert_close(edgellm_logits(path, TOKENS), ref, 1e-3 if "F16" in case else 2e-5,
                 min_exact=0.4 if "Q5_1" in case else 1.0)


@pytest.mark.parametrize("ftype", ["LLAMA_FTYPE_MOSTLY_Q4_K_S", "LLAMA_FTYPE_MOSTLY_Q5_K_S", "LLAMA_FTYPE_MOSTLY_Q6_K",
                                   "LLAMA_FTYPE_MOSTLY_Q4_K_M"])
def test_kquant_logits_match_llamacpp(ftype, tmp_path):
    src = write_tiny_gguf(tmp_path / "f32.gguf", TinySpec(dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512))
    dst = quantize_with_llamacpp(src, tmp_path / f"{ftype}.gguf", ftype)
    from edgellm.runtime.gguf_file import open_gguf
    types = {open_gguf(dst).store.info(n).qtype.name for n in open_gguf(dst).store.names()}
    assert types & {"Q4_K", "Q5_K", "Q6_K"}, types
    # Known gap: most positions agree to ~1e-6, but on some decode steps llama.cpp's K-quant path rounds
    # differently from ggml's reference Q8_K (differences ~3e-2, the size of activation-rounding noise).
    assert_close(edgellm_logits(dst, TOKENS), llamacpp_logits(dst, TOKENS), 2e-5, min_exact=0.6)


def test_activation_rounding_is_what_makes_the_match(tmp_path):
    """Without ggml's activation rounding the Q4_0 reference drifts from llama.cpp far more than with it."""
    path = write_tiny_gguf(tmp_path / "q4.gguf", TinySpec(qtype="Q4_0"))
    ref = llamacpp_logits(path, TOKENS)
    exact = np.abs(edgellm_logits(path, TOKENS) - ref).max()
    plain = np.abs(edgellm_logits(path, TOKENS, act_quant="none") - ref).max()
    assert exact * 10 < plain, (exact, plain)
