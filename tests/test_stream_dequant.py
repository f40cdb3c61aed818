"""The streaming dequantizers (edgellm.runtime.memory.dequant) against gguf's own dequantization.

Streamed weights are dequantized on every token, so these fast paths must give exactly the floats
gguf gives (the streamed logits are then bit-identical to the reference: test_streaming.py).
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from edgellm.runtime.act_quant import MIN_TYPES, block_mins
from edgellm.runtime.memory import dequant
from edgellm.runtime.memory.dequant import down_columns, dequantize_rows, down_scales, element_bits, shared_is_header

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0]


def quantized(qtype, rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.random((rows, 1)) * 3).astype(np.float32)
    w[0, :32] = 0.0                                  # an all-zero block: d = 0
    w[1, :32] *= 1e-6                                # tiny scales: fp16 subnormals
    raw = quants.quantize(w, qtype)
    return raw, quants.dequantize(raw, qtype).reshape(rows, cols)


@pytest.fixture(params=[8192, 3], ids=["one-chunk", "many-chunks"])
def chunk(request, monkeypatch):
    monkeypatch.setattr(dequant, "CHUNK", request.param)
    return request.param


@pytest.mark.parametrize("qtype", TYPES + [Q.Q5_0, Q.Q5_1])
def test_rows_equal_gguf(qtype, chunk):
    raw, ref = quantized(qtype, 12, 96)
    assert np.array_equal(dequantize_rows(raw, qtype, (12, 96)), ref)
    big = np.full((20, 96), np.nan, np.float32)
    mins = np.empty((7, 3), np.float32) if qtype in MIN_TYPES else None
    got = dequantize_rows(raw[3:10], qtype, (7, 96), out=big[5:12], mins=mins)
    assert np.shares_memory(got, big)
    assert np.array_equal(big[5:12], ref[3:10]) and np.isnan(big[:5]).all() and np.isnan(big[12:]).all()
    if mins is not None:
        assert np.array_equal(mins, block_mins(raw[3:10], qtype, 7))


def column_bytes(raw, qtype, rows, ids):
    """Each neuron's ffn_down column as the bundle stores it: its element bits in row order, packed."""
    size = quants.GGML_QUANT_SIZES[qtype][1]
    bits = np.unpackbits(raw.reshape(rows, -1, size), axis=2, bitorder="little")      # [rows, blocks, bits]
    eb = np.asarray(element_bits(qtype))
    col = bits[np.arange(rows)[:, None, None], (ids // 32)[None, :, None], eb[ids % 32][None]]   # [rows, k, b]
    return np.packbits(col.transpose(1, 0, 2).reshape(len(ids), -1), axis=1, bitorder="little")


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("which", ["all", "partial head", "partial both ends", "inside one block", "scattered", "one"])
def test_down_columns_equal_gguf(qtype, which, chunk):
    rows, ffn = 10, 160
    raw, ref = quantized(qtype, rows, ffn, seed=1)
    ids = {"all": np.arange(ffn), "partial head": np.arange(12, ffn), "partial both ends": np.arange(40, 150),
           "inside one block": np.arange(35, 60), "one": np.array([77]),
           "scattered": np.sort(np.random.default_rng(2).choice(ffn, 70, replace=False))}[which]
    size, head = dequant._LAYOUT[qtype]
    hdr = raw.reshape(rows, -1, size)[:, :, :head]
    d, m = down_scales(np.ascontiguousarray(hdr).reshape(-1), qtype, rows, ffn // 32)
    cols = column_bytes(raw, qtype, rows, ids)
    assert np.array_equal(down_columns(cols, ids, qtype, rows, d, m), ref[:, ids])
    big = np.full((rows, len(ids) + 9), np.nan, np.float32)
    down_columns(cols, ids, qtype, rows, d, m, out=big[:, 4:4 + len(ids)])
    assert np.array_equal(big[:, 4:4 + len(ids)], ref[:, ids]) and np.isnan(big[:, :4]).all()


def test_shared_header_layout_is_checked():
    q41 = {"shared_bits": list(range(32)), "element_bits": element_bits(Q.Q4_1)}
    assert shared_is_header(Q.Q4_1, q41)
    assert not shared_is_header(Q.Q4_1, {**q41, "shared_bits": list(range(31))})
    assert not shared_is_header(Q.Q4_0, q41)
    assert not shared_is_header(Q.Q5_0, q41)
