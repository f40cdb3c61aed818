"""TVM kernels and the tvm backend against the numpy reference; cross-compilation for rpi5, run under qemu.

Kernels are compiled for the host from tiny models the tests write, each checked against the numpy
function it replaces; whole-model logits must match NumpyBackend(act_quant="none"). The rpi5 build must be an
aarch64 ELF, and the edgellm runtime itself, started with an arm64 Debian python under qemu-aarch64-static,
must produce the same greedy tokens as the host.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import IN_CI, require
from tinymodels import TinySpec, write_tiny_gguf

from edgellm.errors import EdgeLLMError
from edgellm.runtime import model as ref
from edgellm.runtime.backend import NumpyBackend
from edgellm.runtime.loader import load_model

REPO = Path(__file__).resolve().parent.parent
RPI5 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"]}
EM_AARCH64 = 183
TOL = 1e-4   # max |tvm - reference| / max |reference| over the logits


def require_tvm():
    require("tvm_ffi", "the tvm backend runs kernels through the TVM runtime")
    return require("tvm", "TVM compiles the kernels")


def require_tool(tool: str, package: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path is None:
        msg = f"{tool} not installed (apt-get install {package})"
        pytest.fail(f"{msg}: required in CI") if IN_CI else pytest.skip(msg)
    return path


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


SPECS = {"llama": TinySpec(),                                              # GQA, normal RoPE, separate lm_head
         "qwen2": TinySpec(arch="qwen2", seed=1),                          # NeoX RoPE, q/k/v biases
         "mha_tied": TinySpec(n_kv_heads=4, tied=True, seed=2, rope_scale=2.0)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (loaded model, host kernel library path) for each tiny spec, compiled once."""
    require_tvm()
    from edgellm.compiler.tvm_build import build_kernels, host_target
    d = tmp_path_factory.mktemp("tvm")
    out = {}
    for name, spec in SPECS.items():
        m = load_model(write_tiny_gguf(d / f"{name}.gguf", spec))
        out[name] = (m, build_kernels(m.config, host_target(), d / f"{name}.so"))
    return out


@pytest.fixture(scope="module")
def kernels(tiny):
    from edgellm.runtime.tvm_backend import load_library
    return {name: load_library(lib) for name, (_, lib) in tiny.items()}


def buf(a):
    from edgellm.runtime.tvm_backend import Buffer
    return Buffer(np.asarray(a, dtype=np.float32))


# ---------------------------------------------------------------- kernels vs numpy

@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_matmul_kernels(tiny, kernels, name):
    from edgellm.runtime.tvm_backend import kernel_names
    cfg = tiny[name][0].config
    rng = np.random.default_rng(0)
    for (n, k), fname in kernel_names(cfg)["matmul"].items():
        x, w, y = buf(rng.standard_normal((1, k))), buf(rng.standard_normal((n, k))), buf(np.zeros((1, n)))
        kernels[name][fname](x.t, w.t, y.t)
        np.testing.assert_allclose(y.np, x.np @ w.np.T, rtol=1e-4, atol=1e-4 * np.sqrt(k), err_msg=fname)


def test_rms_norm_and_swiglu_kernels(tiny, kernels):
    from edgellm.runtime.tvm_backend import kernel_names
    cfg = tiny["llama"][0].config
    names, lib = kernel_names(cfg), kernels["llama"]
    rng = np.random.default_rng(1)
    x, w, y = buf(rng.standard_normal((1, cfg.dim)) * 3), buf(rng.standard_normal(cfg.dim)), buf(np.zeros((1, cfg.dim)))
    lib[names["rms_norm"]](x.t, w.t, y.t)
    np.testing.assert_allclose(y.np, ref.rms_norm(x.np, w.np, cfg.norm_eps), rtol=1e-5, atol=1e-6)
    g, u = buf(rng.standard_normal((1, cfg.ffn_dim)) * 4), buf(rng.standard_normal((1, cfg.ffn_dim)))
    out = buf(np.zeros((1, cfg.ffn_dim)))
    lib[names["swiglu"]](g.t, u.t, out.t)
    np.testing.assert_allclose(out.np, ref.silu(g.np) * u.np, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "qwen2"])      # normal and NeoX pair layouts
def test_rope_kernels(tiny, kernels, name):
    from edgellm.runtime.tvm_backend import kernel_names
    cfg = tiny[name][0].config
    names = kernel_names(cfg)
    cos, sin = ref.rope_tables(cfg, np.arange(32))
    tc, ts = buf(cos), buf(sin)
    rng = np.random.default_rng(2)
    for heads, key in ((cfg.n_heads, "rope_q"), (cfg.n_kv_heads, "rope_k")):
        x = buf(rng.standard_normal((1, heads * cfg.head_dim)))
        y = buf(np.zeros_like(x.np))
        for pos in (0, 7, 31):
            kernels[name][names[key]](x.t, tc.t, ts.t, pos, y.t)
            want = ref.apply_rope(x.np.reshape(1, heads, cfg.head_dim), cos[pos:pos + 1], sin[pos:pos + 1],
                                  cfg.rope_neox, cfg.rope_dim)
            np.testing.assert_allclose(y.np.reshape(want.shape), want, rtol=1e-5, atol=1e-6, err_msg=f"{key} pos={pos}")


@pytest.mark.parametrize("name", ["llama", "mha_tied"])   # GQA and MHA
def test_attention_kernel(tiny, kernels, name):
    from edgellm.runtime.tvm_backend import kernel_names
    cfg = tiny[name][0].config
    rng = np.random.default_rng(3)
    n_ctx, layer, L = 16, cfg.n_layers - 1, 9
    shape = (cfg.n_layers, n_ctx, cfg.n_kv_heads, cfg.head_dim)
    kc, vc = buf(rng.standard_normal(shape)), buf(rng.standard_normal(shape))
    q = buf(rng.standard_normal((1, cfg.n_heads * cfg.head_dim)))
    out = buf(np.zeros_like(q.np))
    kernels[name][kernel_names(cfg)["attention"]](q.t, kc.t, vc.t, layer, L, out.t)
    want = ref.attention(q.np.reshape(1, cfg.n_heads, cfg.head_dim), kc.np[layer, :L], vc.np[layer, :L], L - 1, cfg.n_rep)
    np.testing.assert_allclose(out.np, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- whole model vs the numpy reference

@pytest.mark.parametrize("name", list(SPECS))
def test_tiny_model_logits_match_reference(tiny, name):
    from edgellm.runtime.tvm_backend import TvmBackend
    m, lib = tiny[name]
    numpy_be = NumpyBackend(m.config, m.weights, act_quant="none")
    tvm_be = TvmBackend(m.config, m.weights, lib, threads=2)
    tokens = np.array([5, 100, 7, 42, 3, 9, 200, 11])
    kv_ref, kv_tvm = numpy_be.new_cache(32), tvm_be.new_cache(32)
    a = numpy_be.forward(tokens, 0, kv_ref, all_logits=True)
    b = tvm_be.forward(tokens, 0, kv_tvm, all_logits=True)
    assert b.shape == a.shape
    assert rel_err(b, a) < TOL
    for step, tok in enumerate([17, 250, 3]):                 # decode steps, last-position logits
        pos = len(tokens) + step
        a = numpy_be.forward([tok], pos, kv_ref)
        b = tvm_be.forward([tok], pos, kv_tvm)
        assert b.shape == (1, m.config.vocab_size)
        assert rel_err(b, a) < TOL, f"decode step {step}"
    np.testing.assert_allclose(kv_tvm.k[:, :pos + 1], kv_ref.k[:, :pos + 1], rtol=1e-4, atol=1e-5)


def test_runtime_never_imports_the_tvm_compiler(tiny):
    """The device has only the TVM runtime: the backend must load and run kernels without `import tvm`."""
    m, lib = tiny["llama"]
    code = ("import sys, numpy as np\n"
            "from edgellm.runtime.loader import load_model\n"
            "from edgellm.runtime.tvm_backend import TvmBackend, greedy\n"
            f"m = load_model({str(m.path)!r})\n"
            f"ids = greedy(TvmBackend(m.config, m.weights, {str(lib)!r}), [5, 6, 7], 3)\n"
            "assert len(ids) == 3\n"
            "bad = sorted(k for k in sys.modules if k == 'tvm' or k.startswith(('tvm.', 'edgellm.compiler')))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_library_for_another_model_is_refused(tiny):
    from edgellm.runtime.tvm_backend import TvmBackend
    m, _ = tiny["llama"]
    _, other = tiny["qwen2"]                               # same shapes, NeoX RoPE: must not be mixed up
    be = TvmBackend(m.config, m.weights, other)
    with pytest.raises(EdgeLLMError, match="not compiled for this model"):
        be.forward([1, 2], 0, be.new_cache(8))


def test_missing_library_and_foreign_cache_errors(tiny, tmp_path):
    from edgellm.runtime.tvm_backend import TvmBackend
    m, lib = tiny["llama"]
    with pytest.raises(EdgeLLMError, match="does not exist"):
        TvmBackend(m.config, m.weights, tmp_path / "nope.so")
    be = TvmBackend(m.config, m.weights, lib)
    with pytest.raises(EdgeLLMError, match="new_cache"):
        be.forward([1], 0, NumpyBackend(m.config, m.weights).new_cache(8))
    with pytest.raises(EdgeLLMError, match="context full"):
        be.forward(list(range(9)), 0, be.new_cache(8))


def test_cross_compiler_errors(monkeypatch):
    require_tvm()
    from edgellm.compiler import tvm_build
    with pytest.raises(EdgeLLMError, match="riscv64"):
        tvm_build.cross_compiler({"kind": "llvm", "mtriple": "riscv64-linux-gnu"})
    monkeypatch.setattr(tvm_build.shutil, "which", lambda name: None)
    with pytest.raises(EdgeLLMError, match="apt-get install gcc-aarch64-linux-gnu"):
        tvm_build.cross_compiler(RPI5)


# ---------------------------------------------------------------- SmolLM2

@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    require_tvm()
    return load_model(smollm2_path)


def test_smollm2_logits_match_reference(smollm2, tmp_path):
    from edgellm.compiler.tvm_build import build_kernels_report, host_target
    from edgellm.runtime.tvm_backend import TvmBackend
    m = smollm2
    r = build_kernels_report(m.config, host_target(), tmp_path / "smollm2.so")
    assert r.seconds < 60, f"compiling SmolLM2's kernels took {r.seconds:.1f} s"
    tokens = np.array(m.tokenizer.encode("Once upon a time, there was"))
    numpy_be = NumpyBackend(m.config, m.weights, act_quant="none")
    tvm_be = TvmBackend(m.config, m.weights, r.path, threads=2)
    kv_ref, kv_tvm = numpy_be.new_cache(32), tvm_be.new_cache(32)
    a = numpy_be.forward(tokens, 0, kv_ref, all_logits=True)
    b = tvm_be.forward(tokens, 0, kv_tvm, all_logits=True)
    assert rel_err(b, a) < TOL
    tok = int(a[-1].argmax())
    assert int(b[-1].argmax()) == tok
    a = numpy_be.forward([tok], len(tokens), kv_ref)
    b = tvm_be.forward([tok], len(tokens), kv_tvm)
    assert rel_err(b, a) < TOL


def test_smollm2_rpi5_library_is_aarch64_elf(smollm2, tmp_path):
    require_tool("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")
    from edgellm.compiler.tvm_build import build_kernels
    from edgellm.runtime.tvm_backend import elf_machine, kernel_names
    t0 = time.perf_counter()
    lib = build_kernels(smollm2.config, RPI5, tmp_path / "smollm2-rpi5.so")
    assert time.perf_counter() - t0 < 60
    assert elf_machine(lib) == EM_AARCH64
    data = lib.read_bytes()
    for name in kernel_names(smollm2.config)["matmul"].values():
        assert name.encode() in data                        # every kernel made it into the library
    with pytest.raises(EdgeLLMError, match="built for aarch64"):
        from edgellm.runtime.tvm_backend import load_library
        load_library(lib)


# ---------------------------------------------------------------- the edgellm runtime on emulated ARM

@pytest.fixture(scope="module")
def arm_rootfs():
    """arm64 Debian userland with python3, numpy and the TVM runtime (tools/arm_rootfs.sh, cached)."""
    require_tool("qemu-aarch64-static", "qemu-user-static")
    require_tool("debootstrap", "debootstrap")
    require_tool("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")
    r = subprocess.run(["bash", str(REPO / "tools" / "arm_rootfs.sh")], capture_output=True, text=True, timeout=1200)
    if r.returncode:
        msg = f"tools/arm_rootfs.sh failed: {r.stderr[-1500:]}"
        pytest.fail(msg) if IN_CI else pytest.skip(msg)
    return Path(r.stdout.strip().splitlines()[-1])


def run_on_arm(rootfs: Path, model: Path, library: Path, prompt: str, n: int, timeout: float = 300) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
           "PYTHONPATH": f"{rootfs / 'opt' / 'edgellm-site'}:{REPO}", "PYTHONNOUSERSITE": "1",
           "EDGELLM_CACHE": os.environ.get("EDGELLM_CACHE", "/tmp")}
    cmd = [shutil.which("qemu-aarch64-static") or "/usr/bin/qemu-aarch64-static", "-L", str(rootfs),
           str(rootfs / "usr" / "bin" / "python3.11"), "-m", "edgellm.runtime.tvm_backend",
           "--model", str(model), "--library", str(library), "--prompt", prompt, "-n", str(n)]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_rpi5_kernels_run_edgellm_on_emulated_arm(tiny, arm_rootfs, tmp_path):
    """The host-compiled rpi5 library, run by the edgellm runtime in arm64 python, gives the host's greedy tokens."""
    from edgellm.compiler.tvm_build import build_kernels
    from edgellm.runtime.tvm_backend import TvmBackend, elf_machine, greedy
    m, host_lib = tiny["llama"]
    arm_lib = build_kernels(m.config, RPI5, tmp_path / "tiny-rpi5.so")
    assert elf_machine(arm_lib) == EM_AARCH64
    prompt = "the theory of rings"
    got = run_on_arm(arm_rootfs, m.path, arm_lib, prompt, 8)
    assert got["machine"] == "aarch64"
    host = greedy(TvmBackend(m.config, m.weights, host_lib), m.tokenizer.encode(prompt), 8)
    reference = greedy(NumpyBackend(m.config, m.weights, act_quant="none"), m.tokenizer.encode(prompt), 8)
    assert host == reference
    assert got["ids"] == host


def test_smollm2_rpi5_on_emulated_arm_matches_host(smollm2, arm_rootfs, tmp_path):
    """The issue's proof: SmolLM2 compiled for rpi5, run by edgellm in arm64 python under qemu = host greedy tokens."""
    from edgellm.compiler.tvm_build import build_kernels, host_target
    from edgellm.runtime.tvm_backend import TvmBackend, greedy
    m = smollm2
    arm_lib = build_kernels(m.config, RPI5, tmp_path / "smollm2-rpi5.so")
    prompt = "Once upon a time"
    got = run_on_arm(arm_rootfs, m.path, arm_lib, prompt, 4)
    host_lib = build_kernels(m.config, host_target(), tmp_path / "smollm2-host.so")
    host = greedy(TvmBackend(m.config, m.weights, host_lib, threads=2), m.tokenizer.encode(prompt), 4)
    assert got["machine"] == "aarch64"
    assert got["ids"] == host, (m.tokenizer.decode(got["ids"]), m.tokenizer.decode(host))
