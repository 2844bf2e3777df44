"""`perfx devices`: the OpenCL devices of this machine, whether they build kernels, their copy
bandwidth (measured once, then read from devices.json) and how they are tuned (the tuning database's
levels that match their vendor and architecture keys, and the tuner's file), with the NumPy backend last."""
from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from perfx.engine.backends.opencl import bandwidth as bw
from perfx.engine.backends.opencl import devices as dev
from perfx.engine.backends.opencl import tuning
from perfx.engine.errors import PerfxError

GiB = 1 << 30


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[dim]no[/]"


def _bandwidth_cell(info: dev.DeviceInfo, handle: Any, measure: bool, err: Console) -> tuple[str, str | None]:
    """The bandwidth column's text, and why it has no figure where a failure is the reason."""
    reason = dev.probe(handle)
    if reason is not None:
        return "—", f"cannot build kernels: {reason}"
    try:
        value = bw.bandwidth(info, measure=False)
        if value is None and measure:
            spinner = err.status(f"measuring the copy bandwidth of {info.id}…", spinner="dots")
            with spinner if err.is_terminal else nullcontext():
                value = bw.bandwidth(handle)
    except PerfxError as e:
        return "—", str(e)
    return (f"{value / 1e9:,.1f}", None) if value is not None else ("[dim]not measured[/]", None)


def tuning_of(info: dev.DeviceInfo) -> dict[str, Any]:
    """How the device is tuned: its database keys, the levels of kernels/tuning.toml that match, the tuner's file."""
    when = tuning.override_date(info)
    return {"vendor": info.vendor_key, "architecture": info.architecture or None,
            "levels": [level.name for level in tuning.matching_levels(info)],
            "override": str(tuning.override_path(info)) if when else None,
            "override_date": when.isoformat() if when else None}


def _tuning_cell(info: dev.DeviceInfo) -> str:
    t = tuning_of(info)
    lines = [escape(name) for name in t["levels"]] or ["[dim]built-in defaults[/]"]
    lines.append(f"[green]perfx tune {t['override_date']}[/]" if t["override"] else "[dim]no perfx tune file[/]")
    return "\n".join(lines)


def _numpy_row() -> list[str]:
    import numpy as np
    import psutil

    memory = psutil.virtual_memory().total / GiB
    return ["numpy", f"NumPy\n[dim]{np.__version__}[/]", "reference backend (host CPU)", "cpu", f"{memory:,.1f}",
            str(os.cpu_count() or "?"), "—", "—", "—"]


def devices_json(found: list, measure: bool, err: Console) -> str:
    """The devices as a JSON list (bytes and bytes/s), the NumPy backend last."""
    import psutil

    rows: list[dict[str, Any]] = []
    for info, handle in found:
        reason = dev.probe(handle)
        bandwidth, note = None, None if reason is None else f"cannot build kernels: {reason}"
        if reason is None:
            try:
                bandwidth = bw.bandwidth(info, measure=False)
                if bandwidth is None and measure:
                    bandwidth = bw.bandwidth(handle)
            except PerfxError as e:
                note = str(e)
        rows.append({"id": info.id, "platform": info.platform_name, "platform_label": info.platform_label,
                     "device": info.name, "type": info.type, "memory_bytes": info.global_mem,
                     "compute_units": info.compute_units, "images": info.has_images, "fp16": info.has_fp16,
                     "copy_bytes_per_s": bandwidth, "architecture": info.architecture or None,
                     "tuned": tuning.is_tuned(info), "tuning": tuning_of(info), "note": note})
    rows.append({"id": "numpy", "platform": "NumPy", "platform_label": "reference backend (host CPU)",
                 "device": "host CPU", "type": "cpu", "memory_bytes": psutil.virtual_memory().total,
                 "compute_units": os.cpu_count(), "images": None, "fp16": None, "copy_bytes_per_s": None,
                 "architecture": None, "tuned": None, "tuning": None, "note": None})
    return json.dumps(rows, indent=2)


def devices_command(measure: bool = True, as_json: bool = False) -> None:
    """Prints the table of devices; `measure` measures the bandwidth of devices not yet in the cache."""
    out = Console() if sys.stdout.isatty() else Console(width=200)
    err = Console(stderr=True, highlight=False)
    found = dev.enumerate_devices()
    if as_json:
        print(devices_json(found, measure, err))
        return
    table = Table(title="perfx devices")
    for name, right in (("id", False), ("platform", False), ("device", False), ("type", False),
                        ("memory GiB", True), ("CUs", True), ("images", False), ("fp16", False),
                        ("copy GB/s", True), ("vendor / arch", False), ("tuning", False)):
        table.add_column(name, justify="right" if right else "left")
    notes: list[str] = []
    for info, handle in found:
        cell, why = _bandwidth_cell(info, handle, measure, err)
        if why:
            notes.append(f"{info.id}: {why}")
        table.add_row(
            info.id,
            f"{escape(info.platform_name)}\n[dim]{escape(info.platform_label)}[/]",
            escape(info.name),
            info.type,
            f"{info.global_mem / GiB:,.1f}",
            str(info.compute_units),
            _yes(info.has_images),
            _yes(info.has_fp16),
            cell,
            escape(f"{info.vendor_key} / {info.architecture or '—'}"),
            _tuning_cell(info),
        )
    table.add_row(*_numpy_row(), "—", "—")
    out.print(table)
    if not found:
        notes.append(dev.NO_PLATFORM)
    for note in notes:
        out.print(f"[dim]{escape(note)}[/]", soft_wrap=True)
    out.print("[dim]--device takes an id, or auto, opencl, gpu, cpu, numpy; "
              "copy bandwidth counts bytes read + written; tuning: the levels of kernels/tuning.toml that match "
              "(type, vendor, architecture, device) and the date of this machine's `perfx tune --device ID`[/]")
