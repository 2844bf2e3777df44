"""Kernels built at load (engine/backends/opencl/builds.py): the warm-up's token counts, that a model
loaded with them builds nothing more in a prompt or a decode step, the manifest of later loads, and
that Ctrl-C is not held up by a build."""
from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from perfx.engine.backends.opencl import builds
from tests.conftest import TinySpec, write_tiny_gguf


def fake_backend(few_tt=4, few_max=32, qt_max=8, max_tokens=512):
    return SimpleNamespace(matmul=SimpleNamespace(params={"few_tt": few_tt, "few_max_tokens": few_max}),
                           fused=SimpleNamespace(qt_max=qt_max), max_tokens=max_tokens)


def test_warm_up_tokens_cover_each_program_and_work_group_shape():
    assert builds.warm_up_tokens(fake_backend()) == [1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 33]
    assert builds.warm_up_tokens(fake_backend(few_tt=2, few_max=8, qt_max=16)) == [1, 2, 4, 6, 8, 9, 16]
    assert builds.warm_up_tokens(fake_backend(max_tokens=8)) == [1, 2, 3, 4, 8]


@pytest.fixture
def opencl_model(tmp_path, monkeypatch):
    pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.devices import list_devices

    if not any(i.type == "cpu" for i in list_devices()):
        pytest.skip("no OpenCL CPU device")
    monkeypatch.setenv("PERFX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("POCL_CACHE_DIR", str(tmp_path / "pocl"))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TinySpec(qtype="Q4_0", dim=64, ffn_dim=96))
    return path


@pytest.mark.slow
def test_a_loaded_model_builds_nothing_more_in_its_first_reply(opencl_model):
    from perfx.engine.llm import load_model

    seen = []
    llm = load_model(opencl_model, device="cpu", ctx=128, kernels=lambda *a: seen.append(a))
    assert seen[0] == (builds.FIRST_RUN, 0, seen[-1][2]) and seen[-1][1] == seen[-1][2]
    rt, tr = llm.transformer.backend.rt, llm.transformer
    built = set(rt.requested)
    for n, start in ((31, 0), (7, 31), (50, 38), (1, 88)):
        tr.next_token(np.arange(3, 3 + n, dtype=np.int32) % 200, start)
    assert set(rt.requested) == built

    from perfx.engine.backends.opencl import devices

    devices.clear_caches()                     # a new process: the manifest, built before any pass
    seen.clear()
    again = load_model(opencl_model, device="cpu", ctx=128, kernels=lambda *a: seen.append(a))
    assert set(again.transformer.backend.rt.requested) == built
    assert seen and all(what == builds.LOADING for what, *_ in seen)


def test_prebuild_builds_each_program_once_on_several_threads():
    calls, threads = [], set()

    class FakeRuntime:
        def program(self, name, **defines):
            calls.append((name, defines))
            threads.add(threading.get_ident())
            time.sleep(0.05)
            if name == "broken":
                raise RuntimeError("left to its first use")

    progress = []
    programs = [("a", {"X": 1}), ("b", {}), ("broken", {}), ("c", {"Y": True})]
    builds.prebuild(FakeRuntime(), programs, lambda done, total: progress.append((done, total)))
    assert sorted(calls, key=str) == sorted(programs, key=str)
    assert progress[-1] == (4, 4) and len(progress) == 4
    assert len(threads) > 1 or (os.cpu_count() or 1) == 1


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="POSIX signals")
def test_ctrl_c_is_not_held_up_by_a_build():
    def build():                                # a long build in a native call
        time.sleep(5)

    signal.setitimer(signal.ITIMER_REAL, 0.2)
    previous = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    start = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            builds.interruptible(build)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert time.perf_counter() - start < 1.0


def test_an_error_in_the_build_reaches_the_caller():
    def build():
        raise ValueError("no such kernel")

    with pytest.raises(ValueError, match="no such kernel"):
        builds.interruptible(build)


@pytest.fixture
def kernel_folder(tmp_path, monkeypatch):
    """A kernels folder of one program, probe.cl, that includes outer.h, which includes inner.h."""
    from perfx.engine.backends.opencl import sources

    folder = tmp_path / "kernels"
    folder.mkdir()
    (folder / "probe.cl").write_text('#include "outer.h"\n'
                                     "__kernel void probe(__global int *out) { out[0] = VALUE; }\n")
    (folder / "outer.h").write_text('#ifndef OUTER_H\n#define OUTER_H\n#include "inner.h"\n#endif\n')
    (folder / "inner.h").write_text("#define VALUE 1\n")
    monkeypatch.setattr(sources, "kernels_dir", lambda: folder)
    monkeypatch.setenv("PERFX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("POCL_CACHE_DIR", str(tmp_path / "pocl"))
    return folder


def test_a_program_holds_its_headers_and_theirs(kernel_folder):
    from perfx.engine.backends.opencl.sources import kernel_source

    text = kernel_source("probe")
    assert "#define VALUE 1" in text and "#include" not in text
    (kernel_folder / "inner.h").write_text('#include "probe.cl"\n')
    with pytest.raises(ValueError, match="includes itself"):
        kernel_source("probe")


def test_a_changed_header_builds_anew(kernel_folder):
    """A change to a header, even one included through another, reaches the on-disk binary cache
    (keyed on the program's text): a new process runs the new code, not the cached binary."""
    cl = pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.runtime import Runtime

    cpus = [d for p in cl.get_platforms() for d in p.get_devices() if d.type & cl.device_type.CPU]
    if not cpus:
        pytest.skip("no OpenCL CPU device")

    def run() -> int:
        rt = Runtime(cpus[0])            # a fresh runtime: only the disk caches are shared
        out = rt.empty(4)
        rt.kernel("probe", "probe")(rt.queue, (1,), None, out)
        return int(rt.read(out, 1, np.int32)[0])

    assert run() == 1
    assert run() == 1                    # the cached binary
    (kernel_folder / "inner.h").write_text("#define VALUE 2\n")
    assert run() == 2


def test_the_manifest_keys_on_every_header(kernel_folder):
    from dataclasses import dataclass

    @dataclass
    class Config:
        dim: int = 64

    device = SimpleNamespace(platform=SimpleNamespace(name="Some Platform"), name="cpu", driver_version="1")
    backend = SimpleNamespace(rt=SimpleNamespace(device=device, math_options=()), config=Config(), ctx=128,
                              max_tokens=64, params={})
    before = builds.manifest_path(backend)
    (kernel_folder / "inner.h").write_text("#define VALUE 2\n")
    assert builds.manifest_path(backend) != before
