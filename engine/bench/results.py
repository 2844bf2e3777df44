"""What a bench run found: the timed samples of each test, what each engine says about itself, and
one result per test, engine, device and thread count."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from .probes import Build
from .profile import PhaseProfile
from .spec import BenchConfig, ModelSpec, TestSpec


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def stddev(values: list[float]) -> float:
    """Sample standard deviation (n - 1), 0 for fewer than two values: llama-bench's."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Samples:
    """The timed repetitions of one test: nanoseconds each, and the tokens each one processed."""

    n_tokens: int
    ns: list[int] = field(default_factory=list)

    @property
    def ts(self) -> list[float]:
        return [self.n_tokens * 1e9 / ns for ns in self.ns]

    @property
    def avg_ts(self) -> float:
        return mean(self.ts)

    @property
    def stddev_ts(self) -> float:
        return stddev(self.ts)

    @property
    def median_ts(self) -> float:
        return statistics.median(self.ts) if self.ns else 0.0

    @property
    def avg_ns(self) -> int:
        return round(mean(self.ns))

    @property
    def stddev_ns(self) -> int:
        return round(stddev(self.ns))


@dataclass
class EngineInfo:
    """What a worker says about its engine once the model is loaded, then about memory and bandwidth."""

    engine: str                   # "perfx" or "llama.cpp"
    version: str                  # "perfx 0.1.0", "llama-cpp-python 0.3.36"
    backend: str                  # "OpenCL", "NumPy", "CPU", "GPU"
    device: str                   # "opencl:0:0", "numpy", "cpu"
    device_name: str
    device_type: str              # "cpu" or "gpu"
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_gpu_layers: int
    kv_type: str                  # "f32" or "f16"
    kv_element_bytes: int
    weight_bytes: int             # weight bytes read per decoded token
    notices: list[str] = field(default_factory=list)
    peak_rss: int | None = None
    device_bytes: int | None = None
    copy_bandwidth: float | None = None
    profile: list[PhaseProfile] | None = None    # perfx's launch budget, with --profile (profile.py)

    @property
    def label(self) -> str:
        """The backend column: "perfx OpenCL", "llama.cpp CPU"."""
        return f"{self.engine} {self.backend}"


@dataclass
class Result:
    """One row: a test of a model on one engine, device and thread count."""

    model: ModelSpec
    test: TestSpec
    threads: int
    info: EngineInfo
    samples: Samples
    test_time: str
    ratio: float | None = None    # perfx t/s over llama.cpp's, on perfx rows of a --vs run

    @property
    def engine(self) -> str:
        return self.info.engine

    @property
    def bytes_per_token(self) -> int | None:
        """Weights plus the KV cache read per generated token, on average over a tg test; None otherwise."""
        if self.test.n_prompt or not self.test.n_gen:
            return None
        positions = (self.test.n_gen + 1) / 2
        kv = 2 * self.model.n_layers * self.model.kv_dim * self.info.kv_element_bytes * positions
        return int(self.info.weight_bytes + kv)

    @property
    def bandwidth(self) -> float | None:
        """Bytes read per second while generating (tg tests)."""
        b = self.bytes_per_token
        return b * self.samples.avg_ts if b is not None and self.samples.ns else None

    @property
    def bandwidth_share(self) -> float | None:
        """The achieved bandwidth over the device's measured copy bandwidth."""
        if self.bandwidth is None or not self.info.copy_bandwidth:
            return None
        return self.bandwidth / self.info.copy_bandwidth


@dataclass
class BenchRun:
    config: BenchConfig
    build: Build
    results: list[Result] = field(default_factory=list)
    interrupted: bool = False
    error: str | None = None      # why the run stopped early, after some results
    load: float = 0.0             # the 1-minute load average when the run started: other processes' work

    @property
    def n_tests(self) -> int:
        return len(self.config.combos()) * len(self.config.tests) * len(self.config.engines)
