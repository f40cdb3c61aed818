#!/usr/bin/env python3
"""Per-token time of every SmolLM2-135M matmul: edgellm's compiled integer kernels vs numpy float32 vs
onnxruntime's MatMulNBits.

    python tools/bench_int_matmul.py [--scheme w4a8 --group-size 64] [--threads 2] [--tokens 20] [--rounds 5]
                                     [--baseline HEAD] [--no-ort] [--no-numpy]

One decode token = 30 layers x (q, k, v, o, gate, up, down) at SmolLM2's 576 / 192 / 1536 dimensions plus
the 49152 x 576 int8 head. Weights are random codes of the real shapes, a separate matrix per layer (so the
weights stream from memory as in a real decode). --baseline REV also runs the kernels of git revision REV
(its edgellm package, extracted with `git archive` and imported beside this checkout's) on the same weights,
so a kernel change is measured against its predecessor in one process: the TVM engines run in alternating
rounds (interleaved, so a load change hits them alike), numpy and onnxruntime after them (their thread pools
keep spinning and would slow TVM's). Figures are the median over every call, with the weight bytes a call
reads and the resulting GB/s. The load average is printed with the results.
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


def bench(fns: dict, tokens: int, rounds: int) -> dict[str, float]:
    """Median seconds of one call of each fn: `rounds` alternating rounds of `tokens` calls, each block after an
    untimed call."""
    times = {n: [] for n in fns}
    for r in range(rounds):
        for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            fns[n]()
            for _ in range(tokens):
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def baseline_package(rev: str, tmp: Path):
    """This checkout's edgellm package at git revision `rev`, imported as `edgellm_baseline` (its relative
    imports stay inside it)."""
    import importlib
    import subprocess
    import tarfile
    import io
    root = Path(__file__).resolve().parent.parent
    data = subprocess.run(["git", "-C", str(root), "archive", rev, "edgellm"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / "edgellm").rename(tmp / "edgellm_baseline")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("edgellm_baseline.compiler.tvm_int_matmul")


def tvm_token(layers, head, qc, target, threads: int, mm=None):
    """A function running one token's matmuls with the compiled kernels of module mm (default: this checkout's
    edgellm.compiler.tvm_int_matmul), buffers allocated once, and the weight bytes a call reads."""
    import tvm
    from edgellm.runtime.tvm_backend import aligned_empty
    if mm is None:
        from edgellm.compiler import tvm_int_matmul as mm
    int_matmul_func, kernel_isa, pack_for_kernel = mm.int_matmul_func, mm.kernel_isa, mm.pack_for_kernel
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

    calls, nbytes = [], head["w.q"].nbytes
    for layer in layers:
        for n, t in layer.items():
            rows, cols = SHAPES[n]
            arrays = pack_for_kernel(t, "w", qc)
            nbytes += sum(a.nbytes for a in arrays)
            calls.append((lib[f"mm_{rows}x{cols}"], (xs[cols], *[tensor(a) for a in arrays], amax, *requant(rows))))
    calls.append((lib["head"], (xs[DIM], tensor(head["w.q"]), amax, *requant(VOCAB))))

    def run():
        for f, args in calls:
            f(*args)
    return run, nbytes


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
    ap.add_argument("--tokens", type=int, default=20, help="calls per engine per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    ap.add_argument("--baseline", metavar="REV", help="also time the kernels of this git revision (e.g. HEAD)")
    ap.add_argument("--no-numpy", action="store_true")
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
    import tempfile
    fns, nbytes, others = {}, {}, {}
    fns["edgellm tvm int"], nbytes["edgellm tvm int"] = tvm_token(layers, head, qc, host_target(), threads)
    with tempfile.TemporaryDirectory() as tmp:
        if a.baseline:
            name = f"edgellm tvm int @{a.baseline}"
            fns[name], nbytes[name] = tvm_token(layers, head, qc, host_target(), threads,
                                                baseline_package(a.baseline, Path(tmp)))
        if not a.no_numpy:
            others["numpy float32"] = numpy_token(layers, head, qc)
        if not a.no_ort:
            try:
                others["onnxruntime MatMulNBits"] = ort_token(layers, head, qc, threads)
            except Exception as e:  # noqa: BLE001 - report and go on without ORT
                print(f"onnxruntime MatMulNBits unavailable: {str(e).strip()[:300]}")
        results = bench(fns, a.tokens, a.rounds)      # the TVM engines interleaved: one thread pool
        with threadpool_limits(threads):          # numpy's BLAS; onnxruntime sizes its own pool
            for name, fn in others.items():       # after, one by one: other pools spinning would slow TVM's
                results.update(bench({name: fn}, a.tokens, a.rounds))
    base = results["edgellm tvm int"]
    for name, sec in results.items():
        rate = f"{nbytes[name] / 1e6:6.1f} MB, {nbytes[name] / sec / 1e9:5.1f} GB/s" if name in nbytes else ""
        print(f"  {name:30s} {sec * 1e3:8.2f} ms/token   {sec / base:5.2f}x the tvm kernels' time   {rate}")
    print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs "
          "(timings are only meaningful on an idle machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
