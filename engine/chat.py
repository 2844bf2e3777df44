"""Chat prompts: a model's Jinja chat template, rendered in a sandbox as HF transformers does."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import PerfxError

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Used when the model ships no template (and its vocabulary is not Gemma's)."""

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n'"
    " + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
"""Gemma's own template (as its Hugging Face tokenizer_config writes it, for text messages): used for
a file without a template whose vocabulary has Gemma's <start_of_turn> control token."""


def _raise_exception(message: str) -> None:
    raise PerfxError(f"chat template error: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _is_gemma_vocab(tokenizer: Tokenizer) -> bool:
    ids = tokenizer.encode("<start_of_turn>", special=True, add_bos=False)
    return len(ids) == 1 and tokenizer.is_control(ids[0])


class _GenerationBlock(Extension):
    """Renders the body of ``{% generation %}...{% endgeneration %}`` (an HF training marker)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """Renders a list of ``{"role", "content"}`` messages into the prompt text a model expects.

    ``source`` is the model's Jinja template (``None``: ChatML). It is compiled once; a template
    that does not compile, or that reaches for Python internals while rendering, raises
    :class:`PerfxError`.
    """

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self.source = CHATML_TEMPLATE if source is None else source
        self.is_fallback = source is None
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateError as e:
            raise PerfxError(f"the model's chat template is unsafe or invalid: {e}") from e

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> ChatTemplate:
        """The tokenizer's own template (when it has none: Gemma's for a Gemma vocabulary, else ChatML),
        with its BOS/EOS texts."""
        template = tokenizer.chat_template
        if template is None and _is_gemma_vocab(tokenizer):
            template = GEMMA_TEMPLATE
        chat = cls(template, tokenizer.bos_text, tokenizer.eos_text)
        chat.is_fallback = tokenizer.chat_template is None
        return chat

    def render(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True,
               **context: Any) -> str:
        """The prompt text; ``context`` passes extra template variables (``tools=...`` etc.)."""
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **context,
                     "messages": [dict(m) for m in messages],
                     "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(**variables)
        except PerfxError:
            raise
        except jinja2.TemplateError as e:
            raise PerfxError(f"the model's chat template is unsafe or invalid: {e}") from e
        except Exception as e:
            raise PerfxError(f"the model's chat template failed on these messages: "
                             f"{type(e).__name__}: {e}") from e
