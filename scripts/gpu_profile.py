"""Where a GPU's time goes: every kernel launch of a prefill and of decode steps, from OpenCL profiling
events, summed per kernel: launches, kernel time, the gap before each launch (the device idle since the
previous launch ended), and their shares of the wall time.

    python3 scripts/gpu_profile.py MODEL.gguf [--device gpu] [--prompt 512] [--steps 16] [--set KEY=VALUE,...]

--set: tuned parameters over the device's (as scripts/decode_ab.py's variants), e.g. gemv_norm_in=true.

Profiling adds a little host work per launch; tokens/s come from `perfx bench`, not from here.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time

import numpy as np
import pyopencl as cl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="gpu")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--set", default="", help="KEY=VALUE,... over the device's tuned parameters")
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode_ab import forced, parse_variant

    from perfx.engine.backends.opencl import runtime
    from perfx.engine.llm import load_model

    init = runtime.Runtime.__init__
    runtime.Runtime.__init__ = lambda self, device, profiling=True: init(self, device, True)
    events: list[tuple[str, cl.Event]] = []
    enqueue = cl.enqueue_nd_range_kernel

    def recording(queue, kernel, *rest, **kw):
        ev = enqueue(queue, kernel, *rest, **kw)
        events.append((kernel.function_name, ev))
        return ev

    call = cl.Kernel.__call__

    def calling(kernel, queue, *rest, **kw):
        ev = call(kernel, queue, *rest, **kw)
        events.append((kernel.function_name, ev))
        return ev

    cl.enqueue_nd_range_kernel = recording
    cl.Kernel.__call__ = calling
    with forced(parse_variant(f"set:{a.set}")[1]) if a.set else contextlib.nullcontext():
        llm = load_model(a.model, device=a.device, ctx=a.prompt + a.steps + 8)
    t = llm.transformer
    tokens = np.random.default_rng(0).integers(0, t.config.vocab_size, a.prompt + 1)

    def report(title: str, run) -> None:
        run()                                           # warm-up
        t.backend.rt.queue.finish()
        events.clear()
        start = time.perf_counter()
        run()
        t.backend.rt.queue.finish()
        wall = time.perf_counter() - start
        per = collections.defaultdict(lambda: [0, 0.0, 0.0])
        prev_end = None
        for name, ev in events:
            s, e = ev.profile.start, ev.profile.end
            row = per[name]
            row[0] += 1
            row[1] += (e - s) / 1e3
            if prev_end is not None:
                row[2] += max(0, s - prev_end) / 1e3
            prev_end = e
        busy = sum(r[1] for r in per.values())
        gaps = sum(r[2] for r in per.values())
        print(f"\n## {title}: wall {wall * 1e3:.2f} ms, {len(events)} launches, kernels {busy / 1e3:.2f} ms, "
              f"gaps {gaps / 1e3:.2f} ms")
        print("| kernel | launches | kernel ms | of kernel time | gap ms | µs per launch |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, (n, us, gap) in sorted(per.items(), key=lambda kv: -kv[1][1]):
            print(f"| {name} | {n} | {us / 1e3:.3f} | {us / busy:.1%} | {gap / 1e3:.3f} | {us / n:.1f} |")

    report(f"prefill of {a.prompt} tokens", lambda: t.next_token(tokens[:a.prompt], 0))

    def decode():
        for _ in t.greedy(tokens[a.prompt:], a.prompt, a.steps):
            pass

    report(f"decode, {a.steps} steps", decode)


if __name__ == "__main__":
    main()
