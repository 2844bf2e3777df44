#!/usr/bin/env python3
"""Achieved bandwidth of the int4 GEMV (one token) at given shapes, against the device's copy bandwidth.

    python scripts/gemv_bandwidth.py --device gpu --shapes 4096x4096,11008x4096 --group 128
    python scripts/gemv_bandwidth.py --device gpu --grid "gemv_ksplit=32,64;gemv_tpw=1,2,4"

Bytes moved per call: the packed weights (nibbles, fp16 scales and zeros) + x + y. The weights come from
DRAM: calls cycle through enough copies of the matrix to overflow the device's last-level cache four
times (at least 256 MiB). Timed with OpenCL profiling events three ways: gated (runs of 20 calls held by
a user event until enqueued, then run back to back, launch gaps included), streamed (20 calls queued
behind a long copy, so that they wait in the device's queue without a user event, launch gaps
included), and kernel (one call's own start to end: what the kernel moves while it runs); medians. --grid times every combination of the
given matmul parameters (merged over the device's tuned values) and marks the fastest per shape. The
last column compares with kernels/copy.cl moving the same number of bytes, timed the same way: the
most any one kernel of that size reaches on the device, its fixed launch cost included.
"""
from __future__ import annotations

import argparse
import itertools
import statistics

import numpy as np
import pyopencl as cl

from perfx.engine.backends.opencl import matmul
from perfx.engine.backends.opencl.bandwidth import bandwidth
from perfx.engine.backends.opencl.devices import select
from perfx.engine.backends.opencl.runtime import Runtime
from perfx.engine.backends.opencl.tuning import params_for

CALLS = 20


def parse_grid(text: str) -> list[dict]:
    axes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, values = part.split("=")
        axes.append([(name.strip(), int(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def time_call(rt: Runtime, mm: matmul.Matmul, copies: list, x, y) -> tuple[float, float, float]:
    """Device seconds per call three ways (timings below): gated, streamed, and the kernels alone."""
    def enqueue(i):
        return mm.linear(x, copies[i % len(copies)], 1, y)

    return gated(rt, enqueue), streamed(rt, enqueue), kernel_only(rt, enqueue)


def kernel_only(rt: Runtime, enqueue) -> float:
    """Median device time of one call's launches, each from its start to its end (profiling events),
    the gaps between launches not counted: what the kernels themselves take while they run."""
    times = []
    for i in range(CALLS * 6):
        events = enqueue(i)
        rt.queue.finish()
        if i >= CALLS:
            times.append(sum(e.profile.end - e.profile.start for e in events) * 1e-9)
    return statistics.median(times)


def streamed(rt: Runtime, enqueue) -> float:
    """Device seconds per call of CALLS calls enqueued while a long copy occupies the device (so they
    wait in the device's own queue, no user event involved) and then run back to back: from the end of
    that copy to the end of the last call, divided by CALLS. Median of 15 runs after 3."""
    n4 = 1 << 26                                            # 1 GiB read + 1 GiB written, ~0.7 ms
    src, dst = rt.empty(16 * n4), rt.empty(16 * n4)
    kernel = cl.Kernel(rt.program("copy"), "copy4")
    kernel.set_args(src, dst)
    times = []
    for run in range(18):
        filler = cl.enqueue_nd_range_kernel(rt.queue, kernel, (n4,), (256,))
        for i in range(CALLS):
            enqueue(run * CALLS + i)
        end = cl.enqueue_marker(rt.queue)
        end.wait()
        if run >= 3:
            times.append((end.profile.end - filler.profile.end) * 1e-9 / CALLS)
    return statistics.median(times)


def gated(rt: Runtime, enqueue) -> float:
    """Device seconds per call of enqueue(i), run as in time_call."""
    times = []
    for run in range(18):
        gate = cl.UserEvent(rt.ctx)
        start = cl.enqueue_marker(rt.queue, wait_for=[gate])
        for i in range(CALLS):
            enqueue(run * CALLS + i)
        end = cl.enqueue_marker(rt.queue)
        gate.set_status(cl.command_execution_status.COMPLETE)
        end.wait()
        if run >= 3:
            times.append((end.profile.end - start.profile.end) * 1e-9 / CALLS)
    return statistics.median(times)


def copy_of_size(rt: Runtime, nbytes: int, cache: int) -> tuple[float, float, float]:
    """Bytes/s of kernels/copy.cl moving nbytes per call (nbytes/2 read + nbytes/2 written), timed the
    three ways the GEMV is: the most a kernel of this size reaches on the device."""
    n4 = max(nbytes // 32 // 256 * 256, 256)
    pairs = [(rt.empty(16 * n4), rt.empty(16 * n4)) for _ in range(max(1, -(-4 * cache // (32 * n4))))]
    kernels = [cl.Kernel(rt.program("copy"), "copy4") for _ in pairs]
    for kernel, pair in zip(kernels, pairs):
        kernel.set_args(*pair)

    def enqueue(i: int) -> list[cl.Event]:
        return [cl.enqueue_nd_range_kernel(rt.queue, kernels[i % len(kernels)], (n4,), (256,))]

    return tuple(32 * n4 / t for t in (gated(rt, enqueue), streamed(rt, enqueue), kernel_only(rt, enqueue)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shapes", default="4096x4096,11008x4096", help="NxK (outputs x inputs), comma-separated")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--grid", default="", help='matmul parameters to try, e.g. "gemv_ksplit=32,64;gemv_tpw=1,2"')
    args = ap.parse_args()

    sel = select(args.device)
    rt = Runtime(sel.device, profiling=True)
    base = params_for(sel.info, "matmul", matmul.DEFAULT_PARAMS)
    copy_bw = bandwidth(sel.device)
    cache = max(int(sel.device.global_mem_cache_size), 64 << 20)   # drivers may report only L1
    print(f"device {sel.info.id} {sel.info.name}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write); "
          f"cache {cache >> 20} MiB")
    grid = parse_grid(args.grid)
    print("Three timings per call (us, GB/s, share of the copy bandwidth): gated (a run of calls released at")
    print("once by a user event), streamed (calls queued behind a long copy), kernel (its own start to end).")
    print("| N x K | group | parameters | gated | streamed | kernel | kernel, of a copy kernel of this size |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        q = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
        scale = (rng.random((n, k // args.group)) * 0.01).astype(np.float32)
        zero = (-8 * scale).astype(np.float32)
        first = matmul.DeviceMatrix.from_int4(rt, q, scale, zero, args.group)
        copies = [first] + [matmul.DeviceMatrix.from_int4(rt, q, scale, zero, args.group)
                            for _ in range(-(-4 * cache // first.nbytes) - 1)]
        x = rt.to_device(rng.standard_normal(k).astype(np.float32))
        y = rt.empty(4 * n)
        moved = first.nbytes + 4 * (k + n)
        ceiling = copy_of_size(rt, moved, cache)
        rows = []
        for overrides in grid:
            try:
                t = time_call(rt, matmul.Matmul(rt, {**base, **overrides}), copies, x, y)
            except Exception as e:  # a candidate the device cannot build or run
                print(f"| {n} x {k} | {args.group} | {overrides} | failed: {str(e).splitlines()[0][:80]} | | |")
                continue
            rows.append((t, overrides))
        best = min(t[2] for t, _ in rows) if rows else 0

        def cell(seconds: float, moved: int = moved) -> str:
            return f"{seconds * 1e6:.1f} us, {moved / seconds / 1e9:.0f} GB/s, {moved / seconds / copy_bw:.0%}"

        for t, overrides in rows:
            label = ", ".join(f"{a}={b}" for a, b in overrides.items()) or "tuned"
            mark = " **best**" if len(rows) > 1 and t[2] == best else ""
            print(f"| {n} x {k} | {args.group} | {label}{mark} | {cell(t[0])} | {cell(t[1])} | {cell(t[2])} | "
                  f"{moved / t[2] / ceiling[2]:.0%} |")
        print(f"| {n} x {k} | | copy kernel, same bytes | " + " | ".join(cell(moved / c) for c in ceiling) + " | 100% |")
        del copies


if __name__ == "__main__":
    main()
