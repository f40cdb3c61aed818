"""Emulated storage devices: throttle reads to a device's bandwidth and per-request latency.

Reads still come from the real file; only their duration is stretched, so every number measured
with a storage model is an EMULATION of that device and is labelled so wherever it is printed.
The profiles are typical sequential-read figures of each device class (not measured here).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ...errors import EdgeLLMError


@dataclass(frozen=True)
class StorageModel:
    name: str
    read_mb_s: float        # sustained read bandwidth, MB/s (10^6 bytes)
    latency_us: float       # per-request latency (queue + flash read), microseconds

    @property
    def label(self) -> str:
        return f"EMULATED {self.name} ({self.read_mb_s:g} MB/s, {self.latency_us:g} us/request)"

    def read_seconds(self, nbytes: int) -> float:
        return self.latency_us * 1e-6 + nbytes / (self.read_mb_s * 1e6)

    def throttle(self, nbytes: int, elapsed: float) -> float:
        """Sleep so a read of nbytes that really took `elapsed` s lasts as long as on the device; returns the sleep."""
        extra = self.read_seconds(nbytes) - elapsed
        if extra > 0:
            time.sleep(extra)
            return extra
        return 0.0


STORAGE_PROFILES = {
    "microsd": StorageModel("microSD (UHS-I A2)", 90.0, 1000.0),
    "emmc": StorageModel("eMMC 5.1", 250.0, 300.0),
    "ufs": StorageModel("UFS 3.1", 1500.0, 100.0),
    "nvme": StorageModel("NVMe PCIe 3.0", 3000.0, 50.0),
}


def get_storage_model(spec: str | StorageModel | None) -> StorageModel | None:
    if spec is None or isinstance(spec, StorageModel):
        return spec
    key = str(spec).lower()
    if key in ("", "none", "real"):
        return None
    if key not in STORAGE_PROFILES:
        raise EdgeLLMError(f"unknown storage device {spec!r} to emulate", f"choose one of: {', '.join(STORAGE_PROFILES)}")
    return STORAGE_PROFILES[key]
