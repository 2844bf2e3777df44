"""The copy bandwidth of each OpenCL device: kernels/copy.cl timed on the device, measured once per boot
and kept in `<root>/devices.json` (`<root>`: engine.dirs.cache_dir()), the figure the bench measures its
kernels' achieved GB/s against.
"""
from __future__ import annotations

import json
import statistics
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ...dirs import cache_dir
from ...errors import PerfxError
from . import devices
from .devices import MiB, DeviceInfo, atomic_write_text, describe, runtime

if TYPE_CHECKING:
    from pathlib import Path

    import pyopencl as cl


def _handle(info: DeviceInfo) -> cl.Device:
    for other, handle in devices.enumerate_devices():
        if other.id == info.id and other.name == info.name:
            return handle
    raise PerfxError(f"{info.label} is no longer among this machine's OpenCL devices")


def _resolve(device: cl.Device | DeviceInfo) -> tuple[DeviceInfo, cl.Device]:
    if isinstance(device, DeviceInfo):
        return device, _handle(device)
    return describe(device), device


def devices_json() -> Path:
    return cache_dir() / "devices.json"


def _bandwidth_key(info: DeviceInfo) -> str:
    """The device key plus its compute units: a PoCL CPU's bandwidth depends on its thread count."""
    return f"{info.key} | {info.compute_units} CU"


def _read_cache() -> dict:
    try:
        data = json.loads(devices_json().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, entry: dict) -> None:
    """Adds `entry` under `key` in devices.json (temp file + rename); a read-only cache is left as is."""
    path = devices_json()
    data = _read_cache()
    old = data.get(key)
    data[key] = {**(old if isinstance(old, dict) else {}), **entry}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError:
        pass


def bandwidth_buffer_bytes(info: DeviceInfo) -> int:
    """Bytes per copy buffer: min(256 MiB, max_alloc / 4) on GPUs, 64 MiB on CPUs, within an eighth of memory."""
    size = 64 * MiB if info.type == "cpu" else min(256 * MiB, info.max_alloc // 4)
    return max(min(size, info.max_alloc, info.global_mem // 8), MiB)


def measure_bandwidth(device: cl.Device | DeviceInfo, nbytes: int | None = None, runs: int = 5) -> float:
    """Copy bandwidth of `device` in bytes/s (bytes read + written): kernels/copy.cl over buffers
    of `nbytes` (default: bandwidth_buffer_bytes), one warm-up then the median of `runs`."""
    import pyopencl as cl

    info, handle = _resolve(device)
    rt = runtime(handle)
    local = max(1, min(64 if info.type == "cpu" else 256, info.max_work_group_size))
    n4 = (nbytes or bandwidth_buffer_bytes(info)) // (16 * local) * local       # float4 elements
    if n4 == 0:
        raise PerfxError(f"a copy of {nbytes} bytes is too small to measure")
    size = 16 * n4
    queue = cl.CommandQueue(rt.ctx, properties=cl.command_queue_properties.PROFILING_ENABLE)
    src, dst = rt.empty(size), rt.empty(size)
    try:
        cl.enqueue_fill_buffer(queue, src, b"\0\0\x80\x3f", 0, size)
        cl.enqueue_fill_buffer(queue, dst, b"\0\0\0\0", 0, size)
        kernel = cl.Kernel(rt.program("copy"), "copy4")
        kernel.set_args(src, dst)
        seconds = []
        for _ in range(runs + 1):
            queue.finish()
            start = time.perf_counter()
            event = cl.enqueue_nd_range_kernel(queue, kernel, (n4,), (local,))
            event.wait()
            wall = time.perf_counter() - start
            try:
                seconds.append((event.profile.end - event.profile.start) * 1e-9 or wall)
            except cl.Error:
                seconds.append(wall)
    finally:
        src.release()
        dst.release()
    return 2 * size / statistics.median(seconds[1:])


def boot_time() -> float:
    """When this machine booted (Unix time); 0 where unknown."""
    try:
        import psutil

        return float(psutil.boot_time())
    except Exception:  # psutil missing or no access to the boot time
        return 0.0


def _cached_bandwidth(key: str) -> float | None:
    """The figure devices.json holds for `key` when it was measured since the machine booted."""
    entry = _read_cache().get(key)
    if not isinstance(entry, dict):
        return None
    value, stamp = entry.get("copy_bandwidth"), entry.get("measured_at")
    try:
        measured = datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return None
    if not isinstance(value, (int, float)) or value <= 0 or measured < boot_time():
        return None
    return float(value)


def bandwidth(device: cl.Device | DeviceInfo, measure: bool = True, fresh: bool = False) -> float | None:
    """The copy bandwidth of `device` (a pyopencl Device or a DeviceInfo) in bytes/s: the best figure
    measured since the machine booted, kept in devices.json. Without one, measured now (None when
    `measure` is False); with `fresh`, measured now too, the higher of the two kept (a copy measured
    while other processes ran reads low, and would let a share of it pass 100%)."""
    info = describe(device)
    key = _bandwidth_key(info)
    cached = _cached_bandwidth(key)
    if (cached is not None and not fresh) or not measure:
        return cached
    value = measure_bandwidth(device)
    if cached is not None and cached >= value:
        return cached
    _write_cache(key, {
        "copy_bandwidth": value,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return value
