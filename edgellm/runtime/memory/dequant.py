"""Exact dequantization of the affine GGUF types (Q4_0, Q4_1, Q8_0) in few numpy passes, into a caller's buffer.

Streaming spends its CPU here: every streamed weight is dequantized again on every token. gguf's
dequantize_blocks splits nibbles with a broadcast shift, casts, then allocates d*q and d*q+m; this
splits the nibbles into one uint8 array, then casts into the float32 output and scales it in place.
The float arithmetic is gguf's (float32 d*q, then +m), so the values are bit-identical to it (tests
check it), and so are the logits computed from them. Other types go through gguf unchanged.

ffn_down is stored by neuron (a column per record) with its block scales kept resident separately:
`down_columns` dequantizes columns straight into ffn_down's [rows, k] layout, transposing only the
uint8 quants. Work goes in chunks of blocks small enough for a chunk's passes to stay in the L2 cache.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

from ..act_quant import block_mins
from ..bundle import TYPED
from ..weights import dequantize

BLOCK = 32
# bytes per block and where its fp16 scale d (and minimum m) sit
_LAYOUT = {Q.Q4_0: (18, 2), Q.Q4_1: (20, 4), Q.Q8_0: (34, 2)}


_F16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)   # fp16 bits -> f32


def _headers(flat: np.ndarray, n: int, size: int, head: int) -> np.ndarray:
    """[n, head/2] float32: each block's fp16 d (and m), gathered as one word per block (long loops) and widened
    through a table (exact, and faster than numpy's float16 cast)."""
    word = np.ndarray((n,), np.uint32 if head == 4 else np.uint16, flat, 0, (size,))
    return np.take(_F16, np.ascontiguousarray(word).view(np.uint16).reshape(n, head // 2))


def _column_nibbles(packed: np.ndarray, out: np.ndarray) -> None:
    """Bytes [rows/2, k] holding two rows' quants each (low nibble: the even row) -> out uint8 [rows, k]."""
    np.bitwise_and(packed, np.uint8(0x0F), out=out[0::2])
    np.right_shift(packed[:len(out) // 2], np.uint8(4), out=out[1::2])


def _block_nibbles(flat: np.ndarray, n: int, size: int, head: int, out: np.ndarray) -> None:
    """The 16 quant bytes of each of n blocks -> out uint8 [n, 32] in gguf's nibble order.

    Works on 64-bit words (8 bytes' nibbles per operation) iterated block-wise in long loops: numpy's
    per-row loops over 16-byte rows cost more than the arithmetic. Endian-neutral (byte lanes stay put).
    """
    words = np.ndarray((n, 2), np.uint64, flat, head, (size, 8)).T           # [2, n], unaligned is fine
    q = out.view(np.uint64).T                                                 # [4, n]
    mask = np.uint64(0x0F0F0F0F0F0F0F0F)
    np.bitwise_and(words, mask, out=q[:2], order="C")
    np.right_shift(words, np.uint64(4), out=q[2:], order="C")
    np.bitwise_and(q[2:], mask, out=q[2:], order="C")


def _scale(q: np.ndarray, qtype: Q, out: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> None:
    """out = d * q (+ m) in float32, as gguf computes it (Q4_0's q is recentred by 8 in int8 first).

    q, out: [r, c]; d, m: [r, c / 32] per block (widened to out's shape with np.repeat first: numpy's broadcast
    over 32-wide rows costs more than that extra pass) or already [r, c] per column.
    """
    if qtype == Q.Q4_0:
        q = q.view(np.int8)
        np.subtract(q, np.int8(8), out=q)
    elif qtype == Q.Q8_0:
        q = q.view(np.int8)
    per = out.shape[-1] // d.shape[-1]
    widen = (lambda a: a) if per == 1 else (lambda a: np.repeat(a, per, axis=-1))  # noqa: E731
    out[...] = q
    out *= widen(d)
    if m is not None:
        out += widen(m)


CHUNK = 8192      # blocks per pass: 1 MB of float32, so a chunk's few passes stay in the L2 cache


def dequantize_rows(raw: np.ndarray, qtype: Q, shape: tuple[int, ...], out: np.ndarray | None = None,
                    mins: np.ndarray | None = None) -> np.ndarray:
    """Stored bytes -> float32 `shape` (written into `out` when given), equal to weights.dequantize.

    mins: float32 [rows, blocks] to fill with the Q4_1/Q5_1 block minimums (act_quant.block_mins) on the way.
    """
    if mins is not None and qtype != Q.Q4_1:
        mins[...] = block_mins(raw, qtype, mins.shape[0])
    if qtype not in _LAYOUT:
        w = _gguf(raw, qtype, shape)
        if out is None:
            return w
        out[...] = w
        return out
    size, head = _LAYOUT[qtype]
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    n = flat.size // size
    if out is None:
        out = np.empty(shape, np.float32)
    o = out.view()
    o.shape = (n, BLOCK)                 # a view of the caller's rows, never a copy
    q = None if qtype == Q.Q8_0 else np.empty((min(n, CHUNK), BLOCK), np.uint8)
    for a in range(0, n, CHUNK):
        c = min(CHUNK, n - a)
        blocks = flat[a * size:(a + c) * size]
        if qtype == Q.Q8_0:               # the int8 quants as they are (cast straight into the output)
            qc = blocks.reshape(c, size)[:, head:]
        else:
            qc = q[:c]
            _block_nibbles(blocks, c, size, head, qc)
        dm = _headers(blocks, c, size, head)
        if mins is not None:
            mins.reshape(-1)[a:a + c] = dm[:, 1]
        _scale(qc, qtype, o[a:a + c], dm[:, :1], dm[:, 1:] if head == 4 else None)
    return out


def _gguf(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """gguf's dequantizer in one call over all blocks (its own `dequantize` splits into 16-row groups)."""
    cls = quants._type_traits.get(qtype)
    if cls is None or qtype in TYPED:
        return dequantize(raw, qtype, shape)
    cls.init_grid()
    blocks = np.ascontiguousarray(raw).reshape(-1).view(np.uint8).reshape(-1, cls.type_size)
    return np.ascontiguousarray(cls.dequantize_blocks(blocks).reshape(shape), dtype=np.float32)


def down_scales(shared: np.ndarray, qtype: Q, rows: int, n_blocks: int) -> tuple[np.ndarray, np.ndarray | None]:
    """ffn_down's block scales d [rows, blocks] (and minimums m) from shared bits that hold each block's whole
    fp16 header in order (a byte-aligned prefix of the block: see `shared_is_header`)."""
    head = _LAYOUT[qtype][1]
    dm = np.take(_F16, np.ascontiguousarray(shared[:rows * n_blocks * head]).view(np.uint16))
    dm = dm.reshape(rows, n_blocks, head // 2)
    return np.ascontiguousarray(dm[..., 0]), (np.ascontiguousarray(dm[..., 1]) if head == 4 else None)


def shared_is_header(qtype: Q, bits: dict) -> bool:
    """True when the bundle's ffn_down bit split is the gguf layout of an affine type: the shared bits are exactly the
    block header (d, m) and the element bits the quants (so columns and scales can be used without re-packing)."""
    if qtype not in _LAYOUT:
        return False
    head = _LAYOUT[qtype][1]
    return list(bits["shared_bits"]) == list(range(8 * head)) and \
        [list(e) for e in bits["element_bits"]] == element_bits(qtype)


def element_bits(qtype: Q) -> list[list[int]]:
    """The bit positions of each element's quant inside a block of the gguf layout."""
    if qtype == Q.Q8_0:
        return [[16 + 8 * e + b for b in range(8)] for e in range(BLOCK)]
    start = 8 * _LAYOUT[qtype][1]
    return [[start + 8 * (e % 16) + 4 * (e // 16) + b for b in range(4)] for e in range(BLOCK)]


def down_columns(cols: np.ndarray, ids: np.ndarray, qtype: Q, rows: int, d: np.ndarray, m: np.ndarray | None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """ffn_down columns of sorted neurons `ids` as float32 [rows, k] (into `out` when given, e.g. a column slice).

    cols: uint8 [k, column bytes], each neuron's quants (4 bits per row for Q4_*, 8 for Q8_0, row order);
    d, m: the block scales [rows, ffn/32]. Bit-identical to dequantizing the whole matrix. Works on chunks of
    rows. A run of neurons (no predictor) is laid out in whole 32-neuron blocks, so every pass is one long
    loop, and copied out when it does not fill them; scattered neurons get their scales gathered per column.
    """
    k = len(ids)
    if out is None:
        out = np.empty((rows, k), np.float32)
    if not k:
        return out
    first, last = int(ids[0]), int(ids[-1])
    run = last - first == k - 1
    if run:
        blocks, lead = slice(first // BLOCK, last // BLOCK + 1), first % BLOCK
        width = (blocks.stop - blocks.start) * BLOCK
    else:
        blocks, lead, width = ids // BLOCK, 0, k
    direct = width == k and (out.flags.c_contiguous or not run)   # the layout is `out` itself
    step = min(rows, max(2, CHUNK * BLOCK // width // 2 * 2))
    q = np.empty((step, width), np.uint8)
    f = None if direct else np.empty((step, width), np.float32)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        qk = q[:n, lead:lead + k]
        if qtype == Q.Q8_0:
            qk[...] = cols[:, r0:r0 + n].T
        else:
            _column_nibbles(np.ascontiguousarray(cols[:, r0 // 2:(r0 + n + 1) // 2].T), qk)
        fc = out[r0:r0 + n] if direct else f[:n]
        pick = (lambda a: a[r0:r0 + n, blocks]) if run else (lambda a: np.take(a[r0:r0 + n], blocks, axis=1))
        _scale(q[:n], qtype, fc, pick(d), None if m is None else pick(m))
        if not direct:
            out[r0:r0 + n] = fc[:, lead:lead + k]
    return out
