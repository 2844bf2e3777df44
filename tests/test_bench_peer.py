"""perfx bench --vs llama.cpp --llama-bench PATH: the peer's runs alternate with perfx's, each one
llama-bench process on the same file, its time taken from llama-bench's JSON record. A stand-in
llama-bench (a script) records its arguments and answers with a fixed time per test."""
from __future__ import annotations

import stat
import sys

import pytest

from perfx.engine.bench import runner, spec
from perfx.engine.errors import PerfxError
from tests.conftest import TinySpec, write_tiny_gguf

FAKE = """#!{python}
import json, sys
a = sys.argv[1:]
open({log!r}, "a").write(" ".join(a) + "\\n")
p, n = int(a[a.index("-p") + 1]), int(a[a.index("-n") + 1])
if "-pg" in a:
    p, n = map(int, a[a.index("-pg") + 1].split(","))
print(json.dumps([{{"build_commit": "abc1234", "backends": "CUDA", "gpu_info": "Fake GPU", "n_batch": 2048,
                    "n_ubatch": 512, "n_gpu_layers": 99, "type_k": "f16", "avg_ns": 1000000 * (p + n)}}]))
"""


@pytest.fixture()
def fake_llama_bench(tmp_path):
    log = tmp_path / "calls.log"
    path = tmp_path / "llama-bench"
    path.write_text(FAKE.format(python=sys.executable, log=str(log)))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path, log


def test_llama_bench_peer_alternates_on_the_same_file(tmp_path, fake_llama_bench):
    from perfx.engine.bench.peer import check_binary

    binary, log = fake_llama_bench
    model = tmp_path / "tiny.gguf"
    write_tiny_gguf(model, TinySpec())
    config = spec.BenchConfig(models=[spec.describe_file(model)], tests=spec.expand_tests([8], [4]), devices=["numpy"],
                              threads=[1], reps=2, vs_llama_cpp=True, llama_bench=check_binary(str(binary)))
    run = runner.run_bench(config)
    engines = [r.engine for r in run.results]
    assert engines == ["perfx", "llama.cpp", "perfx", "llama.cpp"]
    peer = [r for r in run.results if r.engine == "llama.cpp"]
    assert [round(r.samples.avg_ts) for r in peer] == [1000, 1000]      # 8 tokens in 8 ms, 4 in 4 ms
    assert all(r.ratio is not None for r in run.results if r.engine == "perfx")
    calls = log.read_text().splitlines()
    assert len(calls) == 1 + 2 * (2 + 1)                 # the probe, then warm-up + 2 runs per test
    assert all(f"-m {model}" in c and "-ngl 0" in c and "-r 1" in c for c in calls)


def test_llama_bench_must_be_an_executable(tmp_path):
    from perfx.engine.bench.peer import check_binary

    with pytest.raises(PerfxError, match="not an executable file"):
        check_binary(str(tmp_path / "missing"))


def test_synthetic_shape_is_written_once_with_the_given_tokenizer(tmp_path, monkeypatch):
    """--synthetic SHAPE --vs llama.cpp: perfx writes the shape's GGUF (random Q4_0 weights, a real file's
    tokenizer) into its cache once, so that llama.cpp loads the very same weights."""
    from perfx.engine.bench import peer
    from gguf import GGUFReader

    monkeypatch.setenv("PERFX_HOME", str(tmp_path / "home"))
    tok = tmp_path / "tok.gguf"
    write_tiny_gguf(tok, TinySpec(qtype="Q4_0", seed=3))
    path = peer.synthetic_gguf("tiny", 0, str(tok))
    assert path.is_relative_to(tmp_path / "home") and path.exists()
    stamp = path.stat().st_mtime_ns
    assert peer.synthetic_gguf("tiny", 0, str(tok)) == path and path.stat().st_mtime_ns == stamp
    assert any(k.startswith("tokenizer.") for k in GGUFReader(path).fields)
