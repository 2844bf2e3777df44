"""The command line against hostile and careless input: every answer is output or one line, never a traceback.

Each test runs the real `perfx` in a process. Where the engine has to misbehave to show how an unexpected error
is reported, the process patches it before calling `perfx.cli.main.main` (see `perfx_patched`).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import tests.conftest as conftest
from tests.conftest import write_tiny_gguf
from tests.test_cli import ROOT, assert_one_line_error, perfx


def perfx_patched(patch: str, *args: str | bytes, input: bytes | None = None,
                  env: dict | None = None) -> subprocess.CompletedProcess:
    """`perfx ARGS` in a process that first runs the Python statements `patch`."""
    code = f"import sys\n{patch}\nfrom perfx.cli.main import main\nsys.argv[0] = 'perfx'\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, input=input,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=120)


def text(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """A bytes result as text (with U+FFFD for what is not UTF-8)."""
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace"))


def run_bytes(*args: str | bytes, input: bytes | None = None) -> subprocess.CompletedProcess:
    return text(perfx_patched("", *args, input=input))


def with_template(path: Path, template: str, monkeypatch) -> Path:
    monkeypatch.setattr(conftest, "CHATML", template)
    write_tiny_gguf(path)
    return path


BOOM = ("import perfx.engine.llm\n"
        "def boom(*args, **kwargs):\n"
        "    raise ZeroDivisionError('float division by zero')\n"
        "perfx.engine.llm.load_model = boom\n")


# ---- unexpected errors, usage errors ----------------------------------------------------------------


def test_unexpected_error_is_one_line_asking_for_a_report(tiny_gguf):
    path, *_ = tiny_gguf
    result = text(perfx_patched(BOOM, "run", "hi", "-m", str(path)))
    assert_one_line_error(result, "internal error (ZeroDivisionError: float division by zero)", "report",
                          "--debug")
    assert result.returncode == 1


@pytest.mark.parametrize("how", [("--debug",), ()])
def test_debug_shows_the_trace(tiny_gguf, how):
    path, *_ = tiny_gguf
    result = text(perfx_patched(BOOM, *how, "run", "hi", "-m", str(path),
                                env={} if how else {"PERFX_DEBUG": "1"}))
    assert result.returncode == 1
    assert "internal error (ZeroDivisionError" in result.stderr
    assert "Traceback" in result.stderr and "in boom" in result.stderr


@pytest.mark.parametrize("args, fragment", [
    (("run",), "Missing argument"),
    (("run", "hi", "--no-such-option"), "No such option"),
    (("run", "hi", "--ctx", "many"), "'--ctx'"),
    (("no-such-command",), "No such command"),
])
def test_usage_errors_are_one_line(args, fragment):
    result = perfx(*args)
    assert_one_line_error(result, fragment, "--help")
    assert result.returncode == 2


# ---- invalid UTF-8 ----------------------------------------------------------------------------------


def test_invalid_utf8_on_stdin(tiny_gguf):
    path, *_ = tiny_gguf
    result = run_bytes("run", "-", "-m", str(path), "--device", "numpy", "-n", "3", "--temp", "0",
                       input=b"the \xff\xfe thin \xc3\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


def test_invalid_utf8_in_the_prompt_argument(tiny_gguf):
    path, *_ = tiny_gguf
    result = run_bytes("run", b"the \xff thin \xed\xa0\x80", "-m", str(path), "--device", "numpy", "-n", "3",
                       "--system", b"\xfe", "--json")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


def test_invalid_utf8_chat_line_keeps_the_conversation(tiny_gguf):
    path, *_ = tiny_gguf
    result = run_bytes("chat", "-m", str(path), "--device", "numpy", "-n", "3", "--temp", "0",
                       input=b"hi \xff there\n/stats\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "1 turn" in result.stdout        # the message went through and /stats still answered


def test_chat_survives_an_unexpected_error():
    """Any exception while answering one message is reported in one line; the chat goes on."""
    from types import SimpleNamespace

    from rich.console import Console

    from perfx.cli.chat.ui import ChatUI

    def send(text):
        raise ValueError("probabilities contain NaN")

    session = SimpleNamespace(llm=SimpleNamespace(path=Path("m.gguf"), metadata={}), send=send)
    console = Console(file=open(os.devnull, "w"))
    ui = ChatUI(session, console, rich_output=False, errors=console)
    assert ui.handle("hello") is True


# ---- sizes against the machine ----------------------------------------------------------------------


def test_threads_beyond_the_cpus(tiny_gguf):
    path, *_ = tiny_gguf
    assert_one_line_error(perfx("run", "hi", "-m", str(path), "-t", "100000", "--device", "cpu"), "-t 100000",
                          "CPUs")
    assert_one_line_error(perfx("bench", "--synthetic", "tiny", "-t", "100000", "--device", "cpu"), "-t 100000")


def test_kv_pool_checked_against_memory(tiny_gguf):
    path, *_ = tiny_gguf
    # 2 layers x 32 KV values x K and V x 4 bytes = 512 bytes a token: 10^9 tokens are 512 GB.
    result = perfx("serve", "-m", str(path), "--device", "numpy", "--kv-tokens", "1000000000", "--port", "1")
    assert_one_line_error(result, "not enough memory", "KV pool", "--kv-tokens")


def test_synthetic_bench_checked_against_memory():
    """llama-7b on NumPy holds 27 GB of float32 weights: refused with the figure where that is not available."""
    if psutil.virtual_memory().available > 40e9:
        pytest.skip("this machine has room for a float32 7B model")
    result = perfx("bench", "--synthetic", "llama-7b", "--device", "numpy")
    assert_one_line_error(result, "not enough memory", "llama-7b", "MiB available")


# ---- writing files ----------------------------------------------------------------------------------


def unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot create files in."""
    if os.geteuid() == 0:
        return Path("/proc")                # not even root creates files there
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_convert_and_export_check_the_folder_first(tmp_path, tiny_gguf):
    path, *_ = tiny_gguf
    folder = unwritable(tmp_path)
    assert_one_line_error(perfx("convert", str(path), "-o", str(folder / "m.safetensors"), "--quant", "int8"),
                          "cannot write m.safetensors into", "choose a folder")
    assert_one_line_error(perfx("export", "-m", str(path), "--hf", str(folder / "hf")),
                          "cannot write hf into", "choose a folder")


def test_sigterm_during_convert_leaves_nothing(tmp_path, tiny_gguf):
    """SIGTERM arriving while the output is written removes the temporary file, as Ctrl-C does."""
    path, *_ = tiny_gguf
    patch = ("import os, signal, time\n"
             "from pathlib import Path\n"
             "import safetensors.numpy\n"
             "def save_file(tensors, filename, metadata=None):\n"
             "    Path(filename).write_bytes(b'partial')\n"
             "    os.kill(os.getpid(), signal.SIGTERM)\n"
             "    time.sleep(30)\n"
             "safetensors.numpy.save_file = save_file\n")
    out = tmp_path / "out"
    out.mkdir()
    start = time.monotonic()
    result = text(perfx_patched(patch, "convert", str(path), "-o", str(out / "m.safetensors"), "--quant", "int8"))
    assert time.monotonic() - start < 25
    assert result.returncode == 128 + signal.SIGTERM and "Traceback" not in result.stderr, result.stderr
    assert list(out.iterdir()) == []


# ---- meaningless values -----------------------------------------------------------------------------


@pytest.mark.parametrize("args, option", [
    (("run", "hi", "--ctx", "0"), "--ctx"),
    (("run", "hi", "--ctx", "-5"), "--ctx"),
    (("run", "hi", "-n", "-1"), "--n-predict"),
    (("chat", "-n", "0"), "--n-predict"),
    (("perplexity", "README.md", "--chunks", "0"), "--chunks"),
    (("bench", "--synthetic", "tiny", "--cooldown", "inf"), "--cooldown"),
    (("serve", "--kv-tokens", "-1"), "--kv-tokens"),
])
def test_meaningless_values_are_refused(tiny_gguf, args, option):
    path, *_ = tiny_gguf
    result = perfx(*args, "-m", str(path), "--device", "numpy")
    assert_one_line_error(result, option)


def test_n_0_reads_the_prompt_and_generates_nothing(tiny_gguf):
    import json

    path, *_ = tiny_gguf
    result = perfx("run", "the thin", "-m", str(path), "--raw", "-n", "0", "--json", "--device", "numpy")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["ids"] == [] and out["timings"]["prompt_tokens"] == len(out["prompt_ids"]) > 0


# ---- chat templates ---------------------------------------------------------------------------------


def test_template_that_never_ends(tmp_path, monkeypatch):
    path = with_template(tmp_path / "loop.gguf", "{% for i in range(100000) %}{% for j in range(100000) %}"
                                                 "{% endfor %}{% endfor %}", monkeypatch)
    start = time.monotonic()
    assert_one_line_error(perfx("run", "hi", "-m", str(path), "--device", "numpy"), "did not finish within")
    assert time.monotonic() - start < 60


def test_template_that_grows_without_bound(tmp_path, monkeypatch):
    path = with_template(tmp_path / "big.gguf", "{{ 'x' * 10**8 }}", monkeypatch)
    result = perfx("run", "hi", "-m", str(path), "--device", "numpy")
    assert_one_line_error(result, "chat template", "100000000")


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(tiny_gguf):
    """Megabytes on standard input are refused by their length alone, in one line and quickly."""
    path, *_ = tiny_gguf
    result = subprocess.run([sys.executable, "-m", "perfx.cli", "run", "-", "-m", str(path), "--device", "numpy",
                             "--ctx", "32", "--raw"], input=("word " * 2_000_000).encode(), capture_output=True,
                            timeout=120)
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in stderr, stderr
    assert "far more than the context of 32 tokens" in stderr


def test_lone_surrogates_reach_the_tokenizer_as_replacement_characters(tiny_gguf):
    from perfx.engine import load_model

    path, *_ = tiny_gguf
    llm = load_model(path, device="numpy", ctx=64)
    assert llm.tokenizer.encode("a\udc80b") == llm.tokenizer.encode("a\ufffdb")
