"""Chat templates: exact renderings, the ChatML fallback, template errors and the sandbox."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from perfx.engine.text.chat_template import CHATML_TEMPLATE, ChatTemplate
from perfx.engine.errors import PerfxError
from tests.conftest import smollm2_gguf


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
]


def test_smollm2_template_is_the_files() -> None:
    import gguf

    reader = gguf.GGUFReader(smollm2_gguf())
    assert reader.fields["tokenizer.chat_template"].contents() == SMOLLM2_TEMPLATE


def test_smollm2_rendering() -> None:
    prompt = ChatTemplate(SMOLLM2_TEMPLATE).render(QUESTION)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_without_generation_prompt() -> None:
    prompt = ChatTemplate(SMOLLM2_TEMPLATE).render(CONVERSATION, add_generation_prompt=False)
    assert prompt == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )


def test_chatml_fallback() -> None:
    template = ChatTemplate(None)
    assert template.is_fallback and template.source == CHATML_TEMPLATE
    assert template.render(CONVERSATION) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert template.render(CONVERSATION, add_generation_prompt=False).endswith("Hello.<|im_end|>\n")


def test_bos_eos_and_extra_variables() -> None:
    source = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}"
              "{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}")
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    assert template.render(QUESTION[:1]) == "<s>[user] What is the capital of France?</s>"
    assert template.render([{"role": "user", "content": "é"}], tools=[{"name": "ç"}]) == \
        '<s>[user] é</s>[{"name": "ç"}]'


def test_from_tokenizer() -> None:
    tok = SimpleNamespace(chat_template=None, bos_text="<s>", eos_text="</s>",
                          encode=lambda text, special, add_bos: [5, 6], is_control=lambda i: False)
    template = ChatTemplate.from_tokenizer(tok)
    assert template.is_fallback and (template.bos_token, template.eos_token) == ("<s>", "</s>")
    assert template.source == CHATML_TEMPLATE


def test_gemma_vocab_without_template_gets_gemma_template() -> None:
    """A file without a template whose vocab has Gemma's <start_of_turn> control token: Gemma's turns."""
    tok = SimpleNamespace(chat_template=None, bos_text="<bos>", eos_text="<eos>",
                          encode=lambda text, special, add_bos: [105], is_control=lambda i: i == 105)
    template = ChatTemplate.from_tokenizer(tok)
    text = template.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_raise_exception() -> None:
    source = ("{% if messages[0]['role'] != 'user' %}"
              "{{ raise_exception('roles must alternate') }}{% endif %}")
    with pytest.raises(PerfxError, match="chat template error: roles must alternate"):
        ChatTemplate(source).render([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
])
def test_sandbox_escape_refused(source: str) -> None:
    with pytest.raises(PerfxError, match="unsafe or invalid"):
        ChatTemplate(source).render(QUESTION)


def test_invalid_template() -> None:
    with pytest.raises(PerfxError, match="unsafe or invalid"):
        ChatTemplate("{% for message in messages %}")


def test_loop_controls_and_strftime() -> None:
    source = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
              "{{ m.content }}{% endfor %}|{{ strftime_now('%Y') | length }}")
    assert ChatTemplate(source).render(CONVERSATION) == "You are terse.|4"


@pytest.mark.parametrize("source", [
    "{{ 'x' * 10**8 }}",
    "{{ 10**8 * 'x' }}",
    "{{ ([0] * 10**8) | length }}",
    "{{ 'x' | center(10**8) }}",
    "{{ 'x'.ljust(10**8) }}",
    "{{ 2 ** (10 ** 8) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(27) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(27) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
])
def test_template_size_budget(source: str) -> None:
    """A template that would make a huge string, list or number is stopped before it makes it."""
    with pytest.raises(PerfxError, match="chat template"):
        ChatTemplate(source).render(QUESTION)


@pytest.mark.parametrize("source", [
    "{% for i in range(3000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}",
    "{% set s = 'x' * 3000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(22) }}",
])
def test_template_time_budget(source: str) -> None:
    """Loops or calls that run for long (here seconds; for ever in a hostile file) stop at the deadline."""
    import time

    template = ChatTemplate(source)
    template.max_seconds = 0.2
    start = time.monotonic()
    with pytest.raises(PerfxError, match="did not finish within 0.2 s"):
        template.render(QUESTION)
    assert time.monotonic() - start < 1.0
