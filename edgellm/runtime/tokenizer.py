"""Tokenizers that give the same token ids as llama.cpp, built with the `tokenizers` library.

Why: the model was trained on llama.cpp-compatible ids, and golden tests compare against llama.cpp,
so we rebuild llama.cpp's rules (llama-vocab.cpp) from `tokenizers` building blocks instead of
writing BPE by hand:

* GGUF "gpt2" vocab -> byte-level BPE from tokens+merges, with the pre-tokenizer regexes llama.cpp
  uses for `tokenizer.ggml.pre` (each regex splits the pieces of the previous one, like
  llama.cpp's `unicode_regex_split`).
* GGUF "llama" vocab (SentencePiece) -> llama.cpp's score-driven merge (llm_tokenizer_spm) is a BPE
  whose merges are every pair (a, b) with a, b and a+b in the vocab, ranked by the score of a+b
  (HF's LlamaConverter idea), with byte fallback and a "▁" prefix added to every text fragment.
* Control/unknown tokens become special added tokens (parsed only with special=True), user-defined
  tokens non-special added tokens (always parsed), exactly like llama.cpp's tokenizer_st_partition.
"""
from __future__ import annotations

import json
import re
import threading
import warnings
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from ..errors import ModelFormatError, UnsupportedModelError

if TYPE_CHECKING:  # `tokenizers` is imported where a tokenizer is built: a bundle defers that to the first encode
    from tokenizers import Tokenizer as HFTokenizer


class TokenType(IntEnum):
    """GGUF `tokenizer.ggml.token_type` codes (llama_token_type)."""
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Regexes from llama.cpp's llm_tokenizer_bpe (llama-vocab.cpp). GPT-2's pattern gets the trailing
# "|\s+" that llama.cpp's hand-written matcher for it (unicode_regex_split_custom_gpt2) implements.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
           r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?"
          r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "llama3": (_LLAMA3,),
    "starcoder": (r"\p{N}", _GPT2),
    "qwen2": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "deepseek3": (r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
                  r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                  r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"),
    "poro": (_PORO,),
    "viking": (_PORO, r"\p{N}"),
    "tekken": (_TEKKEN,),
    "gpt4o": (_GPT4O,),
    "seed-coder": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                   r"|\s+(?!\S)|\s+",),
    "bailingmoe": (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",),
    "ufakzeka": (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "minicpm5": (r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
}

# `tokenizer.ggml.pre` value -> (regex set, llama.cpp flags), as in llama_vocab::impl::load.
_PRE_ALIASES: dict[str, tuple[str, dict[str, bool]]] = {}
for _names, _kind, _flags in [
    ("default", "default", {}),
    ("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", "llama3",
     {"ignore_merges": True, "add_bos": True}),
    ("dbrx smaug-bpe", "llama3", {}),
    ("chatglm-bpe", "llama3", {"no_bos": True}),
    ("glm4 glm5", "llama3", {"no_bos": True, "ignore_merges": True}),
    ("deepseek-v3 hunyuan-dense joyai-llm hy_v4", "deepseek3", {}),
    ("deepseek-coder", "deepseek-coder", {}),
    ("falcon", "falcon", {}),
    ("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2", "starcoder", {}),
    ("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert mpt olmo jais "
     "trillion granite-docling exaone4", "gpt2", {}),
    ("qwen2 deepseek-r1-qwen kormo f2llmv2 stablelm2 hunyuan solar-open megrez", "qwen2", {}),
    ("grok-2", "qwen2", {}),
    ("qwen35", "qwen35", {}),
    ("poro-chat bloom gpt3-finnish", "poro", {}),
    ("viking", "viking", {}),
    ("tekken", "tekken", {"ignore_merges": True, "add_bos": True}),
    ("gpt-4o llama4 kanana2 talkie minimax-m2", "gpt4o", {}),
    ("seed-coder", "seed-coder", {}),
    ("bailingmoe bailingmoe2 llada-moe", "bailingmoe", {}),
    ("ufakzeka", "ufakzeka", {}),
    ("minicpm5", "minicpm5", {"ignore_merges": True}),
]:
    for _name in _names.split():
        _PRE_ALIASES[_name] = (_kind, _flags)

SUPPORTED_MODELS = ("gpt2", "llama")

# Token texts llama.cpp treats as end of generation (llama_vocab::impl::load, special_eog_ids).
_EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
])
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_FIM_TEXTS = {  # all are made control tokens; only pad/rep/sep end generation
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_SPM_SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the one ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    """Text <-> token ids with llama.cpp's rules; wraps a `tokenizers.Tokenizer`.

    `hf` may be a function that builds it, called on first use, and `tokens` None (read from it then):
    a bundle's tokenizer costs nothing until text is encoded.
    """

    def __init__(self, hf: HFTokenizer | Callable[[], HFTokenizer], tokens: list[str] | None, token_types: list[int],
                 *, model: str, byte_level: bool, bos_id: int | None, eos_id: int | None, eog_ids: set[int],
                 add_bos: bool, add_eos: bool, add_space_prefix: bool = False, chat_template: str | None = None,
                 vocab_size: int | None = None):
        self._hf, self._build_hf = (None, hf) if callable(hf) else (hf, None)
        self._tokens = tokens
        self.model = model  # "gpt2" / "llama" (GGUF tokenizer.ggml.model) or the tokenizer.json model type
        self.token_types = token_types
        self.byte_level = byte_level
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eog_ids = set(eog_ids)
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.vocab_size = len(tokens) if vocab_size is None else vocab_size
        self.chat_template = chat_template
        self._pieces: dict[int, bytes] = {}
        self._lock = threading.Lock()  # encode_special_tokens is a setting of the shared hf object
        self._rstrip: dict[bool, re.Pattern | None] = {True: None, False: None}

    @property
    def hf(self) -> HFTokenizer:
        if self._hf is None:
            with self._lock:
                if self._hf is None:
                    self._hf = self._build_hf()
        return self._hf

    @property
    def tokens(self) -> list[str]:
        """Every token's text by id ("" for an id the tokenizer lacks)."""
        if self._tokens is None:
            tokens = [""] * self.vocab_size
            for text, i in self.hf.get_vocab(with_added_tokens=True).items():
                if 0 <= i < self.vocab_size:
                    tokens[i] = text
            self._tokens = tokens
        return self._tokens

    def _set_rstrip(self, ids: set[int]) -> None:
        """Tokens that swallow the ASCII whitespace after them (C isspace, as llama.cpp's RSTRIP attribute).

        Done on the text because `tokenizers`' own rstrip also eats Unicode spaces (U+2028, U+3000...).
        """
        for special in (True, False):
            texts = sorted({self.tokens[i] for i in ids
                            if special or self.token_types[i] == TokenType.USER_DEFINED}, key=len, reverse=True)
            self._rstrip[special] = (re.compile("(" + "|".join(map(re.escape, texts)) + ")[ \t\n\v\f\r]+")
                                     if texts else None)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> "Tokenizer":
        """Build from GGUF key/values (`tokenizer.ggml.*`), the way llama.cpp's llama_vocab loads them."""
        model = metadata.get("tokenizer.ggml.model")
        if model not in SUPPORTED_MODELS:
            raise UnsupportedModelError(
                f"tokenizer model {model!r} (tokenizer.ggml.model) is not supported",
                f"edgellm supports {', '.join(SUPPORTED_MODELS)}; use a model with one of these tokenizers")
        tokens = _string_list(metadata, "tokenizer.ggml.tokens")
        n = len(tokens)
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        types = list(metadata.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * n)
        if len(types) < n:
            raise ModelFormatError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens",
                                   "re-convert the model with llama.cpp's convert_hf_to_gguf.py")
        types = [int(t) for t in types[:n]]

        if model == "gpt2":
            pre = metadata.get("tokenizer.ggml.pre") or ""
            if pre not in _PRE_ALIASES:
                known = ", ".join(sorted(_PRE_ALIASES))
                warnings.warn(f"unknown or missing pre-tokenizer type {pre!r} (tokenizer.ggml.pre), using 'default' "
                              f"as llama.cpp did; token ids may differ from the model's training. Known: {known}",
                              stacklevel=2)
                pre = "default"
            kind, flags = _PRE_ALIASES[pre]
            merges = _string_list(metadata, "tokenizer.ggml.merges")
            hf = _build_bpe(tokens, merges, PRE_TOKENIZER_REGEXES[kind], flags.get("ignore_merges", False))
            bos, eos, add_bos, add_space_prefix = 11, 11, flags.get("add_bos", False), False
            if flags.get("no_bos"):
                bos = None
        else:
            scores = metadata.get("tokenizer.ggml.scores")
            scores = [float(s) for s in scores] if scores is not None else [0.0] * n
            add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
            hf = _build_spm(tokens, scores, types, add_space_prefix)
            bos, eos, add_bos = 1, 2, True

        bos = _token_id(metadata, "tokenizer.ggml.bos_token_id", bos, n)
        eos = _token_id(metadata, "tokenizer.ggml.eos_token_id", eos, n)
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        ids = {k: _token_id(metadata, f"tokenizer.ggml.{k}_token_id", None, n)
               for k in ("eot", "eom", "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep")}
        eog = _eog_ids(tokens, types, eos, ids)
        _add_special_tokens(hf, tokens, types)
        if add_bos and bos is not None:
            from tokenizers import processors
            hf.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                              pair=f"{tokens[bos]} $A {tokens[bos]} $B",
                                                              special_tokens=[(tokens[bos], bos)])
        tok = cls(hf, tokens, types, model=model, byte_level=(model == "gpt2"), bos_id=bos, eos_id=eos, eog_ids=eog,
                  add_bos=add_bos and bos is not None, add_eos=add_eos and eos is not None,
                  add_space_prefix=add_space_prefix, chat_template=metadata.get("tokenizer.chat_template"))
        tok._set_rstrip(_rstrip_tokens(metadata, tokens, types))
        return tok

    @classmethod
    def from_hf_dir(cls, path) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, generation_config.json) of a Hugging Face model."""
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise ModelFormatError(f"{tj} does not exist",
                                   "point to a Hugging Face model directory that has tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(tj))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
            raise ModelFormatError(f"{tj} is not a valid tokenizer.json ({e})", "re-download the model") from None
        config = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")

        vocab = hf.get_vocab(with_added_tokens=True)
        n = max(vocab.values()) + 1 if vocab else 0
        tokens = [f"[EMPTY_{i}]" for i in range(n)]
        for text, i in vocab.items():
            tokens[i] = text
        raw = json.loads(hf.to_str())
        byte_level = _uses_byte_level(raw)
        types = [TokenType.NORMAL] * n
        if not byte_level:
            for i, t in enumerate(tokens):
                if _BYTE_TOKEN.match(t):
                    types[i] = TokenType.BYTE
        for i, added in hf.get_added_tokens_decoder().items():
            types[i] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED

        def tok_id(value) -> int | None:
            if isinstance(value, dict):
                value = value.get("content")
            return vocab.get(value) if isinstance(value, str) else None

        bos = tok_id(config.get("bos_token"))
        eos = tok_id(config.get("eos_token"))
        gen_bos = gen.get("bos_token_id")
        if bos is None and isinstance(gen_bos, int):
            bos = gen_bos
        gen_eos = gen.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if eos is None and gen_eos:
            eos = gen_eos[0]
        probe = hf.encode("", add_special_tokens=True).ids
        add_bos = config.get("add_bos_token", bos is not None and probe[:1] == [bos])
        add_eos = config.get("add_eos_token", eos is not None and probe[-1:] == [eos])
        eog = _eog_ids(tokens, types, eos, {}) | {i for i in gen_eos if isinstance(i, int) and 0 <= i < n}
        add_space_prefix = not byte_level and _prepends_space(raw)
        return cls(hf, tokens, types, model=str(raw.get("model", {}).get("type", "")).lower(),
                   byte_level=byte_level, bos_id=bos, eos_id=eos, eog_ids=eog,
                   add_bos=bool(add_bos) and bos is not None, add_eos=bool(add_eos) and eos is not None,
                   add_space_prefix=add_space_prefix, chat_template=_hf_chat_template(path, config))

    # ---- use ----------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of `text`, like llama.cpp's llama_tokenize.

        add_bos: None adds the model's default BOS/EOS (llama.cpp add_special=True), True forces BOS
        (and the model's default EOS), False adds neither. special: parse control tokens written in
        the text (llama.cpp parse_special); user-defined tokens are parsed either way.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str, got {type(text).__name__}")
        strip = self._rstrip[bool(special)]
        if strip is not None:
            text = strip.sub(r"\1", text)
        hf = self.hf
        with self._lock:
            hf.encode_special_tokens = not special
            ids = hf.encode(text, add_special_tokens=False).ids if text else []
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_bos is not False and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (llama.cpp token_to_piece with special=True), for streaming UTF-8."""
        piece = self._pieces.get(token_id)
        if piece is None:
            if not 0 <= token_id < self.vocab_size:
                raise IndexError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
            piece = self._pieces[token_id] = self._piece(token_id)
        return piece

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; the inverse of encode (the space SPM adds before each text fragment is removed)."""
        out = bytearray()
        after_special = True
        for i in ids:
            kind = self.token_types[i] if 0 <= i < self.vocab_size else TokenType.NORMAL
            if kind in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED):
                if not (skip_special and kind != TokenType.USER_DEFINED):
                    out += self.token_bytes(i)
                after_special = True
                continue
            piece = self.token_bytes(i)
            if after_special and self.add_space_prefix and piece.startswith(b" "):
                piece = piece[1:]
            out += piece
            after_special = False
        return out.decode("utf-8", errors="replace")

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def is_special(self, token_id: int) -> bool:
        """Control/unknown token (not shown by decode(skip_special=True))."""
        return self.token_types[token_id] in (TokenType.CONTROL, TokenType.UNKNOWN)

    def _piece(self, i: int) -> bytes:
        text, kind = self.tokens[i], self.token_types[i]
        if kind in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED):
            return text.encode("utf-8")
        if kind == TokenType.BYTE:
            m = _BYTE_TOKEN.match(text)
            if m:
                return bytes([int(m.group(1), 16)])
        elif kind != TokenType.NORMAL:
            return b""  # llama.cpp renders unused/undefined tokens as nothing
        if self.byte_level:
            return b"".join(bytes([_BYTE_DECODER[c]]) if c in _BYTE_DECODER else c.encode("utf-8") for c in text)
        return text.replace(_SPM_SPACE, " ").encode("utf-8")


# ---- builders ---------------------------------------------------------------------------------


def _build_bpe(tokens: list[str], merges: Sequence[str], regexes: Sequence[str], ignore_merges: bool) -> HFTokenizer:
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        p = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
        if p > 0:
            pairs.append((m[:p], m[p + 1:]))
    try:
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    except Exception as e:  # noqa: BLE001
        raise ModelFormatError(f"the GGUF BPE vocabulary is inconsistent ({e})",
                               "re-convert the model with llama.cpp's convert_hf_to_gguf.py") from None
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


def _build_spm(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool) -> HFTokenizer:
    """llama.cpp's SPM merge as a BPE: merge (a, b) -> a+b whenever all three are tokens, best score first."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for t, i in vocab.items():
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], i, a, b))
    ranked.sort()
    byte_fallback = any(k == TokenType.BYTE for k in types)
    unk = next((tokens[i] for i, k in enumerate(types) if k == TokenType.UNKNOWN), None)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked], unk_token=unk,
                                byte_fallback=byte_fallback, fuse_unk=True))
    steps = [normalizers.Prepend(_SPM_SPACE)] if add_space_prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", _SPM_SPACE)])
    hf.decoder = decoders.Sequence([decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return hf


def _add_special_tokens(hf: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control/unknown -> special (parse_special only), user-defined -> always split out, as llama.cpp."""
    from tokenizers import AddedToken
    special, user = [], []
    for i, k in enumerate(types):
        if k in (TokenType.CONTROL, TokenType.UNKNOWN):
            special.append(AddedToken(tokens[i], special=True, normalized=False))
        elif k == TokenType.USER_DEFINED:
            user.append(AddedToken(tokens[i], special=False, normalized=False))
    if special:
        hf.add_special_tokens(special)
    if user:
        hf.add_tokens(user)


def _eog_ids(tokens: list[str], types: list[int], eos: int | None, ids: dict[str, int | None]) -> set[int]:
    """End-of-generation ids as llama.cpp computes them (special_eog_ids), marking them control like it does."""
    by_text = {t: i for i, t in enumerate(tokens)}  # last id wins for duplicates, as llama.cpp's token_to_id

    def find(texts):  # llama.cpp takes whichever its hash map yields first; we take the lowest id
        hits = [by_text[t] for t in texts if t in by_text]
        return min(hits) if hits else None

    control = set()
    eot = ids.get("eot") if ids.get("eot") is not None else find(_EOT_TEXTS)
    eog = {i for t, i in by_text.items() if t in _EOG_TEXTS}
    for k, texts in _FIM_TEXTS.items():
        i = ids.get(k) if ids.get(k) is not None else find(texts)
        if i is not None:
            control.add(i)
            if k in ("fim_pad", "fim_rep", "fim_sep"):
                eog.add(i)
    for i in (eos, eot, ids.get("eom")):
        if i is not None:
            eog.add(i)
    texts = {tokens[i] for i in eog}
    if "<|end|>" in texts and (({"<|return|>", "<|call|>"} <= texts) or ({"<|calls|>", "<|flush|>"} <= texts)):
        eog.discard(by_text["<|end|>"])
    if "</s>" in texts and texts & {"<|tool_response>", "<|plamo:eos|>"}:
        eog.discard(by_text["</s>"])
    for i in eog | control:  # llama.cpp forces these to control type, so they are parsed as special tokens
        if types[i] not in (TokenType.CONTROL, TokenType.UNKNOWN):
            types[i] = TokenType.CONTROL
    for i, t in enumerate(tokens):  # llama.cpp's gpt-oss workaround: always rendered, never control
        if t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            types[i] = TokenType.USER_DEFINED
    return eog


def _rstrip_tokens(metadata: dict, tokens: list[str], types: list[int]) -> set[int]:
    """Tokens that eat the whitespace after them: llama.cpp sets this for Phi-3 by model name."""
    name = str(metadata.get("general.name", "")).lower()
    if "phi-3" not in name and "phi3" not in name:
        return set()
    keep = {"<unk>", "<s>", "<|endoftext|>"}
    return {i for i, k in enumerate(types)
            if (k in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED) or tokens[i] == "</s>")
            and tokens[i] not in keep}


# ---- metadata helpers -------------------------------------------------------------------------


def _string_list(metadata: dict, key: str) -> list[str]:
    value = metadata.get(key)
    if not isinstance(value, (list, tuple)) or (value and not isinstance(value[0], str)):
        raise ModelFormatError(f"GGUF key {key} is missing or not a string array",
                               "re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    return list(value)


def _token_id(metadata: dict, key: str, default: int | None, n: int) -> int | None:
    value = metadata.get(key, default)
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < n:
        warnings.warn(f"{key} = {value} is outside the vocabulary of {n} tokens; ignoring it", stacklevel=3)
        return default if default is not None and 0 <= default < n else None
    return value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path} is not valid JSON ({e})", "re-download the model") from None


def _uses_byte_level(raw: dict) -> bool:
    text = json.dumps([raw.get("pre_tokenizer"), raw.get("decoder")])
    return '"ByteLevel"' in text


def _prepends_space(raw: dict) -> bool:
    text = json.dumps([raw.get("normalizer"), raw.get("pre_tokenizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"never"' not in text)


def _hf_chat_template(path: Path, config: dict) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) else None
