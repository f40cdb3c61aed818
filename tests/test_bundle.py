"""Bundles: written from tiny models and SmolLM2, loaded back with the runtime, checked byte for byte.

The reference is the source model itself (the GGUF the bundle was written from): the bundle must
give the same tensor bytes, the same dequantized weights, the same logits and the same tokens.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgellm.compiler import bundle_writer
from edgellm.compiler.bundle_writer import write_bundle
from edgellm.devices.targets import host_target
from edgellm.errors import EdgeLLMError, ModelFormatError
from edgellm.runtime.backend import NumpyBackend
from edgellm.runtime.bundle import STAMP, BundleStore, load_bundle
from edgellm.runtime.loader import load_model

from tinymodels import TinySpec, write_tiny_gguf

HOST = host_target().name
OTHER = "rpi5" if host_target().arch == "x86_64" else "x86-64"
TEXTS = ["Hello, world!", "  the cat sat on the mat\n\tthere", "ünïcödé — 12345 ∑", "<|im_start|>user\nhi<|im_end|>"]


def logits(model, tokens) -> np.ndarray:
    be = NumpyBackend(model.config, model.weights)
    return be.forward(np.asarray(tokens), 0, be.new_cache(64), all_logits=True)


def assert_same_tensors(src, bundle) -> None:
    assert sorted(src.weights.names()) == sorted(bundle.weights.names())
    for n in src.weights.names():
        a, b = src.weights.raw(n), bundle.weights.raw(n)
        assert a.dtype == b.dtype and a.shape == b.shape, n
        assert a.tobytes() == b.tobytes(), f"{n}: stored bytes differ"
        assert src.weights.info(n) == bundle.weights.info(n), n


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A Q4_1 tiny model (the SmolLM2 type: block minimums feed the activation rounding) and its bundle."""
    d = tmp_path_factory.mktemp("tiny")
    src = load_model(write_tiny_gguf(d / "tiny.gguf", TinySpec(qtype="Q4_1", n_layers=3)))
    out = write_bundle(src, d / "bundle", HOST)
    return src, out


@pytest.mark.parametrize("spec", [
    TinySpec(qtype="F32"), TinySpec(qtype="F16"), TinySpec(qtype="BF16"), TinySpec(qtype="Q8_0"),
    TinySpec(qtype="Q4_0"), TinySpec(qtype="Q5_0"), TinySpec(qtype="Q5_1"),
    TinySpec(arch="qwen2", qtype="Q8_0", tied=True), TinySpec(arch="mistral", qtype="Q4_1", n_kv_heads=1),
], ids=lambda s: f"{s.arch}-{s.qtype}{'-tied' if s.tied else ''}")
def test_bundle_round_trip_is_exact(spec, tmp_path):
    src = load_model(write_tiny_gguf(tmp_path / "m.gguf", spec))
    b = load_bundle(write_bundle(src, tmp_path / "b", HOST))
    assert b.format == "bundle" and b.config == src.config
    assert_same_tensors(src, b)
    for n in src.weights.names():
        np.testing.assert_array_equal(src.weights.get(n), b.weights.get(n), err_msg=n)
    toks = [5, 60, 70, 80, 90, 100, 7]
    np.testing.assert_array_equal(logits(src, toks), logits(b, toks))
    js = [0, 31, 32, spec.ffn_dim - 1]
    np.testing.assert_array_equal(b.weights.down_columns(1, js), src.weights.get("blk.1.ffn_down.weight")[:, js])


def test_tiny_bundle_logits_tokenizer_and_metadata(tiny):
    src, out = tiny
    b = load_bundle(out)
    assert_same_tensors(src, b)
    toks = src.tokenizer.encode("the cat and the hat")
    np.testing.assert_allclose(logits(b, toks), logits(src, toks), rtol=1e-6, atol=0)
    ids = [i for t in TEXTS for i in src.tokenizer.encode(t)]
    assert b.tokenizer.decode(ids) == src.tokenizer.decode(ids)
    assert b.tokenizer._hf is None, "decoding ids must not build tokenizer.json's tokenizer (load-time cost)"
    for t in TEXTS:
        assert b.tokenizer.encode(t) == src.tokenizer.encode(t)
        assert b.tokenizer.decode(src.tokenizer.encode(t)) == src.tokenizer.decode(src.tokenizer.encode(t))
    for attr in ("bos_id", "eos_id", "eog_ids", "add_bos", "add_eos", "tokens", "token_types", "chat_template"):
        assert getattr(b.tokenizer, attr) == getattr(src.tokenizer, attr), attr
    assert b.metadata["general.name"] == src.metadata["general.name"]


def test_layers_are_page_aligned_regions_in_order(tiny):
    src, out = tiny
    m = json.loads((out / "manifest.json").read_text())
    w = m["weights"]
    assert w["alignment"] == 4096 and w["ffn_bundled"] is True
    spans = [(w["regions"]["embed"]["offset"], w["regions"]["embed"]["nbytes"], "embed")]
    spans += [(w["layers"][str(i)]["offset"], w["layers"][str(i)]["nbytes"], f"blk.{i}")
              for i in range(src.config.n_layers)]
    spans.append((w["regions"]["output"]["offset"], w["regions"]["output"]["nbytes"], "output"))
    assert [s[2] for s in sorted(spans)] == [s[2] for s in spans]  # embed, layers in order, output
    size = (out / "weights.bin").stat().st_size
    for (off, n, name), nxt in zip(spans, spans[1:] + [(size, 0, "end")]):
        assert off % 4096 == 0, name
        assert off + n <= nxt[0], f"{name} overlaps {nxt[2]}"
    for name, t in w["tensors"].items():  # every tensor lies inside its own region
        region = w["layers"][name.split(".")[1]] if name.startswith("blk.") else w["regions"][t["region"]]
        if "offset" in t:
            assert region["offset"] <= t["offset"] and t["offset"] + t["nbytes"] <= region["offset"] + region["nbytes"]
            assert t["offset"] % 64 == 0
    for i in range(src.config.n_layers):
        ffn = w["layers"][str(i)]["ffn"]
        r = ffn["records"]
        lay = w["layers"][str(i)]
        assert lay["offset"] <= r["offset"] and r["offset"] + r["count"] * r["stride"] <= lay["offset"] + lay["nbytes"]


def test_a_neuron_is_one_contiguous_byte_range(tiny):
    src, out = tiny
    b = load_bundle(out)
    store: BundleStore = b.weights
    data = (out / "weights.bin").read_bytes()
    for layer in (0, 2):
        ffn = store.ffn_layout(layer)
        g, u, d = ffn["gate"], ffn["up"], ffn["down"]
        # the record is exactly gate row + up row + down column, with no gap
        assert (g["at"], u["at"], d["at"]) == (0, g["nbytes"], g["nbytes"] + u["nbytes"])
        assert ffn["records"]["stride"] == g["nbytes"] + u["nbytes"] + d["nbytes"]
        p = f"blk.{layer}."
        down = src.weights.get(p + "ffn_down.weight")
        for j in (0, 1, 31, 32, src.config.ffn_dim - 1):
            off, n = store.neuron_span(layer, j)
            assert n == ffn["records"]["stride"]
            assert store.neuron_span(layer, j + 1)[0] == off + n if j + 1 < src.config.ffn_dim else True
            rec = data[off:off + n]
            assert rec[:g["nbytes"]] == src.weights.raw(p + "ffn_gate.weight")[j].tobytes()
            assert rec[u["at"]:u["at"] + u["nbytes"]] == src.weights.raw(p + "ffn_up.weight")[j].tobytes()
            # the down column is computed from this record's bytes (plus the layer's shared scales) alone
            np.testing.assert_array_equal(store.down_columns(layer, [j])[:, 0], down[:, j])
        js = [3, 64, 127, 5]
        np.testing.assert_array_equal(store.down_columns(layer, js), down[:, js])


def test_down_columns_come_from_the_records(tiny, tmp_path):
    """Zero one neuron's down bytes in weights.bin: exactly that column changes."""
    src, out = tiny
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    store = load_bundle(copy, verify=False).weights
    off, _ = store.neuron_span(1, 40)
    d = store.ffn_layout(1)["down"]
    with open(copy / "weights.bin", "r+b") as f:
        f.seek(off + d["at"])
        f.write(b"\0" * d["nbytes"])
    changed = load_bundle(copy, verify=False).weights.get("blk.1.ffn_down.weight")
    diff = np.nonzero((changed != src.weights.get("blk.1.ffn_down.weight")).any(axis=0))[0]
    assert diff.tolist() == [40]


@pytest.mark.parametrize("victim", ["weights.bin", "tokenizer.json", "kernels/lib.so"])
def test_corrupt_byte_is_refused_naming_the_file(tiny, tmp_path, victim):
    src, _ = tiny
    (tmp_path / "lib.so").write_bytes(b"\x7fELF" + bytes(100))
    out = write_bundle(src, tmp_path / "b", HOST, extra_files={"kernels/lib.so": tmp_path / "lib.so"})
    load_bundle(out)
    f = out / victim
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError) as e:
        load_bundle(out)
    assert victim in str(e.value) and "sha256" in str(e.value) and "re-copy the bundle" in str(e.value)


def test_truncated_and_missing_files_are_refused(tiny, tmp_path):
    src, out = tiny
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    with open(copy / "weights.bin", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(ModelFormatError, match="weights.bin has 4096 bytes"):
        load_bundle(copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError, match="tokenizer.json is missing"):
        load_bundle(copy, verify=True)


def test_bundle_without_a_token_list_reads_the_texts_from_tokenizer_json(tiny, tmp_path):
    """Bundles written before tokenizer_config.json listed the token texts still load with the same tokens."""
    src, out = tiny
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    tc = copy / "tokenizer_config.json"
    config = json.loads(tc.read_text())
    del config["edgellm"]["tokens"]
    tc.write_text(json.dumps(config))
    tok = load_bundle(copy, verify=False).tokenizer
    assert tok.tokens == src.tokenizer.tokens and tok.decode(range(40)) == src.tokenizer.decode(range(40))
    config["edgellm"]["tokens"] = src.tokenizer.tokens[:-1]
    tc.write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="token list has .* entries, vocab_size is"):
        load_bundle(copy, verify=False)


@pytest.mark.parametrize("space", [False, True])
def test_tokenizer_json_merges_are_strings_unless_a_part_has_a_space(space):
    """String merges load with ~20 MB less peak memory; a part with a space keeps the pair form (still loadable)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models
    b = " b" if space else "b"
    spaced = [(" ", "b")] if space else []
    hf = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1, "a" + b: 2, "c": 3, " ": 4, " b": 5}, merges=spaced + [("a", b)]))
    text = bundle_writer._tokenizer_json(hf)
    assert json.loads(text)["model"]["merges"] == ([[" ", "b"], ["a", b]] if space else ["a b"])
    again = HFTokenizer.from_str(text)
    assert again.encode(f"ca{b}a").ids == hf.encode(f"ca{b}a").ids == [3, 2, 0]


def _count_hashing(monkeypatch) -> list[str]:
    from edgellm.runtime import bundle
    hashed, real = [], bundle.sha256_file
    monkeypatch.setattr(bundle, "sha256_file", lambda f: hashed.append(f.name) or real(f))
    return hashed


def _flip_byte_keep_mtime(f: Path) -> None:
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))   # same size and mtime; ctime still moves


def test_verified_bundle_skips_hashing_until_a_file_changes(tiny, tmp_path, monkeypatch):
    _, out = tiny
    copy = tmp_path / "b"
    shutil.copytree(out, copy)   # copies the stamp too: a copy is new files (inode, ctime) and is hashed again
    hashed = _count_hashing(monkeypatch)
    load_bundle(copy)
    assert "weights.bin" in hashed and (copy / STAMP).is_file()
    hashed.clear()
    load_bundle(copy)
    assert hashed == []
    load_bundle(copy, verify_full=True)
    assert "weights.bin" in hashed
    _flip_byte_keep_mtime(copy / "tokenizer.json")
    with pytest.raises(ModelFormatError, match="tokenizer.json fails its sha256"):
        load_bundle(copy)
    with pytest.raises(ModelFormatError, match="tokenizer.json fails its sha256"):
        load_bundle(copy)   # a failed check leaves no stamp behind


def test_damaged_stamp_means_a_full_check(tiny, tmp_path, monkeypatch):
    _, out = tiny
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    load_bundle(copy)
    hashed = _count_hashing(monkeypatch)
    (copy / STAMP).write_text("{not json")
    load_bundle(copy)
    assert "weights.bin" in hashed and json.loads((copy / STAMP).read_text())["weights.bin"][0] > 0


def test_stamp_of_a_read_only_bundle_goes_to_the_user_cache(tiny, tmp_path, monkeypatch):
    from edgellm.runtime import bundle
    _, out = tiny
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    (copy / STAMP).unlink(missing_ok=True)
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bundle, "STAMP", "weights.bin/stamp")   # unwritable even for root
    hashed = _count_hashing(monkeypatch)
    load_bundle(copy)
    assert "weights.bin" in hashed and len(list((tmp_path / "cache" / "verified").iterdir())) == 1
    hashed.clear()
    load_bundle(copy)
    assert hashed == []
    _flip_byte_keep_mtime(copy / "weights.bin")
    with pytest.raises(ModelFormatError, match="weights.bin fails its sha256"):
        load_bundle(copy)


def test_unknown_schema_version_is_refused(tiny, tmp_path):
    _, out = tiny
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelFormatError) as e:
        load_bundle(copy)
    assert "schema version 99" in str(e.value) and "reads schema version(s) 1" in str(e.value)


def test_not_a_bundle(tmp_path):
    with pytest.raises(ModelFormatError, match="no manifest.json"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_bundle(tmp_path)


def test_bundle_for_another_target_is_refused(tiny, tmp_path):
    src, _ = tiny
    out = write_bundle(src, tmp_path / "b", OTHER)
    with pytest.raises(EdgeLLMError) as e:
        load_bundle(out)
    msg = str(e.value)
    assert OTHER in msg and HOST in msg and "allow_target_mismatch=True" in msg and "--target" in msg
    b = load_bundle(out, allow_target_mismatch=True)  # the weights still run on the numpy backend
    assert_same_tensors(src, b)
    assert json.loads((out / "manifest.json").read_text())["target"]["tvm_target"]["mcpu"] == "cortex-a76" \
        or OTHER == "x86-64"


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_interrupted_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    src, _ = tiny
    real = bundle_writer.write_layer

    def fail_on_layer_1(w, i, names):
        if i == 1:
            raise KeyboardInterrupt("simulated interruption")
        return real(w, i, names)

    monkeypatch.setattr(bundle_writer, "write_layer", fail_on_layer_1)
    with pytest.raises(KeyboardInterrupt):
        write_bundle(src, tmp_path / "b", HOST)
    assert not (tmp_path / "b").exists() and _leftovers(tmp_path, "b") == []


def test_failed_write_keeps_the_old_bundle_and_success_replaces_it(tiny, tmp_path, monkeypatch):
    src, _ = tiny
    out = write_bundle(src, tmp_path / "b", HOST)
    before = (out / "manifest.json").read_text()

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(bundle_writer, "_tokenizer_files", boom)
    with pytest.raises(OSError, match="disk full"):
        write_bundle(src, out, HOST, extra_files={"onnx": tmp_path})
    assert (out / "manifest.json").read_text() == before and _leftovers(tmp_path, "b") == []
    load_bundle(out)
    monkeypatch.undo()
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "decode.onnx").write_bytes(b"graph")
    write_bundle(src, out, HOST, extra_files={"onnx": tmp_path / "g"})
    m = json.loads((out / "manifest.json").read_text())
    assert {"onnx/decode.onnx", "weights.bin", "tokenizer.json", "tokenizer_config.json"} <= {f["path"] for f in m["files"]}
    assert _leftovers(tmp_path, "b") == []
    load_bundle(out)


def test_runtime_loader_never_imports_the_compiler(tiny):
    import subprocess
    import sys
    _, out = tiny
    code = ("import sys; from edgellm.runtime.bundle import load_bundle; load_bundle(sys.argv[1]); "
            "print(' '.join(m for m in sys.modules if m.startswith(('edgellm.compiler', 'onnx', 'tvm'))))")
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""


# ---- the real model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_bundle(smollm2_path, tmp_path_factory):
    src = load_model(smollm2_path)
    out = write_bundle(src, tmp_path_factory.mktemp("smol") / "smollm2.bundle", HOST)
    return src, out


@pytest.mark.slow
def test_smollm2_bundle_matches_the_gguf(smollm2_bundle):
    src, out = smollm2_bundle
    b = load_bundle(out)
    assert b.config == src.config
    assert_same_tensors(src, b)
    size = (out / "weights.bin").stat().st_size
    assert size < 1.02 * sum(src.weights.info(n).nbytes for n in src.weights.names()) + 64 * 4096
    for t in TEXTS:
        assert b.tokenizer.encode(t) == src.tokenizer.encode(t), t
    assert b.tokenizer.chat_template == src.tokenizer.chat_template and b.tokenizer.eog_ids == src.tokenizer.eog_ids
    toks = src.tokenizer.encode("Once upon a time")
    np.testing.assert_allclose(logits(b, toks), logits(src, toks), rtol=1e-6, atol=0)
    store = b.weights
    for layer in (0, 29):
        np.testing.assert_array_equal(store.down_columns(layer, [0, 777, 1535]),
                                      src.weights.get(f"blk.{layer}.ffn_down.weight")[:, [0, 777, 1535]])


class _SwapFFN:
    """A weight store whose FFN tensors are replaced by random blocks of another type (K-quants,
    which the tiny-model writer cannot quantize): the layout must not care what the bits mean."""

    def __init__(self, base, qtype, seed=0):
        from gguf import GGML_QUANT_SIZES

        from edgellm.runtime.weights import TensorInfo
        self.base, self.infos, self.arrays = base, {}, {}
        rng = np.random.default_rng(seed)
        block, tsize = GGML_QUANT_SIZES[qtype]
        for n in base.names():
            if ".ffn_" in n and n.endswith(("gate.weight", "up.weight", "down.weight")):
                rows, cols = base.info(n).shape
                raw = rng.integers(0, 256, (rows, cols // block * tsize), dtype=np.uint8)
                self.infos[n] = TensorInfo(n, qtype, (rows, cols), raw.size)
                self.arrays[n] = raw

    def info(self, n):
        return self.infos.get(n) or self.base.info(n)

    def names(self):
        return self.base.names()

    def __contains__(self, n):
        return n in self.base

    def raw(self, n):
        return self.arrays[n] if n in self.arrays else self.base.raw(n)

    def get(self, n):
        from edgellm.runtime.weights import dequantize
        i = self.info(n)
        return dequantize(self.raw(n), i.qtype, i.shape) if n in self.arrays else self.base.get(n)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random scale bits include fp16 NaN/inf
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"])
def test_k_quant_ffn_bundles_exactly(qtype, tmp_path):
    import dataclasses

    from gguf import GGMLQuantizationType
    src = load_model(write_tiny_gguf(tmp_path / "m.gguf", TinySpec(dim=256, n_heads=4, ffn_dim=512, n_layers=1)))
    src = dataclasses.replace(src, weights=_SwapFFN(src.weights, GGMLQuantizationType[qtype]))
    b = load_bundle(write_bundle(src, tmp_path / "b", HOST))
    assert_same_tensors(src, b)
    down = src.weights.get("blk.0.ffn_down.weight")  # random scales: NaN/inf compare equal by position
    js = [0, 1, 255, 256, 300, 511]
    np.testing.assert_array_equal(b.weights.down_columns(0, js), down[:, js])
    bits = json.loads((tmp_path / "b" / "manifest.json").read_text())["weights"]["down_bits"][qtype]
    assert len(bits["element_bits"]) == 256 and len(bits["element_bits"][0]) == int(qtype[1])


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_hugging_face_source_bundles_exactly(dtype, tmp_path):
    from test_hf_loader import _bf16_bits, hf_config, hf_weights, write_hf_dir, write_safetensors_by_hand
    tok = load_model(write_tiny_gguf(tmp_path / "t.gguf")).tokenizer
    w = hf_weights(3, bias=True)
    d = write_hf_dir(tmp_path / "hf", w if dtype == "F32" else None, hf_config("qwen2"),
                     tokenizer__json=tok.hf.to_str(),
                     tokenizer_config__json=json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    if dtype == "BF16":
        write_safetensors_by_hand(d / "model.safetensors",
                                  {k: ("BF16", v.shape, _bf16_bits(v).tobytes()) for k, v in w.items()})
    src = load_model(d)
    b = load_bundle(write_bundle(src, tmp_path / "b", HOST))
    assert b.config == src.config and b.config.attn_bias
    assert_same_tensors(src, b)
    for n in src.weights.names():
        np.testing.assert_array_equal(src.weights.get(n), b.weights.get(n), err_msg=n)
    toks = [1, 2, 3, 200, 100]
    np.testing.assert_array_equal(logits(b, toks), logits(src, toks))
    assert b.tokenizer.chat_template == src.tokenizer.chat_template
    for t in TEXTS:
        assert b.tokenizer.encode(t) == src.tokenizer.encode(t)


def test_manifest_file_entries_cannot_escape_the_bundle(tiny, tmp_path):
    _, out = tiny
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["files"].append({"path": "../outside", "bytes": 0, "sha256": "0" * 64})
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelFormatError, match="malformed files entry"):
        load_bundle(copy)
