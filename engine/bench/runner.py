"""Running a bench: every combination's tests in fresh worker processes, the engines taking turns."""
from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from ..errors import PerfxError
from .probes import Build, build_info, load_average
from .profile import PhaseProfile
from .results import BenchRun, Result, Samples
from .spec import BenchConfig, Combo
from .worker import Worker


Progress = Callable[[str, int, int], None]          # (what runs now, runs done, runs in all)


def run_bench(config: BenchConfig, progress: Progress | None = None, build: Build | None = None) -> BenchRun:
    """Runs every test of every combination. On Ctrl-C, returns the tests finished so far; on an
    error after some tests finished (a device that fails), returns them with the error."""
    config.validate()
    run = BenchRun(config, build or build_info(), load=load_average())
    state = {"done": 0, "total": config.n_steps}
    try:
        for combo in config.combos():
            _run_combo(config, combo, run, progress or (lambda *a: None), state)
    except KeyboardInterrupt:
        run.interrupted = True
    except PerfxError as e:
        if not run.results:
            raise
        run.error = str(e)
    return run


def _run_combo(config: BenchConfig, combo: Combo, run: BenchRun, progress: Progress, state: dict) -> None:
    model = combo.model
    where = f"{Path(model.name).name} · {combo.device} · {combo.threads} thread{'s' * (combo.threads != 1)}"
    spec = {"path": model.path, "shape": model.shape, "device": combo.device, "threads": combo.threads,
            "ctx": config.n_ctx(model), "seed": config.seed, "max_tokens": config.longest,
            "tests": [[t.n_prompt, t.n_gen] for t in config.tests],
            "llama_bench": config.llama_bench, "llama_fa": config.llama_fa}
    workers: list[Worker] = []
    try:
        progress(f"{where} · loading perfx", state["done"], state["total"])
        workers.append(Worker("perfx", spec, combo.threads))
        host = workers[0].wait_ready()
        if config.vs_llama_cpp:
            progress(f"{where} · loading llama.cpp", state["done"], state["total"])
            workers.append(Worker("llama.cpp", {**spec, "offload": host.device_type == "gpu"}, combo.threads))
            workers[1].wait_ready().weight_bytes = model.file_bytes_per_token
        for index, test in enumerate(config.tests):
            samples = [Samples(test.n_tokens) for _ in workers]
            for rep in range(config.reps + 1):
                for w, s in zip(workers, samples):
                    step = "warm-up" if rep == 0 else f"run {rep}/{config.reps}"
                    last = f" · {s.ts[-1]:.1f} t/s" if s.ns else ""
                    if rep and config.cooldown:
                        progress(f"{where} · cooling down {config.cooldown:g} s", state["done"], state["total"])
                        time.sleep(config.cooldown)
                    progress(f"{where} · {w.engine} {test.name} {step}{last}", state["done"], state["total"])
                    ns = w.request("run", test=index)["ns"]
                    if rep:
                        s.ns.append(ns)
                    state["done"] += 1
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            rows = [Result(model, test, combo.threads, w.info, s, stamp) for w, s in zip(workers, samples)]
            if len(rows) == 2 and rows[1].samples.avg_ts > 0:
                rows[0].ratio = rows[0].samples.avg_ts / rows[1].samples.avg_ts
            for w in workers:
                _update_memory(w)
            run.results += rows
        if config.profile:
            progress(f"{where} · perfx launch profile", state["done"], state["total"])
            n_prompt, n_gen = config.profile_lengths
            phases = workers[0].request("profile", n_prompt=n_prompt, n_gen=n_gen)["profile"]
            workers[0].info.profile = [PhaseProfile.from_dict(p) for p in phases]
        progress(f"{where} · memory and bandwidth", state["done"], state["total"])
        for w in workers:
            _update_memory(w)
            w.info.copy_bandwidth = w.request("bandwidth")["copy_bandwidth"]
        for w in workers[1:]:
            if w.info.device_type == "cpu" and host.device_type == "cpu":
                w.info.copy_bandwidth = host.copy_bandwidth
    except BaseException:
        for w in workers:
            w.close(kill=True)
        raise
    for w in workers:
        w.close()


def _update_memory(worker: Worker) -> None:
    m = worker.request("memory")
    worker.info.peak_rss, worker.info.device_bytes = m["peak_rss"], m["device_bytes"]
