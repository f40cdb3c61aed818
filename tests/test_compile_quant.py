"""`edgellm compile --quant`: integer models in bundles, the int backend, the error report, every bad option."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import edgellm
from edgellm.cli import main
from edgellm.compiler.quantize import QuantConfig, calibration_chunks, format_quant_report, quantize_model
from edgellm.devices import targets as T
from edgellm.errors import EdgeLLMError, ModelFormatError
from edgellm.runtime.bundle import sha256_file
from edgellm.runtime.int_backend import IntBackend, NpzTensors
from edgellm.runtime.intref import LINEARS, QuantizedModel
from edgellm.runtime.loader import load_model
from tinymodels import TinySpec, write_tiny_gguf

WORDS = ("the king and queen of a castle spoke to their men at night while rain fell on the old stone walls "
         "what light is there but the fire in the hall where all the lords sat").split()
CALIB = 512        # calibration tokens (the minimum the quantizer takes is 256)
IDS = [5, 80, 200, 17, 99, 3, 44, 150, 61, 9]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("q") / "tiny.gguf", TinySpec(qtype="Q8_0", n_layers=2, seed=5))


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    rng = np.random.default_rng(1)
    p = tmp_path_factory.mktemp("calib") / "text.txt"
    p.write_text(" ".join(rng.choice(WORDS, 900)), encoding="utf-8")
    return p


def _compile(tiny, calib, out, **kw):
    return edgellm.compile(tiny, "x86-64", out, calibration=calib, calib_tokens=CALIB, log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def bundles(tiny, calib, tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    return {"w8a8": _compile(tiny, calib, d / "w8a8", quant="w8a8", integer_only=True),
            "w4a8": _compile(tiny, calib, d / "w4a8", quant="w4a8", group_size=32, report=True)}


def _direct(tiny, calib, qc: QuantConfig) -> QuantizedModel:
    """The same quantization done by hand: the file read whole, chunks of min(512, context) tokens."""
    m = load_model(tiny)
    chunks = calibration_chunks(m.tokenizer, [calib], CALIB, n_ctx=min(512, m.config.context_length), skip_chars=0)
    return quantize_model(m.config, m.weights, qc, chunks, progress=False)


def _logits(backend, ids=IDS):
    return backend.forward(np.asarray(ids), 0, backend.new_cache(32), all_logits=True)


# --- bundles run on the int backend ----------------------------------------------------------------

@pytest.mark.parametrize("scheme,qc,mode,default", [
    ("w8a8", dict(scheme="w8a8", kv_int8=True), "integer", "tvm-int"),
    ("w4a8", dict(scheme="w4a8", group_size=32), "mixed", "int"),
])
def test_quantized_bundle_runs_the_same_arithmetic_as_the_int_reference(tiny, calib, bundles, scheme, qc, mode,
                                                                         default):
    llm = edgellm.LLM(bundles[scheme].bundle, threads=2)
    assert llm.backend.name == default          # integer-only bundles with kernels run them by default
    ref = edgellm.LLM(bundles[scheme].bundle, backend="int", threads=2)
    assert ref.backend.name == "int" and ref.backend.mode == mode
    direct = IntBackend(_direct(tiny, calib, QuantConfig(calib_tokens=CALIB, **qc)), mode=mode)
    assert np.array_equal(_logits(ref.backend), _logits(direct))      # same integers, same float32 logits
    if mode == "integer":                                               # the compiled kernels: bit-identical
        assert np.array_equal(_logits(llm.backend), _logits(direct))
        assert isinstance(llm.backend.qmodel.tensors, NpzTensors)       # read from the file as packed, no copy
    # --backend numpy still runs the bundle's float weights, as the source model does
    float_llm = edgellm.LLM(bundles[scheme].bundle, backend="numpy", threads=2)
    assert float_llm.backend.name == "numpy"
    assert np.array_equal(_logits(float_llm.backend), _logits(edgellm.LLM(tiny, threads=2).backend))


def test_onnxruntime_runs_the_quantized_graph_like_the_mixed_reference(bundles):
    """The bundle's ONNX graph (MatMulInteger on int8 x int8) against the int backend in mixed mode."""
    llm = edgellm.LLM(bundles["w4a8"].bundle, backend="onnxruntime", threads=2)
    ref = edgellm.LLM(bundles["w4a8"].bundle, threads=2).backend
    assert ref.mode == "mixed"
    got, want = _logits(llm.backend), _logits(ref)
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()    # float32 op order can flip an int8 rounding
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


def test_block_activations_with_q4_1_groups_from_the_cli(tiny, calib, tmp_path, capsys):
    """--asym --zero fp16 --act block: llama.cpp's Q4_1 weight groups (5.0 bits per weight) times int8
    activations with one scale per 32 channels (as llama.cpp's Q8_0 activations). The bundle's integer kernels
    are bit-identical to the int reference and its ONNX graph matches the mixed reference."""
    out = tmp_path / "blk"
    assert main(["compile", str(tiny), "-o", str(out), "--quant", "w4a8", "--group-size", "32", "--asym",
                 "--zero", "fp16", "--act", "block", "--integer-only", "--calibration", str(calib),
                 "--calib-tokens", str(CALIB)]) == 0
    q = json.loads((out / "manifest.json").read_text())["quant"]
    assert q["act"] == "block" and q["label"] == "w4a8-g32-fmin" and q["bits_per_weight"] == pytest.approx(5.0, abs=0.01)
    qm = QuantizedModel.load(out / "quant" / "model.npz")
    assert qm.qconfig.act_block == 32 and qm.qconfig.zero == "fp16" and not qm.qconfig.symmetric
    llm = edgellm.LLM(out, threads=2)
    assert llm.backend.name == "tvm-int"
    assert np.array_equal(_logits(llm.backend), _logits(IntBackend(qm, mode="integer")))
    got, want = _logits(edgellm.LLM(out, backend="onnxruntime", threads=2).backend), _logits(IntBackend(qm, mode="mixed"))
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "block int8 activations" in capsys.readouterr().out


def test_manifest_lists_and_describes_the_quantized_model(bundles):
    b = bundles["w4a8"].bundle
    man = json.loads((b / "manifest.json").read_text())
    q = man["quant"]
    qm = QuantizedModel.load(b / "quant" / "model.npz")
    assert q["file"] == "quant/model.npz" and q["scheme"] == "w4a8" and q["label"] == "w4a8-g32"
    assert q["integer_only"] is False and q["kv_int8"] is False and q["group_size"] == 32
    assert q["bits_per_weight"] == pytest.approx(qm.block_bits_per_weight(), abs=1e-4)
    assert q["model_bytes"] == qm.nbytes() and q["calib_tokens"] == CALIB
    files = {f["path"]: f for f in man["files"]}
    assert files["quant/model.npz"]["sha256"] == sha256_file(b / "quant" / "model.npz")
    assert "weights.bin" in files and "onnx/decode.onnx" in files and "kernels/int.so" in files
    assert set(bundles["w4a8"].stage_seconds) == {"import", "quantize", "onnx-quant", "tvm-int", "bundle"}
    w8 = json.loads((bundles["w8a8"].bundle / "manifest.json").read_text())["quant"]
    assert w8["integer_only"] is True and w8["kv_int8"] is True and w8["group_size"] is None


def test_cli_generates_greedy_from_the_bundle(bundles, capsys):
    b = bundles["w8a8"].bundle
    want = edgellm.LLM(b, threads=2).generate("the king", max_tokens=8, temperature=0, ignore_eos=True).text
    assert main(["run", "--model", str(b), "-n", "8", "--temperature", "0", "--ignore-eos", "--stats",
                 "the king"]) == 0
    out = capsys.readouterr()
    assert out.out.rstrip("\n") == want
    assert "backend tvm-int" in out.err and "8 generated" in out.err


def test_inspect_shows_the_quant_section(bundles, tiny, capsys):
    assert main(["inspect", str(bundles["w8a8"].bundle)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("quantization:"))
    assert "w8a8, integer-only, int8 KV" in line and "bits/weight" in line and "quant/model.npz" in line
    plain = edgellm.compile(tiny, "x86-64", bundles["w8a8"].bundle.parent / "plain", backends=(), log=lambda m: None)
    assert main(["inspect", str(plain.bundle)]) == 0
    assert "quantization:    gguf-native" in capsys.readouterr().out
    with pytest.raises(EdgeLLMError, match="edgellm compile .*--quant"):
        edgellm.LLM(plain.bundle, backend="int")
    with pytest.raises(EdgeLLMError, match="edgellm compile .*--quant"):
        edgellm.LLM(tiny, backend="int")
    assert edgellm.LLM(plain.bundle).backend.name == "numpy"


def test_corrupt_quantized_model_is_refused(bundles, tmp_path, capsys):
    b = tmp_path / "b"
    shutil.copytree(bundles["w8a8"].bundle, b)
    f = b / "quant" / "model.npz"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="quant/model.npz fails its sha256"):
        edgellm.LLM(b)
    assert main(["run", "--model", str(b), "-n", "2", "the"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sha256" in err


def test_loading_a_quantized_bundle_imports_no_compiler(bundles):
    code = ("import sys, edgellm\n"
            f"llm = edgellm.LLM({str(bundles['w8a8'].bundle)!r})\n"
            "llm.logits([1, 2, 3])\n"
            "print(llm.backend.name, ' '.join(m for m in sys.modules if m.startswith('edgellm.compiler')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["tvm-int"]


# --- the report --------------------------------------------------------------------------------------

def test_report_has_a_row_per_linear_and_the_worst_layers(bundles):
    lines = bundles["w4a8"].report
    rows = [ln for ln in lines if ln.startswith("  blk.")]
    assert [r.split()[0] for r in rows] == [f"blk.{i}.{n}" for i in range(2) for n in LINEARS]
    assert lines[0].startswith("quantization w4a8-g32, mixed:") and "14 linears" in lines[0]
    assert any(ln.startswith("worst 5: ") for ln in lines)
    assert any(ln.startswith("bits per weight ") for ln in lines)


def test_format_quant_report_orders_the_worst_layers():
    layers = [{"name": f"blk.0.{n}", "scales": "none", "rel_err": e, "clip": 1.0, "act_max": 2.0, "bits": b}
              for n, e, b in zip(LINEARS, [0.01, 0.05, 0.02, 0.07, 0.03, 0.04, 0.06], [4, 4, 4, 8, 4, 4, 4])]
    lines = format_quant_report({"scheme": "w8a8", "layers": layers, "calib_tokens": 512}, 8.0625, 3 * 2**20)
    assert lines[0] == "quantization w8a8: 7 linears, calibrated on 512 tokens"
    table = lines[2:9]
    assert [float(r.split()[-1]) for r in table] == [r["rel_err"] for r in layers]
    assert [int(r.split()[1]) for r in table] == [r["bits"] for r in layers]     # a promoted int8 linear shows 8
    assert lines[9] == ("worst 5: blk.0.attn_output 0.07000, blk.0.ffn_down 0.06000, blk.0.attn_k 0.05000, "
                        "blk.0.ffn_up 0.04000, blk.0.ffn_gate 0.03000")
    assert lines[10].startswith("bits per weight 8.062") and "3.00 MiB" in lines[10]


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,phrases,early", [
    (["--quant", "w3a3"], ["unknown quantization scheme", "gguf-native, w8a8, w4a8, w4a16, w8a16"], True),
    (["--quant", "w4a4", "CAL"], ["int4 activations", "w8a8, w4a8, w8a16, w4a16"], True),
    (["--quant", "w8a8", "--group-size", "32", "CAL"], ["drop --group-size", "32, 64 or 128"], True),
    (["--quant", "w4a8", "--group-size", "48", "CAL"], ["group size 48", "32, 64, 128"], True),
    (["--quant", "w4a16", "--integer-only", "CAL"], ["--integer-only needs int8 activations", "w8a8 or w4a8"], True),
    (["--quant", "w8a8"], ["needs calibration text", "--calibration file_or_dir"], True),
    (["--quant", "w8a8", "SMALL"], ["fewer than", "--calib-tokens"], False),
    (["--quant", "w8a8", "--calibration", "no-such.txt"], ["no-such.txt does not exist"], True),
    (["--quant", "w8a8", "--integer-only", "--target", "jetson-orin", "CAL"],
     ["jetson-orin cannot run --integer-only", "float32", "x86-64, rpi4, rpi5"], True),
    (["--quant", "w8a16", "--backends", "tvm", "CAL"], ["tvm integer kernels need int8 activations"], True),
    (["--quant", "w4a8", "--backends", "onnxruntime,tvm-relax", "CAL"], ["tvm-relax are not built for quantized"],
     True),
    (["--integer-only"], ["only to integer quantization", "w8a8 or w4a8"], True),
    (["--act", "block"], ["--act block applies only to integer quantization"], True),
    (["--quant", "w4a8", "--zero", "fp16", "CAL"], ["--zero fp16 sets the zero point", "add --asym"], True),
    (["--quant", "w8a16", "--act", "block", "CAL"], ["keeps float activations", "drop --act"], True),
    (["--quant", "w8a8", "--backends", "cuda", "CAL"], ["unknown backend", "onnxruntime, tvm, tvm-relax"], True),
])
def test_bad_quant_options_exit_2_and_leave_nothing(tiny, calib, tmp_path, capsys, argv, phrases, early):
    small = tmp_path / "small.txt"
    small.write_text("only a few words of text", encoding="utf-8")
    sub = {"CAL": ["--calibration", str(calib)], "SMALL": ["--calibration", str(small)]}
    args = [a for x in argv for a in sub.get(x, [x])]
    out = tmp_path / "x"
    assert main(["compile", str(tiny), "-o", str(out), "--calib-tokens", str(CALIB), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgellm: error: ") and all("Traceback" not in ln for ln in err)
    for p in phrases:
        assert p in err[-1].lower() or p in err[-1], (p, err[-1])
    if early:                                      # refused before the model was even imported
        assert len(err) == 1, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["small.txt"]      # no scratch directory left behind


def test_group_size_must_divide_the_model_widths(tmp_path, calib, capsys):
    m96 = write_tiny_gguf(tmp_path / "t96.gguf", TinySpec(dim=96, n_heads=4, n_kv_heads=2, ffn_dim=192))
    assert main(["compile", str(m96), "-o", str(tmp_path / "x"), "--quant", "w4a8", "--group-size", "64",
                 "--calibration", str(calib), "--calib-tokens", str(CALIB)]) == 2
    assert "choose --group-size from 32" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_target_quant_capabilities():
    for name, t in T.TARGETS.items():
        assert set(t.quant_schemes) == set(T.QUANT_SCHEMES), name      # the integer reference runs on any CPU
        assert t.integer_only == (name != "jetson-orin")
    T.check_quant("rpi5", "w4a8", integer_only=True)
    T.check_quant("jetson-orin", "w4a8")                                 # mixed mode on its CPU
    fp_only = T.Target("fp", "x86_64-linux-gnu", "x86_64", "x86-64", [], None, [], "float only", {},
                       quant_schemes=["gguf-native"])
    with pytest.raises(EdgeLLMError, match="cannot run --quant w8a8.*choose --quant from: gguf-native$"):
        T.check_quant(fp_only, "w8a8")
