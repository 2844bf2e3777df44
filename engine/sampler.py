"""Choosing the next token from logits: greedy, or temperature with top-k, top-p and min-p.

The settings are declared once, in OPTIONS (name, type, range, defaults, help); `perfx run` and
`perfx chat` take their flags from it, chat's /set its keys and the HTTP API its fields and checks.
The sampler is numerically safe over the whole declared range: logits in float64, shifted by their
maximum before the temperature divides them (a temperature of 1e-307 is greedy, not NaN), and the
most likely token always stays in the draw.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Iterable

import numpy as np

from .errors import PerfxError

SEED_MAX = 2**64 - 1            # numpy's generators take seeds in 0..2**64-1


@dataclass(frozen=True)
class Option:
    """One sampling setting, as every surface sees it."""

    name: str                   # the Sampling field
    type: type                  # int or float
    low: float | None           # the range; None: unbounded on that side
    high: float | None
    default: Any                # `perfx run` and `perfx chat`'s default
    help: str
    flag: str | None = None     # the `perfx run` / `perfx chat` option (None: the command declares its own)
    key: str = ""               # chat's /set key (default: the name)
    api: str | None = None      # the HTTP API's request field (None: not there, or checked by the API itself)
    api_default: Any = None     # the API's default (OpenAI's)
    low_open: bool = False      # low itself is outside the range
    high_open: bool = False
    optional: bool = False      # None is a value (seed: a random one)

    @property
    def set_key(self) -> str:
        return self.key or self.name

    @property
    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}" \
                if self.type is float else f"in {self.low}..{self.high}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"

    def problem(self, value: Any) -> str | None:
        """Why `value` cannot be this setting (None when it can)."""
        if value is None:
            return None if self.optional else f"must be {'an integer' if self.type is int else 'a number'}"
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or \
                (self.type is int and not isinstance(value, (int, np.integer))):
            return f"must be {'an integer' if self.type is int else 'a number'}"
        if isinstance(value, (float, np.floating)) and not np.isfinite(value):
            return "must be a finite number"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"must be {self.range_text}" if below or above else None

    def parse(self, text: str) -> Any:
        """A value typed as text (chat's /set); ValueError when it is not one."""
        if self.optional and text.lower() in ("none", "random", "off"):
            return None
        value = self.type(text)
        if self.type is float and not np.isfinite(value):
            raise ValueError(text)
        return value

    @property
    def kind(self) -> str:
        kind = "a whole number" if self.type is int else "a number"
        return f"{kind} or 'random'" if self.optional else kind


OPTIONS: tuple[Option, ...] = (
    Option("temperature", float, 0, 2, 0.8, "Temperature; 0 is greedy.", "--temp", key="temp",
           api="temperature", api_default=1.0),
    Option("top_k", int, 0, None, 40, "Keep the k most likely tokens (0: off).", "--top-k", api="top_k",
           api_default=0),
    Option("top_p", float, 0, 1, 0.95, "Nucleus sampling mass (1: off).", "--top-p", api="top_p",
           api_default=1.0, low_open=True),
    Option("min_p", float, 0, 1, 0.05, "Drop tokens below min_p x the top probability (0: off).", "--min-p",
           api="min_p", api_default=0.0, high_open=True),
    Option("repeat_penalty", float, 0, None, 1.0, "Penalty for recent tokens (1: off).", "--repeat-penalty",
           api="repetition_penalty", api_default=1.0, low_open=True),
    Option("repeat_last_n", int, 0, None, 64, "How many recent tokens the repeat penalty looks at."),
    Option("seed", int, 0, SEED_MAX, None, "Random seed: same seed, same text (default: a random one).", "--seed",
           api="seed", optional=True),
    Option("max_tokens", int, 0, None, 256, "Most tokens to generate."),
)
OPTION = {o.name: o for o in OPTIONS}


class SamplingError(PerfxError):
    """A setting outside its range; `option` names it, `problem` says what it must be."""

    def __init__(self, option: Option, problem: str, value: Any):
        super().__init__(f"bad sampling setting: {option.set_key} {problem}")
        self.option, self.problem, self.value = option, problem, value


@dataclass(frozen=True)
class Sampling:
    temperature: float = OPTION["temperature"].default    # 0 means greedy
    top_k: int = OPTION["top_k"].default                  # 0 means off
    top_p: float = OPTION["top_p"].default                # 1 means off
    min_p: float = OPTION["min_p"].default                # 0 means off; keeps tokens with p >= min_p * p_max
    repeat_penalty: float = OPTION["repeat_penalty"].default  # 1 means off; llama.cpp's: divide positive logits,
    repeat_last_n: int = OPTION["repeat_last_n"].default      # multiply negative ones, over the last n tokens
    seed: int | None = OPTION["seed"].default             # same seed, same text
    max_tokens: int = OPTION["max_tokens"].default

    def __post_init__(self):
        for f in fields(self):
            option = OPTION[f.name]
            problem = option.problem(getattr(self, f.name))
            if problem:
                raise SamplingError(option, problem, getattr(self, f.name))

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
        """The distribution the next token is drawn from (all zeros but one when greedy); never NaN."""
        s = self.s
        logits = np.array(logits, dtype=np.float64)
        if np.isnan(logits).any():
            raise PerfxError("the model's logits are NaN; the model file or the device is broken")
        if s.repeat_penalty != 1.0 and s.repeat_last_n:
            recent = np.unique(np.fromiter(history, dtype=np.int64)[-s.repeat_last_n :])
            if recent.size:
                seen = logits[recent]
                with np.errstate(over="ignore"):
                    logits[recent] = np.where(seen > 0, seen / s.repeat_penalty, seen * s.repeat_penalty)
        big = np.finfo(np.float64).max
        np.clip(logits, -big, big, out=logits)    # an infinite logit (or penalty) would make inf - inf
        if s.greedy:
            p = np.zeros_like(logits)
            p[int(np.argmax(logits))] = 1.0
            return p

        keep = np.ones(logits.shape, dtype=bool)
        if s.top_k and s.top_k < logits.size:
            kth = np.partition(logits, -s.top_k)[-s.top_k]
            keep &= logits >= kth
        with np.errstate(over="ignore"):           # far below the top: -inf, probability 0
            z = np.where(keep, (logits - logits.max()) / s.temperature, -np.inf)
        p = np.exp(z)                              # the top token is exp(0) = 1, so the sum is >= 1
        if s.min_p > 0:
            p[p < s.min_p * p.max()] = 0.0
        if s.top_p < 1.0:
            p /= p.sum()
            order = np.argsort(-p, kind="stable")
            before = np.cumsum(p[order]) - p[order]       # mass of the tokens ranked above each one
            p[order[before >= s.top_p]] = 0.0
        return p / p.sum()

    def __call__(self, logits: np.ndarray, history: Iterable[int] = ()) -> int:
        if self.s.greedy and self.s.repeat_penalty == 1.0:
            return int(np.argmax(logits))
        p = self.probabilities(logits, history)
        return int(self.rng.choice(p.size, p=p))
