"""Decode speed and launches per token of tuned-parameter variants on one device, alternating (A/B).

    python3 scripts/decode_ab.py MODEL.gguf OUT.json [--device gpu] [--tokens 128] [--start 0] [--rounds 5]
        [--variant NAME:KEY=VALUE,KEY=VALUE ...]

Variants (DEFAULT_VARIANTS below) set parameters of the matmul or fused section
(engine/backends/opencl/specs.py) over the device's tuned values. Parameters read at each call
(SWITCHED) are set on a loaded model between runs; variants that differ in others get a model of
their own (one load each). After a warm-up of each variant, `--rounds` rounds run one greedy decode
of `--tokens` tokens per variant in turn (as llama-bench's tg: from one token at position 0, or at
`--start` after a prompt of that many tokens, prefilled once: split-KV attention starts at 256
positions), and the median tokens/s is reported. Launches per token are counted in one more decode of
each, outside the timed runs. Each variant's logits of a decode step (after an 8-token prompt) are
compared with the first variant's, and its greedy tokens too. Prints a table; writes JSON to OUT.json.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import time

import numpy as np
import pyopencl as cl

DEFAULT_VARIANTS = ["base:", "norm_in:gemv_norm_in=true", "norm_in_direct:gemv_norm_in=true,gemv_norm_stage=false",
                    "split_combine:split_combine=true", "both:gemv_norm_in=true,split_combine=true",
                    "both_rows4:gemv_norm_in=true,split_combine=true,gemv_wg_rows=4"]
# Read at each call (backend._norm_in, Matmul plans, FusedOps.attention and its kernels): set on a loaded
# model, its kernel plans dropped so that they are made again.
SWITCHED = {"gemv_norm_in", "gemv_norm_stage", "gemv_wg_rows", "gemv_tpw", "split_combine",
            "max_splits", "split_wgs", "split_min_chunk"}


def parse_variant(text: str) -> tuple[str, dict]:
    """"name:key=value,key=value" -> (name, {key: value}); values are booleans, numbers or strings."""
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        low = value.strip().lower()
        if low in ("true", "false"):
            params[key.strip()] = low == "true"
            continue
        try:
            params[key.strip()] = int(value)
        except ValueError:
            try:
                params[key.strip()] = float(value)
            except ValueError:
                params[key.strip()] = value.strip()
    return name, params


def sections(params: dict) -> dict[str, dict]:
    """params split by the tuning-database section that declares each key."""
    from perfx.engine.backends.opencl import fused, matmul

    out: dict[str, dict] = {"matmul": {}, "fused": {}}
    for key, value in params.items():
        section = "matmul" if key in matmul.DEFAULT_PARAMS else "fused" if key in fused.DEFAULT_PARAMS else None
        if section is None:
            raise SystemExit(f"unknown parameter {key!r}: see engine/backends/opencl/specs.py")
        out[section][key] = value
    return out


@contextlib.contextmanager
def forced(params: dict):
    """Models loaded inside take `params` over the device's tuned values."""
    from perfx.engine.backends.opencl import tuning

    real, by_section = tuning.params_for, sections(params)

    def params_for(info, kernel, *args, **kwargs):
        return {**real(info, kernel, *args, **kwargs), **by_section.get(kernel, {})}

    tuning.params_for = params_for
    try:
        yield
    finally:
        tuning.params_for = real


@contextlib.contextmanager
def counting(names: list[str]):
    """The name of each kernel launched inside, appended to `names`."""
    enqueue, call = cl.enqueue_nd_range_kernel, cl.Kernel.__call__

    def recording(queue, kernel, *rest, **kw):
        names.append(kernel.function_name)
        return enqueue(queue, kernel, *rest, **kw)

    def calling(kernel, queue, *rest, **kw):
        names.append(kernel.function_name)
        return call(kernel, queue, *rest, **kw)

    cl.enqueue_nd_range_kernel, cl.Kernel.__call__ = recording, calling
    try:
        yield
    finally:
        cl.enqueue_nd_range_kernel, cl.Kernel.__call__ = enqueue, call


def switch(backend, device: dict[str, dict], params: dict) -> None:
    """The SWITCHED parameters of a loaded model set to `params`, the others back to the device's."""
    by_section = sections({k: v for k, v in params.items() if k in SWITCHED})
    for section, ops in (("matmul", backend.matmul), ("fused", backend.fused)):
        ops.params.update({k: device[section][k] for k in SWITCHED if k in device[section]})
        ops.params.update(by_section[section])
    backend.matmul._plans.clear()
    backend.fused._attend.clear()


def decode(t, start: int, n: int) -> list[int]:
    return list(t.greedy(np.array([1]), start, n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--device", default="gpu")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variant", action="append", help="NAME:KEY=VALUE,... (repeatable)")
    a = ap.parse_args()

    from perfx.engine.llm import load_model

    variants = dict(parse_variant(v) for v in (a.variant or DEFAULT_VARIANTS))
    loaded: dict[str, tuple] = {}                # load-time parameters -> (transformer, its device params)
    models, results = {}, {}
    prompt = np.random.default_rng(0).integers(0, 256, 8)

    def use(name: str):
        t, device = models[name]
        switch(t.backend, device, variants[name])
        return t

    for name, params in variants.items():
        fixed = {k: v for k, v in params.items() if k not in SWITCHED}
        key = json.dumps(fixed, sort_keys=True)
        if key not in loaded:
            with forced(fixed):
                t = load_model(a.model, device=a.device, ctx=a.start + a.tokens + 16).transformer
            loaded[key] = t, {"matmul": dict(t.backend.matmul.params), "fused": dict(t.backend.fused.params)}
        models[name] = loaded[key]
        t = use(name)
        t.forward(prompt, 0, all_logits=False)
        step = t.forward(np.array([7]), len(prompt))                       # one decode step's logits
        if a.start:
            t.forward(np.random.default_rng(1).integers(0, 256, a.start), 0, all_logits=False)
        names: list[str] = []
        decode(t, a.start, a.tokens)                                              # warm-up, builds
        t.backend.rt.queue.finish()
        with counting(names):
            tokens = decode(t, a.start, a.tokens)
            t.backend.rt.queue.finish()
        results[name] = {"params": params, "tg": [], "greedy": tokens, "step_logits": step,
                         "launches_per_token": len(names) / a.tokens,
                         "launches_by_kernel": {k: v / a.tokens for k, v in collections.Counter(names).most_common()},
                         "device": t.backend.description}
    for _ in range(a.rounds):
        for name in models:
            t = use(name)
            decode(t, a.start, 4)                                                 # its plans made again
            t.backend.rt.queue.finish()
            start = time.perf_counter()
            decode(t, a.start, a.tokens)
            results[name]["tg"].append(a.tokens / (time.perf_counter() - start))

    first = next(iter(results.values()))
    ref = first["step_logits"]
    print(f"{first['device']}, {a.model}, tg{a.tokens} from position {a.start}, {a.rounds} rounds alternating")
    print("| variant | params | tg t/s (median) | min-max | launches per token | step logits vs first "
          "| greedy = first |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for name, r in results.items():
        diff = float(np.abs(r.pop("step_logits") - ref).max() / np.abs(ref).max())
        r.update(median_ts=statistics.median(r["tg"]), step_logits_max_rel_diff=diff,
                 greedy_matches_first=r["greedy"] == first["greedy"])
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "device's"
        print(f"| {name} | {params} | {r['median_ts']:.1f} | {min(r['tg']):.1f}-{max(r['tg']):.1f} | "
              f"{r['launches_per_token']:.1f} | {diff:.1e} | {r['greedy_matches_first']} |")
    report = {"model": a.model, "device": first["device"], "tokens": a.tokens, "start": a.start,
              "rounds": a.rounds, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "variants": results}
    tmp = f"{a.out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
