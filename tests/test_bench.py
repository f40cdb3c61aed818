"""The edgellm-vs-llama.cpp benchmark on a tiny model: structure, per-engine processes, medians, ratios, JSON.

No speed is asserted anywhere: speed depends on the machine and its load.
"""
from __future__ import annotations

import json
import math
import os
import re

import pytest

import edgellm.bench as bench
from conftest import require, require_llama_cpp
from edgellm.errors import EdgeLLMError
from edgellm.hub import sha256_file
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
    assert set(r) == {"config", "machine", "runs", "median", "ratios"}
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
