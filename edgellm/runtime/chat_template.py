"""Render chat messages into a prompt with the model's Jinja chat template.

Why: chat models only answer well when prompted in the exact format they were trained on, and that
format ships as a Jinja template (GGUF `tokenizer.chat_template`, HF `tokenizer_config.json`). We
render it the way Hugging Face transformers' apply_chat_template does (sandboxed, trim/lstrip
blocks, raise_exception, strftime_now, tojson), which is also what llama.cpp's --jinja mode follows.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import EdgeLLMError

# Used when the model has no template: ChatML, the most common chat format.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _IgnoreGenerationTags(jinja2.ext.Extension):
    """Pass-through for HF's `{% generation %}` tag (it only marks assistant text for training masks)."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Like transformers: no HTML escaping (jinja's own tojson escapes <, >, & and ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_IgnoreGenerationTags, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise EdgeLLMError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})",
                           "fix the template or use a model whose GGUF has a working tokenizer.chat_template") from None


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)):
        raise EdgeLLMError(f"chat messages must be a list of {{'role', 'content'}} dicts, "
                           f"got {type(messages).__name__}",
                           'pass e.g. [{"role": "user", "content": "Hello"}]')
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise EdgeLLMError(f"chat message {i} is a {type(m).__name__}, not a dict",
                               'pass e.g. {"role": "user", "content": "Hello"}')
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise EdgeLLMError(f"chat message {i} has no 'role' string", 'give it a role such as "user"')
        content = m.get("content")
        if not (isinstance(content, (str, list)) or (content is None and m.get("tool_calls"))):
            raise EdgeLLMError(f"chat message {i} ({m['role']}) has no 'content' string",
                               "give every message a text 'content'")


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **kwargs) -> str:
    """The prompt text for `messages` (ChatML if `template` is None); extra kwargs (tools, ...) go to the template."""
    _check_messages(messages)
    compiled = _compile(template if template is not None else CHATML_TEMPLATE)
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **kwargs)
    except jinja2.TemplateError as e:
        raise EdgeLLMError(f"the chat template failed: {e}",
                           "check the messages (roles, order) against what the model's template accepts") from None
    except Exception as e:  # noqa: BLE001 - a template can fail with any Python error (TypeError on None + str, ...)
        raise EdgeLLMError(f"the chat template failed: {type(e).__name__}: {e}",
                           "check the messages (roles, order) against what the model's template accepts") from None
