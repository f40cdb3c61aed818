"""Streaming statistics: bytes read from storage per token, neuron cache hit rate, compute vs I/O wait."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StreamStats:
    tokens: int = 0                 # tokens run through forward (prefill tokens included)
    forwards: int = 0
    bytes_read: int = 0             # bytes read from weights.bin (coalescing gaps included)
    read_requests: int = 0
    neuron_hits: int = 0            # needed FFN neurons found resident
    neuron_misses: int = 0          # needed FFN neurons read from storage (or from a prefetch)
    prefetch_bytes: int = 0         # bytes read by the I/O thread ahead of use
    prefetch_wasted: int = 0        # neurons loaded by a prefetch (guess or merged-read gap) beyond the needed ones
    neurons_needed: int = 0         # sum over layers and forwards of needed neurons
    neurons_total: int = 0          # sum over layers and forwards of ffn_dim
    neurons_computed: int = 0       # sum over layers and tokens of neurons computed (predicted active)
    neurons_computed_total: int = 0
    device_neurons: int = 0         # of neurons_computed, those the second device computed (hot/cold split)
    device_wait_s: float = 0.0      # time the CPU path waited for the second device
    io_read_s: float = 0.0          # time spent inside reads (both threads, throttling included)
    io_wait_s: float = 0.0          # time the compute thread waited for reads
    forward_s: float = 0.0
    emulated: str | None = None     # label of the emulated storage device, if any
    io_mode: str = "real (page cache evicted)"   # how reads reach the real device
    peak_resident: int = 0
    history: list = field(default_factory=list)   # (tokens, bytes_read) per forward

    def record_forward(self, n_tokens: int, bytes_read: int, seconds: float) -> None:
        self.forwards += 1
        self.tokens += n_tokens
        self.forward_s += seconds
        self.history.append((n_tokens, bytes_read))

    @property
    def compute_s(self) -> float:
        return max(0.0, self.forward_s - self.io_wait_s)

    @property
    def hit_rate(self) -> float:
        n = self.neuron_hits + self.neuron_misses
        return self.neuron_hits / n if n else 1.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / self.tokens if self.tokens else 0.0

    @property
    def active_fraction(self) -> float:
        return self.neurons_needed / self.neurons_total if self.neurons_total else 1.0

    @property
    def computed_fraction(self) -> float:
        """Share of FFN neurons each token computes (1 without a predictor)."""
        return self.neurons_computed / self.neurons_computed_total if self.neurons_computed_total else 1.0

    def summary(self) -> dict:
        return {"tokens": self.tokens, "bytes_read": self.bytes_read, "bytes_per_token": self.bytes_per_token,
                "read_requests": self.read_requests, "neuron_hit_rate": self.hit_rate,
                "loaded_neuron_fraction": self.active_fraction, "computed_neuron_fraction": self.computed_fraction, "prefetch_bytes": self.prefetch_bytes,
                "compute_s": self.compute_s, "io_wait_s": self.io_wait_s, "io_read_s": self.io_read_s,
                "peak_resident_bytes": self.peak_resident, "storage": self.emulated or self.io_mode,
                "device_neuron_fraction": self.device_neurons / self.neurons_computed if self.neurons_computed else 0.0,
                "device_wait_s": self.device_wait_s}

    def format(self) -> str:
        s = self.summary()
        return (f"streaming: {s['bytes_per_token'] / 1e6:.2f} MB read/token ({s['read_requests']} requests, "
                f"{self.bytes_read / 1e6:.1f} MB total over {self.tokens} tokens), neuron cache hit rate "
                f"{100 * s['neuron_hit_rate']:.1f}%, neurons loaded {100 * s['loaded_neuron_fraction']:.1f}% / computed per token {100 * s['computed_neuron_fraction']:.1f}%, "
                f"compute {s['compute_s']:.2f} s, waiting for I/O {s['io_wait_s']:.2f} s; storage: {s['storage']}"
                + (f"; hot/cold split: {100 * s['device_neuron_fraction']:.1f}% of computed neurons on the hot-neuron "
                   f"device, waited {s['device_wait_s']:.2f} s for it" if self.device_neurons else ""))

    def reset(self) -> None:
        emulated, io_mode = self.emulated, self.io_mode
        self.__init__()
        self.emulated, self.io_mode = emulated, io_mode
