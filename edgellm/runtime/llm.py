"""The user-facing Python API: `edgellm.LLM`, shaped like llama-cpp-python's `Llama`."""
from __future__ import annotations

import codecs
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..errors import EdgeLLMError
from .backend import make_backend
from .loader import load_model
from .sampling import Sampler, SamplingParams

DEFAULT_CTX = 2048


@dataclass
class Timings:
    load_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    finish_reason: str
    timings: Timings = field(default_factory=Timings)


class _Utf8Stream:
    """Joins token bytes into text: incomplete UTF-8 sequences wait for the next token, invalid bytes become U+FFFD."""

    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, b: bytes) -> str:
        return self._dec.decode(b)

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


def _cut_at_stop(text: str, stops: list[str], final: bool = False) -> tuple[str, str, bool]:
    """Split text into (held back, safe to emit, stop hit). Text from a stop string on is dropped; a tail that
    could still grow into a stop string is held back unless this is the final piece."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return "", text[: min(hits)], True
    keep = 0 if final else max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[len(text) - keep:], text[: len(text) - keep], False


def _physical_cores() -> int:
    import psutil  # only when threads is not given: importing it costs 20-50 ms of load time
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class LLM:
    """Load a model once, then tokenize, score and generate.

    `model` is a .gguf file, a Hugging Face directory, or a registry name such as "smollm2-135m".
    `backend` None picks "int" for a bundle compiled with an integer --quant scheme, else "numpy".
    """

    def __init__(self, model: str | os.PathLike = "smollm2-135m", *, threads: int | None = None,
                 n_ctx: int | None = None, backend: str | None = None, verbose: bool = False,
                 allow_target_mismatch: bool = False, memory_budget: str | int | None = None,
                 stream_mode: str = "neuron", storage: str | None = None, split_devices: str | None = None,
                 direct_io: bool = False):
        t0 = time.perf_counter()
        m = load_model(model, allow_target_mismatch=allow_target_mismatch)
        self.config, self.tokenizer, self.path, self.metadata = m.config, m.tokenizer, m.path, m.metadata
        self.weights = m.weights
        self.threads = threads or _physical_cores()
        self.n_ctx = n_ctx if n_ctx is not None else min(DEFAULT_CTX, self.config.context_length)
        if self.n_ctx <= 0 or self.n_ctx > (1 << 20):
            raise EdgeLLMError(f"n_ctx={self.n_ctx} is out of range", "pass a context size such as 2048")
        if memory_budget is not None:
            # weights beyond the budget stay in the bundle's weights.bin and are read as needed
            from .memory import make_budgeted_model
            if backend not in (None, "numpy"):
                raise EdgeLLMError(f"a memory budget runs on the numpy backend, not {backend!r}",
                                   "drop --backend or the memory budget")
            self.backend = make_budgeted_model(m, memory_budget, mode=stream_mode, storage=storage,
                                               threads=self.threads, split_devices=split_devices,
                                               direct_io=direct_io)
        else:
            self.backend = make_backend(backend, m, self.threads)
        self.backend.prepare()
        self.verbose = verbose
        self._kv = None
        self._cached: list[int] = []   # tokens whose K/V are in self._kv
        self.load_s = time.perf_counter() - t0

    # --- tokens -----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    # --- forward ----------------------------------------------------------------------------------
    def _cache(self):
        if self._kv is None:
            self._kv = self.backend.new_cache(self.n_ctx)
        return self._kv

    def _check_tokens(self, tokens: list[int]) -> np.ndarray:
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.ndim != 1 or len(arr) == 0:
            raise EdgeLLMError("no tokens to evaluate", "pass a non-empty prompt")
        if arr.min() < 0 or arr.max() >= self.config.vocab_size:
            raise EdgeLLMError(f"token id out of range 0..{self.config.vocab_size - 1}", "pass ids from llm.tokenize")
        if len(arr) > self.n_ctx:
            raise EdgeLLMError(f"{len(arr)} tokens exceed the context size n_ctx={self.n_ctx}",
                               "pass a larger n_ctx (--ctx) or a shorter input")
        return arr

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits for every position, [len(tokens), vocab] (what perplexity needs)."""
        arr = self._check_tokens(tokens)
        kv = self._cache()
        self._cached = []
        out = self.backend.forward(arr, 0, kv, all_logits=True)
        self._cached = list(map(int, arr))
        return out

    def _prefill(self, prompt: list[int]) -> np.ndarray:
        """Evaluate the prompt, reusing the KV cache for a prefix shared with the previous call."""
        kv = self._cache()
        n = 0
        for a, b in zip(self._cached, prompt):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt) - 1)
        self._cached = self._cached[:n]
        kv.truncate(n)
        logits = self.backend.forward(np.asarray(prompt[n:], dtype=np.int64), n, kv)[-1]
        self._cached = list(prompt)
        return logits

    # --- generation -------------------------------------------------------------------------------
    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        return [int(t) for t in prompt]

    def _tokens(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams, ignore_eos: bool,
                timings: Timings) -> Iterator[int]:
        """Yield generated token ids; the KV cache holds every token yielded so far except the last."""
        self._check_tokens(prompt_ids)
        if max_tokens < 0:
            raise EdgeLLMError(f"max_tokens={max_tokens} is negative", "pass max_tokens >= 0")
        sampler = Sampler(params)
        history = list(prompt_ids)
        t = time.perf_counter()
        logits = self._prefill(prompt_ids)
        timings.prefill_s = time.perf_counter() - t
        timings.prompt_tokens = len(prompt_ids)
        t = time.perf_counter()
        while timings.generated_tokens < max_tokens:
            tok = sampler(logits, history)
            if not ignore_eos and self.tokenizer.is_eog(tok):
                self._finish = "stop"
                return
            history.append(tok)
            timings.generated_tokens += 1
            yield tok
            if timings.generated_tokens == max_tokens or len(history) >= self.n_ctx:
                return
            logits = self.backend.forward(np.asarray([tok]), len(history) - 1, self._kv)[-1]
            self._cached = list(history)
            timings.decode_steps += 1
            timings.decode_s = time.perf_counter() - t

    def _run(self, prompt, max_tokens, stop, ignore_eos, **sampling) -> Iterator[str]:
        """Drive _tokens and cut the text at stop strings; sets self._last when done."""
        ids = self._prompt_ids(prompt)
        params = SamplingParams(**sampling)
        stops = [s for s in ([stop] if isinstance(stop, str) else (stop or [])) if s]
        timings = Timings(load_s=self.load_s)
        utf8, out, tokens, held = _Utf8Stream(), [], [], ""
        self._finish = "length"
        for tok in self._tokens(ids, max_tokens, params, ignore_eos, timings):
            tokens.append(tok)
            held += utf8.push(self.tokenizer.token_bytes(tok))
            held, piece, hit = _cut_at_stop(held, stops)
            if piece:
                out.append(piece)
                yield piece
            if hit:
                self._finish = "stop"
                break
        else:
            held, piece, hit = _cut_at_stop(held + utf8.flush(), stops, final=True)
            if hit:
                self._finish = "stop"
            if piece:
                out.append(piece)
                yield piece
        self._last = GenerationResult("".join(out), tokens, ids, self._finish, timings)

    def generate(self, prompt, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, seed: int | None = None,
                 stop=None, ignore_eos: bool = False) -> GenerationResult:
        for _ in self._run(prompt, max_tokens, stop, ignore_eos, temperature=temperature, top_k=top_k,
                           top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed):
            pass
        return self._last

    def stream(self, prompt, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
               top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, seed: int | None = None,
               stop=None, ignore_eos: bool = False) -> Iterator[str]:
        """Yield text pieces as tokens are generated; `self.last_result` holds the full result afterwards."""
        for piece in self._run(prompt, max_tokens, stop, ignore_eos, temperature=temperature, top_k=top_k,
                                  top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed):
            yield piece

    @property
    def last_result(self) -> GenerationResult | None:
        return getattr(self, "_last", None)

    # --- chat -------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        from .chat_template import render_chat
        tok = self.tokenizer
        bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
        eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
        text = render_chat(tok.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos, eos_token=eos)
        add_bos = tok.add_bos and not (bos and text.startswith(bos))
        return self.tokenize(text, add_bos=add_bos, special=True)

    def create_chat_completion(self, messages: list[dict], stream: bool = False, max_tokens: int = 512, **gen):
        """OpenAI chat.completion dict (or an iterator of chat.completion.chunk dicts with stream=True)."""
        import uuid
        ids = self.apply_chat_template(messages)
        meta = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": self.config.name or self.path.name}
        if stream:
            return self._chat_chunks(ids, meta, max_tokens, gen)
        r = self.generate(ids, max_tokens=max_tokens, **gen)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "finish_reason": r.finish_reason}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(r.tokens),
                          "total_tokens": len(ids) + len(r.tokens)}}

    def _chat_chunks(self, ids, meta, max_tokens, gen) -> Iterator[dict]:
        def chunk(delta, finish=None):
            return {**meta, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        yield chunk({"role": "assistant"})
        for piece in self.stream(ids, max_tokens=max_tokens, **gen):
            yield chunk({"content": piece})
        yield chunk({}, self._last.finish_reason)

    def chat(self, messages: list[dict], **gen) -> dict:
        return self.create_chat_completion(messages, stream=False, **gen)
