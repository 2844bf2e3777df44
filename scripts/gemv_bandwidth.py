#!/usr/bin/env python3
"""Achieved bandwidth of the int4 GEMV (one token) at given shapes, against the device's copy bandwidth.

    python scripts/gemv_bandwidth.py --device gpu --shapes 4096x4096,11008x4096 --group 128
    python scripts/gemv_bandwidth.py --device gpu --grid "gemv_ksplit=32,64;gemv_tpw=1,2,4"

Bytes moved per call: the packed weights (nibbles, fp16 scales and zeros) + x + y. The weights come from
DRAM: calls cycle through enough copies of the matrix to overflow the device's last-level cache four
times (at least 256 MiB). Timed with OpenCL profiling events around runs of 20 calls that the device
runs back to back (the queue is gated until the run is enqueued, so host enqueue time is excluded
and launch gaps on the device are included): 3 warm-up runs, then the median of 15. --grid times every combination of the
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

from engine.backends.opencl import matmul
from engine.backends.opencl.devices import bandwidth, select
from engine.backends.opencl.runtime import Runtime
from engine.backends.opencl.tuning import params_for

CALLS = 20


def parse_grid(text: str) -> list[dict]:
    axes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, values = part.split("=")
        axes.append([(name.strip(), int(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def time_call(rt: Runtime, mm: matmul.Matmul, copies: list, x, y) -> float:
    """Device seconds per call, median over runs of CALLS calls cycling through the copies. The queue is
    held by a user event until the run is enqueued, so the device runs the calls back to back and the
    host's enqueue time is not counted."""
    return gated(rt, lambda i: mm.linear(x, copies[i % len(copies)], 1, y))


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


def copy_of_size(rt: Runtime, nbytes: int, cache: int) -> float:
    """Bytes/s of kernels/copy.cl moving nbytes per call (nbytes/2 read + nbytes/2 written), timed like
    the GEMV: the most a kernel of this size reaches on the device, launch costs included."""
    n4 = max(nbytes // 32 // 256 * 256, 256)
    pairs = [(rt.empty(16 * n4), rt.empty(16 * n4)) for _ in range(max(1, -(-4 * cache // (32 * n4))))]
    kernel = cl.Kernel(rt.program("copy"), "copy4")

    def enqueue(i: int) -> None:
        kernel.set_args(*pairs[i % len(pairs)])
        cl.enqueue_nd_range_kernel(rt.queue, kernel, (n4,), (256,))

    return 32 * n4 / gated(rt, enqueue)


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
    print("| N x K | group | parameters | us / call | GB/s | of copy bandwidth | of a copy kernel of this size |")
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
        best = min(t for t, _ in rows) if rows else 0
        for t, overrides in rows:
            label = ", ".join(f"{a}={b}" for a, b in overrides.items()) or "tuned"
            mark = " **best**" if len(rows) > 1 and t == best else ""
            print(f"| {n} x {k} | {args.group} | {label}{mark} | {t * 1e6:.1f} | {moved / t / 1e9:.0f} | "
                  f"{moved / t / copy_bw:.0%} | {moved / t / ceiling:.0%} |")
        print(f"| {n} x {k} | | copy kernel, same bytes | {moved / ceiling * 1e6:.1f} | {ceiling / 1e9:.0f} | "
              f"{ceiling / copy_bw:.0%} | 100% |")
        del copies


if __name__ == "__main__":
    main()
