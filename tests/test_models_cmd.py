"""`perfx models`, `show`, `rm`, `devices --json` and the command line's conventions, as real processes."""
from __future__ import annotations

import json
import re
import shutil

from perfx.engine.hub.registry import load_registry
from tests.test_cli import perfx


def test_help_version_and_completion() -> None:
    short, long = perfx("-h"), perfx("--help")
    assert short.returncode == 0 and short.stdout == long.stdout and "models" in short.stdout
    assert "--install-completion" in long.stdout
    version = perfx("--version")
    assert version.returncode == 0 and version.stdout.startswith("perfx ")
    run_help = perfx("run", "-h", env={"COLUMNS": "150"})
    assert "-c" in run_help.stdout and "<bool>" not in run_help.stdout
    raw = next(line for line in run_help.stdout.splitlines() if "--raw" in line)
    assert "<" not in raw


def test_models_json_lists_every_entry(tmp_path) -> None:
    result = perfx("models", "--json", env={"PERFX_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    registry = load_registry()
    assert [row["name"] for row in rows] == list(registry.models)
    gemma = next(row for row in rows if row["name"] == "gemma3-270m-it")
    assert gemma["architecture"] == "gemma3" and gemma["quantization"] == "Q4_K_M" and not gemma["downloaded"]
    assert gemma["size"] == 253113024 and gemma["memory_need"] > gemma["size"] and gemma["fits"] in (True, False)
    assert sum(row["default"] for row in rows) == 1


def test_models_piped_keeps_whole_names(tmp_path) -> None:
    result = perfx("models", env={"PERFX_HOME": str(tmp_path), "COLUMNS": "40"})
    assert result.returncode == 0, result.stderr
    for name in load_registry().models:
        assert name in result.stdout


def test_show_and_rm_read_the_gguf_header(tiny_gguf, tmp_path) -> None:
    path, spec, _ = tiny_gguf
    entry = load_registry().get("hf:org/repo/tiny.gguf")
    env = {"PERFX_HOME": str(tmp_path)}
    absent = perfx("show", entry.name, env=env)
    assert absent.returncode == 0 and "not downloaded" in absent.stdout
    target = tmp_path / "models/hf/org/repo/tiny.gguf"
    target.parent.mkdir(parents=True)
    shutil.copy(path, target)
    (target.parent / ".tiny.gguf.sha256").write_text("0" * 64 + " 1 hf:org/repo/tiny.gguf\n")
    info = json.loads(perfx("show", entry.name, "--json", env=env).stdout)
    assert info["architecture"] == "llama" and info["context"] == spec.ctx_len and info["downloaded"]
    assert info["path"] == str(target) and info["template"].startswith("{% for message in messages %}")
    text = perfx("show", str(path)).stdout
    assert "architecture llama" in text and f"context      {spec.ctx_len} tokens" in text

    removed = perfx("rm", entry.name, env=env)
    assert removed.returncode == 0 and removed.stdout.startswith(f"deleted {target}")
    assert not target.parent.exists()
    again = perfx("rm", entry.name, env=env)
    assert again.returncode == 0 and "is not downloaded" in again.stderr
    mine = perfx("rm", str(path))
    assert mine.returncode == 1 and "not one perfx downloaded" in mine.stderr and path.exists()


def test_devices_json() -> None:
    result = perfx("devices", "--json", "--no-measure")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows[-1]["id"] == "numpy" and all({"id", "device", "memory_bytes"} <= set(row) for row in rows)


def test_run_prints_no_rate_for_one_token(tiny_gguf) -> None:
    path, *_ = tiny_gguf
    result = perfx("run", "the thin", "-m", str(path), "--raw", "--temp", "0", "-n", "1", "-c", "64")
    assert result.returncode == 0, result.stderr
    assert "reply 1 tok · " in result.stderr
    assert not re.search(r"(?<![\d.])0\.0 tok/s", result.stderr), result.stderr
