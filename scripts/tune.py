#!/usr/bin/env python3
"""Tune the matrix-product kernels for the device at hand and store the result for later runs.

    python scripts/tune.py [--device auto] [-t THREADS] [--shapes 960x576,3072x576,576x1536] [--dry-run]

A coordinate search: one group of -D parameters at a time (GEMV, few-token GEMM, tiled GEMM), every
candidate of the group checked against NumPy on random int4 weights (a wrong or failing candidate is
dropped) and timed with OpenCL profiling events (median of 15 after 3 warm-ups) over the shapes; the
best of each group is kept before the next group is searched. The winners are written to the
device's override file (engine/backends/opencl/tuning.py), which every later run reads on top of
kernels/tuning.toml. Tuning never runs during inference.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import numpy as np

GROUPS: dict[str, tuple[str, int, dict[str, list]]] = {
    # group: (scheme, tokens, candidate values)
    "gemv": ("gemv", 1, {"gemv_vec": [4, 8, 16], "gemv_ksplit": [1, 2, 4, 8, 16], "gemv_wg_rows": [1, 2, 4, 8]}),
    "few": ("few", 16, {"few_vec": [4, 8, 16], "few_tt": [2, 4, 8], "few_wg_rows": [1, 4, 16]}),
    "tiled": ("tiled", 256, {"tiled_bn": [16, 32, 64], "tiled_bt": [32, 48, 64], "tiled_tr": [4, 6]}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("-t", "--threads", type=int, default=None, help="PoCL CPU threads")
    ap.add_argument("--shapes", default="960x576,3072x576,576x1536", help="NxK of the matrices to time")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--only", default=",".join(GROUPS), help="groups to tune: gemv,few,tiled")
    ap.add_argument("--dry-run", action="store_true", help="print the result without writing it")
    args = ap.parse_args()

    from engine.errors import PerfxError

    try:
        tune(args)
    except PerfxError as e:
        sys.exit(f"error: {e}")


def tune(args) -> None:
    if args.threads:
        from engine.backends.opencl.devices import set_cpu_threads

        set_cpu_threads(args.threads)
    import pyopencl as cl

    from engine.backends.opencl import matmul
    from engine.backends.opencl.devices import select
    from engine.backends.opencl.runtime import Runtime
    from engine.backends.opencl.tuning import params_for, write_override

    sel = select(args.device)
    if sel.backend != "opencl":
        from engine.errors import PerfxError

        raise PerfxError("no OpenCL device to tune (" + "; ".join(sel.notices) + ")")
    rt = Runtime(sel.device, profiling=True)
    best = params_for(sel.info, "matmul", matmul.DEFAULT_PARAMS)
    print(f"tuning {sel.info.id} {sel.info.name}" + (f", {args.threads} threads" if args.threads else ""))

    rng = np.random.default_rng(0)
    problems = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        q = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
        scale = (rng.random((n, k // args.group_size)) * 0.02).astype(np.float32)
        zero = (-8 * scale).astype(np.float32)
        w_host = (q * np.repeat(scale.astype(np.float16).astype(np.float32), args.group_size, axis=1)
                  + np.repeat(zero.astype(np.float16).astype(np.float32), args.group_size, axis=1))
        problems.append((matmul.DeviceMatrix.from_int4(rt, q, scale, zero, args.group_size), w_host))

    def run(params: dict, scheme: str, T: int) -> float | None:
        """Median seconds of one pass over the shapes, or None if the candidate fails or is wrong."""
        try:
            mm = matmul.Matmul(rt, params)
            total = 0.0
            for w, w_host in problems:
                x_host = rng.standard_normal((T, w.cols)).astype(np.float32)
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
        except Exception:  # a build failure, a work-group too large for the device, ...
            return None

    for name in args.only.split(","):
        scheme, T, space = GROUPS[name]
        baseline = run(best, scheme, T)
        results = [(baseline, {k: best[k] for k in space})] if baseline is not None else []
        for values in itertools.product(*space.values()):
            candidate = {**best, **dict(zip(space, values))}
            t = run(candidate, scheme, T)
            if t is not None:
                results.append((t, dict(zip(space, values))))
        if not results:
            print(f"{name}: no candidate worked; keeping {[best[k] for k in space]}")
            continue
        t, chosen = min(results, key=lambda r: r[0])
        gain = f"{baseline / t:.2f}x the current setting" if baseline else "the current setting fails here"
        print(f"{name} (T={T}): {chosen}  {t * 1e6:.0f} us per pass, {gain} ({len(results) - (baseline is not None)} candidates worked)")
        best.update(chosen)

    tuned = {k: best[k] for space in (GROUPS[n][2] for n in args.only.split(",")) for k in space}
    if args.dry_run:
        print("not written (--dry-run):", tuned)
    else:
        path = write_override(sel.info, "matmul", tuned)
        print(f"written to {path}: later runs on this device use it")


if __name__ == "__main__":
    main()
