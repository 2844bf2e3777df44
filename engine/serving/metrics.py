"""What the server counts, and its Prometheus text exposition (format 0.0.4).

Counters only grow; gauges are read when /metrics is asked. The scheduler thread updates
`EngineCounters`; the HTTP side counts requests by route and status.
"""
from __future__ import annotations

import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field


@dataclass
class EngineCounters:
    """Written by the scheduler thread, read by /metrics (ints and floats: reads need no lock)."""

    prompt_tokens: int = 0        # prompt tokens computed (a preempted sequence's recompute included)
    generation_tokens: int = 0    # tokens sampled
    steps: int = 0                # batched model steps
    step_tokens: int = 0          # tokens over all steps
    step_sequences: int = 0       # sequences over all steps
    preemptions: int = 0          # sequences sent back to wait for KV blocks
    finished: Counter = field(default_factory=Counter)   # by finish reason: stop, length, cancelled, error
    window: deque = field(default_factory=deque)         # (time, tokens sampled) of recent steps
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)   # guards window

    WINDOW_S = 10.0

    def record_step(self, n_tokens: int, n_sequences: int, n_prompt: int, n_sampled: int) -> None:
        self.steps += 1
        self.step_tokens += n_tokens
        self.step_sequences += n_sequences
        self.prompt_tokens += n_prompt
        self.generation_tokens += n_sampled
        now = time.monotonic()
        with self.lock:
            self.window.append((now, n_sampled))
            while self.window and self.window[0][0] < now - self.WINDOW_S:
                self.window.popleft()

    def tokens_per_second(self) -> float:
        """Tokens sampled per second over the last WINDOW_S seconds."""
        now = time.monotonic()
        with self.lock:
            recent = [(t, n) for t, n in self.window if t >= now - self.WINDOW_S]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span


class RequestCounter:
    """HTTP requests by (route, status), counted from the event loop and read from anywhere."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter = Counter()

    def add(self, route: str, status: int) -> None:
        with self._lock:
            self._counts[(route, status)] += 1

    def items(self) -> list[tuple[tuple[str, int], int]]:
        with self._lock:
            return sorted(self._counts.items())


def exposition(metrics: list[tuple[str, str, str, list[tuple[dict, float]]]]) -> str:
    """Prometheus text from (name, type, help, [(labels, value), ...])."""
    lines = []
    for name, kind, text, samples in metrics:
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            lines.append(f"{name}{{{label_text}}} {_number(value)}" if label_text else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of a Prometheus text exposition: {(name, ((label, value), ...)): value}; ValueError if malformed."""
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = sample.match(line)
        if not m:
            raise ValueError(f"not a Prometheus sample line: {line!r}")
        labels = tuple(sorted(label.findall(m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out
