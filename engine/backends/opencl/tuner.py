"""The tuner behind `perfx tune`: searches the declared space of the matrix-product kernels on one
device and keeps the fastest configuration that is right.

A coordinate search, one group at a time (GEMV, few-token GEMM, tiled GEMM, two-level tiled GEMM):
every candidate of the group's search space (specs.py) is checked against NumPy on random int4 weights of the model's
shapes (a wrong or failing candidate is dropped) and timed with OpenCL profiling events (median of
15 after 3 warm-ups); the best of each group is kept before the next is searched. Each group has an
equal share of the time budget left when it starts, and stops trying candidates once that is spent.
The winners go to the device's override file (tuning.py), written atomically, which every later run
reads on top of kernels/tuning.toml.
"""
from __future__ import annotations

import itertools
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Callable

import numpy as np
import pyopencl as cl

from ...errors import PerfxError
from . import matmul
from .devices import Selection
from .runtime import Runtime
from .specs import search_space
from .tuning import params_for, write_override

# group: (kernel spec, matmul scheme, tokens per product)
GROUPS: dict[str, tuple[str, str, int]] = {
    "gemv": ("gemv", "gemv", 1),
    "few": ("gemm_few", "few", 16),
    "tiled": ("gemm_tiled", "tiled", 256),
    "reg": ("gemm_reg", "tiled", 256),
}
# what a group's every candidate sets besides its search space: gemm_reg's tilings run with tiled_reg on, and
# the group's winner keeps it on only where one beats the current setting (the tiled group's winner)
FIXED: dict[str, dict] = {"reg": {"tiled_reg": True}}
SMOLLM2_SHAPES = ((960, 576), (3072, 576), (576, 1536))   # N x K: QKV, gate+up, down of SmolLM2-135M
MARGIN = 0.03       # a candidate replaces the current setting only when this much faster (timing noise)


@dataclass
class GroupResult:
    group: str
    tokens: int
    before_s: float | None       # one pass over the shapes with the device's current setting (None: it fails)
    after_s: float | None
    chosen: dict
    tried: int = 0
    worked: int = 0

    @property
    def speedup(self) -> float | None:
        return self.before_s / self.after_s if self.before_s and self.after_s else None


@dataclass
class TuneResult:
    groups: list[GroupResult] = field(default_factory=list)
    params: dict = field(default_factory=dict)     # the tuned parameters written
    path: Path | None = None                       # the override file


Step = Callable[[str, int, int, float | None, dict], None]   # (group, done, total, best seconds, best params)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def model_shapes(config) -> tuple[tuple[int, int], ...]:
    """The N x K of a model's products: QKV, gate+up, down."""
    return ((config.q_dim + 2 * config.kv_dim, config.dim), (2 * config.ffn_dim, config.dim),
            (config.dim, config.ffn_dim))


def check_groups(groups: list[str]) -> None:
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise PerfxError(f"unknown kernel group {(unknown or [''])[0]!r}; choose from {', '.join(GROUPS)}")


class Tuner:
    def __init__(self, selection: Selection, shapes=SMOLLM2_SHAPES, group_size: int = 32, seed: int = 0):
        if selection.backend != "opencl":
            why = f" ({'; '.join(selection.notices)})" if selection.notices else ""
            raise PerfxError(f"no OpenCL device to tune{why}: the NumPy backend has nothing to tune")
        self.info = selection.info
        self.rt = Runtime(selection.device, profiling=True)
        self.rng = np.random.default_rng(seed)
        self.problems = [self._problem(n, k, group_size) for n, k in shapes]

    def _problem(self, n: int, k: int, group: int):
        if k % group:
            raise PerfxError(f"shape {n}x{k}: K is not a multiple of the group size {group}")
        q = self.rng.integers(0, 16, size=(n, k), dtype=np.uint8)
        scale = (self.rng.random((n, k // group)) * 0.02).astype(np.float32)
        zero = (-8 * scale).astype(np.float32)
        expand = lambda a: np.repeat(a.astype(np.float16).astype(np.float32), group, axis=1)  # noqa: E731
        return matmul.DeviceMatrix.from_int4(self.rt, q, scale, zero, group), q * expand(scale) + expand(zero)

    def time(self, params: dict, scheme: str, T: int) -> float | None:
        """Median seconds of one pass over the shapes, or None if the candidate fails or is wrong."""
        rt = self.rt
        try:
            mm = matmul.Matmul(rt, params)
            total = 0.0
            for w, w_host in self.problems:
                x_host = self.rng.standard_normal((T, w.cols)).astype(np.float32)
                x, y = rt.to_device(x_host), rt.empty(4 * T * w.rows)
                cl.enqueue_fill_buffer(rt.queue, y, np.float32(np.nan), 0, 4 * T * w.rows)
                mm.linear(x, w, T, y, scheme=scheme)
                want = x_host @ w_host.T
                if not np.allclose(rt.read(y, (T, w.rows)), want, atol=1e-3 * np.abs(want).max()):
                    return None
                for _ in range(3):
                    mm.linear(x, w, T, y, scheme=scheme)
                times = []
                for _ in range(15):
                    start = cl.enqueue_marker(rt.queue)
                    mm.linear(x, w, T, y, scheme=scheme)
                    end = cl.enqueue_marker(rt.queue)
                    end.wait()
                    times.append((end.profile.end - start.profile.start) * 1e-9)
                total += statistics.median(times)
            return total
        except (cl.Error, PerfxError, RuntimeError, ValueError):   # a build failure, a work-group too large...
            return None

    def run(self, groups: list[str], budget_s: float, on_step: Step | None = None,
            write: bool = True) -> TuneResult:
        check_groups(groups)
        deadline = time.monotonic() + budget_s
        best = params_for(self.info, "matmul", matmul.DEFAULT_PARAMS)
        result = TuneResult()
        for n, name in enumerate(groups):
            # each group gets an equal share of the time left, what one leaves unspent going to the next
            until = time.monotonic() + max(deadline - time.monotonic(), 0) / (len(groups) - n)
            kernel, scheme, T = GROUPS[name]
            space = search_space(kernel)
            candidates = list(itertools.product(*space.values()))
            fixed = FIXED.get(name, {})
            current = {k: best[k] for k in (*space, *fixed)}
            before = self.time(best, scheme, T)
            g = GroupResult(name, T, before, None, current)
            for i, values in enumerate(candidates):
                if time.monotonic() > until:
                    break
                candidate = {**fixed, **dict(zip(space, values))}
                t = self.time({**best, **candidate}, scheme, T)
                g.tried += 1
                if t is not None:
                    g.worked += 1
                    if g.after_s is None or t < g.after_s:
                        g.after_s, g.chosen = t, candidate
                if on_step:
                    on_step(name, i + 1, len(candidates), g.after_s, g.chosen)
            if before is not None and (g.after_s is None or g.after_s > before * (1 - MARGIN)):
                g.after_s, g.chosen = before, current        # nothing measurably faster: keep it
            best.update(g.chosen)
            result.groups.append(g)
        searched = [g.group for g in result.groups if g.tried]       # only measured groups are written
        result.params = {k: best[k] for name in searched
                         for k in (*search_space(GROUPS[name][0]), *FIXED.get(name, {}))}
        if write and result.params:
            note = f"measured {date.today().isoformat()} on {self.info.name} ({self.info.platform_label}), " \
                   f"perfx {_commit()}, budget {budget_s:g} s"
            result.path = write_override(self.info, "matmul", result.params, note=note)
        return result
