"""Running under a memory budget (edgellm.runtime.memory): budgets, exactness of streaming, sparsity, errors.

The reference is the numpy backend on the fully loaded bundle (itself checked against llama.cpp in
test_smollm2.py): naive streaming and neuron streaming with every neuron active compute the same
arithmetic on the same weights, so their logits must be bit-identical to it, token by token.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgellm.compiler.bundle_writer import write_bundle
from edgellm.compiler.profile_neurons import profile_neurons, recall_offset
from edgellm.devices.targets import host_target
from edgellm.errors import EdgeLLMError
from edgellm.runtime.backend import NumpyBackend
from edgellm.runtime.bundle import load_bundle
from edgellm.runtime.loader import load_model
from edgellm.runtime.memory import (PROFILE_FILE, StorageModel, StreamedStore, get_storage_model,
                                    make_budgeted_model, minimum_resident_set, parse_budget)
from edgellm.runtime.memory import direct_io
from edgellm.runtime.memory.budget import fmt_bytes
from edgellm.runtime.perplexity import token_nll

from tinymodels import TinySpec, write_tiny_gguf

HOST = host_target().name
TOKENS = [5, 70, 100, 200, 33, 7, 9, 11, 260, 40, 41, 42]
PROMPT = 6


def run(backend, tokens=TOKENS, prompt=PROMPT, check=None):
    """Prefill `prompt` tokens, then decode the rest one at a time; all logits stacked [len(tokens), vocab]."""
    kv = backend.new_cache(64)
    outs = [backend.forward(np.asarray(tokens[:prompt]), 0, kv, all_logits=True)]
    if check:
        check()
    for j in range(prompt, len(tokens)):
        outs.append(backend.forward(np.asarray(tokens[j:j + 1]), j, kv))
        if check:
            check()
    return np.concatenate(outs)


def reference(bundle):
    return run(NumpyBackend(bundle.config, bundle.weights))


@pytest.fixture(scope="module", params=["Q4_1", "Q8_0", "Q5_0", "F32"])
def tiny(request, tmp_path_factory):
    """A tiny bundle per weight type (Q4_1, Q8_0: the fast affine column decoder; Q5_0, F32: the generic one)."""
    d = tmp_path_factory.mktemp(f"tiny-{request.param}")
    src = load_model(write_tiny_gguf(d / "m.gguf", TinySpec(qtype=request.param, n_layers=3)))
    b = load_bundle(write_bundle(src, d / "bundle", HOST))
    return b, reference(b)


@pytest.fixture(scope="module")
def tiny_q41(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinyq41")
    src = load_model(write_tiny_gguf(d / "m.gguf", TinySpec(qtype="Q4_1", n_layers=3, ffn_dim=256)))
    return src, load_bundle(write_bundle(src, d / "bundle", HOST)), d


# ---- budgets -----------------------------------------------------------------------------------


def test_parse_budget():
    assert parse_budget("60MB", 10**9) == 60_000_000
    assert parse_budget("60 MiB", 10**9) == 60 * 2**20
    assert parse_budget("1.5GB", 10**9) == 1_500_000_000
    assert parse_budget("35%", 1000) == 350
    assert parse_budget("100%", 96_576_768) == 96_576_768
    assert parse_budget(12345, 10) == 12345
    for bad in ["abc", "60 parsecs", "-5MB", "0%", "", True, -1]:
        with pytest.raises(EdgeLLMError):
            parse_budget(bad, 1000)


@pytest.mark.parametrize("mode", ["naive", "neuron"])
def test_budget_below_minimum_states_the_minimum(tiny_q41, mode):
    _, b, _ = tiny_q41
    need = minimum_resident_set(b.weights, mode).total
    with pytest.raises(EdgeLLMError) as e:
        make_budgeted_model(b, need - 1, mode=mode)
    msg = str(e.value)
    assert "minimum resident set" in msg and fmt_bytes(need) in msg and "--memory-budget" in msg
    make_budgeted_model(b, need, mode=mode).close()         # exactly the minimum is enough


def test_budget_needs_a_bundle(tiny_q41):
    src, _, _ = tiny_q41
    with pytest.raises(EdgeLLMError, match="edgellm compile"):
        make_budgeted_model(src, "50%")


# ---- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["100%", "80%", "60%"])
@pytest.mark.parametrize("mode", ["naive", "neuron"])
def test_streaming_equals_reference_and_stays_within_budget(tiny, mode, budget):
    b, ref = tiny
    be = make_budgeted_model(b, budget, mode=mode, window=2 if mode == "neuron" else 0)
    st = be.store
    limit = parse_budget(budget, b.weights.stored_bytes())

    def check():
        assert st.resident_bytes() <= limit

    out = run(be, check=check)
    assert np.array_equal(out, ref), f"max diff {np.abs(out - ref).max()}"
    if budget == "100%":
        assert st.stats.bytes_read == 0, "everything fits: nothing may be read per token"
    else:
        assert st.stats.bytes_read > 0, "a smaller budget must stream something"
    be.close()


def test_neuron_streaming_at_the_minimum_budget_equals_reference(tiny):
    """Nothing of the FFN resident: every neuron comes from storage every token, still bit-identical."""
    b, ref = tiny
    need = minimum_resident_set(b.weights, "neuron").total
    be = make_budgeted_model(b, need, mode="neuron")
    assert sum(s.filled for s in be.store.slots.values()) == 0
    # the tiny models are untied: the token embedding is outside the minimum, read a row per token
    assert be.store.embed_on_demand and "token_embd.weight" not in be.store._res
    outside = [n for n in b.weights.names() if not n.startswith("blk.") and n != "token_embd.weight"]
    assert minimum_resident_set(b.weights, "neuron").parts["embeddings/output"] == \
        sum(b.weights.info(n).nbytes for n in outside)
    with pytest.raises(EdgeLLMError, match="outside the vocabulary"):
        be.store.embed(np.asarray([b.config.vocab_size]))
    assert np.array_equal(run(be, check=lambda: be.store.resident_bytes() <= need), ref)
    assert be.stats.neuron_hits == 0 and be.stats.bytes_read > 0
    be.close()


def test_prefetch_off_gives_the_same_logits(tiny_q41):
    _, b, _ = tiny_q41
    ref = reference(b)
    for mode in ("naive", "neuron"):
        on, off = (make_budgeted_model(b, "60%", mode=mode, prefetch=p) for p in (True, False))
        assert np.array_equal(run(on), ref) and np.array_equal(run(off), ref)
        assert on.stats.prefetch_bytes > 0 and off.stats.prefetch_bytes == 0
        on.close(), off.close()


def test_neurons_come_resident_first_unless_exact(tiny_q41):
    """Scattered resident neurons: exact keeps id order (the reference's down-sum order); otherwise the
    resident ones come first and the streamed ones are decoded in place after them, rows and columns matching."""
    _, b, _ = tiny_q41
    ffn = b.config.ffn_dim
    ranking = np.tile(np.random.default_rng(0).permutation(ffn), (b.config.n_layers, 1))
    st = StreamedStore(b.weights, parse_budget("70%", b.weights.stored_bytes()), "neuron", ranking=ranking,
                       prefetch=False)
    hot = np.sort(st.slots[1].ids)
    assert 0 < len(hot) < ffn and not np.array_equal(hot, np.arange(len(hot))), "want a scattered resident set"
    gate, down = b.weights.get("blk.1.ffn_gate.weight"), b.weights.get("blk.1.ffn_down.weight")
    for exact in (True, False):
        ids, n = st.neurons(1, np.arange(ffn), exact=exact)
        want = np.arange(ffn) if exact else np.concatenate([hot, np.setdiff1d(np.arange(ffn), hot)])
        assert np.array_equal(ids, want)
        assert np.array_equal(n["gate"], gate[ids]) and np.array_equal(n["down"], down[:, ids])
    st.close()


def test_windowing_keeps_recently_read_neurons(tiny_q41):
    _, b, _ = tiny_q41
    be = make_budgeted_model(b, "70%", mode="neuron", window=2, prefetch=False)
    st = be.store
    s = st.slots[0]
    cold = np.nonzero(s.slot_of < 0)[0][:5]
    assert len(cold) and len(s.ids)
    st.neurons(0, cold)
    assert (s.slot_of[cold] >= 0).all(), "neurons read for this token must be kept for the window"
    before = st.resident_bytes()
    st.end_forward()
    assert st.resident_bytes() == before <= st.budget
    static = make_budgeted_model(b, "70%", mode="neuron", window=0, prefetch=False)
    static.store.neurons(0, cold)
    assert (static.store.slots[0].slot_of[cold] < 0).all(), "without windowing the resident set is static"
    be.close(), static.close()


# ---- sparsity ----------------------------------------------------------------------------------


def test_sparse_mode_without_profile_names_the_compile_flag(tiny_q41):
    _, b, _ = tiny_q41
    with pytest.raises(EdgeLLMError) as e:
        make_budgeted_model(b, "100%", mode="sparse")
    assert "--profile-neurons" in str(e.value)


@pytest.fixture(scope="module")
def profiled(tiny_q41, shakespeare_dir):
    src, _, d = tiny_q41
    from edgellm.compiler.profile_neurons import calibration_texts
    prof = profile_neurons(src, calibration_texts(shakespeare_dir, max_files=4), sparsity=0.5, rank=16, recall=0.95,
                           n_ctx=64, max_tokens=1024, log=lambda *a: None)
    path = prof.save(d / PROFILE_FILE)
    return load_bundle(write_bundle(src, d / "profiled", HOST, extra_files={PROFILE_FILE: path})), prof


def ppl(backend, tokens):
    logits = backend.forward(np.asarray(tokens), 0, backend.new_cache(len(tokens)), all_logits=True)
    return math.exp(token_nll(logits[:-1], np.asarray(tokens[1:])).mean())


def test_profile_measures_sparsity_and_ranks_neurons(profiled):
    _, prof = profiled
    assert abs(prof.meta["measured_sparsity"] - 0.5) < 0.02
    assert prof.meta["recall"] >= 0.94
    f = prof.frequency[0]
    assert (np.diff(f[prof.ranking[0]]) <= 0).all(), "ranking must list the most often active neurons first"


def test_predictor_recall_is_set_on_held_out_calibration_tokens(profiled, tiny_q41):
    _, prof = profiled
    assert prof.meta["validation_tokens"] > 0 and prof.meta["recall_by"] == "count"
    rng = np.random.default_rng(0)
    score, mask, w = rng.standard_normal(4000), rng.random(4000) < 0.5, rng.random(4000)
    tau = recall_offset(score, mask, 0.9)
    assert abs((score[mask] > tau).mean() - 0.9) < 0.01
    tau = recall_offset(score, mask, 0.9, w)
    assert w[mask & (score > tau)].sum() >= 0.9 * w[mask].sum()
    assert w[mask & (score >= tau)].sum() - w[mask & (score > tau)].sum() > 0, "the offset sits on an active entry"
    src, _, _ = tiny_q41
    for bad, match in [(dict(recall=1.5), "recall"), (dict(val_fraction=1.0), "validation"),
                       (dict(recall_by="energy"), "recall measure")]:
        with pytest.raises(EdgeLLMError, match=match):
            profile_neurons(src, ["text"], **bad)


def test_held_out_thresholds_meet_their_recall_on_held_out_chunks(tiny_q41, shakespeare_dir):
    """The per-layer predictor offset is chosen on whole calibration chunks the fit never saw, for the
    float16 factors the profile stores: the runtime's own prediction recalls the target share there."""
    from edgellm.compiler.profile_neurons import build_profile, calibration_texts, collect
    quiet = lambda *a: None  # noqa: E731
    hs, acts = collect(tiny_q41[0], calibration_texts(shakespeare_dir, max_files=4), n_ctx=64, max_tokens=1024,
                       log=quiet)
    for heldout in (0.25, 0.5):
        prof = build_profile(hs, acts, sparsity=0.6, rank=8, recall=0.9, n_ctx=64, val_fraction=heldout, log=quiet)
        n_val = prof.meta["validation_tokens"]
        assert n_val % 64 == 0 and 0 < n_val <= heldout * len(hs[0])
        for i in range(len(hs)):
            active = acts[i][-n_val:] > prof.threshold[i]
            pred = prof.predict(i, hs[i][-n_val:])
            recall = (pred & active).sum() / active.sum()
            assert recall >= 0.9 - 1e-3, f"layer {i}: recall {recall:.4f} on held-out chunks"
            assert abs(recall - prof.meta["recall_per_layer"][i]) < 1e-6, "the profile reports what the runtime gets"
            assert pred.mean() < 1.0, "the predictor must skip some neurons"


def test_without_the_guess_only_predicted_neurons_are_read_and_computed(profiled):
    """guess=False: each layer reads and computes just the neurons predicted from its FFN input, so the logits
    equal those of a run without any prefetching, and it computes fewer neurons than with the guess."""
    b, prof = profiled
    runs = {k: make_budgeted_model(b, "60%", mode="sparse", window=2, **kw)
            for k, kw in [("guess", {}), ("no guess", dict(guess=False)), ("no prefetch", dict(prefetch=False))]}
    out = {k: run(be) for k, be in runs.items()}
    assert np.array_equal(out["no guess"], out["no prefetch"])
    st = {k: be.stats for k, be in runs.items()}
    assert st["no guess"].neurons_computed == st["no prefetch"].neurons_computed
    assert st["no guess"].computed_fraction < st["guess"].computed_fraction
    assert st["guess"].prefetch_wasted > 0 == st["no guess"].prefetch_wasted
    for be in runs.values():
        be.close()


def test_masked_reference_of_bench_sparsity_matches_the_runtime(profiled):
    """tools/bench_sparsity.py's masked numpy reference: no mask is the reference itself, the profile's mask gives
    the sparse runtime's batched logits, and the oracle keeps exactly the share it is asked to."""
    import importlib.util
    path = Path(__file__).parent.parent / "tools" / "bench_sparsity.py"
    spec = importlib.util.spec_from_file_location("bench_sparsity", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    b, prof = profiled
    toks = np.asarray(TOKENS)
    logits = lambda m: m.forward(toks, 0, m.new_cache(32), all_logits=True)  # noqa: E731
    assert np.array_equal(tool.MaskedFFN(b).logits(TOKENS), logits(NumpyBackend(b.config, b.weights)))
    sparse = make_budgeted_model(b, "100%", mode="sparse")
    masked = tool.MaskedFFN(b, profile=prof)
    np.testing.assert_allclose(masked.logits(TOKENS), logits(sparse), rtol=1e-4, atol=1e-4)
    assert abs(np.mean(masked.kept) - sparse.stats.computed_fraction) < 1e-9
    sparse.close()
    oracle = tool.MaskedFFN(b, drop=0.25)
    oracle.logits(TOKENS)
    assert np.allclose(oracle.kept, 0.75, atol=2 / b.config.ffn_dim)


def test_profile_flags_of_compile_reach_the_profile(tiny_q41, shakespeare_dir, tmp_path, capsys):
    """--neuron-tokens / --neuron-recall / --neuron-heldout override profile_neurons's defaults; bad values refused."""
    from edgellm.cli import main
    from edgellm.runtime.memory import bundle_profile
    gguf, calib = tiny_q41[2] / "m.gguf", str(shakespeare_dir / "macbeth_gut.txt")
    args = ["compile", str(gguf), "--backends", "", "--profile-neurons", "--calibration", calib]
    assert main(args + ["--neuron-tokens", "512", "--neuron-recall", "0.9", "--neuron-heldout", "0.5",
                        "-o", str(tmp_path / "b")]) == 0
    meta = bundle_profile(tmp_path / "b").meta
    assert (meta["tokens"], meta["target_recall"], meta["validation_tokens"]) == (512, 0.9, 256)
    assert min(meta["recall_per_layer"]) >= 0.9 - 1e-3
    assert main(args + ["--neuron-recall", "1.5", "-o", str(tmp_path / "c")]) == 2
    assert "recall" in capsys.readouterr().err


def test_predictor_keeps_perplexity_close_and_reads_less(profiled, heldout_text):
    b, prof = profiled
    tokens = [t for t in b.tokenizer.encode(heldout_text[5000:5400], add_bos=False) if t < b.config.vocab_size][:48]
    dense = ppl(NumpyBackend(b.config, b.weights), tokens)
    sparse = make_budgeted_model(b, "100%", mode="sparse")
    p = ppl(sparse, tokens)
    assert sparse.stats.computed_fraction < 0.9, "the predictor must skip neurons"
    assert abs(p / dense - 1) < 0.05, f"perplexity {p:.3f} vs dense {dense:.3f}"
    # same memory for weights (the sparse run also holds its predictor): the predictor must cut the bytes read
    dense_io = make_budgeted_model(b, "60%", mode="neuron", coalesce_bytes=0)
    budget = parse_budget("60%", b.weights.stored_bytes()) + prof.predictor_bytes
    sparse_io = make_budgeted_model(b, budget, mode="sparse", coalesce_bytes=0)
    run(dense_io), run(sparse_io)
    assert sparse_io.stats.bytes_read < dense_io.stats.bytes_read
    for be in (sparse, dense_io, sparse_io):
        be.close()


# ---- storage -----------------------------------------------------------------------------------


def test_storage_model_is_labelled_emulation_and_throttles(tiny_q41):
    _, b, _ = tiny_q41
    assert get_storage_model("emmc").label.startswith("EMULATED")
    with pytest.raises(EdgeLLMError, match="microsd"):
        get_storage_model("floppy")
    slow = StorageModel("test device", 1.0, 0.0)               # 1 MB/s
    be = make_budgeted_model(b, "60%", mode="naive", storage=slow, prefetch=False)
    assert "EMULATED test device" in be.store.describe() and "EMULATED" in be.stats.format()
    t = time.perf_counter()
    run(be, TOKENS[:3], 2)
    took = time.perf_counter() - t
    assert took >= 0.9 * be.stats.bytes_read / 1e6, "reads must last as long as on the emulated device"
    be.close()


# ---- hot/cold split across two devices (both the CPU) -----------------------------------------


def close_to(a, b):
    """Equal to float32 tolerance: the split sums the down product in two parts (hot + cold), one device in one."""
    return np.allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("device", ["cpu", "inline"])
@pytest.mark.parametrize("budget", ["100%", "70%"])
def test_split_devices_equals_one_device_within_budget(tiny, budget, device):
    b, ref = tiny
    one = make_budgeted_model(b, budget, mode="neuron")
    two = make_budgeted_model(b, budget, mode="neuron", split_devices=device)
    limit = parse_budget(budget, b.weights.stored_bytes())

    def check():
        assert two.store.resident_bytes() <= limit

    single, split = run(one), run(two, check=check)
    assert np.array_equal(single, ref)
    assert close_to(split, single), f"max diff {np.abs(split - single).max()}"
    assert (split.argmax(-1) == single.argmax(-1)).all()
    st = two.stats
    assert st.device_neurons > 0, "the hot (resident) neurons must run on the second device"
    if budget == "100%":
        assert st.device_neurons == st.neurons_computed and st.bytes_read == 0
    else:
        assert 0 < st.device_neurons < st.neurons_computed, "cold neurons must run on the CPU path"
        assert st.bytes_read == one.stats.bytes_read > 0, "the split must not change what is read"
    one.close(), two.close()


def test_split_devices_with_predictor_and_window(profiled):
    b, prof = profiled
    budget = parse_budget("60%", b.weights.stored_bytes()) + prof.predictor_bytes
    one = make_budgeted_model(b, budget, mode="sparse", window=2)
    two = make_budgeted_model(b, budget, mode="sparse", window=2, split_devices="cpu")
    single = run(one)
    split = run(two, check=lambda: two.store.resident_bytes() <= budget)
    assert close_to(split, single), f"max diff {np.abs(split - single).max()}"
    assert 0 < two.stats.device_neurons < two.stats.neurons_computed < two.stats.neurons_computed_total
    assert two.stats.neuron_hits == one.stats.neuron_hits, "windowing must keep the same neurons either way"
    assert "hot-neuron device" in two.stats.format()
    one.close(), two.close()


def test_split_devices_bad_values(tiny_q41):
    _, b, _ = tiny_q41
    with pytest.raises(EdgeLLMError) as e:
        make_budgeted_model(b, "70%", mode="neuron", split_devices="gpu")
    assert "--split-devices" in str(e.value) and "cpu" in str(e.value)
    with pytest.raises(EdgeLLMError, match="needs neuron streaming"):
        make_budgeted_model(b, "70%", mode="naive", split_devices="cpu")
    make_budgeted_model(b, "70%", mode="neuron", split_devices="off").close()
    need = minimum_resident_set(b.weights, "neuron").total        # the split changes no budget arithmetic
    with pytest.raises(EdgeLLMError, match="minimum resident set"):
        make_budgeted_model(b, need - 1, mode="neuron", split_devices="cpu")
    be = make_budgeted_model(b, need, mode="neuron", split_devices="cpu")
    assert np.array_equal(run(be, check=lambda: be.store.resident_bytes() <= need), reference(b))
    be.close()


# ---- O_DIRECT ----------------------------------------------------------------------------------


def _refuses_direct_io(root: Path) -> str | None:
    """Why the filesystem of `root` refuses O_DIRECT, or None if it accepts it."""
    probe = root / ".odirect-probe"
    probe.write_bytes(bytes(4096))
    try:
        os.close(direct_io.open_direct(probe))
    except direct_io.DirectIOUnsupported as e:
        return f"{root}: {e.strerror}"
    finally:
        probe.unlink()
    return None


@pytest.fixture(scope="module")
def disk_bundle(tiny_q41):
    """The tiny bundle in a directory that accepts O_DIRECT (tmpfs refuses it: then a copy in the user cache)."""
    _, b, d = tiny_q41
    why = _refuses_direct_io(d)
    if why is None:
        yield b
        return
    cache = Path.home() / ".cache" / "edgellm"
    cache.mkdir(parents=True, exist_ok=True)
    why_cache = _refuses_direct_io(cache)
    if why_cache is not None:
        pytest.skip(f"no filesystem here accepts O_DIRECT ({why}; {why_cache})")
    tmp = Path(tempfile.mkdtemp(dir=cache))
    try:
        yield load_bundle(shutil.copytree(b.path, tmp / "bundle"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_direct_io_reads_equal_buffered_reads(disk_bundle):
    b = disk_bundle
    be = make_budgeted_model(b, "60%", mode="neuron", direct_io=True)
    assert "O_DIRECT" in be.store.describe() and "O_DIRECT" in be.stats.format()
    data = Path(b.path, "weights.bin").read_bytes()
    rng = np.random.default_rng(0)
    spans = [(0, 1), (4095, 2), (4096, 4096), (len(data) - 7, 7), (0, len(data))]
    spans += [(int(o), int(n)) for o, n in zip(rng.integers(0, len(data) - 9000, 20), rng.integers(1, 9000, 20))]
    for off, n in spans:
        before = be.stats.bytes_read
        got = be.store.io.read(off, n)
        assert got.tobytes() == data[off:off + n], f"bytes differ at offset {off}, length {n}"
        lo, size = direct_io.aligned_span(off, n)
        assert be.stats.bytes_read - before == min(size, len(data) - lo), "O_DIRECT moves whole pages"
    with pytest.raises(EdgeLLMError, match="ended"):
        be.store.io.read(len(data) - 10, 20)
    be.stats.reset()
    ref = reference(b)
    assert np.array_equal(run(be), ref) and be.stats.bytes_read > 0
    be.close()


def test_direct_io_refused_falls_back_with_a_message(tiny_q41, monkeypatch):
    _, b, _ = tiny_q41

    def refuse(path):
        raise direct_io.DirectIOUnsupported(22, f"the filesystem of {path} refuses O_DIRECT (Invalid argument)")

    monkeypatch.setattr("edgellm.runtime.memory.streamed_store.open_direct", refuse)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        be = make_budgeted_model(b, "60%", mode="neuron", direct_io=True)
    assert any("direct I/O is not available" in str(x.message) and "--direct-io" in str(x.message) for x in w)
    assert "O_DIRECT refused" in be.store.describe()
    assert np.array_equal(run(be), reference(b))
    be.close()


def test_direct_io_bad_value(tiny_q41):
    _, b, _ = tiny_q41
    with pytest.raises(EdgeLLMError, match="--direct-io"):
        make_budgeted_model(b, "60%", mode="neuron", direct_io="yes")


# ---- SmolLM2 -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_bundle(smollm2_path, tmp_path_factory):
    return load_bundle(write_bundle(load_model(smollm2_path), tmp_path_factory.mktemp("smol") / "b", HOST),
                       verify=False)


def test_smollm2_streams_exactly_at_half_budget(smol_bundle):
    """SmolLM2 at 50% (naive and neuron mode stream real Q4_1 layers, bit-identical to the reference); at 30% the
    minimum neuron-mode set (tied 30 MB embedding, shared bits) does not fit."""
    b = smol_bundle
    with pytest.raises(EdgeLLMError, match="minimum resident set of 3[0-9].[0-9][0-9] MB"):
        make_budgeted_model(b, "30%", mode="neuron")
    ids = b.tokenizer.encode("To be, or not to be, that is the question:", add_bos=False)[:10]
    ref = NumpyBackend(b.config, b.weights)
    kv = ref.new_cache(32)
    want = [ref.forward(np.asarray(ids[:8]), 0, kv)] + [ref.forward(np.asarray([t]), 8 + j, kv)
                                                        for j, t in enumerate(ids[8:])]
    for mode in ("naive", "neuron"):
        be = make_budgeted_model(b, "50%", mode=mode)
        kv = be.new_cache(32)
        got = [be.forward(np.asarray(ids[:8]), 0, kv)] + [be.forward(np.asarray([t]), 8 + j, kv)
                                                          for j, t in enumerate(ids[8:])]
        assert all(np.array_equal(a, c) for a, c in zip(want, got)), mode
        assert be.store.resident_bytes() <= parse_budget("50%", b.weights.stored_bytes())
        assert be.stats.bytes_read > 10e6
        be.close()
