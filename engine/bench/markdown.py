"""A bench run as llama-bench's markdown table, perfx's columns after it, and a footer that says what
was measured on which device."""
from __future__ import annotations

import os
from collections.abc import Callable

from .profile import phase_table
from .results import BenchRun, Result

MiB, GiB = 1 << 20, 1 << 30


def _size(n: int) -> str:
    return f"{n / MiB:.2f} MiB" if n < GiB else f"{n / GiB:.2f} GiB"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"


def _memory(n: int | None) -> str:
    if n is None:
        return "—"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB" if n >= 10 * MiB else f"{n / MiB:.1f} MiB"


def _columns(run: BenchRun) -> list[tuple[str, int, Callable[[Result], str]]]:
    """(header, minimum width (negative: left-aligned), cell) of each markdown column."""
    cols: list[tuple[str, int, Callable[[Result], str]]] = [
        ("model", -30, lambda r: r.model.description),
        ("size", 10, lambda r: _size(r.model.size)),
        ("params", 10, lambda r: _params(r.model.n_params)),
        ("backend", -10, lambda r: r.info.label),
    ]
    if len({r.info.device for r in run.results if r.engine == "perfx"}) > 1:
        cols.append(("dev", -12, lambda r: r.info.device))
    cols += [
        ("threads", 7, lambda r: str(r.threads)),
        ("test", 15, lambda r: r.test.name),
        ("t/s", 20, lambda r: f"{r.samples.avg_ts:.2f} ± {r.samples.stddev_ts:.2f}"),
    ]
    if run.config.vs_llama_cpp:
        cols.append(("vs llama.cpp", 12, lambda r: f"{r.ratio:.2f}x" if r.ratio is not None else ""))
    cols += [
        ("peak RSS", 9, lambda r: _memory(r.info.peak_rss)),
        ("dev mem", 9, lambda r: _memory(r.info.device_bytes)),
        ("GB/s", 6, lambda r: "—" if r.bandwidth is None else f"{r.bandwidth / 1e9:.1f}"),
        ("of copy BW", 10, _share),
    ]
    return cols


def _share(r: Result) -> str:
    """The share of the copy bandwidth; over 100% marked *, which the footer explains."""
    if r.bandwidth_share is None:
        return "—"
    return f"{100 * r.bandwidth_share:.0f}%" + ("*" if r.bandwidth_share > 1 else "")


# Memory bandwidth on the datasheet (bytes/s), by a substring of the OpenCL device name; shown beside
# the measured copy bandwidth. Add a device here when its datasheet figure is known.
DATASHEET_PEAKS = {
    "H100 80GB HBM3": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H200": 4.8e12,
    "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12, "A100-PCIE-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12,
    "L40S": 864e9, "L4": 300e9, "RTX 4090": 1.008e12, "RTX 3090": 936e9, "Adreno (TM) 750": 77e9,
}


def datasheet_peak(device_name: str) -> float | None:
    """The datasheet memory bandwidth of a device, where DATASHEET_PEAKS knows it."""
    matches = [(len(k), v) for k, v in DATASHEET_PEAKS.items() if k.lower() in device_name.lower()]
    return max(matches)[1] if matches else None


def format_markdown(run: BenchRun) -> str:
    """llama-bench's table (model, size, params, backend, threads, test, t/s), perfx's columns after it,
    a footer: build, devices, what the columns mean; then the launch budgets of --profile."""
    cols = _columns(run)
    cells = [[cell(r) for _, _, cell in cols] for r in run.results]
    widths = [max([abs(w), len(h)] + [len(row[i]) for row in cells]) for i, (h, w, _) in enumerate(cols)]

    def line(values: list[str]) -> str:
        parts = [v.ljust(width) if w < 0 else v.rjust(width) for v, width, (_, w, _) in zip(values, widths, cols)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(" " + ("-" * width if w < 0 else "-" * (width - 1) + ":") + " "
                          for width, (_, w, _) in zip(widths, cols)) + "|"
    lines = [line([h for h, _, _ in cols]), rule] + [line(row) for row in cells]
    return "\n".join(lines + [""] + footer(run) + launch_budgets(run)) + "\n"


def footer(run: BenchRun) -> list[str]:
    c, b = run.config, run.build
    lines = [f"build: {b.commit} (perfx {b.version})"]
    devices: dict[str, list[Result]] = {}
    for r in run.results:
        if r.engine == "perfx":
            devices.setdefault(r.info.device, []).append(r)
    for device, rows in devices.items():
        i = rows[0].info
        copies = {r.threads: r.info.copy_bandwidth for r in rows if r.info.copy_bandwidth}
        measured = ", ".join(f"{bw / 1e9:.1f} GB/s ({t} thread{'s' * (t != 1)})" for t, bw in copies.items())
        peak = datasheet_peak(i.device_name)
        lines.append(f"device {device}: {i.device_name} ({i.device_type}), KV cache {i.kv_type}"
                     + (f"; measured copy bandwidth {measured}" if measured else "")
                     + (f"; datasheet peak {peak / 1e9:.0f} GB/s" if peak else ""))
    llama = next((r.info for r in run.results if r.engine == "llama.cpp"), None)
    if llama is not None:
        lines.append(f"llama.cpp: {llama.version}, {llama.backend} backend, KV cache {llama.kv_type}, "
                     "same GGUF file and threads, runs alternating with perfx")
    for m in {m.shape: m for m in c.models if m.shape}.values():
        lines.append(synthetic_footprint(m.shape, c.n_ctx(m), [r for r in run.results if r.model is m]))
    ctxs = "/".join(str(n) for n in sorted({r.info.n_ctx for r in run.results if r.engine == "perfx"}))
    lines.append(f"t/s: mean ± stddev of {c.reps} run{'s' * (c.reps != 1)} after one warm-up; "
                 f"context {ctxs or c.ctx} tokens; "
                 "peak RSS: each engine's process; dev mem: device buffers (weights, KV cache, activations); "
                 "GB/s (tg tests): weights + KV cache read per token x t/s; of copy BW: share of the device's "
                 "measured copy bandwidth")
    if any(r.bandwidth_share and r.bandwidth_share > 1 for r in run.results):
        lines.append("* over 100% of the copy bandwidth: part of what a token reads came from the CPU's caches "
                     "(a small model or a short context), which the copy test's 64 MiB buffers do not reach; "
                     "the copy is measured with each run and the best figure since boot kept")
    cpus = os.cpu_count() or 1
    if run.load > max(1.0, cpus / 4):
        lines.append(f"warning: load average {run.load:.1f} on {cpus} CPUs when the run started: other processes "
                     "competed for the CPU, so the numbers are noisy")
    if run.interrupted or run.error:
        lines.append(f"{'interrupted' if run.interrupted else 'stopped by an error'}: "
                     f"{len(run.results)} of {run.n_tests} tests finished")
    return lines


def launch_budgets(run: BenchRun) -> list[str]:
    """The launch budget tables (profile.py) of each perfx worker that was profiled."""
    lines: list[str] = []
    profiled = {id(r.info): r for r in run.results if r.info.profile is not None}
    for r in profiled.values():
        where = f"{r.model.description} · {r.info.device} · {r.threads} thread{'s' * (r.threads != 1)}"
        for phase in r.info.profile:
            lines += [""] + phase_table(phase, r.info.copy_bandwidth, f"{where} · {phase.name}")
    return lines


def synthetic_footprint(shape_name: str, ctx: int, rows: list[Result] = ()) -> str:
    """What a synthetic shape needs: int4 weights plus an f16 KV cache at ctx, and what perfx allocated."""
    from ..synthetic import get_shape

    s = get_shape(shape_name)
    kv = s.kv_bytes(ctx, 2)
    text = (f"{s.name} (synthetic, {_params(s.n_params)} params): int4 g{s.group} weights {_size(s.nbytes)} "
            f"+ KV cache at {ctx} tokens {_size(kv)} (f16) = {_size(s.nbytes + kv)}")
    measured: dict[str, int] = {}
    for r in rows:
        if r.engine == "perfx" and r.info.device_bytes:
            measured[r.info.device] = max(measured.get(r.info.device, 0), r.info.device_bytes)
    if measured:
        text += "; perfx allocated " + ", ".join(f"{_size(n)} on {d}" for d, n in measured.items())
    return text
