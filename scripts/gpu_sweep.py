"""A short tuning sweep of the kernels that bound a GPU's prefill and decode on LLaMA-7B's shape, each
variant timed alone (median of 5 runs of `reps` launches after a warm-up):

  mma GEMM tiles (12288x4096, T = 512), GEMV (12288x4096 and 4096x11008, T = 1), prefill attention
  (T = 512 from position 0), decode attention (T = 1 at position 511, 8 layers' caches in turn),
  add_rmsnorm (T = 1 and 512), and the launch floor (an empty kernel, small and large copies).

    python3 scripts/gpu_sweep.py [--platform nvidia] [--write]

prints one table per kernel; --write stores the fastest of each as the device's tuned parameters
(the tuner's file, engine/backends/opencl/tuning.py write_override), which perfx then loads.

    python3 scripts/gpu_sweep.py --parts mma2 --out mma2.json

checks each pipeline variant of gemm_mma (MMA_PIPELINES: gemm_mma.cl's options, each alone over the
device's entry, then together) against NumPy (1536 x 4096 x 512 and SwiGLU 2000 x 4096 x 77 on fp16-rounded
operands, error relative to the output's largest magnitude, passed at 1e-4 as in tests/test_cl_gemm_mma.py)
and times it on a 7B prefill's products at T = 512 (12288 x 4096, 4096 x 4096, 22016 x 4096 SwiGLU,
4096 x 11008); the JSON is rewritten after each variant, so a variant that brings the device down leaves
those before it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

# gemm_mma's pipeline variants, over the device's tuned entry: each option alone, then together; the
# ldmatrix address modes that are not checked at run time come last (a wrong address can fault).
ALL = {"mma_ks": 32, "mma_buffers": 2, "mma_words_once": 1, "mma_deq": "half2", "mma_ldmatrix": "auto"}
MMA_PIPELINES = [
    ("entry", {}),
    ("KS 32", {"mma_ks": 32}),
    ("KS 32, 2 buffers", {"mma_ks": 32, "mma_buffers": 2}),
    ("KS 32, 2 buffers, words once", {"mma_ks": 32, "mma_buffers": 2, "mma_words_once": 1}),
    ("words once", {"mma_words_once": 1}),
    ("half2 dequantization", {"mma_deq": "half2"}),
    ("ldmatrix (auto address)", {"mma_ldmatrix": "auto"}),
    ("at most 128 registers", {"mma_maxrreg": 128}),
    ("all", ALL),
    ("all, at most 128 registers", {**ALL, "mma_maxrreg": 128}),
    ("all, warps of 32 x 32 (16 warps)", {**ALL, "mma_wn": 32}),
    ("warps of 32 x 32 (16 warps)", {"mma_wn": 32}),
    ("all, 128 x 64 tiles (4 warps)", {**ALL, "mma_bt": 64}),
    ("all, 256 x 64 tiles, 1 buffer",
     {**ALL, "mma_bn": 256, "mma_bt": 64, "mma_wm": 64, "mma_wn": 32, "mma_buffers": 1}),
    ("all, 128 x 256 tiles, 1 buffer", {**ALL, "mma_bt": 256, "mma_wm": 64, "mma_wn": 64, "mma_buffers": 1}),
    ("ldmatrix (the pointer's value)", {"mma_ldmatrix": "value"}),
    ("ldmatrix (cvta.to.shared)", {"mma_ldmatrix": "cvta"}),
]
# checked against NumPy: (label, rows, K, T, op); timed: (label, rows, K, op) at T = 512
MMA_CHECKS = [("linear 1536x4096x512", 1536, 4096, 512, "linear"), ("SwiGLU 2000x4096x77", 2000, 4096, 77, "swiglu")]
MMA_SHAPES = [("12288x4096", 12288, 4096, "linear"), ("4096x4096", 4096, 4096, "linear"),
              ("22016x4096 SwiGLU", 22016, 4096, "swiglu"), ("4096x11008", 4096, 11008, "linear")]


def timed(run, sync, reps: int = 10) -> float:
    run()
    sync()
    out = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            run()
        sync()
        out.append((time.perf_counter() - t) / reps)
    return statistics.median(out)


def mma_pipelines(rt, mparams: dict, info, out: str | None) -> None:
    """The mma2 part (module doc): each of MMA_PIPELINES checked against NumPy and timed; JSON to out."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix, Matmul

    rng = np.random.default_rng(1)
    sync = rt.queue.finish

    def int4(rows, K):
        q = rng.integers(0, 16, (rows, K), dtype=np.uint8)
        s = rng.uniform(0.002, 0.004, (rows, K // 32)).astype(np.float16)
        z = (-rng.uniform(7, 9, s.shape) * s).astype(np.float16)
        w = q * np.repeat(s, 32, axis=1).astype(np.float32) + np.repeat(z, 32, axis=1)
        return DeviceMatrix.from_int4(rt, q, s, z, 32), w

    def h(a):
        return np.asarray(a, np.float64).astype(np.float16).astype(np.float64)

    checks = []           # (name, matrix, x, want, op)
    for name, rows, K, T, op in MMA_CHECKS:
        dm, w = int4(rows, K)
        x = rng.standard_normal((T, K)).astype(np.float32)
        want = h(x) @ h(w).T
        if op == "swiglu":
            gate, up = np.split(want, 2, axis=1)
            want = gate / (1.0 + np.exp(-gate)) * up
        checks.append((name, dm, x, want, op))
    mats = {label: int4(rows, K)[0] for label, rows, K, _ in MMA_SHAPES}
    x = rt.to_device(rng.standard_normal((512, max(K for _, _, K, _ in MMA_SHAPES))).astype(np.float32))
    y = rt.empty(4 * 512 * max(rows for _, rows, _, _ in MMA_SHAPES))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    report = {"device": info.name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "commit": commit, "entry": {k: v for k, v in mparams.items() if k.startswith(("gemm_mma", "mma_"))},
              "variants": []}
    print("\n## gemm_mma pipeline variants, T = 512 (TFLOP/s; check: largest error / largest output)")
    print("| variant | check | " + " | ".join(label for label, *_ in MMA_SHAPES) + " |")
    print("| --- | --- |" + " ---: |" * len(MMA_SHAPES))
    for label, options in MMA_PIPELINES:
        row = {"label": label, "options": options}
        try:
            mm = Matmul(rt, {**mparams, **options})
            if mm.mma is None or any(mm.mma.options.get(k, v) != v for k, v in options.items()):
                raise RuntimeError("its probe failed (stderr says why)")
            errs = {}
            for name, dm, xc, want, op in checks:
                xb = rt.to_device(xc)
                yb = rt.to_device(np.full(want.shape, np.nan, np.float32))
                run = mm.swiglu if op == "swiglu" else mm.linear
                run(xb, dm, xc.shape[0], yb, scheme="mma")
                got = rt.read(yb, want.shape)
                err = float(np.abs(got - want).max()) if np.isfinite(got).all() else float("inf")
                errs[name] = err / float(np.abs(want).max())
            row["check"] = {**errs, "passed": all(e <= 1e-4 for e in errs.values())}
            row["shapes"] = {}
            for shape, rows, K, op in MMA_SHAPES:
                run = mm.swiglu if op == "swiglu" else mm.linear
                sec = timed(lambda: run(x, mats[shape], 512, y, scheme="mma"), sync)
                row["shapes"][shape] = {"us": sec * 1e6, "tflops": 2 * rows * K * 512 / sec / 1e12}
            cells = [f"{row['shapes'][s]['tflops']:.1f}" for s, *_ in MMA_SHAPES]
            check = f"{'ok' if row['check']['passed'] else 'WRONG'} {max(errs.values()):.1e}"
        except Exception as e:          # noqa: BLE001 (a variant that fails is reported, the next runs)
            row["error"] = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            cells, check = ["-"] * len(MMA_SHAPES), row["error"][:80]
        print(f"| {label} | {check} | " + " | ".join(cells) + " |", flush=True)
        report["variants"].append(row)
        if out:
            Path(out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--platform", default="nvidia")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--parts", default="mma,gemv,attention,decode,norm,floor",
                    help="which kernels, comma-separated; mma2: gemm_mma's pipeline variants (not in the default)")
    ap.add_argument("--out", help="the mma2 part's JSON")
    a = ap.parse_args()

    import pyopencl as cl

    from perfx.engine.backends.opencl import fused as fz
    from perfx.engine.backends.opencl.devices import describe
    from perfx.engine.backends.opencl.matmul import DEFAULT_PARAMS, DeviceMatrix, Matmul
    from perfx.engine.backends.opencl.runtime import Runtime
    from perfx.engine.backends.opencl.tuning import params_for, write_override
    from perfx.engine.synthetic import get_shape

    device = next(d for p in cl.get_platforms() if a.platform in p.name.lower() for d in p.get_devices())
    info = describe(device)
    rt = Runtime(device)
    sync = rt.queue.finish
    mparams = params_for(info, "matmul", DEFAULT_PARAMS)
    fparams = params_for(info, "fused", fz.DEFAULT_PARAMS)
    rng = np.random.default_rng(0)
    best_m, best_f = {}, {}

    def table(title, results, unit):
        results.sort(key=lambda r: r[1])
        print(f"\n## {title}\n| variant | µs | {unit} |\n| --- | ---: | ---: |")
        for label, sec, metric, _ in results:
            print(f"| {label} | {sec * 1e6:.1f} | {metric:.0f} |")
        return results[0][3]

    def matrix(M, K):
        q = rng.integers(0, 16, (M, K), dtype=np.uint8)
        s = rng.uniform(0.002, 0.004, (M, K // 32)).astype(np.float16)
        return DeviceMatrix.from_int4(rt, q, s, (-8 * s).astype(np.float16), 32)

    w12 = matrix(12288, 4096)
    w411 = matrix(4096, 11008)
    x = rt.to_device(rng.standard_normal((512, 11008)).astype(np.float32))
    y = rt.empty(4 * 512 * 12288)

    parts = a.parts.split(",")
    if "mma2" in parts:
        mma_pipelines(rt, mparams, info, a.out)
    # mma tiles
    res = []
    for bn, bt, wm, wn in [(128, 64, 64, 32), (128, 128, 64, 32), (128, 128, 32, 64), (256, 128, 64, 64),
                           (256, 64, 64, 32), (128, 128, 32, 32), (256, 128, 128, 32)] if "mma" in parts else []:
        v = dict(mma_bn=bn, mma_bt=bt, mma_wm=wm, mma_wn=wn)
        try:
            mm = Matmul(rt, {**mparams, **v})
            if mm.mma is None:
                continue
            sec = timed(lambda: mm.linear(x, w12, 512, y, scheme="mma"), sync)
        except Exception as e:          # noqa: BLE001 (a variant that does not build is reported)
            print(f"mma {v}: {str(e)[:150]}")
            continue
        res.append((f"bn {bn} bt {bt} wm {wm} wn {wn}", sec, 2 * 12288 * 4096 * 512 / sec / 1e9, v))
    if res:
        best_m.update(table("mma GEMM 12288x4096, T = 512", res, "GFLOP/s"))

    # GEMV
    res = []
    for vec, ks, wgr, tpw, img in [(4, 64, 2, 1, True), (4, 32, 4, 1, True), (4, 32, 2, 2, True), (8, 32, 2, 1, True),
                                   (4, 16, 8, 1, True), (4, 64, 2, 1, False), (4, 128, 1, 1, True), (8, 16, 4, 1, True),
                                   (4, 32, 8, 1, True), (4, 64, 4, 1, True)] if "gemv" in parts else []:
        v = dict(gemv_vec=vec, gemv_ksplit=ks, gemv_wg_rows=wgr, gemv_tpw=tpw, use_image=img)
        try:
            mm = Matmul(rt, {**mparams, **v, "gemm_mma": "off"})
            s1 = timed(lambda: mm.linear(x, w12, 1, y), sync, 50)
            s2 = timed(lambda: mm.linear(x, w411, 1, y), sync, 50)
        except Exception as e:          # noqa: BLE001
            print(f"gemv {v}: {str(e)[:150]}")
            continue
        res.append((f"vec {vec} ksplit {ks} rows {wgr} tpw {tpw} image {img} (12288x4096 | 4096x11008 µs "
                    f"{s1 * 1e6:.1f} | {s2 * 1e6:.1f})", s1 + s2, (w12.nbytes + w411.nbytes) / (s1 + s2) / 1e9, v))
    if res:
        best_m.update(table("GEMV, T = 1 (both matrices)", res, "GB/s"))

    # attention and norms, LLaMA-7B shape, one layer
    config = get_shape("llama-7b").config()
    qkv = rt.to_device(rng.standard_normal((512, 3 * 4096)).astype(np.float32))
    out = rt.empty(4 * 512 * 4096)
    res_p = []
    for wg, vec, rows, half in [(128, 4, 32, False), (128, 4, 16, False), (64, 4, 32, False), (128, 4, 32, True),
                                (128, 8, 32, False)] if "attention" in parts else []:
        v = dict(att_wg=wg, att_vec=vec, att_rows=rows, kv_half=half)
        try:
            f = fz.FusedOps(rt, config, 1024, 1, {**fparams, **v, "attention_mma": "off"})   # attend itself
            sp = timed(lambda: f.attention(qkv, 512, 0, 0, out), sync, 5)
        except Exception as e:          # noqa: BLE001
            print(f"attention {v}: {str(e)[:150]}")
            continue
        res_p.append((f"wg {wg} vec {vec} rows {rows} half {half}", sp, 4 * 512 * 512 * 4096 / 2 / sp / 1e9, v))
    # decode: position 511 of 8 layers in turn, so that each launch reads its cache from memory, as in a model
    res_d = []
    for wg, vec, kl, half, chunk, wgs in [(128, 4, 1, False, 128, 0), (128, 8, 1, False, 128, 0),
                                          (128, 4, 1, True, 128, 0), (64, 4, 1, False, 64, 512),
                                          (128, 4, 8, False, 16, 1024), (128, 4, 8, True, 16, 1024),
                                          (128, 4, 8, False, 32, 1024), (128, 4, 4, False, 32, 1024),
                                          (256, 4, 8, False, 32, 1024), (128, 4, 8, False, 64, 512),
                                          (128, 4, 16, False, 16, 1024), (64, 4, 8, True, 16, 2048)] \
            if "decode" in parts else []:
        v = dict(att_wg=wg, att_vec=vec, att_key_lanes=kl, kv_half=half, split_min_chunk=chunk, split_wgs=wgs)
        try:
            f = fz.FusedOps(rt, config, 1024, 8, {**fparams, **v})
            for layer in range(8):
                f.attention(qkv, 511, layer, 0, out)
            turn = iter(range(10 ** 9))
            sd = timed(lambda: f.attention(qkv, 1, next(turn) % 8, 511, out), sync, 64)
        except Exception as e:          # noqa: BLE001
            print(f"decode attention {v}: {str(e)[:150]}")
            continue
        kv_bytes = 2 * 512 * 4096 * (2 if half else 4)
        res_d.append((f"wg {wg} vec {vec} lanes {kl} half {half} chunk {chunk} wgs {wgs} "
                      f"({f.splits_for(1, 512)} slices)", sd, kv_bytes / sd / 1e9, v))
    if res_p:
        best_f.update({k: table("prefill attention, T = 512 (GFLOP/s, causal)", res_p, "GFLOP/s")[k]
                       for k in ("att_rows",)})
    if res_d:       # decode keeps its slices, lanes and cache type
        bd = table("decode attention, T = 1 at position 511, cache read from memory", res_d, "GB/s")
        best_f.update({k: bd[k] for k in ("att_wg", "att_vec", "att_key_lanes", "kv_half", "split_min_chunk",
                                          "split_wgs")})
    res = []
    h = rt.empty(4 * 512 * 4096)
    for wg in (64, 128, 256, 512, 1024) if "norm" in parts else ():
        try:
            f = fz.FusedOps(rt, config, 1024, 1, {**fparams, "rms_wg": wg})
            s1 = timed(lambda: f.add_rmsnorm(qkv, out, qkv, 1, h), sync, 50)
            s2 = timed(lambda: f.add_rmsnorm(qkv, out, qkv, 512, h), sync, 10)
        except Exception as e:          # noqa: BLE001
            print(f"rms_wg {wg}: {str(e)[:150]}")
            continue
        res.append((f"rms_wg {wg} (T=512: {s2 * 1e6:.1f} µs)", s1, 0, dict(rms_wg=wg)))
    if res:
        best_f.update(table("add_rmsnorm, T = 1", res, "-"))
    if "floor" in parts:       # what one launch costs with nothing to do, and with 16 KB to copy
        prog = cl.Program(rt.ctx, "__kernel void nop(__global float *x) {}\n"
                          "__kernel void cp(__global const float4 *a, __global float4 *b) "
                          "{ b[get_global_id(0)] = a[get_global_id(0)]; }").build()
        nop, cp = prog.nop, prog.cp
        s0 = timed(lambda: nop(rt.queue, (64,), (64,), h), sync, 200)
        s1 = timed(lambda: cp(rt.queue, (1024,), (256,), qkv, h), sync, 200)
        s2 = timed(lambda: cp(rt.queue, (1 << 19,), (256,), qkv, h), sync, 50)
        sync()
        t = time.perf_counter()
        for _ in range(1000):
            nop(rt.queue, (64,), (64,), h)
        host = (time.perf_counter() - t) / 1000          # Python and the driver's enqueue, per launch
        sync()
        nop.set_args(h)
        t = time.perf_counter()
        for _ in range(1000):
            cl.enqueue_nd_range_kernel(rt.queue, nop, (64,), (64,))
        host_bound = (time.perf_counter() - t) / 1000    # the same with the arguments bound once
        sync()
        print(f"\n## launch floor\nempty kernel {s0 * 1e6:.2f} µs, 16 KB copy {s1 * 1e6:.2f} µs, "
              f"8 MB copy {s2 * 1e6:.2f} µs ({2 * 8 * 2**20 / s2 / 1e9:.0f} GB/s); host enqueue per launch "
              f"{host * 1e6:.2f} µs, {host_bound * 1e6:.2f} µs with arguments bound once")
    print("\nbest matmul:", best_m, "\nbest fused:", best_f)
    if a.write:
        for kernel, best in (("matmul", best_m), ("fused", best_f)):
            if best:
                print(write_override(info, kernel, best))


if __name__ == "__main__":
    main()
