"""The Relax lowering (one VM call per token) against the numpy reference; rpi5 build run under qemu.

edgellm.compiler.relax_build compiles the whole forward pass into a Relax VM executable; the tvm-relax
backend runs it through the TVM runtime only. Logits must match NumpyBackend(act_quant="none") within 1e-4
relative on tiny models and SmolLM2, greedy tokens must be identical, and the rpi5 executable, run by
arm64 python under qemu-aarch64-static, must produce the host's greedy tokens.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from test_tvm import (EM_AARCH64, REPO, TOL, arm_rootfs, build_tiny, finish_on_arm,  # noqa: F401 (fixture)
                      rel_err, require_tool, require_tvm, start_on_arm)
from tinymodels import check_forward_errors

from edgellm.errors import EdgeLLMError
from edgellm.runtime.backend import NumpyBackend
from edgellm.runtime.loader import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (loaded model, build result of its host executable), compiled once."""
    require_tvm()
    from edgellm.compiler.relax_build import build_relax
    return build_tiny(tmp_path_factory, "relax", build_relax)


def test_build_fuses_and_lowers_every_function(tiny):
    _, r = tiny["qwen2"]
    assert {"decode", "prefill", "prefill_last"} <= set(r.functions)
    # FuseOps + FuseTIR merge the slices of the gate/up GEMV output with SiLU and the multiply (SwiGLU),
    # once per row shape (decode T=1, prefill T symbolic)
    assert len(r.fused) >= 2 and all("silu" in f and "multiply" in f for f in r.fused), r.fused
    assert r.seconds["total"] < 60 and r.path.stat().st_size < 2_000_000      # weights are not in the library


@pytest.mark.parametrize("name,chunk", [("llama", 32), ("qwen2", 3), ("mha_tied", 1)])   # chunk 3: 8 = 3+3+2
def test_tiny_model_logits_match_reference(tiny, name, chunk):
    from edgellm.runtime.relax_backend import RelaxBackend
    m, r = tiny[name]
    numpy_be = NumpyBackend(m.config, m.weights, act_quant="none")
    be = RelaxBackend(m.config, m.weights, r.path, threads=2, chunk=chunk)
    tokens = np.array([5, 100, 7, 42, 3, 9, 200, 11])
    kv_ref, kv = numpy_be.new_cache(32), be.new_cache(32)
    a = numpy_be.forward(tokens, 0, kv_ref, all_logits=True)
    b = be.forward(tokens, 0, kv, all_logits=True)
    assert b.shape == a.shape and rel_err(b, a) < TOL
    last = be.forward(tokens[-3:], len(tokens) - 3, kv)          # rewrite positions 5..7: last logits only
    assert last.shape == (1, m.config.vocab_size) and rel_err(last, a[-1:]) < TOL
    for step, tok in enumerate([17, 250, 3]):                     # decode: one VM call per token
        pos = len(tokens) + step
        a = numpy_be.forward([tok], pos, kv_ref)
        b = be.forward([tok], pos, kv)
        assert b.shape == (1, m.config.vocab_size)
        assert rel_err(b, a) < TOL, f"decode step {step}"
    np.testing.assert_allclose(kv.k[:, :pos + 1], kv_ref.k[:, :pos + 1], rtol=1e-4, atol=1e-5)   # written in place
    np.testing.assert_allclose(kv.v[:, :pos + 1], kv_ref.v[:, :pos + 1], rtol=1e-4, atol=1e-5)


def test_runtime_never_imports_the_tvm_compiler(tiny):
    """The device has only the TVM runtime: the executable must load and run without `import tvm`."""
    m, r = tiny["llama"]
    code = ("import sys\n"
            "from edgellm.runtime.loader import load_model\n"
            "from edgellm.runtime.relax_backend import RelaxBackend\n"
            "from edgellm.runtime.tvm_backend import greedy\n"
            f"m = load_model({str(m.path)!r})\n"
            f"ids = greedy(RelaxBackend(m.config, m.weights, {str(r.path)!r}), [5, 6, 7], 3)\n"
            "assert len(ids) == 3\n"
            "bad = sorted(k for k in sys.modules if k == 'tvm' or k.startswith(('tvm.', 'edgellm.compiler')))\n"
            "assert not bad, bad\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_wrong_model_wrong_library_and_errors(tiny, tmp_path):
    from edgellm.compiler.tvm_build import build_kernels, host_target
    from edgellm.runtime.relax_backend import RelaxBackend
    m, r = tiny["llama"]
    be = RelaxBackend(m.config, m.weights, tiny["qwen2"][1].path)      # same shapes, NeoX RoPE and biases
    with pytest.raises(EdgeLLMError, match="not compiled for this model"):
        be.forward([1, 2], 0, be.new_cache(8))
    kernels = build_kernels(m.config, host_target(), tmp_path / "kernels.so")   # per-op kernels, no VM
    with pytest.raises(EdgeLLMError, match="not a Relax VM executable"):
        RelaxBackend(m.config, m.weights, kernels).prepare()
    with pytest.raises(EdgeLLMError, match="does not exist"):
        RelaxBackend(m.config, m.weights, tmp_path / "nope.so")
    be = RelaxBackend(m.config, m.weights, r.path)
    check_forward_errors(be, NumpyBackend(m.config, m.weights).new_cache(8), m.config.vocab_size)


def test_bundle_runs_with_the_relax_executable(tiny, tmp_path):
    """A bundle (streaming weight layout) holding the executable at RELAX_LIBRARY feeds the backend's weights."""
    from edgellm.compiler.bundle_writer import write_bundle
    from edgellm.devices.targets import host_target
    from edgellm.runtime.relax_backend import RELAX_LIBRARY, RelaxBackend
    from edgellm.runtime.tvm_backend import greedy
    m, r = tiny["mha_tied"]
    bundle = load_model(write_bundle(m, tmp_path / "tiny.bundle", host_target().name, {RELAX_LIBRARY: r.path}))
    assert bundle.format == "bundle"
    be = RelaxBackend(bundle.config, bundle.weights, bundle.path / RELAX_LIBRARY)
    assert greedy(be, [5, 6, 7], 6) == greedy(NumpyBackend(m.config, m.weights, act_quant="none"), [5, 6, 7], 6)


# ---------------------------------------------------------------- SmolLM2 (F32 copy of the shipped Q4_1 weights)

@pytest.fixture(scope="module")
def smollm2(smollm2_f32_path):
    require_tvm()
    return load_model(smollm2_f32_path)


def test_smollm2_logits_and_greedy_tokens_match_reference(smollm2, tmp_path):
    from edgellm.compiler.relax_build import build_relax
    from edgellm.compiler.tvm_build import host_target
    from edgellm.runtime.relax_backend import RelaxBackend
    from edgellm.runtime.tvm_backend import greedy
    m = smollm2
    r = build_relax(m.config, host_target(), tmp_path / "smollm2.so")
    assert r.seconds["total"] < 60, r.seconds
    be = RelaxBackend(m.config, m.weights, r.path, threads=2)
    numpy_be = NumpyBackend(m.config, m.weights, act_quant="none")
    tokens = np.array(m.tokenizer.encode("Once upon a time, there was"))
    kv_ref, kv = numpy_be.new_cache(32), be.new_cache(32)
    a = numpy_be.forward(tokens, 0, kv_ref, all_logits=True)
    b = be.forward(tokens, 0, kv, all_logits=True)
    assert rel_err(b, a) < TOL
    tok = int(a[-1].argmax())
    assert int(b[-1].argmax()) == tok
    assert rel_err(be.forward([tok], len(tokens), kv), numpy_be.forward([tok], len(tokens), kv_ref)) < TOL
    prompt = m.tokenizer.encode("The capital of France is")
    assert greedy(be, prompt, 4) == greedy(numpy_be, prompt, 4)


# ---------------------------------------------------------------- rpi5 executable on emulated ARM

def test_rpi5_executable_on_emulated_arm_matches_host(tiny, arm_rootfs, tmp_path):  # noqa: F811
    """The rpi5 Relax executable (aarch64 ELF), run by arm64 python under qemu with only the TVM runtime
    (the rootfs has no libtvm_compiler), gives the host's greedy tokens, which are the reference's."""
    require_tool("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")
    from edgellm.compiler.relax_build import build_relax
    from edgellm.runtime.relax_backend import RelaxBackend
    from edgellm.runtime.tvm_backend import elf_machine, greedy
    m, r = tiny["qwen2"]                                       # NeoX RoPE and biases
    arm = build_relax(m.config, "rpi5", tmp_path / "qwen2-rpi5.so")
    assert elf_machine(arm.path) == EM_AARCH64
    prompt = "the theory of rings"
    proc = start_on_arm(arm_rootfs, ["-m", "edgellm.runtime.relax_backend", "--model", str(m.path),
                                     "--library", str(arm.path), "--prompt", prompt, "-n", "8"])
    ids = m.tokenizer.encode(prompt)
    host = greedy(RelaxBackend(m.config, m.weights, r.path), ids, 8)
    assert host == greedy(NumpyBackend(m.config, m.weights, act_quant="none"), ids, 8)
    got = json.loads(finish_on_arm(proc)[0].strip().splitlines()[-1])
    assert got["machine"] == "aarch64"
    assert got["ids"] == host
