"""Hot/cold neuron split across compute devices (PowerInfer): hot neurons on a second device, cold ones on the CPU.

A ComputeDevice holds the resident (hot) FFN neurons of every layer and computes their part of the
FFN; the main CPU path computes the cold neurons from streamed records; the partial outputs are
summed per layer. SwiGLU's down input is rounded (ggml activation quantization) on 32-neuron blocks
that mix hot and cold neurons, so each layer runs in two phases: both sides compute their neurons'
activations, the host rounds the merged vector once, then both compute their share of the down
product. The result equals the single-device FFN up to float32 summation order (two partial sums
instead of one), i.e. to float tolerance, not bit for bit.

CPUDevice is the second device simulated on the CPU: its own worker thread, same numpy kernels.
A GPU/OpenCL device would implement the same three methods (hold, activations, down) with its own
copy of the slices; the CPU device computes on the store's slot arrays in place (no second copy).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ...errors import EdgeLLMError
from .sparse_ffn import ffn_activations

SPLIT_CHOICES = ("off", "cpu", "inline")
SPLIT_FLAG = "--split-devices"


class ComputeDevice:
    """A compute device owning the hot neurons' FFN slices (per layer) and computing their partial FFN."""

    name = "abstract"

    def hold(self, layer: int, slots, qtypes: tuple) -> None:
        """Take over layer `layer`'s resident neuron slots (_NeuronSlots) and the FFN weight types."""
        raise NotImplementedError

    def refresh(self, layer: int, changed: np.ndarray) -> None:
        """Slots `changed` of `layer` were refilled (windowing); a device with its own copy re-uploads them."""

    def activations(self, layer: int, h: np.ndarray, sel: np.ndarray | None, mask: np.ndarray | None,
                    act_quant: str) -> Future:
        """silu(gate.h) * up.h [T, k] of slots `sel` (None: every slot, in slot order), masked."""
        raise NotImplementedError

    def down(self, layer: int, xr: np.ndarray, sel: np.ndarray | None) -> Future:
        """Partial FFN output [T, dim] = xr [T, k] @ down[:, sel].T (xr: rounded down input of those slots)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class CPUDevice(ComputeDevice):
    """A second 'device' that is the CPU: one worker thread computing on the slots with the numpy kernels.

    threaded=False runs the same computation on the calling thread ("inline"): no second device, but the
    split's arithmetic, which computes on the resident slots in place instead of merging them with the
    streamed neurons into new arrays every token (cheaper than the one-device path, not bit-identical).
    """

    name = "cpu"

    def __init__(self, threaded: bool = True):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgellm-device") if threaded else _Inline()
        self._layers: dict[int, tuple] = {}

    def hold(self, layer: int, slots, qtypes: tuple) -> None:
        self._layers[layer] = (slots, qtypes)

    def activations(self, layer, h, sel, mask, act_quant) -> Future:
        return self._pool.submit(self._activations, layer, h, sel, mask, act_quant)

    def _activations(self, layer, h, sel, mask, act_quant):
        s, qt = self._layers[layer]
        pick = (lambda a: a) if sel is None else (lambda a: None if a is None else a[sel])  # noqa: E731
        return ffn_activations(h, pick(s.gate), pick(s.up), qt, (pick(s.mins_g), pick(s.mins_u)), mask, act_quant)

    def down(self, layer, xr, sel) -> Future:
        s, _ = self._layers[layer]
        return self._pool.submit(lambda: xr @ (s.down if sel is None else s.down[:, sel]).T)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _Inline:
    """An executor that runs the job at once on the calling thread."""

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut

    def shutdown(self, wait: bool = True) -> None:
        pass


def make_device(spec) -> ComputeDevice | None:
    """None for no split ("off", None, False), else the device computing the hot neurons ("cpu"/True: a
    worker thread; "inline": the split's arithmetic on the calling thread)."""
    if spec is None or spec is False or (isinstance(spec, str) and spec.lower() in ("off", "none", "")):
        return None
    if isinstance(spec, ComputeDevice):
        return spec
    if spec is True or (isinstance(spec, str) and spec.lower() == "cpu"):
        return CPUDevice()
    if isinstance(spec, str) and spec.lower() == "inline":
        return CPUDevice(threaded=False)
    raise EdgeLLMError(f"unknown device {spec!r} for the hot/cold neuron split",
                       f"pass {SPLIT_FLAG} with one of: {', '.join(SPLIT_CHOICES)} (a second CPU worker "
                       "stands in for a GPU/OpenCL device)")
