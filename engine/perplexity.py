"""Perplexity as llama.cpp's llama-perplexity measures it.

The text is tokenized without special tokens and cut into non-overlapping windows of `ctx`
tokens; the first token of each window is replaced by BOS; in each window the logits at
positions ctx/2 .. ctx-2 score the following token. PPL = exp(mean NLL), and the error is
PPL times the standard error of the mean NLL.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import PerfxError


@dataclass
class PerplexityResult:
    ppl: float
    ppl_error: float
    tokens_scored: int
    chunk_ppl: list[float] = field(default_factory=list)   # running estimate after each window

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "ppl_error": self.ppl_error, "tokens_scored": self.tokens_scored,
                "chunk_ppl": self.chunk_ppl}


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) for each row of logits [n, vocab], in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1))
    return z[np.arange(len(targets)), targets] - lse


def perplexity(model, text: str, ctx: int = 512, chunks: int | None = None,
               on_chunk: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    tokens = model.tokenizer.encode(text, special=False, add_bos=False)
    if ctx < 4:
        raise PerfxError(f"--ctx must be at least 4 (got {ctx})")
    if ctx > model.ctx:
        raise PerfxError(f"--ctx {ctx} is larger than the model's loaded context {model.ctx}")
    available = len(tokens) // ctx
    if available == 0:
        raise PerfxError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}; use a smaller --ctx")
    n_chunks = available if chunks is None else min(chunks, available)
    bos = model.tokenizer.bos_id

    nll = []
    result = PerplexityResult(0.0, 0.0, 0)
    first = ctx // 2
    for c in range(n_chunks):
        window = np.array(tokens[c * ctx:(c + 1) * ctx], dtype=np.int64)
        if bos is not None:
            window[0] = bos
        model.reset()
        logits = model.forward(window, 0)
        targets = np.array(tokens[c * ctx + first + 1:(c + 1) * ctx], dtype=np.int64)
        nll.extend((-log_softmax_at(logits[first:ctx - 1], targets)).tolist())
        result.chunk_ppl.append(math.exp(float(np.mean(nll))))
        if on_chunk:
            on_chunk(c + 1, n_chunks, result.chunk_ppl[-1])

    values = np.array(nll)
    mean = float(values.mean())
    stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    result.ppl = math.exp(mean)
    result.ppl_error = result.ppl * stderr
    result.tokens_scored = len(values)
    return result
