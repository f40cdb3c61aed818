"""The edgellm-vs-llama.cpp benchmark on a tiny model: structure, per-engine processes, medians, ratios, JSON,
same-bits pairing through llama.cpp's quantizer, issue #5's targets, the context sweep and its PNG, the profile.

No speed is asserted anywhere: speed depends on the machine and its load.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import sys

import numpy as np
import pytest

import edgellm.bench as bench
from conftest import require, require_llama_cpp
from edgellm.errors import EdgeLLMError
from edgellm.hub import sha256_file
from edgellm.runtime.gguf_file import open_gguf
from edgellm.runtime.loader import load_model
from tinymodels import TinySpec, write_tiny_gguf

PROMPT, GEN = 8, 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # F32 so the numpy reference matches llama.cpp to ~1e-5 and greedy decoding agrees token for token
    return write_tiny_gguf(tmp_path_factory.mktemp("bench") / "tiny.gguf", TinySpec())


@pytest.fixture(scope="module")
def both(tiny, tmp_path_factory):
    """One real run of both engines, recording every os.replace the JSON writer makes."""
    require_llama_cpp()
    out = tmp_path_factory.mktemp("json") / "out.json"
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((str(src), str(dst), os.path.exists(src), os.path.exists(dst)))
        return real_replace(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench.os, "replace", spy)
        result = bench.run_bench(str(tiny), prompt_tokens=PROMPT, gen_tokens=GEN, threads=2, reps=1, out_json=out)
    return result, out, renames


def test_structure_and_positive_numbers(both, tiny):
    r, _, _ = both
    assert set(r) == {"config", "machine", "bits_per_weight", "runs", "median", "ratios", "targets"}
    c = r["config"]
    assert (c["prompt_tokens"], c["gen_tokens"], c["threads"], c["reps"]) == (PROMPT, GEN, 2, 1)
    assert c["engines"] == ["edgellm", "llama.cpp"]
    assert c["model_sha256"] == sha256_file(tiny)[:16]
    m = r["machine"]
    for key in ("cpu", "logical_cores", "date", "edgellm_version", "llama_cpp_version"):
        assert m[key], key
    assert m["other_load_cores"] >= 0
    for engine in ("edgellm", "llama.cpp"):
        (run,) = r["runs"][engine]
        for metric in bench.METRICS:
            assert run[metric] > 0 and math.isfinite(run[metric]), (engine, metric, run[metric])
            assert r["median"][engine][metric] == run[metric]
        assert run["peak_rss_mb"] >= run["rss_before_load_mb"]
        assert len(run["generated"]) == GEN
        # the first token comes after the engine's import and load, and before the warm-up's decode step
        assert run["load_s"] + run["import_s"] < run["load_to_first_token_s"] < run["load_s"] + run["import_s"] + run["warmup_s"]


def test_each_engine_runs_in_its_own_small_process(both):
    """Peak RSS is the child's own (VmHWM), not inherited from the parent that loaded the tokenizer."""
    r, _, _ = both
    for engine in ("edgellm", "llama.cpp"):
        run = r["runs"][engine][0]
        assert run["rss_before_load_mb"] < 40, run   # a bare interpreter, no engine imported yet


def test_both_engines_got_the_same_prompt(both):
    """Same ids in, same greedy tokens out (the F32 tiny model matches llama.cpp to ~1e-5)."""
    r, _, _ = both
    assert r["runs"]["edgellm"][0]["generated"] == r["runs"]["llama.cpp"][0]["generated"]


def test_ratios_are_ratios_of_medians(both):
    r, _, _ = both
    ratio, a, b = r["ratios"]["edgellm/llama.cpp"], r["median"]["edgellm"], r["median"]["llama.cpp"]
    for metric in bench.METRICS:
        assert ratio[metric] == pytest.approx(a[metric] / b[metric])


def test_summarize_takes_medians_not_means():
    def run(x):
        return {m: x for m in bench.METRICS}
    medians, ratios = bench.summarize({"edgellm": [run(1.0), run(2.0), run(30.0)],
                                       "llama.cpp": [run(8.0), run(4.0), run(5.0)]})
    assert medians["edgellm"]["decode_tps"] == 2.0 and medians["llama.cpp"]["decode_tps"] == 5.0
    assert ratios["edgellm/llama.cpp"]["decode_tps"] == pytest.approx(0.4)
    assert bench.summarize({"edgellm": [run(1.0)]})[1] == {}


def test_json_written_atomically_and_matches(both):
    r, out, renames = both
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    (src, dst, src_existed, dst_existed), = renames
    assert dst == str(out) and os.path.dirname(src) == os.path.dirname(dst) and src != dst
    assert src_existed and not dst_existed and not os.path.exists(src)
    assert sorted(os.listdir(out.parent)) == ["out.json"]


def test_failed_json_write_keeps_the_old_file(tmp_path):
    out = tmp_path / "out.json"
    bench.write_json_atomic(out, {"old": 1})
    with pytest.raises(TypeError):
        bench.write_json_atomic(out, {"bad": object()})
    assert json.loads(out.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["out.json"]


@pytest.mark.parametrize("n", [1, 5, 300])
def test_prompt_has_exactly_n_tokens(tiny, n):
    tok = load_model(tiny).tokenizer
    ids = bench.prompt_ids(tok, n)
    assert len(ids) == n
    first = tok.encode(bench.PROMPT_TEXT)
    assert ids[: len(first)] == first[:n]


def test_edgellm_alone_through_main(tiny, tmp_path, capsys):
    out = tmp_path / "e.json"
    rc = bench.main(["--model", str(tiny), "--prompt-tokens", "4", "--gen-tokens", "3", "--reps", "2",
                     "--engines", "edgellm", "--json", str(out), "-q"])
    text = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"^edgellm +\|", text, re.M) and "llama.cpp |" not in text and "x\n" not in text
    data = json.loads(out.read_text())
    assert len(data["runs"]["edgellm"]) == 2 and data["ratios"] == {}


def test_child_failure_is_reported(tiny):
    """A user error inside the child comes back as the engine's own one-line message, not a traceback."""
    with pytest.raises(EdgeLLMError, match=r"^edgellm could not run: .*no-such-backend") as e:
        bench.run_bench(str(tiny), prompt_tokens=4, gen_tokens=2, reps=1, engines=("edgellm",),
                        backend="no-such-backend")
    assert "Traceback" not in str(e.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"engines": ("edgellm", "vllm")}, "known engines"),
    ({"engines": ()}, "known engines"),
    ({"reps": 0}, "reps=0"),
    ({"gen_tokens": -1}, "gen_tokens=-1"),
    ({"prompt_tokens": 250, "gen_tokens": 100}, "context length"),
])
def test_bad_arguments_fail_before_running(tiny, kwargs, match):
    with pytest.raises(EdgeLLMError, match=match):
        bench.run_bench(str(tiny), **{"prompt_tokens": 4, "gen_tokens": 2, "reps": 1, **kwargs})


def test_main_reports_errors_with_exit_2(tiny, capsys):
    assert bench.main(["--model", str(tiny), "--engines", "nope", "-q"]) == 2
    assert "error:" in capsys.readouterr().err


def test_several_backends_on_a_bundle_each_get_a_ratio(tmp_path):
    require_llama_cpp()
    require("onnxruntime", "the onnxruntime backend")
    import edgellm
    from edgellm.bench import run_bench
    from tinymodels import TinySpec, write_tiny_gguf
    gguf = write_tiny_gguf(tmp_path / "t.gguf", TinySpec())
    bundle = edgellm.compile(gguf, "x86-64", tmp_path / "b", backends=("onnxruntime",), log=lambda m: None).bundle
    r = run_bench(str(gguf), prompt_tokens=8, gen_tokens=4, reps=1, backend="numpy,onnxruntime", bundle=str(bundle))
    assert set(r["runs"]) == {"edgellm:numpy", "edgellm:onnxruntime", "llama.cpp"}
    assert set(r["ratios"]) == {"edgellm:numpy/llama.cpp", "edgellm:onnxruntime/llama.cpp"}
    assert all(m["decode_tps"] > 0 for m in r["median"].values())


# --- same bits per weight, targets, context sweep, profile ------------------------------------------
SWEEP = [8, 32]


@pytest.fixture(scope="module")
def q41(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("q41") / "tiny.gguf", TinySpec(qtype="Q4_1"))


@pytest.fixture(scope="module")
def paired(q41, tmp_path_factory):
    """One `edgellm bench --pair q4_0 --context-sweep --profile` run on a Q4_1 model: (JSON, stdout, json path)."""
    require_llama_cpp()
    out = tmp_path_factory.mktemp("paired") / "p.json"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        rc = bench.main(["--model", str(q41), "--pair", "q4_0", "--prompt-tokens", "8", "--gen-tokens", "4",
                         "--reps", "1", "--context-sweep", ",".join(map(str, SWEEP)), "--sweep-gen-tokens", "4",
                         "--profile", "--json", str(out), "-q"])
    assert rc == 0
    return json.loads(out.read_text()), text.getvalue(), out


def _block_types(path):
    store = open_gguf(path).store
    return {store.info(n).qtype.name for n in store.names() if n.startswith("blk.") and len(store.info(n).shape) == 2}


def test_pair_runs_llama_cpp_on_its_own_q4_0_of_the_f32_weights(paired, q41):
    """Q4_0 is llama.cpp's quantization of the exact F32 dequantization; both engines run that one file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    r, _, _ = paired
    f32 = q41.with_name("tiny.dequantized-F32.gguf")
    q40 = q41.with_name("tiny.dequantized-F32.Q4_0.gguf")
    assert r["config"]["pair"] == "Q4_0"
    assert r["config"]["model_paths"] == {"edgellm": str(q40), "llama.cpp": str(q40)}
    src, deq = open_gguf(q41).store, open_gguf(f32).store
    for name in src.names():
        assert deq.info(name).qtype.name == "F32"
        np.testing.assert_array_equal(deq.get(name), src.get(name))
    assert _block_types(q40) == {"Q4_0"}
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
    for engine in ("edgellm", "llama.cpp"):
        assert r["bits_per_weight"][engine]["bits_per_weight"] == pytest.approx(8 * size / block)   # 4.5
        assert r["median"][engine]["bits_per_weight"] == r["bits_per_weight"][engine]["bits_per_weight"]
    assert not [p for p in os.listdir(q41.parent) if p.endswith(".tmp")]


def test_pair_reuses_a_model_already_of_that_type(q41):
    before = sorted(os.listdir(q41.parent))
    assert bench.paired_gguf(q41, "q4_1") == q41
    assert sorted(os.listdir(q41.parent)) == before


def test_pair_quantizes_a_float_model_directly(tmp_path):
    require_llama_cpp()
    f32 = write_tiny_gguf(tmp_path / "f.gguf", TinySpec())
    out = bench.paired_gguf(f32, "Q8_0")
    assert out == tmp_path / "f.Q8_0.gguf" and _block_types(out) == {"Q8_0"}
    assert sorted(os.listdir(tmp_path)) == ["f.Q8_0.gguf", "f.gguf"]      # no F32 copy of an F32 model
    assert bench.paired_gguf(f32, "q8_0") == out                             # cached


def test_targets_are_pass_or_miss_by_their_ratio(paired):
    r, text, _ = paired
    rows = r["targets"]["edgellm/llama.cpp"]
    assert [t["metric"] for t in rows] == [m for m, *_ in bench.TARGETS]
    expect = {"decode_tps": (">=", 1.3), "prefill_tps": (">=", 1.0), "peak_rss_mb": ("<=", 1.0),
              "load_to_first_token_s": ("<=", 1.5), "bits_per_weight": ("<=", 1.0)}
    for t in rows:
        a, b = r["median"]["edgellm"][t["metric"]], r["median"]["llama.cpp"][t["metric"]]
        assert t["ratio"] == pytest.approx(a / b) == r["ratios"]["edgellm/llama.cpp"][t["metric"]]
        assert (t["op"], t["target"]) == expect[t["metric"]]
        ok = t["ratio"] >= t["target"] if t["op"] == ">=" else t["ratio"] <= t["target"]
        assert t["status"] == ("PASS" if ok else "MISS")
        assert re.search(rf"{t['label']} +\S+x +target {t['op']} {t['target']:g}x +{t['status']}", text), t
    missed = [t["label"] for t in rows if t["status"] == "MISS"]
    assert ("missed:" in text) == bool(missed) and all(m in text.split("missed:")[-1] for m in missed)


def test_check_targets_edges():
    rows = bench.check_targets({"edgellm/llama.cpp": {"decode_tps": 1.3, "prefill_tps": 0.99,
                                                      "peak_rss_mb": float("nan"), "load_to_first_token_s": 1.5}})
    assert {t["metric"]: t["status"] for t in rows["edgellm/llama.cpp"]} == {
        "decode_tps": "PASS", "prefill_tps": "MISS", "peak_rss_mb": "MISS", "load_to_first_token_s": "PASS"}


def test_context_sweep_has_one_point_per_context_per_engine(paired):
    r, text, out = paired
    sw = r["context_sweep"]
    assert r["config"]["context_sweep"] == sw["contexts"] == SWEEP
    assert set(sw["median"]) == set(sw["runs"]) == {"edgellm", "llama.cpp"}
    for engine, points in sw["median"].items():
        assert [p["context"] for p in points] == SWEEP
        assert all(p["decode_tps"] > 0 and p["prefill_tps"] > 0 for p in points)
        (rep,) = sw["runs"][engine]
        assert [p["context"] for p in rep] == SWEEP
    assert re.search(r"^8 +\|", text, re.M) and re.search(r"^32 +\|", text, re.M)


def test_sweep_plot_is_a_png_written_by_matplotlib(paired):
    import matplotlib.image
    r, _, out = paired
    png = out.with_suffix(".png")
    assert r["context_sweep"]["plot"] == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"Matplotlib" in data[:2000]   # the Software text chunk
    assert matplotlib.image.imread(png).shape[:2] == (400, 1000)
    assert sorted(os.listdir(out.parent)) == ["p.json", "p.png"]


def test_profile_names_edgellm_functions(paired):
    r, text, _ = paired
    prof = r["profile"]["edgellm"]
    assert prof["decode_steps"] == 4 and prof["wall_s"] > 0 and prof["backend"] == "numpy"
    funcs = [row["function"] for row in prof["by_tottime"]]
    assert any(f.startswith("edgellm/runtime/") for f in funcs)
    assert prof["by_cumtime"][0]["cumtime_s"] >= max(row["tottime_s"] for row in prof["by_tottime"])
    assert "where edgellm's decode time goes" in text


def test_default_backend_runs_an_integer_bundle_at_its_manifest_bits(tmp_path):
    """--backend auto is edgellm's default path (int for a w4a8 bundle); its bits per weight come from the manifest."""
    import edgellm
    gguf = write_tiny_gguf(tmp_path / "t.gguf", TinySpec(qtype="Q8_0"))
    rng = np.random.default_rng(1)
    (tmp_path / "calib.txt").write_text(" ".join(rng.choice(["the", "king", "rain", "on", "old", "walls"], 900)))
    b = edgellm.compile(gguf, "x86-64", tmp_path / "b", quant="w4a8", group_size=32,
                        calibration=tmp_path / "calib.txt", calib_tokens=512, log=lambda m: None).bundle
    r = bench.run_bench(str(gguf), prompt_tokens=4, gen_tokens=2, reps=1, engines=("edgellm",), bundle=str(b))
    manifest = json.loads((b / "manifest.json").read_text())
    assert r["runs"]["edgellm"][0]["backend"] == "int"
    assert r["bits_per_weight"]["edgellm"] == {"bits_per_weight": manifest["quant"]["bits_per_weight"],
                                               "source": "bundle manifest quant.bits_per_weight", "scheme": "w4a8"}
    assert r["ratios"] == {} and r["targets"] == {}


@pytest.mark.parametrize("args, match", [
    (["--pair", "q3_k"], "--pair 'q3_k'.*q4_0"),
    (["--context-sweep", "8,300"], "context length is 256"),
    (["--context-sweep", "8,abc"], "positive token counts"),
    (["--context-sweep", "0"], "positive token counts"),
    (["--sweep-gen-tokens", "0", "--context-sweep", "8"], "sweep_gen_tokens=0"),
    (["--profile", "--engines", "llama.cpp"], "--profile"),
])
def test_bad_bench_options_exit_2_before_running(tiny, args, match, capsys, monkeypatch):
    monkeypatch.setattr(bench, "_run_child", lambda *a, **k: pytest.fail("a benchmark child ran"))
    engines = [] if "--engines" in args else ["--engines", "edgellm"]
    assert bench.main(["--model", str(tiny), "--prompt-tokens", "4", "--gen-tokens", "2", "-q", *engines, *args]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err, err


def test_missing_matplotlib_is_a_clear_error(tiny, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # `import matplotlib` now raises ImportError
    monkeypatch.setattr(bench, "_run_child", lambda *a, **k: pytest.fail("measured before checking matplotlib"))
    assert bench.main(["--model", str(tiny), "--engines", "edgellm", "--context-sweep", "8", "-q"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "pip install matplotlib" in err and "edgellm[bench]" in err
