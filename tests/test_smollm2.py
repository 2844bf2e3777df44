"""The default model end to end: its chat prompt, a greedy answer, and perplexity on a real text."""
from __future__ import annotations

from pathlib import Path

import pytest

from perfx.engine import Sampling
from perfx.engine.perplexity import perplexity

pytestmark = pytest.mark.model

CAPITAL_PROMPT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
                      407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520,
                      9531, 198]
GPL3 = Path("/usr/share/common-licenses/GPL-3")


def chat_ids(model, question: str) -> list[int]:
    text = model.chat_template.render([{"role": "user", "content": question}])
    return model.tokenizer.encode(text, special=True)


def test_chat_prompt_encodes_exactly(smollm):
    assert chat_ids(smollm, "What is the capital of France?") == CAPITAL_PROMPT_IDS


def test_greedy_answer(smollm):
    ids, stats = smollm.generate(CAPITAL_PROMPT_IDS, Sampling(temperature=0, max_tokens=32))
    assert smollm.tokenizer.decode(ids) == "The capital of France is Paris."
    assert stats.finish == "stop"


@pytest.mark.slow
@pytest.mark.skipif(not GPL3.exists(), reason="needs /usr/share/common-licenses/GPL-3")
def test_perplexity_gpl3(smollm):
    """llama.cpp (llama-cpp-python 0.3.36) scores the same 4 windows of 512 at 18.364 (scripts/perplexity_peer.py)."""
    result = perplexity(smollm, GPL3.read_text(), ctx=512, chunks=4)
    assert result.tokens_scored == 4 * 255
    assert 18.0 <= result.ppl <= 18.6, result.ppl
