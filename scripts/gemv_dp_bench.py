#!/usr/bin/env python3
"""The int4 GEMV of decode, one token: the float GEMV (kernels/gemv.cl, the device's tuned parameters)
against the GEMV by integer dot products (kernels/gemv_dp.cl, matmul parameter gemv_dp), weights from DRAM.

    python scripts/gemv_dp_bench.py --json /tmp/gemv_dp.json
    python scripts/gemv_dp_bench.py --json out.json --grid "dp_vec=4,8;dp_ksplit=16,32,64;dp_wg_rows=2,4;dp_tpw=1,2"
    python scripts/gemv_dp_bench.py --device cpu --mode emulated --shapes 1024x1024 --rotate-mib 64 --json x.json

Shapes (N x K, "s" for gate+up with SwiGLU: N rows, N/2 outputs): LLaMA-7B's 12288x4096 (QKV), 4096x11008
(down) and 22016x4096s (gate+up). Each call reads another copy of the matrix, enough copies to exceed the
last-level cache four times (--rotate-mib overrides), so the weights come from DRAM. Before timing, the two
GEMVs' outputs are compared (max difference over the largest output: the dot-product GEMV multiplies x in
int16 blocks, about 1e-5). Times (scripts/gemv_bandwidth.py's): gated (runs of 20 calls released at once,
launch gaps included) and kernel (a call's launches, start to end, summed; the dot-product GEMV's
quantize launch included); medians. GB/s: the packed weights (nibbles, fp16 scales and zeros) + x + y
per call. Prints a table and writes the rows as JSON to --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_bandwidth import gated, kernel_only, parse_grid  # noqa: E402

from perfx.engine.backends.opencl import matmul  # noqa: E402
from perfx.engine.backends.opencl.bandwidth import bandwidth  # noqa: E402
from perfx.engine.backends.opencl.devices import select  # noqa: E402
from perfx.engine.backends.opencl.runtime import Runtime  # noqa: E402
from perfx.engine.backends.opencl.tuning import params_for  # noqa: E402

SHAPES = "12288x4096,4096x11008,22016x4096s"


def matrices(rt: Runtime, n: int, k: int, group: int, rotate: int, rng) -> list:
    """Copies of one random int4 matrix, together at least `rotate` bytes."""
    q = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    scale = rng.uniform(0.002, 0.02, (n, k // group)).astype(np.float16).astype(np.float32)
    zero = (-8 * scale).astype(np.float32)
    first = matmul.DeviceMatrix.from_int4(rt, q, scale, zero, group)
    return [first] + [matmul.DeviceMatrix.from_int4(rt, q, scale, zero, group)
                      for _ in range(-(-rotate // first.nbytes) - 1)]


def setup(device: str, rotate_mib: int):
    """(selection, profiling Runtime, the device's tuned matmul parameters, copy bandwidth in bytes/s,
    bytes of weight copies to cycle: rotate_mib, else 4x the last-level cache); says them."""
    sel = select(device)
    rt = Runtime(sel.device, profiling=True)
    base = params_for(sel.info, "matmul", matmul.DEFAULT_PARAMS)
    copy_bw = bandwidth(sel.device)
    cache = max(int(sel.device.global_mem_cache_size), 64 << 20)   # drivers may report only L1
    rotate = (rotate_mib << 20) or 4 * cache
    print(f"device {sel.info.name.strip()}; copy bandwidth {copy_bw / 1e9:.0f} GB/s; weights cycled {rotate >> 20} MiB; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    return sel, rt, base, copy_bw, rotate


def write(path: str, sel, copy_bw: float, rotate: int, rows: list[dict]) -> None:
    Path(path).write_text(json.dumps({"device": sel.info.name.strip(), "copy_gbs": copy_bw / 1e9,
                                      "rotate_bytes": rotate, "date": time.strftime("%Y-%m-%d %H:%M"),
                                      "rows": rows}, indent=1))
    print(f"wrote {path}")


def in_effect(name: str, mm: matmul.Matmul) -> None:
    """Raises where a dot-product variant is not what runs (its probe failed, said above)."""
    if name != "tuned" and mm.dp is None:
        raise RuntimeError("the dot-product GEMV failed its probe (see above)")


def measure(rt: Runtime, variants: list[tuple[str, dict]], shapes: str, group: int, rotate: int,
            check) -> list[dict]:
    """Each variant's GEMV on each shape ("NxK", "s": gate+up with SwiGLU), weights cycled through
    `rotate` bytes of copies: its output against the first variant's, then gated and kernel times;
    check(name, matmul) raises where a variant is not in effect. Prints a table; the rows."""
    print("| N x K | op | GEMV | gated us | GB/s | kernel us | GB/s | max diff vs tuned |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    rows, rng = [], np.random.default_rng(0)
    for shape in shapes.split(","):
        swiglu = shape.endswith("s")
        n, k = (int(v) for v in shape.rstrip("s").lower().split("x"))
        out = n // 2 if swiglu else n
        copies = matrices(rt, n, k, group, rotate, rng)
        x = rt.to_device(rng.standard_normal(k).astype(np.float32))
        y = rt.empty(4 * out)
        moved = copies[0].nbytes + 4 * (k + out)
        reference = None
        for name, params in variants:
            try:
                mm = matmul.Matmul(rt, params)
                check(name, mm)
            except Exception as e:  # a candidate the device cannot build or run
                print(f"| {n} x {k} | | {name} | failed: {str(e).splitlines()[0][:100]} | | | | |")
                continue

            def enqueue(i: int, mm=mm) -> list:
                product = mm.swiglu if swiglu else mm.linear
                return product(x, copies[i % len(copies)], 1, y, scheme="gemv")

            enqueue(0)
            got = rt.read(y, (out,))
            reference = got if reference is None else reference
            diff = float(np.abs(got - reference).max() / np.abs(reference).max())
            t_gated, t_kernel = gated(rt, enqueue), kernel_only(rt, enqueue)
            row = {"shape": f"{n}x{k}", "op": "swiglu" if swiglu else "linear", "group": group, "gemv": name,
                   "gated_us": t_gated * 1e6, "gated_gbs": moved / t_gated / 1e9,
                   "kernel_us": t_kernel * 1e6, "kernel_gbs": moved / t_kernel / 1e9,
                   "bytes": moved, "max_diff": diff, "params": {k_: v for k_, v in params.items() if k_.startswith(("gemv", "dp_", "use_image"))}}
            rows.append(row)
            print(f"| {n} x {k} | {row['op']} | {name} | {row['gated_us']:.1f} | {row['gated_gbs']:.0f} | "
                  f"{row['kernel_us']:.1f} | {row['kernel_gbs']:.0f} | {diff:.1e} |", flush=True)
        del copies
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="gpu")
    ap.add_argument("--shapes", default=SHAPES, help='NxK, comma-separated; "s" after K: gate+up with SwiGLU')
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--mode", default="ptx", choices=("ptx", "emulated"), help="gemv_dp mode")
    ap.add_argument("--grid", default="", help='dot-product GEMV parameters to try, e.g. "dp_ksplit=16,32"')
    ap.add_argument("--rotate-mib", type=int, default=0, help="bytes of weight copies cycled (default: 4x cache)")
    ap.add_argument("--json", required=True, help="where to write the rows")
    args = ap.parse_args()

    sel, rt, base, copy_bw, rotate = setup(args.device, args.rotate_mib)
    variants = [("tuned", {**base, "gemv_dp": "off"})]             # gemv.cl on GPUs
    variants += [("dp " + (", ".join(f"{a}={b}" for a, b in o.items()) or "defaults"), {**base, "gemv_dp": args.mode, **o})
                 for o in parse_grid(args.grid)]
    rows = measure(rt, variants, args.shapes, args.group, rotate, in_effect)
    write(args.json, sel, copy_bw, rotate, rows)


if __name__ == "__main__":
    main()
