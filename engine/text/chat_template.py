"""Chat prompts: a model's Jinja chat template, rendered in a sandbox as HF transformers does.

The template comes with the model file, so it is untrusted code. The sandbox refuses Python
internals; on top of it a rendering has a budget of time and size (`ChatTemplate.max_seconds`,
`max_chars`): every loop step and call checks the clock, and every string or list a template makes
(by `*`, `+`, `~`, a call or a filter), like the output as it grows, is checked against the size
limit, before it is made where its size is known in advance. A template over budget is stopped
with a PerfxError instead of rendering for ever or growing without bound.
"""
from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from perfx.engine.errors import PerfxError

if TYPE_CHECKING:
    from perfx.engine.text.tokenizer import Tokenizer

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


MAX_SECONDS = 5.0          # a real template renders in milliseconds
MAX_CHARS = 1 << 23        # 8 Mi characters: 2M tokens or so, more than any model's context
MAX_POWER_BITS = 1 << 16   # the largest integer `**` may make


@dataclass
class _Budget:
    """What one rendering may still spend; checked from inside the template's code."""

    deadline: float
    seconds: float
    chars: int

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise PerfxError(f"the model's chat template did not finish within {self.seconds:g} s "
                             "(a loop that never ends?); it was stopped")

    def size(self, n: int) -> None:
        if n > self.chars:
            raise PerfxError(f"the model's chat template makes a string or list of {n} items, more than "
                             f"the {self.chars} allowed; it was stopped")

    def check_args(self, args: tuple, kwargs: dict) -> None:
        """An integer argument beyond the size limit (a width, a count) would make something too large."""
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool):
                self.size(abs(value))

    def check_result(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple, dict)):
            self.size(len(value))
        return value


_BUDGET: ContextVar[_Budget] = ContextVar("chat_template_budget")
_SIZED = (str, list, tuple)


def _checked(fn: Any) -> Any:
    """A filter (or global) with the budget's checks on its arguments and result."""

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        budget.tick()
        budget.check_args(args, kwargs)
        return budget.check_result(fn(*args, **kwargs))

    return checked


class _Budgeted(NodeTransformer):
    """Rewrites a parsed template so that each loop step and each `~` goes through the budget."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = _call("budget_iter", node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        return _call("budget_concat", *self.generic_visit(node).nodes)


def _call(method: str, *args: nodes.Expr) -> nodes.Call:
    return nodes.Call(nodes.EnvironmentAttribute(method), list(args), [], None, None, lineno=args[0].lineno)


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with the current rendering's budget (`_BUDGET`) checked in loops, calls,
    operators and filters."""

    intercepted_binops = frozenset(["*", "+", "**"])

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _Budgeted().visit(super()._parse(source, name, filename))

    def budget_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        budget = _BUDGET.get()
        for item in iterable:
            budget.tick()
            yield item

    def budget_concat(self, *values: Any) -> str:
        texts = [str(v) for v in values]
        _BUDGET.get().size(sum(map(len, texts)))
        return "".join(texts)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _BUDGET.get()
        budget.tick()
        if __obj not in (__self.budget_iter, __self.budget_concat):
            budget.check_args(args, kwargs)
        return budget.check_result(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _BUDGET.get()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, _SIZED) and isinstance(n, int):
                    budget.size(len(seq) * n)
        elif operator == "+" and isinstance(left, _SIZED) and isinstance(right, _SIZED):
            budget.size(len(left) + len(right))
        elif (operator == "**" and isinstance(left, int) and isinstance(right, int)
              and abs(left) > 1 and right * left.bit_length() > MAX_POWER_BITS):
            raise PerfxError(f"the model's chat template computes {left} ** {right}, too large a number; "
                             "it was stopped")
        return super().call_binop(context, operator, left, right)


def _environment() -> jinja2.Environment:
    env = BudgetedSandbox(
        trim_blocks=True, lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _checked(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """Renders a list of ``{"role", "content"}`` messages into the prompt text a model expects.

    ``source`` is the model's Jinja template (``None``: ChatML). It is compiled once; a template
    that does not compile, or that reaches for Python internals while rendering, raises
    :class:`PerfxError`, as does a rendering over its budget of `max_seconds` and `max_chars`.
    """

    max_seconds = MAX_SECONDS
    max_chars = MAX_CHARS

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
        budget = _Budget(time.monotonic() + self.max_seconds, self.max_seconds, self.max_chars)
        token = _BUDGET.set(budget)
        try:
            out: list[str] = []
            n = 0
            for piece in self._template.generate(**variables):
                n += len(piece)
                budget.size(n)
                budget.tick()
                out.append(piece)
            return "".join(out)
        except PerfxError:
            raise
        except jinja2.TemplateError as e:
            raise PerfxError(f"the model's chat template is unsafe or invalid: {e}") from e
        except Exception as e:
            raise PerfxError(f"the model's chat template failed on these messages: "
                             f"{type(e).__name__}: {e}") from e
        finally:
            _BUDGET.reset(token)
