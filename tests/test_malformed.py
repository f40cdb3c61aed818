"""open_gguf on valid files (same result as gguf.GGUFReader, fast) and on damaged ones (a clear
EdgeLLMError, quickly, without a big allocation). Damaged files are valid GGUFWriter output with
bytes patched at offsets located by GGUFReader, so the corruptions do not depend on our parser."""
from __future__ import annotations

import os
import random
import resource
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter, quants

from edgellm.errors import EdgeLLMError, ModelFormatError, UnsupportedModelError
from edgellm.runtime.gguf_file import open_gguf

REPO = Path(__file__).resolve().parent.parent


def write_gguf(path: Path, *, endian: GGUFEndian = GGUFEndian.LITTLE, tensors: bool = True,
               extra_kv=None) -> Path:
    """A small valid GGUF: a few KV pairs of each kind and two 2-D tensors (F32 and Q8_0)."""
    w = GGUFWriter(str(path), "llama", endianess=endian)
    w.add_string("general.name", "tiny test model")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b", "héllo", ""])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, -2.25, 3.0, 1e-3])
    w.add_key_value("tokenizer.ggml.token_type", [1, 2, 3, 4, 5], GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT16)
    w.add_uint64("test.u64", 2 ** 40 + 3)
    w.add_float64("test.f64", 1 / 3)
    w.add_int8("test.i8", -7)
    for k, v in (extra_kv or {}).items():
        w.add_uint32(k, v)
    if tensors:
        rng = np.random.default_rng(0)
        w.add_tensor("a.weight", rng.standard_normal((3, 8), dtype=np.float32))
        q = quants.quantize(rng.standard_normal((2, 64), dtype=np.float32), GGMLQuantizationType.Q8_0)
        w.add_tensor("b.weight", q, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def good(tmp_path) -> Path:
    return write_gguf(tmp_path / "good.gguf")


def layout(path: Path) -> dict:
    """Byte offsets of the fields we corrupt, found by the gguf library's own reader."""
    r = GGUFReader(path)
    kv = {k: f.offset for k, f in r.fields.items() if not k.startswith("GGUF.")}
    ti = {}
    for t in r.tensors:
        at = t.field.offset
        n_dims_at = at + 8 + len(t.name.encode())
        dims_at = n_dims_at + 4
        type_at = dims_at + 8 * len(t.shape)
        ti[t.name] = dict(at=at, n_dims=n_dims_at, dims=dims_at, type=type_at, offset=type_at + 4,
                          data=t.data_offset, nbytes=t.n_bytes)
    return dict(kv=kv, tensors=ti, data_start=r.data_offset, size=path.stat().st_size)


def patch(path: Path, at: int, fmt: str, *values) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, at, *values)
    path.write_bytes(bytes(data))
    return path


def truncate(path: Path, size: int) -> Path:
    path.write_bytes(path.read_bytes()[:size])
    return path


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def open_guarded(path, timeout: float = 5.0):
    """open_gguf in a thread: returns (result or exception); fails on a hang or a big allocation."""
    box: dict = {}

    def run():
        try:
            box["result"] = open_gguf(path)
        except BaseException as e:  # noqa: BLE001 - we inspect whatever comes out
            box["error"] = e

    before = maxrss_mb()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"open_gguf({path}) did not finish within {timeout} s"
    assert maxrss_mb() - before < 200, "open_gguf allocated more than 200 MB on a small file"
    return box.get("error", box.get("result"))


def expect(path, exc_type, *phrases):
    err = open_guarded(path)
    assert isinstance(err, exc_type), f"expected {exc_type.__name__}, got {err!r}"
    msg = str(err)
    for p in phrases:
        assert p in msg, f"{p!r} not in message: {msg}"
    assert err.fix, "the error must say how to fix it"
    return msg


# ---------------------------------------------------------------- valid files: same as GGUFReader

def assert_same_as_reader(path: Path, g=None):
    g = g or open_gguf(path)
    r = GGUFReader(path)
    ref = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(g.metadata) == list(ref)
    for k, v in ref.items():
        assert g.metadata[k] == v and type(g.metadata[k]) is type(v), k
    assert g.version == int(r.fields["GGUF.version"].contents())
    assert list(g.store.names()) == [t.name for t in r.tensors]
    for t in r.tensors:
        info = g.store.info(t.name)
        assert info.qtype == t.tensor_type
        assert info.shape == tuple(reversed(t.shape.tolist()))
        assert info.nbytes == t.n_bytes
        a = g.store.raw(t.name)
        assert a.dtype == t.data.dtype and a.shape == t.data.shape
        assert np.array_equal(a, t.data)


@pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_small_file_matches_gguf_reader(tmp_path, endian):
    path = write_gguf(tmp_path / "m.gguf", endian=endian)
    assert_same_as_reader(path)
    g = open_gguf(path)
    assert g.metadata["tokenizer.ggml.tokens"][3] == "héllo"
    assert g.metadata["test.u64"] == 2 ** 40 + 3
    np.testing.assert_allclose(g.store.get("b.weight"), quants.dequantize(g.store.raw("b.weight"),
                                                                          GGMLQuantizationType.Q8_0))
    assert g.store.info("b.weight").shape == (2, 64)


def test_more_tensor_types_match_gguf_reader(tmp_path):
    path = tmp_path / "types.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    rng = np.random.default_rng(1)
    w.add_tensor("f16", rng.standard_normal((4, 5)).astype(np.float16))
    w.add_tensor("i32", np.arange(7, dtype=np.int32))
    w.add_tensor("bf16", quants.quantize(rng.standard_normal((2, 3, 4), dtype=np.float32), GGMLQuantizationType.BF16),
                 raw_dtype=GGMLQuantizationType.BF16)
    w.add_tensor("q4_1", quants.quantize(rng.standard_normal((3, 64), dtype=np.float32), GGMLQuantizationType.Q4_1),
                 raw_dtype=GGMLQuantizationType.Q4_1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert_same_as_reader(path)


def test_file_without_tensors_opens(tmp_path):
    path = write_gguf(tmp_path / "vocab.gguf", tensors=False)
    g = open_gguf(path)
    assert list(g.store.names()) == [] and g.metadata["llama.block_count"] == 2
    assert_same_as_reader(path, g)


@pytest.fixture(scope="module")
def smollm2(request) -> Path:
    env = os.environ.get("EDGELLM_TEST_MODEL")
    if env:
        return Path(env)
    return request.getfixturevalue("smollm2_path")


@pytest.mark.slow
def test_smollm2_opens_and_matches_gguf_reader(smollm2):
    g = open_gguf(smollm2)
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 49152
    assert_same_as_reader(smollm2, g)


# ---------------------------------------------------------------- the path itself

def test_nonexistent_path(tmp_path):
    expect(tmp_path / "nope.gguf", ModelFormatError, "does not exist")


def test_directory(tmp_path):
    expect(tmp_path, ModelFormatError, "is a directory")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    expect(p, ModelFormatError, "is empty")


def test_wrong_magic(good):
    patch(good, 0, "4s", b"GGML")
    expect(good, ModelFormatError, "not a GGUF file", "b'GGML'")


def test_git_lfs_pointer(tmp_path):
    p = tmp_path / "lfs.gguf"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 98362432\n")
    expect(p, ModelFormatError, "Git LFS", "git lfs pull")


@pytest.mark.parametrize("version", [1, 4, 0xFFFF])
def test_unsupported_version(good, version):
    patch(good, 4, "<I", version)
    expect(good, ModelFormatError, f"GGUF version {version}", "only versions 2, 3")


@pytest.mark.parametrize("size", [3, 7, 12, 23])
def test_truncated_header(good, size):
    expect(truncate(good, size), ModelFormatError, "truncated")


# ---------------------------------------------------------------- header counts and the KV section

@pytest.mark.parametrize("field,at", [("metadata pairs", 16), ("tensors", 8)])
@pytest.mark.parametrize("count", [2 ** 60, 2 ** 64 - 1, 10 ** 6])
def test_absurd_counts(good, field, at, count):
    expect(patch(good, at, "<Q", count), ModelFormatError, f"claims {count} {field}", "corrupt")


def test_truncated_kv_section(good):
    lay = layout(good)
    cut = lay["kv"]["tokenizer.ggml.tokens"] + 30
    expect(truncate(good, cut), ModelFormatError, "truncated")


def test_string_length_beyond_end_of_file(good):
    at = layout(good)["kv"]["general.name"] + 8 + len("general.name") + 4
    expect(patch(good, at, "<Q", 10 ** 6), ModelFormatError, "'general.name'", "claims 1000000 bytes")


def test_absurd_key_length(good):
    expect(patch(good, layout(good)["kv"]["general.name"], "<Q", 2 ** 62), ModelFormatError,
           f"claims {2 ** 62} bytes")


@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.scores"])
def test_absurd_array_length(good, key):
    at = layout(good)["kv"][key] + 8 + len(key) + 4 + 4
    expect(patch(good, at, "<Q", 2 ** 60), ModelFormatError, key, f"claims {2 ** 60} elements")


def test_unknown_value_type(good):
    at = layout(good)["kv"]["llama.block_count"] + 8 + len("llama.block_count")
    expect(patch(good, at, "<I", 77), ModelFormatError, "unknown value type id 77")


def test_nested_array_rejected(good):
    at = layout(good)["kv"]["tokenizer.ggml.scores"] + 8 + len("tokenizer.ggml.scores") + 4
    expect(patch(good, at, "<I", 9), ModelFormatError, "array of arrays")


def test_duplicate_key(good):
    # "test.u64" -> "test.f64" in place: the file then holds the key twice
    at = layout(good)["kv"]["test.u64"] + 8
    expect(patch(good, at, "8s", b"test.f64"), ModelFormatError, "'test.f64' appears twice")


def test_bad_alignment(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", extra_kv={"general.alignment": 3})
    expect(path, ModelFormatError, "general.alignment", "power of two")


# ---------------------------------------------------------------- tensor infos

def test_too_many_dims(good):
    expect(patch(good, layout(good)["tensors"]["a.weight"]["n_dims"], "<I", 5), ModelFormatError,
           "'a.weight' has 5 dimensions", "1 to 4")


def test_huge_n_dims(good):
    expect(patch(good, layout(good)["tensors"]["a.weight"]["n_dims"], "<I", 2 ** 31), ModelFormatError,
           "dimensions")


def test_zero_dim(good):
    expect(patch(good, layout(good)["tensors"]["b.weight"]["dims"] + 8, "<Q", 0), ModelFormatError,
           "zero-sized dimension")


def test_huge_dim(good):
    expect(patch(good, layout(good)["tensors"]["a.weight"]["dims"] + 8, "<Q", 2 ** 40), ModelFormatError,
           "'a.weight'", "more than the whole file")


def test_element_count_overflow(good):
    at = layout(good)["tensors"]["a.weight"]["dims"]
    expect(patch(good, at, "<QQ", 2 ** 32, 2 ** 32), ModelFormatError, "overflows")


def test_row_not_multiple_of_block(good):
    # Q8_0 rows of 64 -> 16 values x 8 rows: same bytes, but rows no longer whole blocks of 32
    at = layout(good)["tensors"]["b.weight"]["dims"]
    expect(patch(good, at, "<QQ", 16, 8), ModelFormatError, "not a multiple of the Q8_0 block size 32")


@pytest.mark.parametrize("type_id", [4, 200, 2 ** 32 - 1])
def test_unknown_tensor_type(good, type_id):
    msg = expect(patch(good, layout(good)["tensors"]["b.weight"]["type"], "<I", type_id),
                 UnsupportedModelError, f"ggml type id {type_id}")
    assert "pip install -U gguf" in msg


def test_duplicate_tensor_names(good):
    expect(patch(good, layout(good)["tensors"]["b.weight"]["at"] + 8, "1s", b"a"), ModelFormatError,
           "'a.weight' appears twice")


def test_misaligned_offset(good):
    t = layout(good)["tensors"]["b.weight"]
    offset = t["data"] - layout(good)["data_start"]
    expect(patch(good, t["offset"], "<Q", offset + 1), ModelFormatError, "not a multiple of the alignment 32")


def test_overlapping_tensors(good):
    expect(patch(good, layout(good)["tensors"]["b.weight"]["offset"], "<Q", 0), ModelFormatError, "overlap")


def test_offset_beyond_end(good):
    expect(patch(good, layout(good)["tensors"]["b.weight"]["offset"], "<Q", 2 ** 62), ModelFormatError,
           "'b.weight'", "truncated")


# ---------------------------------------------------------------- truncated tensor data

def test_truncated_tensor_data(good):
    b = layout(good)["tensors"]["b.weight"]
    expect(truncate(good, b["data"] + b["nbytes"] - 10), ModelFormatError, "'b.weight'", "tensor data is truncated")


def test_file_ends_exactly_before_data_section(good):
    expect(truncate(good, layout(good)["data_start"]), ModelFormatError,
           "before its tensor data section", "all tensor data is missing")


def test_file_ends_after_tensor_infos_before_padding(good):
    lay = layout(good)
    end_of_infos = lay["tensors"]["b.weight"]["offset"] + 8
    assert end_of_infos < lay["data_start"]  # GGUFWriter padded this file
    expect(truncate(good, end_of_infos), ModelFormatError, "before its tensor data section")


def test_every_prefix_of_the_header_fails_cleanly(good):
    data = good.read_bytes()
    bad = good.with_name("prefix.gguf")
    for size in range(layout(good)["data_start"] + 1):
        bad.write_bytes(data[:size])
        with pytest.raises(ModelFormatError):
            open_gguf(bad)


def test_random_header_corruption_never_crashes(good):
    """Any flipped byte in the header and tensor infos gives a valid file or an EdgeLLMError."""
    data = good.read_bytes()
    end = layout(good)["data_start"]
    rng = random.Random(1234)
    bad = good.with_name("fuzz.gguf")
    for _ in range(300):
        b = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 4])):
            b[rng.randrange(end)] = rng.randrange(256)
        bad.write_bytes(bytes(b))
        try:
            open_gguf(bad)
        except EdgeLLMError:
            pass


# ---------------------------------------------------------------- the CLI

def test_cli_inspect_bad_file_exits_2_without_traceback(good):
    patch(good, 8, "<Q", 2 ** 60)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "edgellm", "inspect", str(good)], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "tensors" in lines[0] and "corrupt" in lines[0]
