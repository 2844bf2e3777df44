"""A short tuning sweep of the kernels that bound a GPU's prefill and decode on LLaMA-7B's shape, each
variant timed alone (median of 5 runs of `reps` launches after a warm-up):

  mma GEMM tiles (12288x4096, T = 512), GEMV (12288x4096 and 4096x11008, T = 1), prefill attention
  (T = 512 from position 0), decode attention (T = 1 at position 511, 8 layers' caches in turn),
  add_rmsnorm (T = 1 and 512), and the launch floor (an empty kernel, small and large copies).

    python3 scripts/gpu_sweep.py [--platform nvidia] [--write]

prints one table per kernel; --write stores the fastest of each as the device's tuned parameters
(the tuner's file, engine/backends/opencl/tuning.py write_override), which perfx then loads.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--platform", default="nvidia")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--parts", default="mma,gemv,attention,decode,norm,floor", help="which kernels, comma-separated")
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
