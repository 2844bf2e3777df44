"""Host µs per decode token: the Python and driver work of enqueuing one decode step, with no kernel
running meanwhile, and the floor of the same launches enqueued from a list with their arguments bound.

    python3 scripts/host_loop.py [MODEL] [--device cpu] [--steps 40] [--json OUT.json]

Each decode step (after a 64-token prompt) is enqueued while the queue is held by a user event, so the
host's clock measures only the host's work (on a CPU device the enqueuing otherwise competes with the
kernels for the cores); then the event is released and the step runs. The floor replays the launches
of one step by cl.enqueue_nd_range_kernel (their arguments as last bound), held the same way. Also the
free-running decode µs per token. Medians of --steps steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import pyopencl as cl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args()
    from perfx.engine.llm import load_model

    t = load_model(a.model, device=a.device, ctx=2048).transformer
    b = t.backend
    rt = b.rt
    t.next_token(np.random.default_rng(0).integers(0, t.config.vocab_size, 64), 0)

    def step(pos: int):
        return b.argmax_async(t._layers(None, t._contiguous(pos)), t.w.output)

    def held(enqueue) -> float:
        """µs the host spends in enqueue() while the queue waits on a user event."""
        gate = cl.UserEvent(rt.ctx)
        cl.enqueue_marker(rt.queue, wait_for=[gate])
        t0 = time.perf_counter_ns()
        out = enqueue()
        t1 = time.perf_counter_ns()
        gate.set_status(cl.command_execution_status.COMPLETE)
        (out.result() if out is not None else cl.enqueue_marker(rt.queue).wait())
        return (t1 - t0) / 1e3

    launches, launch = [], rt.launch
    rt.launch = lambda kernel, g, l, *args, cost=None: launches.append((kernel, g, l)) or launch(kernel, g, l, *args,
                                                                                               cost=cost)
    step(64).result()
    rt.launch = launch

    def replay() -> None:
        for kernel, g, l in launches:
            cl.enqueue_nd_range_kernel(rt.queue, kernel, g, l)

    for pos in range(65, 70):          # warm-up: plans made, caches filled
        held(lambda: step(pos))
    host = [held(lambda: step(70 + i)) for i in range(a.steps)]
    floor = [held(replay) for _ in range(a.steps)]
    chosen, wall = step(200), []
    for pos in range(201, 201 + a.steps):
        t0 = time.perf_counter_ns()
        ahead = step(pos)
        chosen.result()
        chosen = ahead
        wall.append((time.perf_counter_ns() - t0) / 1e3)
    chosen.result()
    n = len(launches)
    rec = {"device": b.description, "launches_per_token": n, "host_us_per_token": statistics.median(host),
           "floor_us_per_token": statistics.median(floor), "decode_us_per_token": statistics.median(wall)}
    print(f"{b.description}: {n} launches per token; host {rec['host_us_per_token']:.0f} µs per token "
          f"({rec['host_us_per_token'] / n:.1f} µs a launch), floor {rec['floor_us_per_token']:.0f} µs "
          f"({rec['floor_us_per_token'] / n:.1f} µs a launch); decode {rec['decode_us_per_token']:.0f} µs per token")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
