#!/usr/bin/env python3
"""Per-token time of every SmolLM2-135M matmul: edgellm's compiled integer kernels vs numpy float32 vs
onnxruntime's MatMulNBits.

    python tools/bench_int_matmul.py [--scheme w4a8 --group-size 64] [--threads 2] [--tokens 20]

One decode token = 30 layers x (q, k, v, o, gate, up, down) at SmolLM2's 576 / 192 / 1536 dimensions plus
the 49152 x 576 int8 head. Weights are random codes of the real shapes, a separate matrix per layer (so the
weights stream from memory as in a real decode). Timings mean nothing on a loaded machine: the load average
is printed with the results.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's edgellm, installed or not

from edgellm.runtime.intref import LINEARS, QuantConfig, pack_int4  # noqa: E402

DIM, KV, FFN, VOCAB, LAYERS = 576, 192, 1536, 49152, 30
SHAPES = {"attn_q": (DIM, DIM), "attn_k": (KV, DIM), "attn_v": (KV, DIM), "attn_output": (DIM, DIM),
          "ffn_gate": (FFN, DIM), "ffn_up": (FFN, DIM), "ffn_down": (DIM, FFN)}


def random_linear(rng, rows: int, cols: int, qc: QuantConfig | None) -> dict:
    """Stored tensors of one linear in intref's format (qc None: the int8 head)."""
    if qc is None or qc.w_bits == 8:
        return {"w.q": rng.integers(-127, 128, (rows, cols)).astype(np.int8),
                "w.scale": rng.uniform(1e-3, 1e-2, rows).astype(np.float32)}
    g = qc.group_size
    return {"w.q": pack_int4(rng.integers(0, 16, (rows, cols))),
            "w.scale": (rng.uniform(1e-3, 1e-2, (rows, cols // g))).astype(np.float16)}


def set_threads(n: int) -> None:
    """The TVM runtime pool sizes itself from TVM_NUM_THREADS on first use; then pin it (as tvm_backend does)."""
    import tvm_ffi
    os.environ["TVM_NUM_THREADS"] = str(n)
    tvm_ffi.get_global_func("runtime.config_threadpool")(1, n)


def bench(fn, tokens: int) -> float:
    """Median seconds of one call of fn over `tokens` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tvm_token(layers, head, qc, target, threads: int):
    """A function running one token's matmuls with the compiled kernels (buffers allocated once)."""
    import tvm
    from edgellm.compiler.tvm_int_matmul import int_matmul_func, kernel_isa, pack_for_kernel
    from edgellm.runtime.tvm_backend import aligned_empty
    g = qc.group_size if qc.w_bits == 4 else None
    funcs = {f"mm_{r}x{c}": int_matmul_func(r, c, qc.w_bits, g, target, 1) for r, c in set(SHAPES.values())}
    funcs["head"] = int_matmul_func(VOCAB, DIM, 8, None, target, 1)
    t0 = time.perf_counter()
    lib = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}),
                      target=tvm.target.Target(target))
    print(f"compiled {len(funcs)} kernels ({kernel_isa(target)}) in {time.perf_counter() - t0:.1f} s")
    set_threads(threads)

    def tensor(a):
        b = aligned_empty(a.shape, a.dtype)
        b[...] = a
        return tvm.runtime.from_dlpack(b)

    rng = np.random.default_rng(0)
    xs = {c: tensor(rng.integers(-127, 128, (1, c)).astype(np.int8)) for c in (DIM, FFN)}
    amax = tensor(np.full((1, 1), 1000, np.int64))

    def requant(rows: int) -> list:          # per-row multipliers, shifts and pre-shifts of a typical linear
        return [tensor(np.full(rows, v, np.int64)) for v in (1 << 30, 40, 4)] + [tensor(np.zeros((1, rows), np.int64))]

    calls = []
    for layer in layers:
        for n, t in layer.items():
            rows, cols = SHAPES[n]
            w = [tensor(a) for a in pack_for_kernel(t, "w", qc)]
            calls.append((lib[f"mm_{rows}x{cols}"], (xs[cols], *w, amax, *requant(rows))))
    calls.append((lib["head"], (xs[DIM], tensor(head["w.q"]), amax, *requant(VOCAB))))

    def run():
        for f, args in calls:
            f(*args)
    return run


def numpy_token(layers, head, qc):
    from edgellm.runtime.intref import dequantize_linear
    x = {c: np.random.default_rng(1).standard_normal((1, c)).astype(np.float32) for c in (DIM, FFN)}
    ws = [(x[SHAPES[n][1]], dequantize_linear(t, "w", qc)) for layer in layers for n, t in layer.items()]
    ws.append((x[DIM], (head["w.q"] * head["w.scale"][:, None]).astype(np.float32)))

    def run():
        for a, w in ws:
            a @ w.T
    return run


def ort_token(layers, head, qc, threads: int):
    """One ONNX graph with every matmul as com.microsoft MatMulNBits (4-bit blocks, or 8-bit for w8 and the head),
    accuracy_level 4: activations quantized to int8 per block, as llama.cpp and the integer kernels do."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    nodes, inits, outs = [], [], []

    def add(i: int, q_codes: np.ndarray, scales: np.ndarray, bits: int, block: int, cols: int):
        rows, nb = q_codes.shape[0], cols // block
        # the default zero point 2^(bits-1) matches intref: 4-bit value = code - 8, 8-bit stored as q + 128
        b = q_codes if bits == 4 else (q_codes.astype(np.int16) + 128).astype(np.uint8)
        inits.extend([numpy_helper.from_array(b.reshape(rows, nb, block * bits // 8), f"b{i}"),
                      numpy_helper.from_array(scales.astype(np.float32).reshape(-1), f"s{i}")])
        nodes.append(helper.make_node("MatMulNBits", [f"x{cols}", f"b{i}", f"s{i}"], [f"y{i}"],
                                      domain="com.microsoft", K=cols, N=rows, bits=bits, block_size=block,
                                      accuracy_level=4))      # int8 activations, as the integer kernels
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, rows]))

    i = 0
    for layer in layers:
        for n, t in layer.items():
            rows, cols = SHAPES[n]
            if qc.w_bits == 4:
                add(i, t["w.q"], t["w.scale"], 4, qc.group_size, cols)
            else:
                add(i, t["w.q"], np.repeat(t["w.scale"][:, None], cols // 32, 1), 8, 32, cols)
            i += 1
    add(i, head["w.q"], np.repeat(head["w.scale"][:, None], DIM // 32, 1), 8, 32, DIM)
    graph = helper.make_graph(nodes, "smollm2_matmuls",
                              [helper.make_tensor_value_info(f"x{c}", TensorProto.FLOAT, [1, c]) for c in (DIM, FFN)],
                              outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {f"x{c}": np.random.default_rng(2).standard_normal((1, c)).astype(np.float32) for c in (DIM, FFN)}
    return lambda: sess.run(None, feed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/bench_int_matmul.py", description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="w4a8", choices=["w4a8", "w8a8"])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--no-ort", action="store_true")
    a = ap.parse_args(argv)
    import psutil
    from threadpoolctl import threadpool_limits
    from edgellm.compiler.tvm_build import host_target
    threads = a.threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    qc = QuantConfig(a.scheme, group_size=a.group_size if a.scheme == "w4a8" else None)
    rng = np.random.default_rng(0)
    layers = [{n: random_linear(rng, *SHAPES[n], qc) for n in LINEARS} for _ in range(a.layers)]
    head = random_linear(rng, VOCAB, DIM, None)
    print(f"SmolLM2-135M matmuls of one decode token: {a.layers} layers x 7 + head {VOCAB}x{DIM} (int8), "
          f"{qc.label}, {threads} threads")
    results = {}
    results["edgellm tvm int"] = bench(tvm_token(layers, head, qc, host_target(), threads), a.tokens)
    with threadpool_limits(threads):
        results["numpy float32"] = bench(numpy_token(layers, head, qc), a.tokens)
    if not a.no_ort:
        try:
            results["onnxruntime MatMulNBits"] = bench(ort_token(layers, head, qc, threads), a.tokens)
        except Exception as e:  # noqa: BLE001 - report and go on without ORT
            print(f"onnxruntime MatMulNBits unavailable: {str(e).strip()[:300]}")
    base = results["edgellm tvm int"]
    for name, sec in results.items():
        print(f"  {name:26s} {sec * 1e3:8.2f} ms/token   {sec / base:5.2f}x the tvm kernels' time")
    print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs "
          "(timings are only meaningful on an idle machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
