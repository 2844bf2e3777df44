"""perfx bench: test expansion, statistics, each output format parsed back, synthetic models, and short
real runs on tiny models (NumPy, OpenCL where there is one, llama.cpp where it is installed)."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from perfx.engine.bench import formats, markdown, probes, results, runner, spec, worker
from perfx.engine.errors import PerfxError
from perfx.engine.synthetic import SHAPES, get_shape, synthetic_weights
from tests.conftest import TinySpec, write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]


def perfx(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "perfx.cli", *args], check=False, capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "tiny-q4.gguf"
    write_tiny_gguf(path, TinySpec(qtype="Q4_0", ctx_len=256, seed=7))
    return path


def model_spec(name: str = "m", n_layers: int = 2, kv_dim: int = 8, ctx_len: int = 4096) -> spec.ModelSpec:
    return spec.ModelSpec(name=name, description=f"llama 1M Q4_0 {name}", size=3 * markdown.MiB, n_params=1_000_000,
                          n_layers=n_layers, kv_dim=kv_dim, ctx_len=ctx_len, file_bytes_per_token=900,
                          path=f"/x/{name}")


def engine_info(engine: str = "perfx", **changes) -> results.EngineInfo:
    values = dict(engine=engine, version=f"{engine} 1", backend="OpenCL" if engine == "perfx" else "CPU",
                  device="opencl:0:0" if engine == "perfx" else "cpu", device_name="PoCL CPU", device_type="cpu",
                  n_ctx=2048, n_batch=512, n_ubatch=512, n_gpu_layers=0, kv_type="f32", kv_element_bytes=4,
                  weight_bytes=1000, peak_rss=200 * markdown.MiB, device_bytes=120 * markdown.MiB,
                  copy_bandwidth=52800.0)
    values.update(changes)
    return results.EngineInfo(**values)


def fake_run() -> results.BenchRun:
    """A --vs run with known numbers: on tg4 perfx runs at 32 and 16 t/s, llama.cpp at 16 t/s."""
    model = model_spec()
    config = spec.BenchConfig(models=[model], tests=[spec.TestSpec(0, 4), spec.TestSpec(8, 0)], threads=[2], reps=2,
                              vs_llama_cpp=True)
    run = results.BenchRun(config, probes.Build("0.1.0", "abc1234", "Test CPU"))
    tg, pp = config.tests
    perfx_tg = results.Result(model, tg, 2, engine_info(), results.Samples(4, [125_000_000, 250_000_000]),
                              "2026-01-01T00:00:00Z", ratio=1.5)
    llama_info = engine_info("llama.cpp", kv_type="f16", kv_element_bytes=2, device_bytes=None)
    llama_tg = results.Result(model, tg, 2, llama_info,
                              results.Samples(4, [250_000_000, 250_000_000]), "2026-01-01T00:00:00Z")
    perfx_pp = results.Result(model, pp, 2, engine_info(), results.Samples(8, [10_000_000, 20_000_000]),
                              "2026-01-01T00:00:01Z")
    run.results = [perfx_tg, llama_tg, perfx_pp]
    return run


# ---- arguments and their expansion ----------------------------------------------------------------


def test_tests_are_named_and_ordered_as_llama_bench_does():
    tests = spec.expand_tests([512, 0, 64], [128, 0], [(512, 128), (0, 0)])
    assert [t.name for t in tests] == ["pp512", "pp64", "tg128", "pp512+tg128"]
    assert [t.n_tokens for t in tests] == [512, 64, 128, 640]


def test_comma_separated_values_expand_into_every_combination():
    m1, m2 = model_spec("a"), model_spec("b")
    config = spec.BenchConfig(models=[m1, m2], tests=spec.expand_tests([16], [4]), devices=["numpy", "cpu"],
                              threads=[1, 2, 4], reps=3)
    combos = config.combos()
    assert len(combos) == 2 * 2 * 3
    assert combos[0] == spec.Combo(m1, "numpy", 1) and combos[1] == spec.Combo(m1, "numpy", 2)
    assert combos[-1] == spec.Combo(m2, "cpu", 4)
    assert config.n_steps == 12 * 2 * (3 + 1)
    config.vs_llama_cpp = True
    assert config.n_steps == 12 * 2 * (3 + 1) * 2


def test_context_covers_the_longest_test_within_the_model():
    config = spec.BenchConfig(models=[], tests=spec.expand_tests([512], [128], [(3000, 100)]), ctx=2048)
    assert config.n_ctx(model_spec(ctx_len=8192)) == 3100
    assert config.n_ctx(model_spec(ctx_len=8192)) >= max(t.n_tokens for t in config.tests)
    short = spec.BenchConfig(models=[], tests=spec.expand_tests([8], [0]), ctx=2048)
    assert short.n_ctx(model_spec(ctx_len=256)) == 256


@pytest.mark.parametrize("call, message", [
    (lambda: spec.parse_ints("1,x", "-t"), "comma-separated integers"),
    (lambda: spec.parse_ints("-1", "-p"), "at least 0"),
    (lambda: spec.parse_ints("0", "-t", minimum=1), "at least 1"),
    (lambda: spec.parse_pg("512"), "'P,N'"),
    (lambda: spec.expand_tests([0], [0]), "nothing to run"),
    (lambda: spec.parse_list(" , ", "--device"), "at least one"),
    (lambda: formats.format_run(fake_run(), "xml"), "md, json, jsonl, csv"),
])
def test_bad_arguments_say_what_is_wrong(call, message):
    with pytest.raises(PerfxError, match=message):
        call()


def test_validation(monkeypatch):
    tests = spec.expand_tests([16], [4])
    with pytest.raises(PerfxError, match="-r must be at least 1"):
        spec.BenchConfig(models=[model_spec()], tests=tests, reps=0).validate()
    with pytest.raises(PerfxError, match="longer than the model's context of 256"):
        spec.BenchConfig(models=[model_spec(ctx_len=256)], tests=spec.expand_tests([512], [0])).validate()
    synthetic = spec.describe_synthetic("tiny")
    with pytest.raises(PerfxError, match="needs GGUF models"):
        spec.BenchConfig(models=[synthetic], tests=tests, vs_llama_cpp=True).validate()
    monkeypatch.setattr(spec, "llama_cpp_available", lambda: False)
    with pytest.raises(PerfxError, match="scripts/install-llama-cpp.sh"):
        spec.BenchConfig(models=[model_spec()], tests=tests, vs_llama_cpp=True).validate()


# ---- statistics and bandwidth ---------------------------------------------------------------------


def test_statistics_on_known_samples():
    s = results.Samples(128, [1_000_000_000, 2_000_000_000, 4_000_000_000])
    assert s.ts == [128.0, 64.0, 32.0]
    assert s.avg_ts == pytest.approx(224 / 3)
    assert s.stddev_ts == pytest.approx(statistics.stdev([128, 64, 32]))       # sample stddev, as llama-bench
    assert s.median_ts == 64.0
    assert s.avg_ns == 2_333_333_333
    assert s.stddev_ns == round(statistics.stdev([1e9, 2e9, 4e9]))
    one = results.Samples(10, [5_000_000])
    assert one.avg_ts == pytest.approx(2000.0) and one.stddev_ts == 0.0


def test_bandwidth_counts_weights_and_the_kv_cache_read_per_token():
    run = fake_run()
    perfx_tg, llama_tg, perfx_pp = run.results
    # tg4 reads on average (4 + 1) / 2 positions of K and V: 2 x 2 layers x 8 x 4 bytes x 2.5 = 320 bytes
    assert perfx_tg.bytes_per_token == 1000 + 320
    assert perfx_tg.bandwidth == pytest.approx(1320 * 24)                        # mean of 32 and 16 t/s
    assert perfx_tg.bandwidth_share == pytest.approx(1320 * 24 / 52800)
    assert llama_tg.bytes_per_token == 1000 + 160                               # f16 KV
    assert perfx_pp.bytes_per_token is None and perfx_pp.bandwidth is None and perfx_pp.bandwidth_share is None


# ---- output formats -------------------------------------------------------------------------------


def test_json_carries_every_field_and_every_sample():
    run = fake_run()
    records = json.loads(formats.format_json(run))
    assert len(records) == 3
    for record, result in zip(records, run.results):
        assert list(record) == list(formats.RECORD_FIELDS)
        assert record["samples_ns"] == result.samples.ns
        assert record["samples_ts"] == pytest.approx(result.samples.ts)
        assert record["avg_ts"] == pytest.approx(result.samples.avg_ts)
        assert record["build_commit"] == "abc1234" and record["test"] == result.test.name
    assert records[0]["vs_llama_cpp"] == 1.5 and records[1]["vs_llama_cpp"] is None
    assert records[0]["peak_rss_bytes"] == 200 * markdown.MiB and records[1]["device_bytes"] is None
    assert records[0]["bandwidth_share"] == pytest.approx(1320 * 24 / 52800)


def test_jsonl_is_one_record_per_line():
    lines = formats.format_jsonl(fake_run()).splitlines()
    assert [json.loads(line)["engine"] for line in lines] == ["perfx", "llama.cpp", "perfx"]


def test_csv_parses_back():
    rows = list(csv.DictReader(io.StringIO(formats.format_csv(fake_run()))))
    assert len(rows) == 3 and list(rows[0]) == list(formats.RECORD_FIELDS)
    assert [int(x) for x in rows[0]["samples_ns"].split(";")] == fake_run().results[0].samples.ns
    assert float(rows[0]["avg_ts"]) == pytest.approx(24.0)
    assert rows[1]["device_bytes"] == "" and rows[2]["test"] == "pp8"


def test_markdown_reads_like_llama_bench_with_perfx_columns():
    text = markdown.format_markdown(fake_run())
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:7] == ["model", "size", "params", "backend", "threads", "test", "t/s"]
    assert header[7:] == ["vs llama.cpp", "peak RSS", "dev mem", "GB/s", "of copy BW"]
    assert set(table[1]) <= set("|-: ")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert len(rows) == 3 and all(len(r) == len(header) for r in rows)
    perfx_tg, llama_tg, perfx_pp = (dict(zip(header, r)) for r in rows)
    assert perfx_tg["t/s"] == "24.00 ± 11.31" and perfx_tg["vs llama.cpp"] == "1.50x"
    assert perfx_tg["backend"] == "perfx OpenCL" and llama_tg["backend"] == "llama.cpp CPU"
    assert perfx_tg["size"] == "3.00 MiB" and perfx_tg["params"] == "1.00 M" and perfx_tg["threads"] == "2"
    assert perfx_tg["peak RSS"] == "200 MiB" and llama_tg["dev mem"] == "—"
    assert perfx_tg["of copy BW"] == "60%" and perfx_pp["GB/s"] == "—"
    assert len({len(line) for line in table}) == 1                   # columns line up
    assert "build: abc1234 (perfx 0.1.0)" in text and "device opencl:0:0: PoCL CPU" in text


def test_an_interrupted_or_crowded_run_says_so():
    run = fake_run()
    assert "interrupted" not in markdown.format_markdown(run) and "warning" not in markdown.format_markdown(run)
    run.interrupted, run.load = True, 1000.0
    text = markdown.format_markdown(run)
    assert "interrupted: 3 of 4 tests finished" in text
    assert "warning: load average 1000.0" in text and "numbers are noisy" in text


# ---- synthetic models -----------------------------------------------------------------------------


def test_unknown_shape_lists_the_shapes():
    with pytest.raises(PerfxError, match="llama-7b, llama-3-8b, smollm2-135m, tiny"):
        get_shape("llama-70b")


def test_synthetic_shapes_have_their_models_sizes():
    assert SHAPES["llama-7b"].n_params == 6_738_415_616
    assert SHAPES["llama-3-8b"].n_params == 8_030_261_248
    assert SHAPES["smollm2-135m"].n_params == 134_515_008        # as llama.cpp counts the GGUF file
    assert SHAPES["llama-7b"].group == 128 and SHAPES["smollm2-135m"].group == 64
    assert SHAPES["llama-7b"].kv_bytes(2048) == 1 << 30
    text = markdown.synthetic_footprint("llama-7b", 2048)
    assert "int4 g128 weights 3.46 GiB + KV cache at 2048 tokens 1.00 GiB (f16) = 4.46 GiB" in text


def test_synthetic_weights_are_deterministic_and_well_scaled():
    shape = SHAPES["tiny"]
    w1, w2 = synthetic_weights(shape, seed=3), synthetic_weights(shape, seed=3)
    assert w1.nbytes == shape.nbytes
    assert np.array_equal(w1.layers[1].w_down.raw, w2.layers[1].w_down.raw)
    assert not np.array_equal(w1.layers[1].w_down.raw, synthetic_weights(shape, seed=4).layers[1].w_down.raw)
    wq = w1.layers[0].wqkv[0]
    assert wq.qtype == "INT4" and wq.group == 128 and wq.shape == (shape.dim, shape.dim)
    values = wq.dequantize()
    assert abs(values.mean()) < 0.01 and values.std() == pytest.approx(1 / math.sqrt(shape.dim), rel=0.1)
    assert w1.tok_embd.qtype == "Q8_0" and w1.output is w1.tok_embd


def test_synthetic_model_runs_on_numpy():
    from perfx.engine.backends.numpy_backend import NumpyBackend
    from perfx.engine.model import Transformer

    shape = SHAPES["tiny"]
    t = Transformer(shape.config(), synthetic_weights(shape), NumpyBackend(), 64)
    logits = t.forward(np.arange(12), 0)
    assert logits.shape == (12, shape.vocab_size) and np.isfinite(logits).all()


# ---- real runs ------------------------------------------------------------------------------------


def test_short_run_on_a_tiny_model(tiny_q4):
    config = spec.BenchConfig(models=[spec.describe_file(tiny_q4)], tests=spec.expand_tests([8], [4]),
                              devices=["numpy"], threads=[1], reps=2, ctx=64)
    seen = []
    run = runner.run_bench(config, progress=lambda what, done, total: seen.append((done, total)))
    assert not run.interrupted and [r.test.name for r in run.results] == ["pp8", "tg4"]
    assert seen[-1] == (config.n_steps, config.n_steps)
    for r in run.results:
        assert len(r.samples.ns) == 2 and r.samples.avg_ts > 0
        assert r.info.backend == "NumPy" and r.info.n_ctx == 64
        assert r.info.peak_rss > 10 * markdown.MiB and r.info.device_bytes > 0 and r.info.copy_bandwidth > 0
    tg = run.results[1]
    assert tg.bandwidth > 0 and 0 < tg.bandwidth_share
    assert run.results[0].model.description == "llama 79K Q4_0"
    assert "| llama 79K Q4_0 " in markdown.format_markdown(run)


def test_interrupted_run_keeps_the_finished_tests(tiny_q4):
    config = spec.BenchConfig(models=[spec.describe_file(tiny_q4)], tests=spec.expand_tests([8], [4]),
                              devices=["numpy"], threads=[1], reps=2, ctx=64)

    def stop_in_the_second_test(what: str, done: int, total: int) -> None:
        if done == 4:
            raise KeyboardInterrupt

    run = runner.run_bench(config, progress=stop_in_the_second_test)
    assert run.interrupted and [r.test.name for r in run.results] == ["pp8"]
    assert run.results[0].info.peak_rss > 0


def test_a_failing_device_keeps_the_finished_tests(tiny_q4):
    config = spec.BenchConfig(models=[spec.describe_file(tiny_q4)], tests=spec.expand_tests([8], [0]),
                              devices=["numpy", "opencl:99:0"], threads=[1], reps=1, ctx=64)
    run = runner.run_bench(config)
    assert [r.info.device for r in run.results] == ["numpy"]
    assert run.error and "stopped by an error: 1 of 2 tests finished" in markdown.format_markdown(run)


def test_cli_json_on_a_tiny_model(tiny_q4):
    result = perfx("bench", "-m", str(tiny_q4), "--device", "numpy", "-p", "8", "-n", "4", "-pg", "4,2", "-r", "2",
                   "-t", "1", "-o", "json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["test"] for r in records] == ["pp8", "tg4", "pp4+tg2"]
    assert all(len(r["samples_ts"]) == 2 and len(r["samples_ns"]) == 2 for r in records)
    assert records[1]["bandwidth_bytes_per_s"] > 0 and records[0]["model_filename"] == str(tiny_q4)
    assert result.stderr == ""                                    # silent with -o json


def test_cli_synthetic_markdown():
    result = perfx("bench", "--synthetic", "tiny", "--device", "numpy", "-p", "16", "-n", "4", "-r", "1", "-t", "1")
    assert result.returncode == 0, result.stderr
    assert "llama 0.4M INT4 g128 (synthetic)" in result.stdout and "tg4" in result.stdout
    assert "tiny (synthetic, 0.36 M params): int4 g128 weights" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--synthetic", "llama-70b"], "shapes: llama-7b, llama-3-8b, smollm2-135m, tiny"),
    (["--synthetic", "tiny", "-p", "-1"], "-p values must be at least 0"),
    (["--synthetic", "tiny", "-p", "0", "-n", "0"], "nothing to run"),
    (["--synthetic", "tiny", "-r", "0"], "-r must be at least 1"),
    (["--synthetic", "tiny", "-t", "0"], "-t values must be at least 1"),
    (["--synthetic", "tiny", "-o", "xml"], "unknown output format 'xml'"),
    (["--synthetic", "tiny", "--vs", "vllm"], "--vs takes llama.cpp"),
    (["--synthetic", "tiny", "-p", "2000"], "longer than the model's context of 1024"),
    (["--synthetic", "tiny", "--device", "tpu"], "unknown device 'tpu'"),
])
def test_cli_errors_are_one_line(args, message):
    result = perfx("bench", *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


def test_short_run_on_opencl(tiny_q4):
    pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.devices import select

    try:
        device = select("opencl").info.id
    except PerfxError as e:
        pytest.skip(f"no usable OpenCL device: {e}")
    config = spec.BenchConfig(models=[spec.describe_file(tiny_q4)], tests=spec.expand_tests([8], [4]), devices=[device],
                              threads=[1], reps=1, ctx=64)
    run = runner.run_bench(config)
    assert [r.info.backend for r in run.results] == ["OpenCL", "OpenCL"]
    tg = run.results[1]
    assert tg.info.device == device and tg.info.copy_bandwidth > 0 and tg.bandwidth_share > 0
    # device memory: at least the weights and the KV cache
    assert tg.info.device_bytes >= tg.info.weight_bytes + 2 * 2 * 32 * 64 * tg.info.kv_element_bytes


def test_vs_llama_cpp_alternates_and_gives_ratios(tiny_q4):
    pytest.importorskip("llama_cpp")
    config = spec.BenchConfig(models=[spec.describe_file(tiny_q4)], tests=spec.expand_tests([8], [4]),
                              devices=["numpy"], threads=[1], reps=2, ctx=64, vs_llama_cpp=True)
    run = runner.run_bench(config)
    assert [(r.engine, r.test.name) for r in run.results] == [
        ("perfx", "pp8"), ("llama.cpp", "pp8"), ("perfx", "tg4"), ("llama.cpp", "tg4")]
    perfx_tg, llama_tg = run.results[2:]
    assert perfx_tg.ratio == pytest.approx(perfx_tg.samples.avg_ts / llama_tg.samples.avg_ts)
    assert llama_tg.ratio is None and len(llama_tg.samples.ns) == 2
    assert llama_tg.info.weight_bytes == config.models[0].file_bytes_per_token
    assert llama_tg.info.copy_bandwidth == perfx_tg.info.copy_bandwidth         # the same CPU
    assert "vs llama.cpp" in markdown.format_markdown(run)


class SelfKillingWorker(worker.Worker):
    """A worker that prints a line to its log, reads one request, then kills itself with SIGSEGV."""

    def command(self, spec: dict) -> list[str]:
        return [sys.executable, "-c", "import os, signal, sys; print('ggml_backend_amx_mul_mat', file=sys.stderr); "
                "sys.stdin.readline(); os.kill(os.getpid(), signal.SIGSEGV)"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_peer_killed_by_a_signal_says_what_it_means_and_what_to_do():
    worker = SelfKillingWorker("llama.cpp", {}, threads=1)
    try:
        with pytest.raises(PerfxError) as e:
            worker.request("run", test=0)
    finally:
        worker.close()
    message = str(e.value)
    assert "SIGSEGV" in message and "status -11" not in message
    assert "scripts/install-llama-cpp.sh --rebuild" in message and "ggml_backend_amx_mul_mat" in message


def test_exit_messages():
    assert worker.exit_message("perfx", 1, "boom") == "the perfx worker exited with status 1: boom"
    assert "killed by SIGKILL (out of memory" in worker.exit_message("llama.cpp", -9, "x")
    perfx_crash = worker.exit_message("perfx", -11, "x")
    assert perfx_crash.startswith("the perfx worker crashed with SIGSEGV") and "--rebuild" not in perfx_crash


@pytest.mark.parametrize("flags, native", [
    ("fpu sse4_2 avx avx2 fma f16c bmi2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8", False),
    ("fpu sse4_2 avx avx2 fma f16c bmi2", True),
])
def test_llama_cpp_build_turns_amx_off_and_keeps_avx512(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    script = Path(__file__).resolve().parents[1] / "scripts" / "install-llama-cpp.sh"
    out = subprocess.run(["bash", str(script), "--cmake-args"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "CPUINFO": str(cpuinfo)}, check=True).stdout.split()
    if native:
        assert out == ["-DGGML_NATIVE=ON"]
    else:
        assert "-DGGML_NATIVE=OFF" in out and "-DGGML_AVX512=ON" in out and "-DGGML_AVX512_VNNI=ON" in out
        assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(out)
        assert "-DGGML_AVX512_VBMI=OFF" in out          # a flag the CPU lacks stays off


def test_a_share_over_100_percent_is_marked_and_explained():
    run = fake_run()
    assert "over 100%" not in markdown.format_markdown(run)
    for r in run.results:
        r.info.copy_bandwidth = 20000.0                        # perfx's tg4 reads 31680 B/s: 158%
    text = markdown.format_markdown(run)
    assert "| 158%* |" in text.replace("  ", " ") or "158%*" in text
    assert "* over 100% of the copy bandwidth: part of what a token reads came from the CPU's caches" in text


def test_the_datasheet_peak_is_shown_where_known():
    run = fake_run()
    assert "datasheet peak" not in markdown.format_markdown(run)
    run.results[0].info.device_name = "NVIDIA H100 80GB HBM3"
    assert "datasheet peak 3350 GB/s" in markdown.format_markdown(run)
    assert markdown.datasheet_peak("NVIDIA H100 PCIe") == 2.0e12 and markdown.datasheet_peak("pthread-AMD EPYC") is None
