"""The tiled int4 GEMM's device variants (tiled_arith "half", "dot8") against its f32 form: speed at a model's
prefill shapes, and what they cost a real model's logits.

    python scripts/gemm_variants.py bench --platform "Intel(R) OpenCL" --threads 1 2 --out bench.json
    python scripts/gemm_variants.py agree --platform "Intel(R) OpenCL" --out agree.json
    python scripts/gemm_variants.py accuracy --platform "Intel(R) OpenCL" --out accuracy.json
    python scripts/gemm_variants.py bench --platform nvidia --shapes llama7b --out gpu.json   # a GPU

bench: for each thread count (a CPU driver reads it at start-up: the script re-runs itself with
CL_CONFIG_CPU_TBB_NUM_WORKERS and POCL_MAX_PTHREAD_COUNT set), the variants the device offers take turns
(f32, half, dot8, f32, ...) for --rounds rounds of --reps calls per shape, each call with its conversion
of x (x_to_half, quantize_x8); the median time per call and GFLOP/s (2 T N K per second) are printed
and written to --out as JSON. The device's tuned parameters (kernels/tuning.toml) are used, with
tiled_arith set per variant.

agree: the default model (or -m FILE) teacher-forced over --tokens tokens of the GPL-3 text in one
prefill on the NumPy backend and on the device with each variant: top-1 agreement with NumPy and with
the device's f32 path, perplexity, largest logit difference.

accuracy: the fp16 variant's largest error, as a share of the largest output, against NumPy's product of
the operands rounded to fp16, for each half_fold (1 to 16, past the limit the kernel is kept to) and
piece width, on random int4 matrices of SmolLM2's shapes (x with mean 0 and 0.5), T = 64.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # idle BLAS threads would spin against the driver's
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

MODES = ("f32", "half", "dot8")
# (label, N rows, K, op) at prefill -- op: linear, acc (y += x W^T) or swiglu (N = 2F rows)
SHAPES = {
    "smollm2": [("qkv", 960, 576, "linear"), ("o", 576, 576, "acc"), ("gate+up", 3072, 576, "swiglu"),
                ("down", 576, 1536, "acc")],
    "llama7b": [("qkv", 12288, 4096, "linear"), ("o", 4096, 4096, "acc"), ("gate+up", 22016, 4096, "swiglu"),
                ("down", 4096, 11008, "acc")],
}
TEXT = Path("/usr/share/common-licenses/GPL-3")


def device_info(platform: str):
    """(DeviceInfo, cl.Device) of the first device whose platform, version or name contains `platform`."""
    from perfx.engine.backends.opencl.devices import enumerate_devices

    for info, device in enumerate_devices():
        if platform.lower() in f"{info.platform_name} {device.platform.version} {info.name}".lower():
            return info, device
    sys.exit(f"no OpenCL device matches {platform!r} (`perfx devices` lists them)")


def matmuls(rt, info) -> dict:
    """{mode: Matmul} for the variants the device runs (a probe that fails says so on stderr)."""
    from perfx.engine.backends.opencl.matmul import DEFAULT_PARAMS, Matmul
    from perfx.engine.backends.opencl.tuning import params_for

    base = params_for(info, "matmul", DEFAULT_PARAMS)
    out = {}
    for mode in MODES:
        mm = Matmul(rt, {**base, "tiled_arith": mode})
        if mode == "f32" or mm.variant is not None:
            out[mode] = mm
    return out


def bench_worker(args) -> list[dict]:
    from perfx.engine.backends.opencl.matmul import DeviceMatrix
    from perfx.engine.quant.quantize import quantize_int4
    from perfx.engine.backends.opencl.runtime import Runtime

    info, device = device_info(args.platform)
    rt = Runtime(device)
    mms = matmuls(rt, info)
    rng = np.random.default_rng(0)
    T = args.tokens
    cases = []
    for label, N, K, op in SHAPES[args.shapes]:
        dm = DeviceMatrix.from_int4(rt, *quantize_int4(rng.standard_normal((N, K)).astype(np.float32) * 0.05, 32), 32)
        x = rt.to_device(rng.standard_normal((T, K)).astype(np.float32))
        y = rt.to_device(np.zeros((T, N), np.float32))
        cases.append((label, N, K, op, dm, x, y))

    def call(mm, op, dm, x, y):
        if op == "swiglu":
            mm.swiglu(x, dm, T, y, scheme="tiled")
        else:
            mm.linear(x, dm, T, y, accumulate=op == "acc", scheme="tiled")

    times = {(m, c[0]): [] for m in mms for c in cases}
    for mode, mm in mms.items():                      # warm-up: builds and plans
        for label, N, K, op, dm, x, y in cases:
            call(mm, op, dm, x, y)
    rt.queue.finish()
    for _ in range(args.rounds):
        for mode, mm in mms.items():
            for label, N, K, op, dm, x, y in cases:
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    call(mm, op, dm, x, y)
                rt.queue.finish()
                times[mode, label].append((time.perf_counter() - t0) / args.reps)
    rows = []
    for label, N, K, op, *_ in cases:
        for mode in mms:
            ms = 1e3 * float(np.median(times[mode, label]))
            rows.append({"shape": label, "N": N, "K": K, "T": T, "op": op, "mode": mode, "ms": ms,
                         "gflops": 2 * T * N * K / ms / 1e6, "device": f"{info.platform_name} {info.name}"})
    return rows


def bench(args) -> dict:
    results = {}
    for t in args.threads:
        env = dict(os.environ, CL_CONFIG_CPU_TBB_NUM_WORKERS=str(t), POCL_MAX_PTHREAD_COUNT=str(t),
                   POCL_CPU_MAX_CU_COUNT=str(t))
        cmd = [sys.executable, __file__, "bench", "--worker", "--platform", args.platform, "--shapes", args.shapes,
               "--tokens", str(args.tokens), "--reps", str(args.reps), "--rounds", str(args.rounds)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"worker at {t} threads failed:\n{done.stderr[-2000:]}")
        sys.stderr.write(done.stderr)
        rows = json.loads(done.stdout.splitlines()[-1])
        results[str(t)] = rows
        print(f"\n{rows[0]['device']}, {t} thread(s), T = {args.tokens}, median of {args.rounds} rounds of "
              f"{args.reps} calls")
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        print(f"{'shape':10} {'N x K':>12} " + " ".join(f"{m + ' ms':>10} {'GFLOP/s':>8}" for m in modes)
              + "".join(f" {m + '/f32':>9}" for m in modes[1:]))
        for label in dict.fromkeys(r["shape"] for r in rows):
            by = {r["mode"]: r for r in rows if r["shape"] == label}
            r0 = by["f32"]
            print(f"{label:10} {str(r0['N']) + 'x' + str(r0['K']):>12} "
                  + " ".join(f"{by[m]['ms']:10.2f} {by[m]['gflops']:8.1f}" for m in modes)
                  + "".join(f" {r0['ms'] / by[m]['ms']:8.2f}x" for m in modes[1:]))
    return results


def agree(args) -> dict:
    from perfx.engine import load_model
    from perfx.engine.backends.opencl import tuning
    from perfx.engine.hub.registry import resolve

    path = Path(args.model) if args.model else resolve(None, progress=False)[0]
    text = TEXT.read_text() if TEXT.exists() else "The quick brown fox jumps over the lazy dog. " * 80
    ref_model = load_model(path, device="numpy", ctx=1024)
    ids = ref_model.tokenizer.encode(text, special=False)[: args.tokens]
    ref = ref_model.forward(ids)
    info, _ = device_info(args.platform)
    params_for = tuning.params_for
    logits, out = {}, {"model": str(path), "tokens": len(ids), "device": f"{info.platform_name} {info.name}"}
    for mode in MODES:
        tuning.params_for = lambda i, kernel, defaults=None, database=None, _m=mode: {
            **params_for(i, kernel, defaults, database), **({"tiled_arith": _m} if kernel == "matmul" else {})}
        try:
            dev = load_model(path, device=info.id, ctx=1024)
        finally:
            tuning.params_for = params_for
        if mode != "f32" and dev.transformer.backend.matmul.variant is None:
            continue
        logits[mode] = got = dev.forward(ids)
        out[mode] = {"top1_vs_numpy": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
                     "top1_vs_f32": float(np.mean(got.argmax(-1) == logits["f32"].argmax(-1))),
                     "perplexity": math.exp(nll(got, ids)), "max_logit_diff": float(np.abs(got - ref).max())}
    out["numpy"] = {"perplexity": math.exp(nll(ref, ids))}
    print(json.dumps(out, indent=1))
    return out


def accuracy(args) -> dict:
    from perfx.engine.backends.opencl import gemm_variants
    from perfx.engine.backends.opencl.matmul import DeviceMatrix, Matmul
    from perfx.engine.backends.opencl.runtime import Runtime

    info, device = device_info(args.platform)
    rt = Runtime(device)
    gemm_variants.MAX_HALF_FOLD = 16                  # measure past the limit too
    rng = np.random.default_rng(0)
    cases = []
    for N, K, mean in ((576, 576, 0.0), (576, 1536, 0.0), (1536, 576, 0.5), (576, 1536, 0.5)):
        q = rng.integers(0, 16, (N, K)).astype(np.uint8)
        scale = rng.uniform(0.002, 0.02, (N, K // 32)).astype(np.float16).astype(np.float32)
        zero = (-scale * rng.uniform(4, 12, (N, K // 32))).astype(np.float16).astype(np.float32)
        w = q * np.repeat(scale, 32, axis=1).astype(np.float64) + np.repeat(zero, 32, axis=1)
        x = (rng.standard_normal((args.tokens, K)) + mean).astype(np.float32)
        h = lambda a: a.astype(np.float16).astype(np.float64)         # noqa: E731
        cases.append((f"{N}x{K} mean {mean}", DeviceMatrix.from_int4(rt, q, scale, zero, 32), x, h(x) @ h(w).T))
    out = {"device": f"{info.platform_name} {info.name}", "cases": [c[0] for c in cases], "errors": {}}
    for vec in (16, 4):
        for fold in (1, 2, 4, 8, 16):
            mm = Matmul(rt, {"tiled_arith": "half", "half_fold": fold, "tiled_vec": vec})
            errs = []
            for _, dm, x, want in cases:
                y = rt.to_device(np.full(want.shape, np.nan, np.float32))
                mm.linear(rt.to_device(x), dm, x.shape[0], y, scheme="tiled")
                errs.append(float(np.abs(rt.read(y, want.shape) - want).max() / np.abs(want).max()))
            out["errors"][f"vec {vec} fold {fold}"] = errs
            print(f"vec {vec:2d} half_fold {fold:2d} ({vec * fold:3d} elements): "
                  + "  ".join(f"{e:.2e}" for e in errs))
    return out


def nll(logits: np.ndarray, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] under logits[:-1]."""
    lg = logits[:-1].astype(np.float64)
    top = lg.max(-1)
    lse = np.log(np.exp(lg - top[:, None]).sum(-1)) + top
    return float(np.mean(lse - lg[np.arange(len(ids) - 1), ids[1:]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("bench", "agree", "accuracy"))
    ap.add_argument("--platform", default="Intel(R) OpenCL",
                    help="substring of the platform, its version or the device")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="bench: CPU driver threads")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--tokens", type=int, default=None,
                    help="T (bench: 512, accuracy: 64) or teacher-forced tokens (agree: 300)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-m", "--model", help="agree: a GGUF file (default: the registry's default model)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from perfx.engine.backends.opencl.devices import setup_icd

    setup_icd()
    if args.what == "bench":
        args.tokens = args.tokens or 512
        if args.worker:
            print(json.dumps(bench_worker(args)))
            return
        result = {"bench": bench(args), "date": time.strftime("%Y-%m-%d %H:%M")}
    elif args.what == "agree":
        args.tokens = args.tokens or 300
        result = {"agree": agree(args), "date": time.strftime("%Y-%m-%d %H:%M")}
    else:
        args.tokens = args.tokens or 64
        result = {"accuracy": accuracy(args), "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
