"""Prefill attention on a GPU: `attend` (kernels/attention.cl, CUDA cores) against `attend_mma`
(kernels/attention_mma.cl, tensor cores), one layer of a model's shape, through FusedOps.attention as
the forward pass calls it. On the GPU machine:
    python3 scripts/attention_bench.py --out attention.json [--platform nvidia] [--shape llama7b]
prints, for each case (T new tokens after `start` cached positions), each kernel's time (median of 5 runs
of --reps back-to-back launches after a warm-up, divided by reps), its TFLOP/s on the causal work
(4 x heads x head_dim x the keys each query sees) and the largest difference between the two outputs
(relative to the output's largest magnitude), and writes the rows to the JSON file.
--mode emulated runs attend_mma without the PTX instructions (any device, slowly): a check of the script.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

SHAPES = {   # n_heads, n_kv_heads, head_dim
    "llama7b": (32, 32, 128),
    "llama3-8b": (32, 8, 128),
    "smollm2": (9, 3, 64),
}
CASES = [(512, 0), (16, 0), (32, 0), (64, 0), (128, 0), (256, 0), (1024, 0), (2048, 0), (512, 1536)]   # (T, start)
FP16_TC_PEAK = 989.0e12    # H200 SXM, dense fp16 tensor cores (data sheet)


def causal_flops(T: int, start: int, n_heads: int, head_dim: int) -> float:
    """QK^T and PV over the keys each of the T queries sees: 4 heads D (p + 1) for the query at p."""
    keys = sum(p + 1 for p in range(start, start + T))
    return 4.0 * n_heads * head_dim * keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file for the rows")
    ap.add_argument("--platform", default="nvidia", help="substring of the OpenCL platform's name")
    ap.add_argument("--shape", default="llama7b", choices=sorted(SHAPES))
    ap.add_argument("--mode", default=None, help="attention_mma mode instead of the database's (ptx, emulated)")
    ap.add_argument("--cases", default=None, help="T:start,... (default: " +
                    ",".join(f"{t}:{s}" for t, s in CASES) + ")")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--sweep", action="store_true", help="also every att_mma_warps x att_mma_bk of the spec's "
                    "candidates (those that fit the device)")
    a = ap.parse_args()

    import pyopencl as cl

    from perfx.engine.backends.opencl.devices import describe
    from perfx.engine.backends.opencl.fused import DEFAULT_PARAMS, FusedOps
    from perfx.engine.backends.opencl.runtime import Runtime
    from perfx.engine.backends.opencl.specs import search_space
    from perfx.engine.backends.opencl.tuning import params_for
    from perfx.engine.config import ModelConfig

    device = next(d for p in cl.get_platforms() if a.platform in p.name.lower() for d in p.get_devices())
    rt = Runtime(device)
    params = params_for(describe(device), "fused", DEFAULT_PARAMS)
    if a.mode:
        params["attention_mma"] = a.mode
    heads, kv_heads, head_dim = SHAPES[a.shape]
    cases = [tuple(int(v) for v in c.split(":")) for c in a.cases.split(",")] if a.cases else CASES
    ctx = max(t + s for t, s in cases)
    config = ModelConfig(arch="llama", n_layers=1, dim=heads * head_dim, n_heads=heads, n_kv_heads=kv_heads,
                         head_dim=head_dim, ffn_dim=4 * heads * head_dim, vocab_size=32000, ctx_len=ctx,
                         norm_eps=1e-5, rope_base=10000.0, rope_dim=head_dim, tied_embedding=False)
    plain = FusedOps(rt, config, ctx, 1, {**params, "attention_mma": "off"})
    mma = FusedOps(rt, config, ctx, 1, {**params, "att_mma_min_tokens": 1})
    variants = [("attend", plain)] + ([("attend_mma", mma)] if mma.mma else [])
    if a.sweep and mma.mma:
        space = search_space("attention_mma")
        for warps in space["att_mma_warps"]:
            for bk in space["att_mma_bk"]:
                if (warps, bk) != (params["att_mma_warps"], params["att_mma_bk"]):
                    ops = FusedOps(rt, config, ctx, 1, {**params, "att_mma_min_tokens": 1, "att_mma_warps": warps,
                                                        "att_mma_bk": bk})
                    if ops.mma:
                        variants.append((f"w{warps} bk{bk}", ops))
    print(f"device: {device.name.strip()}; shape {a.shape} ({heads} heads, {kv_heads} KV heads, head_dim "
          f"{head_dim}); attention_mma {params['attention_mma']}: {'on' if mma.mma else 'off'}; "
          f"warps {params['att_mma_warps']}, bk {params['att_mma_bk']}, kv_half {params['kv_half']}", flush=True)
    rng = np.random.default_rng(0)
    width = config.q_dim + 2 * config.kv_dim
    rows = []
    print(f"{'T':>6} {'start':>6} {'kernel':>11} {'ms':>9} {'TFLOP/s':>8} {'of fp16 peak':>12} {'max diff':>9}")
    for T, start in cases:
        flops = causal_flops(T, start, heads, head_dim)
        qkv = rt.to_device(rng.standard_normal((T, width)).astype(np.float32))
        out = rt.empty(4 * T * config.q_dim)
        outs = {}
        for name, ops in variants:
            if start:           # the cache the pass reads: the same prefix for both
                prefix = np.random.default_rng(1).standard_normal((start, width)).astype(np.float32)
                ops.attention(rt.to_device(prefix), start, 0, 0, rt.empty(4 * start * config.q_dim))

            def run(ops=ops):
                ops.attention(qkv, T, 0, start, out)

            run()
            rt.queue.finish()
            times = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(a.reps):
                    run()
                rt.queue.finish()
                times.append((time.perf_counter() - t) / a.reps)
            sec = statistics.median(times)
            outs[name] = got = rt.read(out, (T, config.q_dim))
            diff = float(np.abs(got - outs["attend"]).max() / np.abs(outs["attend"]).max())
            rows.append(dict(T=T, start=start, kernel=name, shape=a.shape, sec=sec, tflops=flops / sec / 1e12,
                             max_diff=diff))
            print(f"{T:>6} {start:>6} {name:>11} {sec * 1e3:>9.3f} {flops / sec / 1e12:>8.2f} "
                  f"{flops / sec / FP16_TC_PEAK:>11.1%} {diff:>9.2e}", flush=True)
        if "attend_mma" in outs:
            sec = {r["kernel"]: r["sec"] for r in rows if (r["T"], r["start"]) == (T, start)}
            print(f"{'':>13} attend_mma: {sec['attend'] / sec['attend_mma']:.1f}x faster than attend", flush=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(dict(device=device.name.strip(), params={k: params[k] for k in sorted(params)}, rows=rows),
                  f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
