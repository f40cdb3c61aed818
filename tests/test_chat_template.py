"""Chat prompts must render exactly as llama.cpp does (its built-in formatter and llama-cpp-python's Jinja path)."""
from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from conftest import require_llama_cpp
from edgellm.errors import EdgeLLMError
from edgellm.runtime.chat_template import CHATML_TEMPLATE, render_chat
from edgellm.runtime.gguf_file import open_gguf

PHI3 = Path(__file__).parent / "data" / "ggml-vocab-phi-3.gguf"

WITH_SYSTEM = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi! Who are you?"},
    {"role": "assistant", "content": "A model."},
    {"role": "user", "content": "Tell me a joke\nabout llamas 🦙."},
]
WITHOUT_SYSTEM = WITH_SYSTEM[1:]


def _apply_builtin(template: str, messages, add_ass: bool) -> str:
    """llama.cpp's own C++ formatter (llama_chat_apply_template), which detects the template family."""
    llama_cpp = require_llama_cpp()
    arr = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(template.encode(), arr, len(messages), add_ass, buf, len(buf))
    assert 0 < n <= len(buf), f"llama.cpp did not recognise the template (returned {n})"
    return buf.raw[:n].decode("utf-8")


def _apply_jinja(template: str, messages, add_generation_prompt: bool, bos: str = "", eos: str = "", **kw) -> str:
    """llama-cpp-python's Jinja2ChatFormatter (mirrors transformers' apply_chat_template)."""
    require_llama_cpp()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    fmt = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=add_generation_prompt)
    return fmt(messages=messages, **kw).prompt


@pytest.fixture(scope="module")
def smol(smollm2_path):
    llama_cpp = require_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)
    return llm.metadata["tokenizer.chat_template"]


@pytest.mark.parametrize("add", [True, False])
def test_smollm2_with_system_matches_llama_cpp(smol, add):
    ours = render_chat(smol, WITH_SYSTEM, add_generation_prompt=add)
    assert ours == _apply_builtin(smol, WITH_SYSTEM, add)
    assert ours == _apply_jinja(smol, WITH_SYSTEM, add)


def test_smollm2_without_system_matches_llama_cpp_jinja(smol):
    ours = render_chat(smol, WITHOUT_SYSTEM)
    assert ours == _apply_jinja(smol, WITHOUT_SYSTEM, True)
    # the template adds its own default system prompt, which llama.cpp's non-Jinja ChatML formatter omits
    assert ours.endswith(_apply_builtin(smol, WITHOUT_SYSTEM, True))
    assert ours.startswith("<|im_start|>system\n")


def test_default_is_chatml_like_llama_cpp():
    for msgs in (WITH_SYSTEM, WITHOUT_SYSTEM):
        assert render_chat(None, msgs) == _apply_builtin("chatml", msgs, True)
        assert render_chat(None, msgs, add_generation_prompt=False) == _apply_builtin("chatml", msgs, False)
    assert render_chat(None, WITH_SYSTEM) == render_chat(CHATML_TEMPLATE, WITH_SYSTEM)


def test_phi3_template_with_bos_matches_llama_cpp():
    meta = open_gguf(PHI3).metadata
    template = meta["tokenizer.chat_template"]
    tokens = meta["tokenizer.ggml.tokens"]
    bos, eos = tokens[meta["tokenizer.ggml.bos_token_id"]], tokens[meta["tokenizer.ggml.eos_token_id"]]
    ours = render_chat(template, WITHOUT_SYSTEM, bos_token=bos, eos_token=eos)
    assert ours == _apply_jinja(template, WITHOUT_SYSTEM, True, bos=bos, eos=eos)
    assert ours.startswith(bos)


FEATURES = """{%- for message in messages %}
    {%- if loop.index0 > 5 %}{% break %}{% endif %}
    {%- if message['role'] == 'tool' %}
        {{- raise_exception('tool messages are not supported') }}
    {%- endif %}
    {% if message['role'] == 'system' %}
SYS: {{ message['content'] | tojson }}
    {% else %}
{{ message['role'] | upper }}: {{ message['content'] }}{{ eos_token }}
    {% endif %}
{%- endfor %}
{%- if tools %}TOOLS: {{ tools | tojson(indent=1) }}{% endif %}
{%- if add_generation_prompt %}
ASSISTANT:{% generation %} {% endgeneration %}
{%- endif %}
DATE: {{ strftime_now('%Y') | length }}"""


def test_hf_template_features_match_llama_cpp_jinja():
    msgs = [{"role": "system", "content": "Use <b>tags</b> & \"quotes\" — ünïcode"}] + WITHOUT_SYSTEM
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": "<int>"}}}]
    ours = render_chat(FEATURES, msgs, eos_token="</s>", tools=tools)
    assert ours == _apply_jinja(FEATURES, msgs, True, eos="</s>", tools=tools)
    assert "\\u00fc" not in ours and "&lt;" not in ours  # tojson keeps unicode and does not HTML-escape


@pytest.mark.parametrize("messages, match", [
    ("hello", "must be a list"),
    ({"role": "user", "content": "x"}, "must be a list"),
    (["hello"], "message 0 is a str"),
    ([{"content": "x"}], "message 0 has no 'role'"),
    ([{"role": "user"}], r"message 0 \(user\) has no 'content'"),
    ([{"role": "user", "content": "ok"}, {"role": "assistant", "content": 3}], "message 1"),
])
def test_bad_messages_raise(messages, match):
    with pytest.raises(EdgeLLMError, match=match):
        render_chat(None, messages)


def test_template_errors_raise_edgellm_error():
    with pytest.raises(EdgeLLMError, match="not valid Jinja.*line 1"):
        render_chat("{% for m in messages %}", WITH_SYSTEM)
    with pytest.raises(EdgeLLMError, match="tool messages are not supported"):
        render_chat(FEATURES, [{"role": "tool", "content": "x"}])
    with pytest.raises(EdgeLLMError, match="TypeError"):
        render_chat("{{ messages[0]['content'] + 1 }}", WITH_SYSTEM)
    with pytest.raises(EdgeLLMError, match="chat template failed"):  # the sandbox blocks attribute access
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", WITH_SYSTEM)
    with pytest.raises(EdgeLLMError, match="chat template failed"):  # and mutation
        render_chat("{% set _ = messages.append(1) %}", WITH_SYSTEM)


def test_tool_call_message_without_content_is_accepted():
    msgs = [{"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]
    text = render_chat("{% for m in messages %}{{ m['role'] }};{% endfor %}", msgs)
    assert text == "user;assistant;"
