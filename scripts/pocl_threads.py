"""How much a second PoCL thread helps a kernel, by the kernel's length.

A decode step is a few hundred short kernels. PoCL's worker threads sleep between commands; a
command's first worker starts it at once, the others only once woken. Where waking a thread on
another CPU is slow (a virtual machine's idle vCPU), kernels shorter than that wake-up run on one
worker whatever the thread count. This script times a fixed amount of arithmetic per launch,
enqueued back to back, at each thread count (re-running itself with POCL_MAX_PTHREAD_COUNT, which
PoCL reads once), and prints the speed-up over one thread for each kernel length.

    python scripts/pocl_threads.py                    # the first PoCL CPU device, 1 and 2 threads
    python scripts/pocl_threads.py --threads 1 2 4 --groups 144
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Each work-item runs `n` dependent multiply-adds: a kernel's length scales with n, its memory does not.
SOURCE = """
__kernel void spin(__global float* y, const int n)
{
    float a = (float)get_global_id(0);
    for (int i = 0; i < n; i++)
        a = mad(a, 0.999f, 1.0f);
    if (a == 12345.0f)
        y[0] = a;
}
"""
WORK = (25, 100, 400, 1600, 6400, 25600)      # multiply-adds per work-item


def worker(groups: int, launches: int) -> dict[int, float]:
    """Microseconds per launch of each amount of work, on the first PoCL CPU device."""
    import numpy as np
    import pyopencl as cl

    from perfx.engine.backends.opencl.devices import select

    rt = select("cpu").runtime()
    kernel = cl.Program(rt.ctx, SOURCE).build().spin
    y = rt.empty(64)
    out = {}
    for n in WORK:
        kernel.set_args(y, np.int32(n))
        runs = []
        for _ in range(4):                           # the first round warms up
            t0 = time.perf_counter()
            for _ in range(launches):
                cl.enqueue_nd_range_kernel(rt.queue, kernel, (groups * 8,), (8,))
            rt.queue.finish()
            runs.append((time.perf_counter() - t0) / launches * 1e6)
        out[n] = min(runs[1:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="POCL_MAX_PTHREAD_COUNT values")
    ap.add_argument("--groups", type=int, default=18, help="work-groups of 8 work-items per launch")
    ap.add_argument("--launches", type=int, default=300, help="launches per timed round")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.groups, args.launches)))
        return
    results = {}
    for t in args.threads:
        env = dict(os.environ, POCL_MAX_PTHREAD_COUNT=str(t), POCL_CPU_MAX_CU_COUNT=str(t))
        cmd = [sys.executable, __file__, "--worker", "--groups", str(args.groups), "--launches", str(args.launches)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"{t} thread(s): {(done.stderr or done.stdout).strip().splitlines()[-1]}")
        results[t] = {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    base = results[args.threads[0]]
    head = f"{'work':>6} | " + " | ".join(f"{t} thread(s): us/launch  speed-up" for t in args.threads)
    print(f"{args.groups} work-groups of 8 work-items per launch, back to back\n{head}\n{'-' * len(head)}")
    for n in WORK:
        print(f"{n:>6} | " + " | ".join(f"{results[t][n]:>21.1f}  {base[n] / results[t][n]:>7.2f}x"
                                        for t in args.threads))


if __name__ == "__main__":
    main()
