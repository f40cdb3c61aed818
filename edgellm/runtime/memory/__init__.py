"""Running models larger than a memory budget: flash weight streaming and hot/cold neuron splitting.

Entry point: `make_budgeted_model(loaded_bundle, "60MB", mode=...)` returns a Backend whose store
holds at most the budget of weight bytes and streams the rest from the bundle's weights.bin
(buffered + page-cache eviction, or O_DIRECT), optionally with the resident hot neurons computed by
a second device (PowerInfer's hot/cold split; devices.py).
"""
from __future__ import annotations

from ...errors import EdgeLLMError
from .budget import ResidentMinimum, check_budget, minimum_resident_set, parse_budget
from .devices import SPLIT_CHOICES, SPLIT_FLAG, ComputeDevice, CPUDevice, make_device
from .direct_io import DIRECT_FLAG
from .neuron_profile import PROFILE_FILE, PROFILE_FLAG, NeuronProfile, bundle_profile, load_profile
from .stats import StreamStats
from .storage_model import STORAGE_PROFILES, StorageModel, get_storage_model
from .streamed_store import StreamedStore
from .streaming_backend import StreamingBackend

__all__ = ["make_budgeted_model", "parse_budget", "minimum_resident_set", "check_budget", "ResidentMinimum",
           "StreamedStore", "StreamingBackend", "StreamStats", "StorageModel", "STORAGE_PROFILES",
           "get_storage_model", "NeuronProfile", "load_profile", "bundle_profile", "PROFILE_FILE", "PROFILE_FLAG",
           "ComputeDevice", "CPUDevice", "make_device", "SPLIT_CHOICES", "SPLIT_FLAG", "DIRECT_FLAG"]


def make_budgeted_model(loaded, budget, mode: str = "naive", predictor=None, window: int = 0, prefetch: bool = True,
                        storage=None, threads: int | None = None, act_quant: str = "ggml",
                        evict_page_cache: bool = True, coalesce_bytes: int | None = None,
                        profile: NeuronProfile | None = None, split_devices=None,
                        direct_io: bool = False, guess: bool = True) -> StreamingBackend:
    """A StreamingBackend for a loaded bundle under `budget` ("60MB", "35%", or bytes).

    mode: "naive" (whole layers, read in full when not resident), "neuron" (per-neuron records; every
    neuron is computed unless a predictor is given) or "sparse" (= "neuron" with the bundle's predictor).
    predictor: None, True/"bundle" (the bundle's neurons.npz; an error naming --profile-neurons if it
    has none) or a NeuronProfile. window: keep neurons used by the last k tokens (neuron mode).
    storage: None (real device, page cache evicted) or "microsd"/"emmc"/"ufs"/"nvme"/StorageModel (emulated).
    coalesce_bytes: merge neighbouring neuron reads across gaps up to this size (default: one page on the
    real device; latency x bandwidth of an emulated one, where a gap costs less than another request).
    profile: a NeuronProfile to use instead of the bundle's (with a predictor, its ranking picks the resident
    hot neurons).
    split_devices: None/"off" (one device) or "cpu" (PowerInfer-style hot/cold split: the resident hot
    neurons computed by a second device, here a CPU worker thread; needs neuron mode) or a ComputeDevice.
    direct_io: read with O_DIRECT (page cache bypassed; falls back with a warning where the filesystem refuses).
    guess: with a predictor, prefetch (and compute) the neurons it predicts from the layer input while attention
    runs; False reads and computes only the neurons predicted from the FFN input.
    """
    if mode == "sparse":
        mode, predictor = "neuron", predictor or "bundle"
    if getattr(loaded, "format", None) != "bundle":
        raise EdgeLLMError(f"a memory budget needs a compiled bundle, and {getattr(loaded, 'path', 'the model')} "
                           f"is a {getattr(loaded, 'format', 'non-bundle')} model",
                           f"compile it first: edgellm compile {getattr(loaded, 'path', 'MODEL')} -o BUNDLE_DIR")
    if predictor not in (None, False) and mode != "neuron":
        raise EdgeLLMError(f"the activation predictor needs neuron streaming, not {mode!r}",
                           'pass mode="neuron" (or "sparse")')
    device = make_device(split_devices)
    if device is not None and mode != "neuron":
        device.close()
        raise EdgeLLMError(f"the hot/cold device split ({SPLIT_FLAG}) needs neuron streaming, not {mode!r}",
                           f'pass mode="neuron" or "sparse" (--stream-mode neuron/sparse), or leave {SPLIT_FLAG} off')
    want = predictor not in (None, False)
    if isinstance(predictor, NeuronProfile):
        profile = predictor
    if profile is None:
        profile = bundle_profile(loaded.path, need_predictor=want)
    if want and not profile.has_predictor:
        raise EdgeLLMError("the neuron profile has no activation predictor",
                           f"recompile the bundle with `edgellm compile MODEL {PROFILE_FLAG}`")
    total = sum(loaded.weights.info(n).nbytes for n in loaded.weights.names())
    nbytes = parse_budget(budget, total)
    # without a predictor every neuron is needed every token: "hot" means nothing, and a contiguous resident
    # range leaves the streamed neurons contiguous too (one read per layer); with one, the hottest stay resident
    ranking = profile.ranking if (profile is not None and want) else None
    store = StreamedStore(loaded.weights, nbytes, mode, ranking=ranking,
                          window=window, extra_resident={"predictor": profile.predictor_bytes if want else 0},
                          storage=storage, evict_page_cache=evict_page_cache, coalesce_bytes=coalesce_bytes,
                          prefetch=prefetch, spec=budget, direct_io=direct_io)
    return StreamingBackend(loaded.config, store, profile if want else None, prefetch, act_quant, threads, device,
                            guess)
