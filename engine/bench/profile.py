"""The launch budget of a token (`perfx bench --profile`): every kernel launch of a prefill and of decode
steps, timed by the device (Backend.profile: OpenCL profiling events), summed per kernel.

Per kernel: launches per token, kernel µs per launch and per token, the gap before each launch (the
device idle between the end of the launch before and the start of this one), its share of the kernel
time, and, where the kernel declares its cost (engine/backends/opencl/specs.py), the bytes it moves and
the FLOPs it does per token and the GB/s it reaches, against the device's measured copy bandwidth. Per
phase: wall µs per token (the host's clock), of which kernels and host (the wall time the device spent
running no kernel: launch overheads and the gaps, or the host's own work where the device waits for it);
and enqueue µs per token, the host's time from the start of each step to its last launch enqueued (the
Python work of a token's launches, waits for the device excluded).

Each phase runs once to warm up (kernels built, launches planned), then once profiled. Profiling adds
a little host work per launch; tokens/s come from the timed tests, not from here.

    phase = profile_phase(transformer.backend, "pp512", 512, lambda: [transformer.next_token(prompt, 0)])
    print("\\n".join(phase_table(phase, transformer.backend.copy_bandwidth(), "pp512")))
"""
from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..backends import Backend, Launch


@dataclass
class KernelRow:
    """The launches of one kernel in a phase, summed."""

    kernel: str
    launches: int = 0
    kernel_ns: int = 0
    gap_ns: int = 0              # device idle before each of its launches, since the launch before ended
    bytes: int | None = None     # moved by its launches, where the kernel declares its cost
    flops: int | None = None


@dataclass
class PhaseProfile:
    """One profiled phase: a prefill of `tokens` tokens, or `tokens` decode steps."""

    name: str                    # "pp512", "tg16"
    tokens: int
    wall_ns: int                 # the host's clock over the profiled run
    enqueue_ns: int              # the host's time from the start of each step to its last launch enqueued
    kernels: list[KernelRow] = field(default_factory=list)   # by kernel time, largest first

    @classmethod
    def from_dict(cls, d: dict) -> PhaseProfile:
        return cls(d["name"], d["tokens"], d["wall_ns"], d["enqueue_ns"], [KernelRow(**k) for k in d["kernels"]])

    @property
    def launches(self) -> int:
        return sum(k.launches for k in self.kernels)

    @property
    def kernel_ns(self) -> int:
        return sum(k.kernel_ns for k in self.kernels)

    @property
    def gap_ns(self) -> int:
        return sum(k.gap_ns for k in self.kernels)

    @property
    def host_ns(self) -> int:
        """Wall time in which the device ran no kernel: the host's work per token, as the device sees it."""
        return max(self.wall_ns - self.kernel_ns, 0)

    def record(self, copy_bandwidth: float | None) -> dict:
        """The phase for JSON: per token figures in µs, bytes and FLOPs, and each kernel's."""
        n = self.tokens
        return {
            "phase": self.name, "tokens": n, "launches_per_token": self.launches / n,
            "wall_us_per_token": self.wall_ns / n / 1e3, "kernel_us_per_token": self.kernel_ns / n / 1e3,
            "host_us_per_token": self.host_ns / n / 1e3, "gap_us_per_token": self.gap_ns / n / 1e3,
            "enqueue_us_per_token": self.enqueue_ns / n / 1e3,
            "copy_bandwidth_bytes_per_s": copy_bandwidth,
            "kernels": [kernel_record(k, n, self.kernel_ns, copy_bandwidth) for k in self.kernels],
        }


def kernel_record(k: KernelRow, tokens: int, total_ns: int, copy_bandwidth: float | None) -> dict:
    """One kernel's figures for JSON: per launch and per token, its share of the phase's kernel time, and
    the GB/s its declared bytes make against the copy bandwidth."""
    rate = k.bytes / k.kernel_ns if k.bytes is not None and k.kernel_ns else None     # bytes per ns = GB/s
    return {
        "kernel": k.kernel, "launches_per_token": k.launches / tokens, "us_per_launch": k.kernel_ns / k.launches / 1e3,
        "us_per_token": k.kernel_ns / tokens / 1e3, "gap_us_per_launch": k.gap_ns / k.launches / 1e3,
        "share": k.kernel_ns / total_ns if total_ns else 0.0,
        "bytes_per_token": None if k.bytes is None else k.bytes / tokens,
        "flops_per_token": None if k.flops is None else k.flops / tokens,
        "gb_per_s": rate, "copy_bandwidth_share": rate * 1e9 / copy_bandwidth if rate and copy_bandwidth else None,
    }


def summarize(launches: list[Launch]) -> list[KernelRow]:
    """The launches of a phase summed per kernel, by kernel time, largest first."""
    rows: dict[str, KernelRow] = {}
    prev_end = None
    for launch in launches:
        row = rows.setdefault(launch.kernel, KernelRow(launch.kernel))
        row.launches += 1
        row.kernel_ns += launch.end_ns - launch.start_ns
        if prev_end is not None:
            row.gap_ns += max(0, launch.start_ns - prev_end)
        prev_end = launch.end_ns
        if launch.bytes is not None:
            row.bytes = (row.bytes or 0) + launch.bytes
            row.flops = (row.flops or 0) + (launch.flops or 0)
    return sorted(rows.values(), key=lambda r: -r.kernel_ns)


def profile_phase(backend: Backend, name: str, tokens: int, steps: Callable[[], Iterable]) -> PhaseProfile:
    """Runs the steps (an iterable whose items end each step, processing `tokens` tokens in all) once to
    warm up, then once profiled."""
    for _ in steps():
        pass
    with backend.profile() as launches:
        marks = [time.perf_counter_ns()]
        for _ in steps():
            marks.append(time.perf_counter_ns())
    return PhaseProfile(name, tokens, marks[-1] - marks[0], enqueue_time(launches, marks), summarize(launches))


def enqueue_time(launches: list[Launch], marks: list[int]) -> int:
    """The host's time, summed over steps, from each step's start (a mark) to the last launch it enqueued
    (the launches' host_ns, on the marks' clock): its Python work, without the waits for the device that
    end a step."""
    hosts = [launch.host_ns for launch in launches]
    total = 0
    for start, end in zip(marks, marks[1:]):
        last = bisect_left(hosts, end) - 1           # the last launch before the step ended
        if last >= 0 and hosts[last] >= start:
            total += hosts[last] - start
    return total


def phase_table(phase: PhaseProfile, copy_bandwidth: float | None, title: str) -> list[str]:
    """The phase as a markdown table, a line above it with the per-token totals."""
    rec = phase.record(copy_bandwidth)
    lines = [f"launch budget, {title}: {rec['launches_per_token']:.1f} launches per token; per token "
             f"{rec['wall_us_per_token']:.1f} µs wall = {rec['kernel_us_per_token']:.1f} µs kernels "
             f"+ {rec['host_us_per_token']:.1f} µs host (gaps between launches {rec['gap_us_per_token']:.1f} µs); "
             f"{rec['enqueue_us_per_token']:.1f} µs of Python enqueuing",
             "",
             "| kernel | launches/token | µs/launch | µs/token | gap µs/launch | of kernel time | MB/token "
             "| GFLOP/token | GB/s | of copy BW |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k in rec["kernels"]:
        lines.append(f"| {k['kernel']} | {k['launches_per_token']:.2f} | {k['us_per_launch']:.1f} "
                     f"| {k['us_per_token']:.1f} | {k['gap_us_per_launch']:.1f} | {k['share']:.1%} "
                     f"| {_cell(k['bytes_per_token'], 1e-6, '.3f')} | {_cell(k['flops_per_token'], 1e-9, '.4f')} "
                     f"| {_cell(k['gb_per_s'], 1, '.1f')} | {_cell(k['copy_bandwidth_share'], 1, '.0%')} |")
    return lines


def _cell(value: float | None, scale: float, fmt: str) -> str:
    return "—" if value is None else format(value * scale, fmt)
