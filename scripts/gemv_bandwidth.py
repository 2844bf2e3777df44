#!/usr/bin/env python3
"""Achieved bandwidth of the int4 GEMV (one token) at given shapes, against the device's copy bandwidth.

    python scripts/gemv_bandwidth.py --device gpu --shapes 4096x4096,11008x4096 --group 128

Bytes moved per call: the packed weights (nibbles, fp16 scales and zeros) + x + y. Timed with OpenCL
profiling events: 10 warm-up calls, then the median of 50.
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import pyopencl as cl

from engine.backends.opencl import matmul
from engine.backends.opencl.devices import bandwidth, select
from engine.backends.opencl.runtime import Runtime
from engine.backends.opencl.tuning import params_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shapes", default="4096x4096,11008x4096", help="NxK (outputs x inputs), comma-separated")
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()

    sel = select(args.device)
    rt = Runtime(sel.device, profiling=True)
    mm = matmul.Matmul(rt, params_for(sel.info, "matmul", matmul.DEFAULT_PARAMS))
    copy_bw = bandwidth(sel.device)
    print(f"device {sel.info.id} {sel.info.name}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    print("| N x K | group | us / call | GB/s | of copy bandwidth |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        q = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
        scale = (rng.random((n, k // args.group)) * 0.01).astype(np.float32)
        zero = (-8 * scale).astype(np.float32)
        w = matmul.DeviceMatrix.from_int4(rt, q, scale, zero, args.group)
        x = rt.to_device(rng.standard_normal(k).astype(np.float32))
        y = rt.empty(4 * n)
        for _ in range(10):
            mm.linear(x, w, 1, y)
        times = []
        for _ in range(50):
            start = cl.enqueue_marker(rt.queue)
            mm.linear(x, w, 1, y)
            end = cl.enqueue_marker(rt.queue)
            end.wait()
            times.append((end.profile.end - start.profile.start) * 1e-9)
        t = statistics.median(times)
        moved = w.nbytes + 4 * (k + n)
        print(f"| {n} x {k} | {args.group} | {t * 1e6:.1f} | {moved / t / 1e9:.0f} | {moved / t / copy_bw:.0%} |")


if __name__ == "__main__":
    main()
