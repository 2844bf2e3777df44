"""Kernel builds at load, so that the first reply computes instead of compiling.

A model needs a few dozen programs (kernels/*.cl with its -D values): the operators of a decode step
(T = 1), of a prompt (the GEMM for T <= few_max_tokens and the tiled one above, attention with each
query tile 2, 4, .. up to its most rows), the embedding and the argmax; PoCL also compiles each
kernel again for each work-group size it is launched with. Which ones depends on the
device's tuned values and the model's shape, so the first time a (device, model shape, kernel
sources) combination loads, perfx runs one forward pass of each token count that picks another
program (warm_up_tokens), which builds them, and writes down what was built in a manifest beside
the kernel cache. Each later load builds the manifest's programs in parallel threads (pyopencl
releases the GIL while the driver builds; PoCL and Intel's runtime build concurrently), most from
the on-disk cache.

The work runs in a daemon thread that the calling thread waits on in short steps: Ctrl-C stops the
load at once (a build in flight ends with the process).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ...dirs import kernel_cache_dir
from . import sources as kernel_sources

Progress = Callable[[str, int, int], None]     # (what, done, total)
FIRST_RUN = "compiling kernels (first run only)"
LOADING = "loading kernels"
MAX_THREADS = 4


def warm_up_tokens(backend: Any) -> list[int]:
    """Token counts whose forward passes run every program, and every work-group shape, of a prompt
    or a decode step on the contiguous cache: 1 (decode); below few_tt each count is its own
    program (TT = T); from few_tt to few_max_tokens each multiple of few_tt is another number of
    token tiles per work-group (PoCL compiles a kernel again for each work-group size); each
    attention query tile up to the most; and one above few_max_tokens (the tiled GEMM)."""
    p = backend.matmul.params
    tt, few_max = int(p["few_tt"]), int(p["few_max_tokens"])
    counts = {1, few_max + 1, *range(2, tt), *range(tt, few_max + 1, tt)}
    tile = 2
    while tile <= backend.fused.qt_max:
        counts.add(tile)
        tile *= 2
    return sorted(n for n in counts if n <= backend.max_tokens)


def pocl_cache_dir() -> Path:
    """Where PoCL keeps the kernels it compiled: $POCL_CACHE_DIR, else $XDG_CACHE_HOME/pocl, else ~/.cache/pocl."""
    if os.environ.get("POCL_CACHE_DIR"):
        return Path(os.environ["POCL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pocl"


def manifest_path(backend: Any) -> Path:
    """programs-<digest>.json, the digest over the device, the model's shape, the tuned values, the build
    options and the kernel sources: a change to any of them makes a new manifest. On PoCL it lies in PoCL's own cache,
    which holds the kernels compiled per work-group size: a manifest there means they are compiled
    (and goes when that cache is cleared); elsewhere in perfx's kernel cache."""
    device = backend.rt.device
    sources = sorted((f.name, f.read_text(encoding="utf-8")) for f in kernel_sources.kernels_dir().iterdir()
                     if f.name.endswith((".cl", ".h")))
    key = json.dumps([device.platform.name, device.name, device.driver_version, asdict(backend.config),
                      backend.ctx, backend.max_tokens, backend.params, backend.rt.math_options, sources],
                     sort_keys=True, default=str)
    name = f"programs-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    pocl = "Portable Computing Language" in device.platform.name
    return pocl_cache_dir() / f"perfx-{name}" if pocl else kernel_cache_dir() / name


def read_manifest(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [(str(name), dict(defines)) for name, defines in data]
    except (OSError, ValueError, TypeError):
        return []


def write_manifest(path: Path, programs: list[tuple[str, dict]]) -> None:
    """Writes the manifest through a temporary file and a rename; a read-only cache is left as is."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(programs, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def build_kernels(transformer: Any, progress: Progress | None = None) -> None:
    """Builds every program `transformer`'s OpenCL backend will run (module doc); waits in a way that
    Ctrl-C interrupts."""
    interruptible(_build, transformer, progress or (lambda *a: None))


def _build(transformer: Any, progress: Progress) -> None:
    backend = transformer.backend
    path = manifest_path(backend)
    programs = read_manifest(path)
    if programs:
        prebuild(backend.rt, programs, lambda done, total: progress(LOADING, done, total))
        return
    counts = warm_up_tokens(backend)
    progress(FIRST_RUN, 0, len(counts) + 1)
    for i, n in enumerate(counts):
        transformer.forward(np.zeros(n, np.int32), 0, all_logits=False)
        progress(FIRST_RUN, i + 1, len(counts) + 1)
    transformer.next_token(np.zeros(1, np.int32), transformer.ctx - 1)   # the device argmax; split attention
    progress(FIRST_RUN, len(counts) + 1, len(counts) + 1)
    backend.rt.queue.finish()
    write_manifest(path, list(backend.rt.requested.values()))


def prebuild(rt: Any, programs: list[tuple[str, dict]], progress: Callable[[int, int], None]) -> None:
    """Builds `programs` ((name, defines) pairs) on up to MAX_THREADS threads. A program that fails
    is left to its first use, which reports the error."""
    todo = list(programs)
    done = [0]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                name, defines = todo.pop()
            try:
                rt.program(name, **defines)
            except Exception:  # reported where the program is used
                pass
            with lock:
                done[0] += 1
                progress(done[0], len(programs))

    threads = [threading.Thread(target=worker, daemon=True)
               for _ in range(max(1, min(MAX_THREADS, os.cpu_count() or 1, len(programs))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def interruptible(fn: Callable, *args) -> None:
    """fn(*args) in a daemon thread, waited for in steps of 0.1 s so that KeyboardInterrupt reaches the
    calling thread at once; what fn raised is raised here."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fn(*args)
        except BaseException as e:  # handed to the waiting thread
            failure.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if failure:
        raise failure[0]
