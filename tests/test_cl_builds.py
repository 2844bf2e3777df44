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
