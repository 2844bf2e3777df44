"""Where a GPU's time goes: the launch budget of a prefill and of decode steps after it, per kernel, from
OpenCL profiling events (engine/bench/profile.py; `perfx bench --profile` prints the same tables beside
its timed tests).

    python3 scripts/gpu_profile.py MODEL.gguf [--device gpu] [--prompt 512] [--steps 16] [--set KEY=VALUE,...]
        [--json OUT.json]

--set: tuned parameters over the device's (as scripts/decode_ab.py's variants), e.g. gemv_norm_in=true.

Profiling adds a little host work per launch; tokens/s come from `perfx bench`, not from here.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="gpu")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--set", default="", help="KEY=VALUE,... over the device's tuned parameters")
    ap.add_argument("--json", help="also write the phases' records (profile.py) to this file")
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode_ab import forced, parse_variant

    from perfx.engine.bench.engines import PerfxEngine
    from perfx.engine.bench.profile import phase_table

    n = a.prompt + a.steps
    with forced(parse_variant(f"set:{a.set}")[1]) if a.set else contextlib.nullcontext():
        engine = PerfxEngine({"path": a.model, "device": a.device, "ctx": n + 8, "seed": 0, "max_tokens": n + 1})
    phases = engine.profile(a.prompt, a.steps)
    copy = engine.copy_bandwidth()
    for phase in phases:
        print("\n".join([""] + phase_table(phase, copy, f"{Path(a.model).name} · {a.device} · {phase.name}")))
    if a.json:
        Path(a.json).write_text(json.dumps([p.record(copy) for p in phases], indent=2) + "\n")


if __name__ == "__main__":
    main()
