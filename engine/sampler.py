"""Choosing the next token from logits: greedy, or temperature with top-k, top-p and min-p."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

import numpy as np

from .errors import PerfxError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8     # 0 means greedy
    top_k: int = 40              # 0 means off
    top_p: float = 0.95          # 1 means off
    min_p: float = 0.05          # 0 means off; keeps tokens with p >= min_p * p_max
    repeat_penalty: float = 1.0  # 1 means off; llama.cpp's: divide positive logits, multiply negative ones
    repeat_last_n: int = 64      # how many recent tokens the penalty looks at
    seed: int | None = None      # same seed, same text
    max_tokens: int = 256

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
            (self.max_tokens >= 0, "max_tokens must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise PerfxError(f"bad sampling setting: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **changes) -> "Sampling":
        return replace(self, **changes)


class Sampler:
    def __init__(self, sampling: Sampling):
        self.s = sampling
        self.rng = np.random.default_rng(sampling.seed)

    def probabilities(self, logits: np.ndarray, history: Iterable[int] = ()) -> np.ndarray:
        """The distribution the next token is drawn from (all zeros but one when greedy)."""
        s = self.s
        logits = np.asarray(logits, dtype=np.float64).copy()
        if s.repeat_penalty != 1.0 and s.repeat_last_n:
            recent = np.unique(np.fromiter(history, dtype=np.int64)[-s.repeat_last_n :])
            if recent.size:
                seen = logits[recent]
                logits[recent] = np.where(seen > 0, seen / s.repeat_penalty, seen * s.repeat_penalty)
        if s.greedy:
            p = np.zeros_like(logits)
            p[int(np.argmax(logits))] = 1.0
            return p

        keep = np.ones(logits.shape, dtype=bool)
        if s.top_k and s.top_k < logits.size:
            kth = np.partition(logits, -s.top_k)[-s.top_k]
            keep &= logits >= kth
        z = np.where(keep, logits / s.temperature, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        if s.min_p > 0:
            p[p < s.min_p * p.max()] = 0.0
        if s.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            before = np.cumsum(p[order]) - p[order]       # mass of the tokens ranked above each one
            p[order[before >= s.top_p]] = 0.0
        return p / p.sum()

    def __call__(self, logits: np.ndarray, history: Iterable[int] = ()) -> int:
        if self.s.greedy and self.s.repeat_penalty == 1.0:
            return int(np.argmax(logits))
        p = self.probabilities(logits, history)
        return int(self.rng.choice(p.size, p=p))
