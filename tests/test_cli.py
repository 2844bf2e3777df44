"""The command line as a user meets it: real processes, one-line errors, no tracebacks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

from tests.conftest import TinySpec, write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]


def perfx(*args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "perfx.cli", *args], capture_output=True, text=True,
                          input=input, env=full_env, timeout=300)


NOTICES = ("running on ", "compiling kernels (first run only)", "tuned by perfx tune")


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines()     # the load's notices are not part of the error
             if line.strip() and not line.startswith(NOTICES)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_run_raw_json_on_tiny_model(tiny_gguf):
    path, *_ = tiny_gguf
    result = perfx("run", "the thin", "-m", str(path), "--raw", "--temp", "0", "-n", "5", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["done"] and len(out["ids"]) <= 5 and out["text"]
    assert out["prompt_ids"] and out["timings"]["prompt_tokens"] == len(out["prompt_ids"])
    streamed = perfx("run", "the thin", "-m", str(path), "--raw", "--temp", "0", "-n", "5", "--jsonl")
    *tokens, last = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert last["ids"] == out["ids"] == [t["id"] for t in tokens] and "".join(t["text"] for t in tokens) == last["text"]


def test_truncated_gguf(tmp_path, default_model_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_model_path.read_bytes()[: 40_000_000])
    assert_one_line_error(perfx("run", "hi", "-m", str(cut)), "truncated")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("just some text\n")
    assert_one_line_error(perfx("run", "hi", "-m", str(bad)), "not a GGUF model file")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(perfx("run", "hi", "-m", str(path)), "architecture 'mamba' is not supported")


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "q2k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    raw = np.zeros((4, 84), np.uint8)                           # one Q2_K block (256 weights) a row
    w.add_tensor("token_embd.weight", raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(perfx("run", "hi", "-m", str(path)), "Q2_K", "not support")


def test_unknown_model_name_suggests_close_match():
    assert_one_line_error(perfx("run", "hi", "-m", "smolm2"), "unknown model 'smolm2'", "smollm2-135m-instruct")


def test_missing_file():
    assert_one_line_error(perfx("run", "hi", "-m", "/nowhere/model.gguf"), "no such file")


def test_prompt_longer_than_context(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinySpec(ctx_len=64))
    result = perfx("run", "x " * 200, "-m", str(path), "--raw")
    assert_one_line_error(result, "longer than the context")


def test_bad_sampling_value(tiny_gguf):
    path, *_ = tiny_gguf
    assert_one_line_error(perfx("run", "hi", "-m", str(path), "--top-p", "0"), "--top-p must be in (0, 1]")


def test_models_lists_the_registry(tmp_path):
    result = perfx("models", env={"PERFX_HOME": str(tmp_path), "COLUMNS": "200"})
    assert result.returncode == 0
    assert "smollm2-135m-instruct" in result.stdout and "(default)" in result.stdout


def test_perplexity_on_tiny_model(tiny_gguf, tmp_path):
    path, *_ = tiny_gguf
    text = tmp_path / "t.txt"
    text.write_text("the thin in the hen " * 40)
    result = perfx("perplexity", str(text), "-m", str(path), "--ctx", "32", "--chunks", "3", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["chunks"] == 3 and out["tokens_scored"] == 3 * 15 and out["ppl"] > 1


def test_perplexity_text_too_short(tiny_gguf, tmp_path):
    path, *_ = tiny_gguf
    text = tmp_path / "t.txt"
    text.write_text("tiny")
    assert_one_line_error(perfx("perplexity", str(text), "-m", str(path), "--ctx", "32"), "fewer than one window")
