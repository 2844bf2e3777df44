#!/usr/bin/env python3
r"""The GEMV's warp layout (matmul parameters gemv_prefetch, gemv_reduce, gemv_waves with gemv_ksplit 32;
docs/performance.md, H200) against the device's shipped GEMV (its tuned parameters, kernels/gemv.cl), one
token, weights from DRAM (scripts/gemv_dp_bench.py's `measure`: copies cycled through 4x the cache, gated
and kernel times, medians).

    python3 scripts/gemv_warp_bench.py --json /tmp/gemv_warp.json
    python3 scripts/gemv_warp_bench.py --json x.json \
        --layout "w4:gemv_ksplit=32,gemv_wg_rows=4,gemv_prefetch=4,gemv_reduce=shfl"
    python3 scripts/gemv_warp_bench.py --device cpu --shapes 1024x1024,512x768s --rotate-mib 16 --json x.json \
        --layout "xor:gemv_vec=4,gemv_ksplit=32,gemv_wg_rows=2,gemv_prefetch=4,gemv_reduce=xor"

Shapes: LLaMA-7B's 12288x4096 (QKV), 4096x4096 (o), 4096x11008 (down), 22016x4096s (gate+up, SwiGLU).
Each layout's output is checked against the shipped GEMV's (largest difference over the largest
output, at most 1e-4: the same float arithmetic in another order); a layout that differs, fails to
build, or is not in effect (shfl's probe failed and it fell back to "once") makes the exit status 1,
after the table and the JSON (--json) are written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_ab import parse_variant  # noqa: E402
from gemv_dp_bench import measure, setup, write  # noqa: E402

SHAPES = "12288x4096,4096x4096,4096x11008,22016x4096s"
WARP = "gemv_vec=4,gemv_ksplit=32,gemv_zero_inline=true,use_image=true"


def default_layouts() -> list[str]:
    """A warp per row tile: work-groups of 2, 4 or 8 warps, 2 or 4 pieces (of 64 bytes per tile) in
    flight per work-item, shfl.sync or local memory once; then whole waves of 2, 4, 8 work-groups per
    compute unit, two tiles per work-item, and two row tiles per warp (K split 16 ways)."""
    out = [f"r{rows}-p{pre}-{red}:{WARP},gemv_wg_rows={rows},gemv_prefetch={pre},gemv_reduce={red}"
           for rows in (2, 4, 8) for pre in (2, 4) for red in ("shfl", "once")]
    out += [f"r4-p4-shfl-waves{w}:{WARP},gemv_wg_rows=4,gemv_prefetch=4,gemv_reduce=shfl,gemv_waves={w}"
            for w in (2, 4, 8)]
    out += [f"r4-p2-shfl-tpw2:{WARP},gemv_wg_rows=4,gemv_prefetch=2,gemv_reduce=shfl,gemv_tpw=2",
            "k16-r8-p4-shfl:gemv_vec=4,gemv_ksplit=16,gemv_wg_rows=8,gemv_prefetch=4,gemv_reduce=shfl"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="gpu")
    ap.add_argument("--shapes", default=SHAPES, help='NxK, comma-separated; "s" after K: gate+up with SwiGLU')
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--layout", action="append", help="NAME:KEY=VALUE,... over the tuned parameters (repeatable; "
                    "default: default_layouts())")
    ap.add_argument("--rotate-mib", type=int, default=0, help="bytes of weight copies cycled (default: 4x cache)")
    ap.add_argument("--json", required=True, help="where to write the rows")
    args = ap.parse_args()

    sel, rt, base, copy_bw, rotate = setup(args.device, args.rotate_mib)
    variants = [("tuned", {**base, "gemv_dp": "off"})]
    variants += [(name, {**base, "gemv_dp": "off", **params})
                 for name, params in map(parse_variant, args.layout or default_layouts())]
    asked = dict(variants)

    def in_effect(name: str, mm) -> None:
        if mm.params["gemv_reduce"] != asked[name]["gemv_reduce"]:
            raise RuntimeError(f"gemv_reduce {asked[name]['gemv_reduce']} fell back to {mm.params['gemv_reduce']}")

    rows = measure(rt, variants, args.shapes, args.group, rotate, in_effect)
    write(args.json, sel, copy_bw, rotate, rows)
    shapes = {r["shape"] + r["op"] for r in rows}
    missing = len(variants) * len(shapes) - len(rows)
    wrong = [f"{r['gemv']} on {r['shape']} ({r['max_diff']:.1e})" for r in rows if not r["max_diff"] <= 1e-4]
    best = {}
    for r in rows:
        if r["gemv"] != "tuned" and r["kernel_us"] < best.get(r["shape"] + r["op"], (1e9,))[0]:
            best[r["shape"] + r["op"]] = (r["kernel_us"], r["gemv"])
    for key, (us, name) in sorted(best.items()):
        tuned = next(r["kernel_us"] for r in rows if r["gemv"] == "tuned" and r["shape"] + r["op"] == key)
        print(f"{key}: best layout {name} {us:.1f} us against the shipped {tuned:.1f} us ({tuned / us:.2f}x)")
    if missing or wrong:
        print(f"FAILED: {missing} layout runs did not run; differ from the shipped GEMV: {', '.join(wrong) or 'none'}")
        sys.exit(1)


if __name__ == "__main__":
    main()
