"""Benchmark perfx's matrix-product kernels (GEMV, few-token GEMM, tiled GEMM) at SmolLM2-135M shapes.

For each OpenCL platform chosen and each thread count, the script re-runs itself with
POCL_MAX_PTHREAD_COUNT set (PoCL reads it once, at start-up) and prints one table per platform:
median time per call, effective weight bandwidth (bytes of the packed matrix, scales included, per
second) and GFLOP/s (2*T*N*K per second).

Decode shapes rotate over enough copies of the matrix to exceed the caches (--cold-mb), as a decode
step streams every layer's weights from DRAM; prefill shapes are compute-bound and use two copies.
Calls are enqueued back to back and timed per batch, as in a decode step.

    python scripts/bench_kernels.py                       # every PoCL platform, 1 and 2 threads
    python scripts/bench_kernels.py --platform "PoCL 3.1" --threads 1 --reps 30
    python scripts/bench_kernels.py --params '{"gemv_wg_rows": 16}'
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # idle BLAS threads would spin against PoCL's
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

# (label, format, N, K, group, T, op) -- op: linear, acc (y += x W^T) or swiglu (N = 2F rows)
SHAPES = [
    ("o proj        ", "int4", 576, 576, 32, 1, "acc"),
    ("qkv           ", "int4", 960, 576, 32, 1, "linear"),
    ("gate+up swiglu", "int4", 3072, 576, 32, 1, "swiglu"),
    ("down          ", "int4", 576, 1536, 32, 1, "acc"),
    ("output (Q8_0) ", "int8", 49152, 576, 32, 1, "linear"),
    ("qkv  g128 K1536", "int4", 1536, 1536, 128, 1, "linear"),
    ("output fp16   ", "f16", 49152, 576, 0, 1, "linear"),
    ("qkv           ", "int4", 960, 576, 32, 16, "linear"),
    ("gate+up swiglu", "int4", 3072, 576, 32, 16, "swiglu"),
    ("N=1536        ", "int4", 1536, 576, 32, 512, "linear"),
    ("gate+up swiglu", "int4", 3072, 576, 32, 512, "swiglu"),
    ("N=3072        ", "int4", 3072, 576, 32, 512, "linear"),
    ("N=576         ", "int4", 576, 576, 32, 512, "linear"),
    ("down          ", "int4", 576, 1536, 32, 512, "acc"),
    ("output (Q8_0) ", "int8", 49152, 576, 32, 64, "linear"),
]


def platforms(pattern: str) -> list[str]:
    import pyopencl as cl

    found = [f"{p.name} | {p.version}" for p in cl.get_platforms()]
    return [f for f in found if pattern.lower() in f.lower()] if pattern != "all" else found


def device_for(label: str):
    import pyopencl as cl

    for p in cl.get_platforms():
        if f"{p.name} | {p.version}" == label:
            return p.get_devices()[0]
    raise SystemExit(f"platform {label!r} not found")


def make_matrix(rt, fmt: str, N: int, K: int, group: int, rng):
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    if fmt == "int4":
        scale = rng.uniform(0.002, 0.02, (N, K // group)).astype(np.float32)
        return DeviceMatrix.from_int4(rt, rng.integers(0, 16, (N, K), dtype=np.uint8), scale, -8 * scale, group)
    if fmt == "int8":
        scale = rng.uniform(0.001, 0.01, (N, K // 32)).astype(np.float32)
        return DeviceMatrix.from_q8(rt, rng.integers(-127, 128, (N, K), dtype=np.int8), scale)
    return DeviceMatrix.from_f16(rt, rng.standard_normal((N, K), dtype=np.float32))


def time_batch(rt, mm, mats: list, x, y, T: int, op: str) -> float:
    """Seconds per call: the op on every matrix of `mats`, enqueued back to back, then one finish."""
    t0 = time.perf_counter()
    for w in mats:
        if op == "swiglu":
            mm.swiglu(x, w, T, y)
        else:
            mm.linear(x, w, T, y, accumulate=op == "acc")
    rt.queue.finish()
    return (time.perf_counter() - t0) / len(mats)


def worker(label: str, reps: int, cold_mb: float, params: dict) -> list[dict]:
    """Time every shape on one platform (thread count fixed by the environment)."""
    from perfx.engine.backends.opencl.matmul import Matmul
    from perfx.engine.backends.opencl.runtime import Runtime

    rt = Runtime(device_for(label))
    mm = Matmul(rt, params)
    rng = np.random.default_rng(0)
    rows = []
    for name, fmt, N, K, group, T, op in SHAPES:
        first = make_matrix(rt, fmt, N, K, group, rng)
        copies = max(1, int(cold_mb * 1e6 // first.nbytes)) if T == 1 else 2
        mats = [first] + [make_matrix(rt, fmt, N, K, group, rng) for _ in range(copies - 1)]
        out = N // 2 if op == "swiglu" else N
        x = rt.to_device(rng.standard_normal((T, K), dtype=np.float32))
        y = rt.to_device(np.zeros((T, out), np.float32))
        for _ in range(3):
            time_batch(rt, mm, mats, x, y, T, op)
        t = float(np.median([time_batch(rt, mm, mats, x, y, T, op) for _ in range(reps)]))
        rows.append({"name": name, "fmt": fmt, "N": N, "K": K, "G": group, "T": T, "op": op,
                     "scheme": mm.scheme(T), "us": t * 1e6, "GBs": first.nbytes / t / 1e9,
                     "GFLOPs": 2 * T * N * K / t / 1e9, "MB": first.nbytes / 1e6})
    return rows


def run_worker(label: str, threads: int, args) -> list[dict] | str:
    env = dict(os.environ, POCL_MAX_PTHREAD_COUNT=str(threads))
    cmd = [sys.executable, __file__, "--worker", label, "--reps", str(args.reps), "--cold-mb", str(args.cold_mb),
           "--params", args.params]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit status {done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(label: str, results: dict[int, list[dict] | str]) -> None:
    print(f"\n## {label}")
    failed = {t: r for t, r in results.items() if isinstance(r, str)}
    for t, why in failed.items():
        print(f"   {t} thread(s): failed: {why}")
    good = {t: r for t, r in results.items() if not isinstance(r, str)}
    if not good:
        return
    threads = sorted(good)
    head = f"{'shape':16} {'fmt':4} {'N x K':>11} {'G':>3} {'T':>3} {'scheme':6} {'MB':>6}"
    for t in threads:
        head += f" | {t}T {'us':>7} {'GB/s':>6} {'GFLOP/s':>7}"
    print(head)
    print("-" * len(head))
    for i, row in enumerate(good[threads[0]]):
        line = (f"{row['name']:16} {row['fmt']:4} {row['N']:>5}x{row['K']:<5} {row['G']:>3} {row['T']:>3} "
                f"{row['scheme']:6} {row['MB']:6.2f}")
        for t in threads:
            r = good[t][i]
            line += f" |    {r['us']:7.1f} {r['GBs']:6.2f} {r['GFLOPs']:7.1f}"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--platform", default="PoCL", help="substring of 'name | version' of the platforms, or 'all'")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="POCL_MAX_PTHREAD_COUNT values")
    ap.add_argument("--reps", type=int, default=15, help="timed batches per shape (median reported)")
    ap.add_argument("--cold-mb", type=float, default=128.0, help="decode: rotate copies up to this many MB")
    ap.add_argument("--params", default="{}", help="JSON dict overriding DEFAULT_PARAMS, or 'nvidia' for kernels/tuning.toml's NVIDIA entry")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.params == "nvidia":
            from perfx.engine.backends.opencl.matmul import DEFAULT_PARAMS
            from perfx.engine.backends.opencl.tuning import vendor_params

            params = vendor_params("gpu", "nvidia", "matmul", DEFAULT_PARAMS)
        else:
            params = json.loads(args.params)
        print(json.dumps(worker(args.worker, args.reps, args.cold_mb, params)))
        return
    labels = platforms(args.platform)
    if not labels:
        raise SystemExit(f"no OpenCL platform matches {args.platform!r}")
    for label in labels:
        print_table(label, {t: run_worker(label, t, args) for t in args.threads})


if __name__ == "__main__":
    main()
