"""Calibration: activation statistics on text, SmoothQuant/AWQ scale search, integer formats.

The text is Shakespeare, never the held-out evaluation play (Hamlet): `calibration_files` drops it by name.
One float forward over the calibration chunks records, per layer, the inputs of each group of linears that
share an input (q/k/v, o, gate/up, down): per-channel max|x| and E[x^2] over all tokens plus a token sample
for the searches, and the ranges that fix the integer-only formats.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import EdgeLLMError
from ...runtime.config import ModelConfig
from ...runtime.intref import QuantConfig, fake_quant_tokens
from ...runtime.kv_cache import KVCache
from ...runtime.model import apply_rope, attention, rms_norm, rope_tables, silu
from .schemes import fake_quant_weight

HELDOUT = ("hamlet",)          # evaluation text: calibration must never read it
MIN_TOKENS = 256
GROUPS = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "gate_up": ("ffn_gate", "ffn_up"),
          "down": ("ffn_down",)}


def calibration_files(texts_dir: str | Path) -> list[Path]:
    """The Shakespeare plays usable for calibration: every *.txt except the held-out ones and metadata."""
    files = sorted(Path(texts_dir).glob("*.txt"))
    files = [f for f in files if f.name != "metadata.txt" and not any(h in f.name.lower() for h in HELDOUT)]
    if not files:
        raise EdgeLLMError(f"no calibration texts in {texts_dir}", "point to the Shakespeare texts directory")
    return files


def calibration_chunks(tokenizer, texts: list[str] | list[Path], n_tokens: int, n_ctx: int = 512,
                       skip_chars: int = 3000) -> list[list[int]]:
    """Token chunks of n_ctx (n_tokens in total) from texts or files, skipping each file's header."""
    chunks, buf = [], []
    for t in texts:
        if isinstance(t, Path):
            if any(h in t.name.lower() for h in HELDOUT):
                raise EdgeLLMError(f"{t.name} is held-out evaluation text", "calibrate on other plays")
            t = t.read_text(encoding="utf-8", errors="replace")[skip_chars:]
        buf += tokenizer.encode(t, add_bos=False)
        while len(buf) >= n_ctx and len(chunks) * n_ctx < n_tokens:
            chunks.append(buf[:n_ctx])
            buf = buf[n_ctx:]
        if len(chunks) * n_ctx >= n_tokens:
            break
    have = len(chunks) * n_ctx
    if have < max(n_tokens, MIN_TOKENS):
        need = max(n_tokens, MIN_TOKENS)
        raise EdgeLLMError(f"calibration text gives {have + len(buf)} tokens, fewer than the {need} needed "
                           f"({n_ctx}-token chunks)", "pass more text (more plays) or lower calib_tokens")
    if getattr(tokenizer, "add_bos", False) and getattr(tokenizer, "bos_id", None) is not None:
        for c in chunks:
            c[0] = tokenizer.bos_id
    return chunks


@dataclass
class ChannelStats:
    """Running per-channel statistics of one linear group's input, and a token sample."""

    amax: np.ndarray | None = None
    sq: np.ndarray | None = None
    mean_abs: np.ndarray | None = None
    n: int = 0
    sample: list = field(default_factory=list)
    xtx: np.ndarray | None = None          # sum of x^T x over all tokens (GPTQ's Hessian), when asked for

    def add(self, x: np.ndarray, rows: np.ndarray, hessian: bool = False) -> None:
        a = np.abs(x).max(axis=0)
        self.amax = a if self.amax is None else np.maximum(self.amax, a)
        s, m = (x.astype(np.float64) ** 2).sum(axis=0), np.abs(x).sum(axis=0, dtype=np.float64)
        self.sq = s if self.sq is None else self.sq + s
        self.mean_abs = m if self.mean_abs is None else self.mean_abs + m
        self.n += len(x)
        self.sample.append(x[rows])
        if hessian:
            xx = x.T.astype(np.float64) @ x
            self.xtx = xx if self.xtx is None else self.xtx + xx

    def finish(self) -> None:
        self.sq, self.mean_abs = self.sq / self.n, self.mean_abs / self.n
        self.sample = np.concatenate(self.sample).astype(np.float32)


@dataclass
class CalibStats:
    """Per layer: {group: ChannelStats}, and maxima of q/k/v/gate/up/residual/logits for the integer formats."""

    layers: list[dict]
    ranges: list[dict]
    res_max: float = 0.0
    logit_max: float = 0.0
    tokens: int = 0


def collect(cfg: ModelConfig, W: dict[str, np.ndarray], chunks: list[list[int]], sample_per_chunk: int = 128,
            seed: int = 0, hessian: bool = False) -> CalibStats:
    """Float forward over the chunks, recording linear-group inputs and the ranges the integer path needs
    (and each group input's x^T x over all tokens when `hessian`, for GPTQ)."""
    rng = np.random.default_rng(seed)
    layers = [{g: ChannelStats() for g in GROUPS} for _ in range(cfg.n_layers)]
    ranges = [dict(q=0.0, k=0.0, v=np.zeros(cfg.n_kv_heads * cfg.head_dim), gate=0.0, up=0.0,
                   up_ch=np.zeros(cfg.ffn_dim), hprod=np.zeros(cfg.ffn_dim)) for _ in range(cfg.n_layers)]
    st = CalibStats(layers, ranges)
    head = W.get("output.weight", W["token_embd.weight"])
    for chunk in chunks:
        T = len(chunk)
        rows = np.unique(np.concatenate([[0, 1], rng.choice(T, sample_per_chunk - 2, replace=False)]))
        kv = KVCache(cfg, T)
        x = W["token_embd.weight"][np.asarray(chunk)]
        cos, sin = rope_tables(cfg, np.arange(T))
        for i in range(cfg.n_layers):
            p, L, R = f"blk.{i}.", layers[i], ranges[i]
            st.res_max = max(st.res_max, float(np.abs(x).max()))
            h = rms_norm(x, W[p + "attn_norm.weight"], cfg.norm_eps)
            L["qkv"].add(h, rows, hessian)
            q = h @ W[p + "attn_q.weight"].T
            k = h @ W[p + "attn_k.weight"].T
            v = h @ W[p + "attn_v.weight"].T
            R["q"], R["k"] = max(R["q"], float(np.abs(q).max())), max(R["k"], float(np.abs(k).max()))
            R["q_ch"] = np.maximum(R.get("q_ch", 0), np.abs(q).max(axis=0))
            R["k_ch"] = np.maximum(R.get("k_ch", 0), np.abs(k).max(axis=0))
            R["v"] = np.maximum(R["v"], np.abs(v).max(axis=0))
            q = apply_rope(q.reshape(T, cfg.n_heads, -1), cos, sin, cfg.rope_neox, cfg.rope_dim)
            k = apply_rope(k.reshape(T, cfg.n_kv_heads, -1), cos, sin, cfg.rope_neox, cfg.rope_dim)
            keys, values = kv.update(i, 0, k, v.reshape(T, cfg.n_kv_heads, -1))
            a = attention(q, keys, values, 0, cfg.n_rep)
            L["o"].add(a, rows, hessian)
            x = x + a @ W[p + "attn_output.weight"].T
            st.res_max = max(st.res_max, float(np.abs(x).max()))
            h = rms_norm(x, W[p + "ffn_norm.weight"], cfg.norm_eps)
            L["gate_up"].add(h, rows, hessian)
            g, u = h @ W[p + "ffn_gate.weight"].T, h @ W[p + "ffn_up.weight"].T
            R["gate"], R["up"] = max(R["gate"], float(np.abs(g).max())), max(R["up"], float(np.abs(u).max()))
            R["up_ch"] = np.maximum(R["up_ch"], np.abs(u).max(axis=0))
            hd = silu(g) * u
            R["hprod"] = np.maximum(R["hprod"], np.abs(hd).max(axis=0))
            L["down"].add(hd, rows, hessian)
            x = x + hd @ W[p + "ffn_down.weight"].T
        st.res_max = max(st.res_max, float(np.abs(x).max()))
        logits = rms_norm(x, W["output_norm.weight"], cfg.norm_eps) @ head.T
        st.logit_max = max(st.logit_max, float(np.abs(logits).max()))
        st.tokens += T
    for L in layers:
        for s in L.values():
            s.finish()
    return st


# --- per-channel scale search (SmoothQuant alpha / AWQ) --------------------------------------------

def _kv_reduce(a: np.ndarray, cfg: ModelConfig, how) -> np.ndarray:
    """Per query-head channel stats [H*d] -> per kv-head channel [KVH*d] (heads sharing a V channel share s)."""
    return how(a.reshape(cfg.n_kv_heads, cfg.n_rep, cfg.head_dim), axis=1).reshape(-1)


def qk_scales(q_ch: np.ndarray, k_ch: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Per kv-head channel s (shared by each RoPE pair) balancing q*s and k/s ranges: s = sqrt(max|k| / max|q|).

    Rotation by RoPE mixes the two channels of a pair, so both get the same s; q heads sharing a kv head share it.
    """
    q = _kv_reduce(q_ch, cfg, np.max).reshape(cfg.n_kv_heads, cfg.head_dim)
    k = k_ch.reshape(cfg.n_kv_heads, cfg.head_dim)
    n = cfg.rope_dim
    pairs = (np.arange(0, n, 2), np.arange(1, n, 2)) if not cfg.rope_neox else (np.arange(n // 2), np.arange(n // 2, n))
    s = np.sqrt(np.maximum(k, 1e-6) / np.maximum(q, 1e-6))
    for a, b in [pairs]:
        pm = np.sqrt(np.maximum(np.maximum(k[:, a], k[:, b]), 1e-6) / np.maximum(np.maximum(q[:, a], q[:, b]), 1e-6))
        s[:, a] = s[:, b] = pm
    return s.reshape(-1).astype(np.float32)


def _kv_expand(s: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return np.tile(s.reshape(cfg.n_kv_heads, 1, cfg.head_dim), (1, cfg.n_rep, 1)).reshape(-1)


def group_error(X: np.ndarray, Ws: list[np.ndarray], s: np.ndarray, qc: QuantConfig,
                act_scale: float | None = None) -> float:
    """Relative output error ||Q(X/s) Q(W s)^T - X W^T|| / ||X W^T|| of one linear group."""
    Xs = X / s
    if qc.a_bits == 8:
        Xs = fake_quant_tokens(Xs, act_scale, qc.act_block)
    num = den = 0.0
    for W in Ws:
        Y = X @ W.T
        Yq = Xs @ fake_quant_weight(W * s, qc).T
        num += float(((Yq - Y) ** 2).sum())
        den += float((Y ** 2).sum())
    return float(np.sqrt(num / max(den, 1e-30)))


def search_scales(stats: ChannelStats, Ws: list[np.ndarray], qc: QuantConfig, cfg: ModelConfig | None = None,
                  kv_tied: bool = False) -> tuple[np.ndarray, str, float, float]:
    """Best per-channel migration scale s (X/s, W*s) over SmoothQuant alphas and AWQ alphas.

    Returns (s, choice, error with s, error without). `kv_tied`: channels are attention outputs whose
    scale must be shared by the query heads of one KV head (it is folded into W_v's rows).
    """
    X = stats.sample
    wmax = np.max([np.abs(W).max(axis=0) for W in Ws], axis=0)
    amax, mabs = stats.amax, stats.mean_abs
    if kv_tied:
        amax, mabs, wmax = (_kv_reduce(a, cfg, np.max) for a in (amax, mabs, wmax))
    cands = {"none": np.ones_like(amax)}
    eps = 1e-5
    for al in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        cands[f"smooth{al}"] = np.maximum(amax, eps) ** al / np.maximum(wmax, eps) ** (1 - al)
    for al in (0.25, 0.5, 0.75):
        s = np.maximum(mabs, eps) ** al
        cands[f"awq{al}"] = s / np.sqrt(s.max() * s.min())
    best = None
    base = None
    for name, s in cands.items():
        s = np.clip(s, 1e-4, 1e4).astype(np.float32)
        full = _kv_expand(s, cfg) if kv_tied else s
        err = group_error(X, Ws, full, qc)
        if name == "none":
            base = err
        if best is None or err < best[2]:
            best = (s, name, err)
    return best[0], best[1], best[2], base
