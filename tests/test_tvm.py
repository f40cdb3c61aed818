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
# (the same as edgellm.devices.targets.TARGETS["rpi5"].tvm_target; tests also build by the name "rpi5")
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


def build_tiny(tmp_path_factory, kind: str, build) -> dict:
    """name -> (loaded model, build(config, host target, library path)) for each tiny spec."""
    require_tvm()
    from edgellm.compiler.tvm_build import host_target
    d = tmp_path_factory.mktemp(kind)
    out = {}
    for name, spec in SPECS.items():
        m = load_model(write_tiny_gguf(d / f"{name}.gguf", spec))
        out[name] = (m, build(m.config, host_target(), d / f"{name}.so"))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (loaded model, host kernel library path) for each tiny spec, compiled once."""
    require_tvm()
    from edgellm.compiler.tvm_build import build_kernels
    return build_tiny(tmp_path_factory, "tvm", build_kernels)


@pytest.fixture(scope="module")
def kernels(tiny):
    from edgellm.runtime.tvm_backend import load_library
    return {name: load_library(lib) for name, (_, lib) in tiny.items()}


def buf(a):
    from edgellm.runtime.tvm_backend import Buffer
    return Buffer(np.asarray(a, dtype=np.float32))


# ---------------------------------------------------------------- kernels vs numpy
# every op exists as a decode kernel (one row) and a prefill kernel (T rows); both are checked

MODES = [("decode", 1), ("prefill", 5)]


@pytest.mark.parametrize("mode,T", MODES)
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_matmul_kernels(tiny, kernels, name, mode, T):
    from edgellm.runtime.tvm_backend import kernel_names
    cfg = tiny[name][0].config
    rng = np.random.default_rng(0)
    for (n, k), fname in kernel_names(cfg)[mode]["matmul"].items():
        x, w, y = buf(rng.standard_normal((T, k))), buf(rng.standard_normal((n, k))), buf(np.zeros((T, n)))
        kernels[name][fname](x.t, w.t, y.t)
        np.testing.assert_allclose(y.np, x.np @ w.np.T, rtol=1e-4, atol=1e-4 * np.sqrt(k), err_msg=fname)


@pytest.mark.parametrize("mode,T", MODES)
def test_rms_norm_and_swiglu_kernels(tiny, kernels, mode, T):
    from edgellm.runtime.tvm_backend import kernel_names
    cfg = tiny["llama"][0].config
    names, lib = kernel_names(cfg)[mode], kernels["llama"]
    rng = np.random.default_rng(1)
    x, w, y = buf(rng.standard_normal((T, cfg.dim)) * 3), buf(rng.standard_normal(cfg.dim)), buf(np.zeros((T, cfg.dim)))
    lib[names["rms_norm"]](x.t, w.t, y.t)
    np.testing.assert_allclose(y.np, ref.rms_norm(x.np, w.np, cfg.norm_eps), rtol=1e-5, atol=1e-6)
    g, u = buf(rng.standard_normal((T, cfg.ffn_dim)) * 4), buf(rng.standard_normal((T, cfg.ffn_dim)))
    out = buf(np.zeros((T, cfg.ffn_dim)))
    lib[names["swiglu"]](g.t, u.t, out.t)
    np.testing.assert_allclose(out.np, ref.silu(g.np) * u.np, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,T", MODES)
@pytest.mark.parametrize("name", ["llama", "qwen2"])      # normal and NeoX pair layouts
def test_rope_kernels(tiny, kernels, name, mode, T):
    from edgellm.runtime.tvm_backend import kernel_names
    cfg = tiny[name][0].config
    names = kernel_names(cfg)[mode]
    cos, sin = ref.rope_tables(cfg, np.arange(40))
    tc, ts = buf(cos), buf(sin)
    rng = np.random.default_rng(2)
    for heads, key in ((cfg.n_heads, "rope_q"), (cfg.n_kv_heads, "rope_k")):
        x = buf(rng.standard_normal((T, heads * cfg.head_dim)))
        y = buf(np.zeros_like(x.np))
        for pos in (0, 7, 40 - T):
            kernels[name][names[key]](x.t, tc.t, ts.t, pos, y.t)
            want = ref.apply_rope(x.np.reshape(T, heads, cfg.head_dim), cos[pos:pos + T], sin[pos:pos + T],
                                  cfg.rope_neox, cfg.rope_dim)
            np.testing.assert_allclose(y.np.reshape(want.shape), want, rtol=1e-5, atol=1e-6, err_msg=f"{key} pos={pos}")


@pytest.mark.parametrize("mode,T", MODES)
@pytest.mark.parametrize("name", ["llama", "mha_tied"])   # GQA and MHA
def test_attention_kernel(tiny, kernels, name, mode, T):
    """Causal attention of T new rows at positions pos..pos+T-1 over the cache (future positions hold junk)."""
    from edgellm.runtime.tvm_backend import kernel_names
    cfg = tiny[name][0].config
    rng = np.random.default_rng(3)
    n_ctx, layer, pos = 16, cfg.n_layers - 1, 8
    shape = (cfg.n_layers, n_ctx, cfg.n_kv_heads, cfg.head_dim)
    kc, vc = buf(rng.standard_normal(shape)), buf(rng.standard_normal(shape))
    q = buf(rng.standard_normal((T, cfg.n_heads * cfg.head_dim)))
    out = buf(np.zeros_like(q.np))
    kernels[name][kernel_names(cfg)[mode]["attention"]](q.t, kc.t, vc.t, layer, pos, out.t)
    S = pos + T
    want = ref.attention(q.np.reshape(T, cfg.n_heads, cfg.head_dim), kc.np[layer, :S], vc.np[layer, :S], pos, cfg.n_rep)
    np.testing.assert_allclose(out.np, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- whole model vs the numpy reference

@pytest.mark.parametrize("name,chunk", [("llama", 32), ("qwen2", 3), ("mha_tied", 1)])   # chunk 3: 8 = 3+3+2
def test_tiny_model_logits_match_reference(tiny, name, chunk):
    from edgellm.runtime.tvm_backend import TvmBackend
    m, lib = tiny[name]
    numpy_be = NumpyBackend(m.config, m.weights, act_quant="none")
    tvm_be = TvmBackend(m.config, m.weights, lib, threads=2, chunk=chunk)
    tokens = np.array([5, 100, 7, 42, 3, 9, 200, 11])
    kv_ref, kv_tvm = numpy_be.new_cache(32), tvm_be.new_cache(32)
    a = numpy_be.forward(tokens, 0, kv_ref, all_logits=True)
    b = tvm_be.forward(tokens, 0, kv_tvm, all_logits=True)
    assert b.shape == a.shape
    assert rel_err(b, a) < TOL
    last = tvm_be.forward(tokens[-3:], len(tokens) - 3, kv_tvm)      # rewrite positions 5..7: last logits only
    assert last.shape == (1, m.config.vocab_size) and rel_err(last, a[-1:]) < TOL
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


def test_cross_compiler_errors(monkeypatch, tmp_path):
    require_tvm()
    from edgellm.compiler import tvm_build
    from edgellm.devices import targets
    with pytest.raises(EdgeLLMError, match="riscv64"):
        tvm_build.cross_compiler({"kind": "llvm", "mtriple": "riscv64-linux-gnu"})
    assert tvm_build.cross_compiler(tvm_build.host_target()) is None
    monkeypatch.setattr(targets.shutil, "which", lambda name: None)
    with pytest.raises(EdgeLLMError, match="apt-get install gcc-aarch64-linux-gnu"):
        tvm_build.cross_compiler(RPI5)
    cfg = load_model(write_tiny_gguf(tmp_path / "m.gguf")).config
    with pytest.raises(EdgeLLMError, match="apt-get install gcc-aarch64-linux-gnu"):
        tvm_build.build_kernels(cfg, "rpi5", tmp_path / "m.so")      # refused before any compile work
    assert not (tmp_path / "m.so").exists()


# ---------------------------------------------------------------- SmolLM2
# The F32 copy of the shipped Q4_1 model (conftest's smollm2_f32_path: the same weights, dequantized once)
# spares every backend, and the emulated ARM CPU most of all, the dequantizing.

@pytest.fixture(scope="module")
def smollm2(smollm2_f32_path):
    require_tvm()
    return load_model(smollm2_f32_path)


@pytest.fixture(scope="module")
def smollm2_tvm(smollm2, tmp_path_factory):
    """(host kernel library build result, prepared TvmBackend) for SmolLM2, shared by the tests below."""
    from edgellm.compiler.tvm_build import build_kernels_report, host_target
    from edgellm.runtime.tvm_backend import TvmBackend
    r = build_kernels_report(smollm2.config, host_target(), tmp_path_factory.mktemp("smollm2") / "host.so")
    be = TvmBackend(smollm2.config, smollm2.weights, r.path, threads=2)
    be.prepare()
    return r, be


def test_smollm2_logits_match_reference(smollm2, smollm2_tvm):
    m = smollm2
    r, tvm_be = smollm2_tvm
    tokens = np.array(m.tokenizer.encode("Once upon a time, there was"))
    numpy_be = NumpyBackend(m.config, m.weights, act_quant="none")
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
    from edgellm.runtime.tvm_backend import elf_machine, kernel_names, load_library
    lib = build_kernels(smollm2.config, RPI5, tmp_path / "smollm2-rpi5.so")
    assert elf_machine(lib) == EM_AARCH64
    data = lib.read_bytes()
    names = kernel_names(smollm2.config)
    for mode in ("decode", "prefill"):
        for name in names[mode]["matmul"].values():
            assert name.encode() in data                    # every kernel made it into the library
    with pytest.raises(EdgeLLMError, match="built for aarch64"):
        load_library(lib)


def test_jetson_cuda_kernels_are_emitted_as_source(tiny, tmp_path):
    """jetson-orin: every kernel as CUDA (dlight GPU schedules) in an aarch64 library, plus the .cu source,
    which nvcc (when present) compiles for sm_87. No GPU here: nothing is launched."""
    require_tool("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")
    import re

    from edgellm.compiler.tvm_build import build_cuda_kernels
    from edgellm.runtime.tvm_backend import elf_machine, kernel_names
    m, _ = tiny["llama"]
    r = build_cuda_kernels(m.config, tmp_path / "cuda" / "model.so", arch="sm_87", host="jetson-orin")
    assert elf_machine(r.path) == EM_AARCH64
    src = r.path.with_suffix(".cu").read_text()
    kernels = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)_kernel\w*\(", src))
    names = kernel_names(m.config)
    for mode in ("decode", "prefill"):
        for key, value in names[mode].items():
            for fname in (value.values() if isinstance(value, dict) else [value]):
                assert fname in kernels, f"no CUDA kernel for {fname}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        ptx = tmp_path / "model.ptx"
        c = subprocess.run([nvcc, "-arch=sm_87", "-ptx", str(r.path.with_suffix(".cu")), "-o", str(ptx)],
                           capture_output=True, text=True, timeout=300)
        assert c.returncode == 0, c.stderr[-2000:]
        assert ".target sm_87" in ptx.read_text()


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


def start_on_arm(rootfs: Path, python_args: list[str]) -> subprocess.Popen:
    """Start the arm64 userland's python3 under qemu-user with this checkout on its path (returns at once)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
           "PYTHONPATH": f"{rootfs / 'opt' / 'edgellm-site'}:{REPO}", "PYTHONNOUSERSITE": "1",
           "EDGELLM_CACHE": os.environ.get("EDGELLM_CACHE", "/tmp")}
    cmd = [shutil.which("qemu-aarch64-static") or "/usr/bin/qemu-aarch64-static", "-L", str(rootfs),
           str(rootfs / "usr" / "bin" / "python3.11"), *python_args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def runner_args(model: Path, library: Path, prompt: str, n: int) -> list[str]:
    """`python -m edgellm.runtime.tvm_backend`: greedy ids of the kernels as JSON."""
    return ["-m", "edgellm.runtime.tvm_backend", "--model", str(model), "--library", str(library),
            "--prompt", prompt, "-n", str(n)]


def finish_on_arm(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-3000:]
    return out, err


def test_rpi5_bundle_runs_in_edgellm_cli_on_emulated_arm(tiny, arm_rootfs, tmp_path):
    """`edgellm compile --target rpi5` bundle, run by `edgellm run --backend tvm` in arm64 python under qemu,
    prints the same greedy text as the host's own bundle run on the host."""
    from edgellm.compiler.pipeline import compile_model
    from edgellm.devices.targets import host_target
    from edgellm.runtime.tvm_backend import elf_machine
    m, _ = tiny["qwen2"]                                   # NeoX RoPE and biases (SmolLM2 below covers llama)
    quiet = lambda *a, **k: None  # noqa: E731
    arm_bundle = compile_model(m.path, "rpi5", tmp_path / "tiny.rpi5.bundle", backends=("tvm",), log=quiet).bundle
    host_bundle = compile_model(m.path, host_target().name, tmp_path / "tiny.host.bundle", backends=("tvm",),
                                log=quiet).bundle
    assert elf_machine(arm_bundle / "kernels" / "model.so") == EM_AARCH64
    args = ["-m", "edgellm", "run", "--backend", "tvm", "--temperature", "0", "-n", "8", "the theory of rings"]
    arm = start_on_arm(arm_rootfs, [*args[:3], "--model", str(arm_bundle), *args[3:]])
    host = subprocess.run([sys.executable, *args[:3], "--model", str(host_bundle), *args[3:]], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert host.returncode == 0, host.stderr[-2000:]
    out, err = finish_on_arm(arm)
    assert out == host.stdout and len(out.strip()) > 0, (out, host.stdout)


def test_smollm2_rpi5_on_emulated_arm_matches_host(smollm2, smollm2_tvm, arm_rootfs, tmp_path):
    """The issue's proof: SmolLM2 compiled for rpi5, run by edgellm in arm64 python under qemu = host greedy tokens."""
    from edgellm.compiler.tvm_build import build_kernels
    from edgellm.runtime.tvm_backend import greedy
    m = smollm2
    arm_lib = build_kernels(m.config, "rpi5", tmp_path / "smollm2-rpi5.so")
    prompt = "Once upon a time"
    arm = start_on_arm(arm_rootfs, runner_args(m.path, arm_lib, prompt, 4))   # ~20 s emulated; the host works meanwhile
    host = greedy(smollm2_tvm[1], m.tokenizer.encode(prompt), 4)
    got = json.loads(finish_on_arm(arm)[0].strip().splitlines()[-1])
    assert got["machine"] == "aarch64"
    assert got["ids"] == host, (m.tokenizer.decode(got["ids"]), m.tokenizer.decode(host))
