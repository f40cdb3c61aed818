"""The `edgellm` command line: run, chat, inspect, perplexity, and one-line errors with exit status 2."""
from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from conftest import require_llama_cpp
from edgellm.cli import main
from edgellm.runtime.llm import LLM
from tinymodels import TinySpec, write_tiny_gguf

REPO = Path(__file__).resolve().parent.parent
TEXT = ("The theatre is the art of the other. In the evening there were more actors on the stage, "
        "and the rest of them were at the door, or in the street, reading their parts aloud. ") * 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("cli") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("cli") / "tiny-q8.gguf", TinySpec(qtype="Q8_0", tied=True))


@pytest.fixture(scope="module")
def tiny_llm(tiny) -> LLM:
    return LLM(tiny, n_ctx=64)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgellm: error: "), err
    assert "Traceback" not in err
    return lines[0]


def edgellm_subprocess(*argv, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "edgellm", *map(str, argv)], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


# --- run --------------------------------------------------------------------------------------------

def test_run_prints_what_the_api_generates(capsys, tiny, tiny_llm):
    rc, out, err = run_cli(capsys, "run", "the theatre", "--model", tiny, "-n", 12, "--temperature", 0,
                           "--ignore-eos", "--ctx", 64)
    assert rc == 0
    want = tiny_llm.generate("the theatre", max_tokens=12, temperature=0, ignore_eos=True)
    assert out == want.text + "\n" and len(want.tokens) == 12
    assert re.search(rf"{len(want.prompt_tokens)} prompt tokens, 12 generated \| prefill [\d.]+ tok/s, "
                     rf"decode [\d.]+ tok/s", err), err


def test_run_sampling_options_and_stdin(capsys, monkeypatch, tiny, tiny_llm):
    monkeypatch.setattr(sys, "stdin", io.StringIO("on the stage"))
    args = ("run", "--model", tiny, "-n", 10, "--temperature", 1.5, "--top-k", 0, "--top-p", 1, "--min-p", 0,
            "--seed", 7, "--ignore-eos", "--stats")
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0
    want = tiny_llm.generate("on the stage", max_tokens=10, temperature=1.5, top_k=0, top_p=1, min_p=0,
                             seed=7, ignore_eos=True)
    assert out == want.text + "\n"
    assert "load " in err and "RSS" in err and "finish: length" in err


def test_run_stop_string(capsys, tiny, tiny_llm):
    full = tiny_llm.generate("the", max_tokens=16, temperature=0, ignore_eos=True).text
    stops = [full[len(full) // 2: len(full) // 2 + 2], "zz"]
    want = tiny_llm.generate("the", max_tokens=16, temperature=0, ignore_eos=True, stop=stops).text
    rc, out, _ = run_cli(capsys, "run", "the", "--model", tiny, "-n", 16, "--temperature", 0, "--ignore-eos",
                         "--stop", stops[0], "--stop", stops[1])
    assert rc == 0 and out == want + "\n"


def test_run_without_prompt_on_a_terminal(capsys, monkeypatch, tiny):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stdin", Tty())
    rc, _, err = run_cli(capsys, "run", "--model", tiny)
    assert rc == 2 and "no prompt" in one_error_line(err)


def test_run_chat_uses_the_chat_template(capsys, tiny, tiny_llm):
    rc, out, _ = run_cli(capsys, "run", "hello", "--chat", "--system", "be brief", "--model", tiny, "-n", 8,
                         "--temperature", 0, "--ignore-eos", "--ctx", 64)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    want = tiny_llm.create_chat_completion(msgs, max_tokens=8, temperature=0, ignore_eos=True)
    assert rc == 0 and out == want["choices"][0]["message"]["content"] + "\n"


def test_ctrl_c_exits_130(capsys, monkeypatch, tiny):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
        yield
    monkeypatch.setattr(LLM, "stream", interrupted)
    rc, _, err = run_cli(capsys, "run", "hi", "--model", tiny)
    assert rc == 130 and err.strip().splitlines() == ["edgellm: interrupted"]


# --- chat -------------------------------------------------------------------------------------------

def test_chat_repl_keeps_history_and_resets(capsys, monkeypatch, tiny, tiny_llm):
    seen = []
    real = LLM.create_chat_completion

    def spy(self, messages, **kw):
        seen.append([dict(m) for m in messages])
        return real(self, messages, **kw)

    lines = iter(["hello", "and then?", "/reset", "again"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(LLM, "create_chat_completion", spy)
    monkeypatch.setattr("builtins.input", fake_input)
    rc, out, err = run_cli(capsys, "chat", "--model", tiny, "--system", "be brief", "-n", 6, "--temperature", 0,
                           "--ignore-eos", "--ctx", 256)
    assert rc == 0
    roles = [[m["role"] for m in msgs] for msgs in seen]
    assert roles == [["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    assert seen[1][2]["content"] and seen[1][2]["content"] in out
    assert seen[2][1]["content"] == "again" and "history cleared" in err


def test_chat_ctrl_c_at_the_prompt_exits_cleanly(capsys, monkeypatch, tiny):
    def interrupt(prompt=""):
        raise KeyboardInterrupt
    monkeypatch.setattr("builtins.input", interrupt)
    rc, _, err = run_cli(capsys, "chat", "--model", tiny)
    assert rc == 0 and "Traceback" not in err


# --- inspect ----------------------------------------------------------------------------------------

def inspect_fields(out: str) -> dict[str, str]:
    return dict(re.match(r"([a-z ]+):\s+(.*)", ln).groups() for ln in out.splitlines()
                if re.match(r"[a-z ]+:\s+\S", ln))


@pytest.mark.parametrize("which", ["tiny", "tiny_q8"])
def test_inspect_fields_match_the_file(capsys, request, which):
    path = request.getfixturevalue(which)
    rc, out, _ = run_cli(capsys, "inspect", path)
    assert rc == 0
    f = inspect_fields(out)
    reader = GGUFReader(path)
    spec = TinySpec()
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    assert f["architecture"] == "llama" and f["name"] == "tiny-llama"
    assert f["layers"] == str(spec.n_layers) and f["dim"] == str(spec.dim) and f["ffn dim"] == str(spec.ffn_dim)
    assert f["heads"].startswith(f"{spec.n_heads} (kv heads {spec.n_kv_heads}, head dim {spec.dim // spec.n_heads}")
    assert f["vocab"] == str(len(reader.fields["tokenizer.ggml.tokens"].data))
    assert f["context"] == str(spec.context_length)
    assert f["rope"].startswith("base 10000, scale 1, layout normal")
    assert f["tied embeddings"] == ("yes" if which == "tiny_q8" else "no")
    assert f["parameters"].startswith(f"{n_params:,} ")
    assert f["bits per weight"] == f"{8 * n_bytes / n_params:.2f}"
    assert f["tokenizer"].startswith("gpt2 (pre default)") and f["chat template"] == "no"
    hist = dict(re.findall(r"^  (\w+)\s+(\d+) tensors", out, re.M))
    want: dict[str, int] = {}
    for t in reader.tensors:
        want[t.tensor_type.name] = want.get(t.tensor_type.name, 0) + 1
    assert {k: int(v) for k, v in hist.items()} == want
    assert ("Q8_0" in hist) == (which == "tiny_q8")


def test_inspect_tensor_table(capsys, tiny_q8):
    rc, out, _ = run_cli(capsys, "inspect", tiny_q8, "--tensors")
    assert rc == 0
    rows = {m[0]: m[1:] for m in re.findall(r"^(\S+\.weight)\s+(\w+)\s+([\dx]+)\s+(\d+)$", out, re.M)}
    reader = GGUFReader(tiny_q8)
    assert len(rows) == len(reader.tensors)
    for t in reader.tensors:
        shape = "x".join(str(int(d)) for d in reversed(t.shape.tolist()))
        assert rows[t.name] == (t.tensor_type.name, shape, str(int(t.n_bytes)))


# --- perplexity -------------------------------------------------------------------------------------

def reference_perplexity(chunk_logits: list[np.ndarray], chunks: list[list[int]], n_ctx: int) -> float:
    """llama-perplexity's definition, written independently: second half of each chunk, next-token NLL."""
    nll = []
    first = n_ctx // 2
    for logits, toks in zip(chunk_logits, chunks):
        for pos in range(first, n_ctx - 1):
            row = logits[pos].astype(np.float64)
            nll.append(np.logaddexp.reduce(row) - row[toks[pos + 1]])
    return math.exp(float(np.mean(nll)))


def parse_ppl(out: str) -> tuple[float, float]:
    m = re.search(r"^PPL = ([\d.]+) \+/- ([\d.]+)$", out, re.M)
    assert m, out
    return float(m.group(1)), float(m.group(2))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ppl") / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_perplexity_matches_numpy(capsys, tiny, tiny_llm, text_file):
    rc, out, err = run_cli(capsys, "perplexity", tiny, "--text", text_file, "--ctx", 64, "--max-chunks", 3, "-q")
    assert rc == 0
    ppl, err_bar = parse_ppl(out)
    assert math.isfinite(ppl) and ppl > 1 and err_bar > 0
    toks = tiny_llm.tokenize(TEXT, special=False)
    assert len(toks) >= 3 * 64
    chunks = [toks[i * 64:(i + 1) * 64] for i in range(3)]
    ref = reference_perplexity([tiny_llm.logits(c) for c in chunks], chunks, 64)
    assert ppl == pytest.approx(ref, rel=1e-4)


def test_perplexity_matches_llama_cpp(capsys, tiny, text_file):
    llama_cpp = require_llama_cpp()
    rc, out, _ = run_cli(capsys, "perplexity", tiny, "--text", text_file, "--ctx", 64, "--max-chunks", 2, "-q")
    assert rc == 0
    ppl, _ = parse_ppl(out)
    ref = llama_cpp.Llama(model_path=str(tiny), n_ctx=64, n_batch=64, logits_all=True, verbose=False)
    toks = ref.tokenize(TEXT.encode(), add_bos=False, special=False)
    chunks = [toks[i * 64:(i + 1) * 64] for i in range(2)]
    logits = []
    for c in chunks:
        ref.reset()
        ref.eval(c)
        logits.append(np.array(ref.scores[:64], dtype=np.float32))
    assert ppl == pytest.approx(reference_perplexity(logits, chunks, 64), rel=5e-4)


def test_perplexity_text_too_short(capsys, tiny, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words", encoding="utf-8")
    rc, _, err = run_cli(capsys, "perplexity", tiny, "--text", short, "--ctx", 64, "-q")
    assert rc == 2 and "fewer than one chunk" in one_error_line(err)


# --- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["run", "hi", "--model", "/nonexistent/model.gguf"], "no file or known model named"),
    (["inspect", "no-such-model"], "known: smollm2-135m"),
    (["run", "hi", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", "hi", "-n", "many"], "invalid int value"),
    (["perplexity", "--text", "/nonexistent/text.txt"], "No such file or directory: /nonexistent/text.txt"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
    (["run", "hi", "--system", "x"], "--system only applies with --chat"),
])
def test_errors_are_one_line_exit_2(capsys, argv, needle):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and needle in one_error_line(err) and out == ""


def test_help_and_version(capsys):
    assert main(["--version"]) == 0 and "edgellm" in capsys.readouterr().out
    for cmd in ("run", "chat", "inspect", "perplexity"):
        assert main([cmd, "--help"]) == 0 and "usage: edgellm " + cmd in capsys.readouterr().out


def test_not_a_gguf_file(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all" * 10)
    rc, _, err = run_cli(capsys, "inspect", bad)
    assert rc == 2 and "bad.gguf" in one_error_line(err)


def test_subprocess_run_and_error(tiny):
    ok = edgellm_subprocess("run", "the", "--model", tiny, "-n", 4, "--temperature", 0, "--ignore-eos")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() and "prompt tokens" in ok.stderr and "Traceback" not in ok.stderr
    bad = edgellm_subprocess("inspect", "/nonexistent/model.gguf")
    assert bad.returncode == 2 and bad.stdout == ""
    one_error_line(bad.stderr)


@pytest.mark.slow
def test_run_smollm2(smollm2_path):
    r = edgellm_subprocess("run", "Once upon a time", "-n", 16, "--temperature", 0, "--model", smollm2_path)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) >= 5, r.stdout
    assert re.search(r"\d+ prompt tokens, \d+ generated \| prefill [\d.]+ tok/s", r.stderr), r.stderr


@pytest.mark.slow
def test_perplexity_smollm2_matches_llama_cpp(capsys, smollm2_path, heldout_text, tmp_path):
    """`edgellm perplexity` on real text equals llama.cpp's logits scored the llama-perplexity way."""
    llama_cpp = require_llama_cpp()
    text = heldout_text[20000:22000]
    f = tmp_path / "hamlet.txt"
    f.write_text(text, encoding="utf-8")
    rc, out, _ = run_cli(capsys, "perplexity", smollm2_path, "--text", f, "--ctx", 64, "--max-chunks", 2, "-q")
    assert rc == 0
    ppl, _ = parse_ppl(out)
    ref = llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=64, n_batch=64, logits_all=True, verbose=False)
    toks = ref.tokenize(text.encode(), add_bos=True, special=False)   # add_bos=True: BOS only if the model adds one
    bos = ref.tokenize(b"", add_bos=True, special=False)
    chunks = [toks[i * 64:(i + 1) * 64] for i in range(2)]
    logits = []
    for c in chunks:
        ref.reset()
        ref.eval(bos[:1] + c[1:] if bos else c)
        logits.append(np.array(ref.scores[:64], dtype=np.float32))
    want = reference_perplexity(logits, chunks, 64)
    # observed: 0.4% apart (numpy logits differ from llama.cpp by up to ~1 on this model); 1% bounds it
    assert ppl == pytest.approx(want, rel=1e-2), (ppl, want)
