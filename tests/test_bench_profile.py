"""perfx bench --profile: the launch budget per token, per kernel, from OpenCL profiling events. Sums on
known launches; then a tiny synthetic model on an OpenCL device (PoCL here; PERFX_TEST_BENCH_DEVICE=gpu on a
GPU), whose profile must count every launch the backend enqueues and carry the kernels' declared costs."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from perfx.engine.backends import Launch, open_backend
from perfx.engine.bench import formats, markdown, runner, spec
from perfx.engine.bench.profile import KernelRow, PhaseProfile, enqueue_time, phase_table, summarize
from perfx.engine.errors import PerfxError

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("PERFX_TEST_BENCH_DEVICE", "cpu")


# ---- sums on known launches -----------------------------------------------------------------------


def test_launches_are_summed_per_kernel_with_the_gap_before_each():
    launches = [Launch("gemv", 100, 300, 1000, 2000), Launch("rmsnorm", 350, 400),
                Launch("gemv", 500, 800, 1000, 2000), Launch("argmax", 810, 820)]
    rows = summarize(launches)
    assert [r.kernel for r in rows] == ["gemv", "rmsnorm", "argmax"]          # by kernel time
    gemv, norm, argmax = rows
    assert (gemv.launches, gemv.kernel_ns, gemv.gap_ns, gemv.bytes, gemv.flops) == (2, 500, 100, 2000, 4000)
    assert (norm.launches, norm.kernel_ns, norm.gap_ns, norm.bytes) == (1, 50, 50, None)
    assert (argmax.kernel_ns, argmax.gap_ns) == (10, 10)


def test_per_token_figures_and_bandwidth():
    phase = PhaseProfile("tg2", 2, wall_ns=10_000, enqueue_ns=3000,
                         kernels=[KernelRow("gemv", 4, 6000, 400, 12_000, 8000), KernelRow("rmsnorm", 2, 2000, 600)])
    rec = phase.record(copy_bandwidth=4e9)
    assert rec["launches_per_token"] == 3 and rec["wall_us_per_token"] == 5.0 and rec["enqueue_us_per_token"] == 1.5
    assert rec["kernel_us_per_token"] == 4.0 and rec["host_us_per_token"] == 1.0 and rec["gap_us_per_token"] == 0.5
    gemv, norm = rec["kernels"]
    assert gemv["launches_per_token"] == 2 and gemv["us_per_launch"] == 1.5 and gemv["us_per_token"] == 3.0
    assert gemv["gap_us_per_launch"] == 0.1 and gemv["share"] == 0.75
    assert gemv["bytes_per_token"] == 6000 and gemv["flops_per_token"] == 4000
    assert gemv["gb_per_s"] == 2.0 and gemv["copy_bandwidth_share"] == 0.5          # 12 kB in 6 µs of 4 GB/s
    assert norm["bytes_per_token"] is None and norm["gb_per_s"] is None and norm["copy_bandwidth_share"] is None
    table = "\n".join(phase_table(phase, 4e9, "m · tg2"))
    assert "launch budget, m · tg2: 3.0 launches per token" in table and "; 1.5 µs of Python enqueuing" in table
    assert "| gemv | 2.00 | 1.5 | 3.0 | 0.1 | 75.0% | 0.006 | 0.0000 | 2.0 | 50% |" in table
    assert "| rmsnorm | 1.00 | 1.0 | 1.0 | 0.3 | 25.0% | — | — | — | — |" in table
    assert PhaseProfile.from_dict(json.loads(json.dumps(asdict(phase)))) == phase


def test_enqueue_time_runs_from_each_step_start_to_its_last_launch():
    # step 1 from 100 to 500 enqueues at 120, 180; step 2 from 500 to 900 at 510, 560, 600 (then waits);
    # step 3 from 900 to 1000 enqueues nothing (the last token read back)
    launches = [Launch("k", 0, 1, host_ns=h) for h in (120, 180, 510, 560, 600)]
    assert enqueue_time(launches, [100, 500, 900, 1000]) == (180 - 100) + (600 - 500)
    assert enqueue_time([], [100, 500]) == 0


def test_the_numpy_backend_has_no_profile():
    backend, _ = open_backend("numpy")
    assert not backend.capabilities.profiling
    with pytest.raises(PerfxError, match="use an OpenCL device"):
        with backend.profile():
            pass


# ---- a tiny model on an OpenCL device -------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.devices import select
    from perfx.engine.bench.engines import PerfxEngine

    try:
        select(DEVICE)
    except PerfxError as e:
        pytest.skip(f"no OpenCL device for --device {DEVICE}: {e}")
    return PerfxEngine({"shape": "tiny", "device": DEVICE, "seed": 0, "ctx": 64, "max_tokens": 17})


def count_enqueued(monkeypatch, run) -> dict[str, int]:
    """Every kernel pyopencl enqueues while `run` runs, by name, counted at pyopencl's own entry points."""
    import pyopencl as cl

    counts: dict[str, int] = {}
    call, enqueue = cl.Kernel.__call__, cl.enqueue_nd_range_kernel

    def calling(kernel, *args, **kwargs):
        counts[kernel.function_name] = counts.get(kernel.function_name, 0) + 1
        return call(kernel, *args, **kwargs)

    def enqueuing(queue, kernel, *args, **kwargs):
        counts[kernel.function_name] = counts.get(kernel.function_name, 0) + 1
        return enqueue(queue, kernel, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(cl.Kernel, "__call__", calling)
        m.setattr(cl, "enqueue_nd_range_kernel", enqueuing)
        run()
    return counts


def test_the_profile_counts_every_launch_the_backend_enqueues(engine, monkeypatch):
    t = engine.transformer
    assert t.backend.capabilities.profiling
    prefill, decode = engine.profile(16, 4)
    assert (prefill.name, prefill.tokens, decode.name, decode.tokens) == ("pp16", 16, "tg4 after pp16", 4)

    def run_decode():
        for _ in t.greedy(engine.tokens[16:17], 16, 4):
            pass

    enqueued = count_enqueued(monkeypatch, run_decode)
    assert {k.kernel: k.launches for k in decode.kernels} == enqueued
    names = set(enqueued)
    assert "gemv" in names and names & {"attend", "attend_one"} and any(n.startswith("embed") for n in names)
    enqueued = count_enqueued(monkeypatch, lambda: t.next_token(engine.tokens[:16], 0))
    assert {k.kernel: k.launches for k in prefill.kernels} == enqueued


def test_the_tensor_core_attention_is_profiled_with_its_cost(engine, tmp_path, monkeypatch):
    """A device entry that turns the tensor-core prefill attention on (emulated here, PTX on NVIDIA)."""
    from perfx.engine.backends.opencl import tuning
    from perfx.engine.bench.engines import PerfxEngine
    from tests.conftest import TinySpec, write_tiny_gguf

    monkeypatch.setattr(tuning, "load_override",
                        lambda info: {"fused": {"attention_mma": "emulated", "att_mma_min_tokens": 16}})
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinySpec(qtype="Q8_0", ctx_len=256, seed=3))
    mma = PerfxEngine({"path": str(path), "device": DEVICE, "seed": 0, "ctx": 64, "max_tokens": 21})
    (prefill,) = mma.profile(20, 0)
    enqueued = count_enqueued(monkeypatch, lambda: mma.transformer.next_token(mma.tokens[:20], 0))
    assert {k.kernel: k.launches for k in prefill.kernels} == enqueued and "attend_mma" in enqueued
    attend = next(k for k in prefill.kernels if k.kernel == "attend_mma")
    assert attend.bytes > 0 and attend.flops > 0


def test_the_profile_times_and_costs_are_positive_and_plausible(engine):
    t = engine.transformer
    (decode,) = engine.profile(0, 3)
    assert decode.wall_ns >= decode.kernel_ns > 0 and decode.host_ns >= 0
    assert 0 < decode.enqueue_ns < decode.wall_ns
    for k in decode.kernels:
        assert k.launches > 0 and k.kernel_ns > 0 and k.gap_ns >= 0
    gemv = next(k for k in decode.kernels if k.kernel == "gemv")
    # every weight matrix read once per token (plus x and y in f32), as its spec's cost declares
    assert t.w.nbytes <= gemv.bytes / decode.tokens < 1.1 * t.w.nbytes
    assert gemv.flops > 0
    attention = next(k for k in decode.kernels if k.kernel in ("attend", "attend_one"))
    assert attention.bytes > 0


# ---- through bench ---------------------------------------------------------------------------------


def test_bench_profile_in_every_format(engine):
    config = spec.BenchConfig(models=[spec.describe_synthetic("tiny")], tests=spec.expand_tests([8], [4]),
                              devices=[DEVICE], threads=[1], reps=1, ctx=64, profile=True)
    run = runner.run_bench(config)
    assert run.error is None and len(run.results) == 2
    records = json.loads(formats.format_json(run))
    for rec in records:
        assert list(rec)[:-1] == list(formats.RECORD_FIELDS) and list(rec)[-1] == "profile"
        prefill, decode = rec["profile"]
        assert (prefill["phase"], decode["phase"]) == ("pp8", "tg4 after pp8")
        assert decode["launches_per_token"] == sum(k["launches_per_token"] for k in decode["kernels"]) > 0
        assert decode["kernel_us_per_token"] > 0 and decode["copy_bandwidth_bytes_per_s"] > 0
        assert 0 < decode["enqueue_us_per_token"] < decode["wall_us_per_token"]
        gemv = next(k for k in decode["kernels"] if k["kernel"] == "gemv")
        assert gemv["gb_per_s"] > 0 and gemv["copy_bandwidth_share"] > 0 and gemv["bytes_per_token"] > 0
    assert [json.loads(line)["profile"] for line in formats.format_jsonl(run).splitlines()] == \
        [r["profile"] for r in records]
    rows = list(csv.DictReader(io.StringIO(formats.format_csv(run))))
    assert len(rows) == 2 and list(rows[0]) == list(formats.RECORD_FIELDS)
    text = markdown.format_markdown(run)
    assert "launch budget, llama 0.4M INT4 g128 (synthetic) · " in text and "· tg4 after pp8: " in text
    assert "| kernel | launches/token | µs/launch | µs/token | gap µs/launch |" in text and "| gemv | " in text


def test_profile_needs_context_for_the_prefill_and_the_decode_after_it():
    config = spec.BenchConfig(models=[spec.describe_synthetic("tiny")], tests=spec.expand_tests([16], [8]), ctx=8)
    assert config.n_ctx(config.models[0]) == 16
    config.profile = True
    assert config.profile_lengths == (16, 8) and config.n_ctx(config.models[0]) == 24
    config.tests = spec.expand_tests([1000], [100])
    with pytest.raises(PerfxError, match="1100 tokens is longer than the model's context of 1024"):
        config.validate()


def test_cli_profile_on_numpy_is_a_one_line_error():
    result = subprocess.run([sys.executable, "-m", "perfx.cli", "bench", "--synthetic", "tiny", "--device", "numpy",
                             "--profile"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "--profile times OpenCL kernel launches" in lines[0]
