"""The prefill GEMM table: int4 weights W [M, K] against N tokens, every perfx scheme against cuBLAS.

On the GPU machine (OpenCL device and, where torch sees a CUDA GPU, cuBLAS as the upper reference):
    python3 scripts/gemm_chart.py measure --out results.json [--platform nvidia]
prints the table (GFLOP/s, share of peak) for M = 12288, K = 4096, N = 1, 2, 4, ..., 512 and the model's
other prefill shapes at N = 512, and writes every timing to results.json. Here, from that file:
    python3 scripts/gemm_chart.py plot results.json docs/gemm_h200.png
draws the chart (matplotlib). Each timing is the median of 5 runs of `reps` back-to-back launches
after a warm-up, divided by reps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

FP32_PEAK = 67.0e12        # H200 SXM, CUDA cores (NVIDIA's data sheet)
FP16_TC_PEAK = 989.0e12    # H200 SXM, dense fp16 tensor cores (data sheet)
TOKENS = [1 << i for i in range(10)]
SHAPES = [("linear", 12288, 4096), ("linear", 4096, 4096), ("swiglu", 22016, 4096), ("linear", 4096, 11008)]


def _time(run, reps: int) -> float:
    run()
    out = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            run(sync=False)
        run.finish()
        out.append((time.perf_counter() - t) / reps)
    return statistics.median(out)


class _Launch:
    def __init__(self, mm, op, x, w, T, y, scheme):
        self.mm, self.args = mm, (op, x, w, T, y, scheme)

    def __call__(self, sync: bool = True):
        op, x, w, T, y, scheme = self.args
        (self.mm.swiglu if op == "swiglu" else self.mm.linear)(x, w, T, y, scheme=scheme)
        if sync:
            self.finish()

    def finish(self):
        self.mm.rt.queue.finish()


def measure(args) -> None:
    import pyopencl as cl

    from perfx.engine.backends.opencl.devices import describe
    from perfx.engine.backends.opencl.matmul import DEFAULT_PARAMS, DeviceMatrix, Matmul
    from perfx.engine.backends.opencl.runtime import Runtime
    from perfx.engine.backends.opencl.tuning import params_for

    device = next(d for p in cl.get_platforms() if args.platform in p.name.lower() for d in p.get_devices())
    rt = Runtime(device)
    params = params_for(describe(device), "matmul", DEFAULT_PARAMS)
    mm = Matmul(rt, params)
    print(f"device: {device.name}; mma: {mm.mma is not None}", flush=True)
    rng = np.random.default_rng(0)
    rows = []

    def matrix(M, K):
        q = rng.integers(0, 16, (M, K), dtype=np.uint8)
        s = rng.uniform(0.002, 0.004, (M, K // 32)).astype(np.float16)
        return DeviceMatrix.from_int4(rt, q, s, (-8 * s).astype(np.float16), 32)

    def time_schemes(op, M, K, Ts, w, extra_variants=()):
        out_m = M // 2 if op == "swiglu" else M
        x = rt.to_device(rng.standard_normal((max(Ts), K)).astype(np.float32))
        y = rt.empty(4 * max(Ts) * out_m)
        for T in Ts:
            flops = 2.0 * M * K * T
            schemes = ["gemv"] if T == 1 else ["few", "tiled"] + (["mma"] if mm.mma is not None else [])
            if T == 1 and mm.mma is not None:
                schemes.append("mma")
            for scheme in schemes:
                if scheme == "few" and T > 64:
                    continue
                try:
                    sec = _time(_Launch(mm, op, x, w, T, y, scheme), args.reps)
                except Exception as e:       # noqa: BLE001 (a variant that does not build is reported, not fatal)
                    print(f"  {op} {M}x{K} T={T} {scheme}: {str(e)[:120]}", flush=True)
                    continue
                rows.append(dict(op=op, M=M, K=K, N=T, engine="perfx", scheme=scheme, params="", sec=sec,
                                 gflops=flops / sec / 1e9))
            for label, variant in extra_variants:
                vm = Matmul(rt, {**params, **variant})
                try:
                    sec = _time(_Launch(vm, op, x, w, T, y, "tiled"), args.reps)
                except Exception as e:       # noqa: BLE001
                    print(f"  variant {label}: {str(e)[:120]}", flush=True)
                    continue
                rows.append(dict(op=op, M=M, K=K, N=T, engine="perfx", scheme="tiled", params=label, sec=sec,
                                 gflops=flops / sec / 1e9))
            cublas(op, M, K, T)

    def cublas(op, M, K, T):
        try:
            import torch
        except ImportError:
            return
        if not torch.cuda.is_available():
            return
        a = torch.randn(T, K, device="cuda", dtype=torch.float16)
        b = torch.randn(K, M, device="cuda", dtype=torch.float16)
        torch.matmul(a, b)
        torch.cuda.synchronize()
        out = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(args.reps):
                torch.matmul(a, b)
            torch.cuda.synchronize()
            out.append((time.perf_counter() - t) / args.reps)
        sec = statistics.median(out)
        rows.append(dict(op=op, M=M, K=K, N=T, engine="cuBLAS fp16", scheme="torch.matmul", params="", sec=sec,
                         gflops=2.0 * M * K * T / sec / 1e9))

    sweep = [(f"bn{bn}_bt{bt}_rr{rr}_tr{tr}_v{v}", dict(tiled_bn=bn, tiled_bt=bt, tiled_rr=rr, tiled_tr=tr, tiled_vec=v))
             for bn, bt, rr, tr, v in [(64, 64, 4, 4, 4), (128, 64, 8, 4, 4), (64, 128, 4, 8, 4), (128, 128, 8, 8, 4),
                                       (64, 64, 4, 4, 8)]]
    for i, (op, M, K) in enumerate(SHAPES):
        w = matrix(M, K)
        time_schemes(op, M, K, TOKENS if i == 0 else [512], w, sweep if i == 0 and args.sweep else ())
        print(f"done {op} {M}x{K}", flush=True)
    json.dump({"device": device.name, "rows": rows}, open(args.out, "w"), indent=1)
    table(rows)


def table(rows) -> None:
    print("| op | M x K | N | engine | scheme | params | µs | GFLOP/s | of fp32 peak | of fp16 TC peak |")
    print("| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['op']} | {r['M']}x{r['K']} | {r['N']} | {r['engine']} | {r['scheme']} | {r['params']} | "
              f"{r['sec'] * 1e6:.1f} | {r['gflops']:.0f} | {r['gflops'] * 1e9 / FP32_PEAK:.0%} | "
              f"{r['gflops'] * 1e9 / FP16_TC_PEAK:.1%} |")


def plot(path: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(path))
    rows = [r for r in data["rows"] if (r["M"], r["K"]) == (12288, 4096) and not r["params"]]
    fig, ax = plt.subplots(figsize=(8, 5))
    for (engine, scheme), label in [(("cuBLAS fp16", "torch.matmul"), "cuBLAS fp16 (torch)"),
                                    (("perfx", "mma"), "perfx int4, tensor cores (gemm_mma)"),
                                    (("perfx", "tiled"), "perfx int4, portable tiled"),
                                    (("perfx", "few"), "perfx int4, gemm_few"),
                                    (("perfx", "gemv"), "perfx int4, GEMV")]:
        pts = sorted((r["N"], r["gflops"] / 1e3) for r in rows if (r["engine"], r["scheme"]) == (engine, scheme))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(FP32_PEAK / 1e12, color="grey", ls="--", lw=1, label="fp32 CUDA-core peak (67)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (tokens)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"GEMM M=12288, K=4096 on {data['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", default="gemm.json")
    m.add_argument("--platform", default="nvidia")
    m.add_argument("--reps", type=int, default=10)
    m.add_argument("--sweep", action="store_true", help="also time a few portable tile shapes")
    p = sub.add_parser("plot")
    p.add_argument("json")
    p.add_argument("png")
    a = ap.parse_args()
    if a.cmd == "measure":
        measure(a)
    else:
        plot(a.json, a.png)


if __name__ == "__main__":
    sys.exit(main())
