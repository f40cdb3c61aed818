"""Model hyper-parameters, shared by every loader (GGUF, Hugging Face, bundle) and every backend."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    arch: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    context_length: int = 2048
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scale: float = 1.0          # linear RoPE scaling factor (positions are divided by it)
    rope_neox: bool = False          # NeoX layout rotates (x[i], x[i+d/2]); normal layout rotates (x[2i], x[2i+1])
    rope_dim: int | None = None      # rotated dims per head; None = head_dim
    head_dim: int | None = None      # None = dim // n_heads
    tied_embeddings: bool = False    # lm_head shares token_embd.weight
    attn_bias: bool = False          # qwen2 has q/k/v biases
    name: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.rope_dim is None:
            self.rope_dim = self.head_dim

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA group size; 1 = MHA, n_heads = MQA)."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)
