"""`perfx chat` as people use it: keys through prompt-toolkit's pipe input, a script on stdin, and
the real terminal in tmux with the default model."""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from perfx.engine import load_model
from perfx.engine.conversation import ChatSession, Conversation
from perfx.engine.dirs import history_path
from perfx.engine.errors import PerfxError
from perfx.engine.sampler import Sampling
from perfx.cli.chat.commands import apply_settings, slash_completer, unknown_command
from perfx.cli.chat.render import model_label
from perfx.cli.chat.ui import ChatUI

ROOT = Path(__file__).resolve().parents[1]
ENTER, ALT_ENTER, CTRL_C, CTRL_D = "\r", "\x1b\r", "\x03", "\x04"
SAMPLING = Sampling(temperature=0, max_tokens=6)


@pytest.fixture
def ui(tiny_gguf) -> ChatUI:
    path, *_ = tiny_gguf
    session = ChatSession(load_model(path, device="numpy"), Conversation("sys"), SAMPLING)
    return ChatUI(session, Console(file=io.StringIO(), width=100, highlight=False))


def type_keys(ui: ChatUI, keys: str, history=None) -> str:
    """Run the TUI on `keys` (ending with Ctrl-D should they not leave); what it printed."""
    with create_pipe_input() as pipe:
        pipe.send_text(keys + CTRL_D)
        with create_app_session(input=pipe, output=DummyOutput()):
            ui.run_tui(history)
    return ui.console.file.getvalue()


def user_messages(ui: ChatUI) -> list[str]:
    return [turn.user for turn in ui.session.conversation.turns]


# ---------------------------------------------------------------------- keys


def test_enter_sends_and_a_reply_is_shown_with_its_figures(ui):
    out = type_keys(ui, "the thin hen" + ENTER + "/exit" + ENTER)
    assert user_messages(ui) == ["the thin hen"]
    reply = ui.session.last
    assert reply.tokens and reply.stats.prompt_tokens == len(reply.prompt_ids)
    assert "perfx chat · tiny · ctx 128" in out and "on NumPy" in out
    assert f"prompt {len(reply.prompt_ids)} tok" in out and f"reply {len(reply.tokens)} tok" in out
    assert "first token" in out


def test_alt_enter_and_pasted_newlines_stay_one_message(ui):
    paste = "\x1b[200~pasted\nlines\x1b[201~"
    type_keys(ui, "one" + ALT_ENTER + "two" + ENTER + paste + ENTER + "/exit" + ENTER)
    assert user_messages(ui) == ["one\ntwo", "pasted\nlines"]


def test_one_token_reply_prints_no_rate(ui):
    ui.session.sampling = SAMPLING.with_(max_tokens=1)
    out = type_keys(ui, "the thin hen" + ENTER + "/stats" + ENTER)
    assert len(ui.session.last.tokens) == 1
    assert re.search(r"reply 1 tok · first token", out), out
    assert re.search(r"1 tokens in \d+\.\d+ s · first token", out), out


def test_show_describes_the_model(ui):
    out = type_keys(ui, "/show" + ENTER)
    assert re.search(r"architecture +llama", out) and re.search(r"context +128 tokens", out)
    assert str(ui.llm.path) in out and "{% for message in messages %}" in out


def test_ctrl_c_clears_the_line_then_leaves(ui):
    type_keys(ui, "never sent" + CTRL_C + CTRL_C + "not typed" + ENTER)
    assert user_messages(ui) == []


def test_ctrl_d_leaves(ui):
    type_keys(ui, CTRL_D + "not typed" + ENTER)
    assert user_messages(ui) == []


def test_ctrl_c_during_a_reply_stops_it_and_the_chat_goes_on(ui, monkeypatch):
    transformer = ui.llm.transformer
    real, calls = transformer.next_token, []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(transformer, "next_token", interrupted_once)
    out = type_keys(ui, "the thin" + ENTER + "hen" + ENTER + "/exit" + ENTER)
    first, second = ui.session.conversation.turns
    assert first.user == "the thin" and second.user == "hen"
    assert "stopped · " in out and out.count("first token") == 2
    assert ui.session.last.stats.prompt_tokens < len(ui.session.last.prompt_ids)   # the history stayed cached


def test_history_is_kept_in_a_file(ui, tmp_path):
    path = tmp_path / "history"
    type_keys(ui, "remember me" + ENTER + "/exit" + ENTER, FileHistory(str(path)))
    assert "+remember me" in path.read_text()
    assert list(FileHistory(str(path)).load_history_strings())[0] == "/exit"


def test_history_lives_in_perfx_home(monkeypatch, tmp_path):
    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    assert history_path() == tmp_path / "history"
    monkeypatch.delenv("PERFX_HOME")
    assert history_path().name == "history" and "perfx" in str(history_path())


# ---------------------------------------------------------------------- slash commands


def test_slash_commands(ui, tmp_path):
    saved = tmp_path / "chat.json"
    out = type_keys(ui, ENTER.join([
        "/help", "the thin", "/stats", f"/save {saved}", "/reset", "/system Be brief.", "/system",
        "/set temp=0.5 top_p=0.9 seed=7", f"/load {saved}", "/exit", "",
    ]))
    assert "/set" in out and "Alt-Enter" in out                                     # /help
    assert "tokens prefilled" in out and "context" in out and "/ 128 tokens" in out    # /stats
    assert json.loads(saved.read_text())["messages"][1] == {"role": "user", "content": "the thin"}
    assert "Be brief." in out
    assert ui.session.sampling == SAMPLING.with_(temperature=0.5, top_p=0.9, seed=7)
    assert ui.session.conversation == Conversation.load(saved)                       # /load replaced it
    assert ui.session.conversation.system == "sys"


def test_bad_input_is_one_line_and_the_chat_goes_on(ui, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"messages": [{"role": "user", "content": "no reply"}]}')
    out = type_keys(ui, ENTER.join(["the", "/hepl", "/set temp=hot", "/set top_p=0", f"/load {broken}",
                                    "/load", "hen", "/exit", ""]))
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: unknown command /hepl; did you mean /help? (/help lists them)",
        "error: temp must be a number (got 'hot')",
        "error: bad sampling setting: top_p must be in (0, 1]",
        f"error: {broken}: the last user message has no reply",
        "error: give the file to load: /load FILE",
    ]
    assert user_messages(ui) == ["the", "hen"] and ui.session.sampling == SAMPLING


def test_a_message_starting_with_two_slashes_is_sent(ui):
    type_keys(ui, "//etc is a directory" + ENTER + "/exit" + ENTER)
    assert user_messages(ui) == ["/etc is a directory"]


def test_context_full_drops_the_oldest_turns_and_says_so(ui):
    ui.session.sampling = Sampling(temperature=0, max_tokens=16)
    out = type_keys(ui, ENTER.join(f"message {i} the thin hen" for i in range(8)) + ENTER + "/exit" + ENTER)
    assert "the context is full: dropped the" in out
    assert user_messages(ui)[-1] == "message 7 the thin hen" and len(user_messages(ui)) < 8
    assert ui.session.conversation.system == "sys"


def test_settings():
    base = Sampling()
    assert apply_settings("temp=0.2 top_k=5 n=99 seed=random", base) == base.with_(
        temperature=0.2, top_k=5, max_tokens=99, seed=None)
    for args, message in [("tmp=1", "unknown setting 'tmp'; did you mean temp?"),
                          ("temp", "KEY=VALUE"), ("top_k=2.5", "top_k must be a whole number"),
                          ("temp=nan", "temp must be a number"), ("min_p=1", "min_p must be in")]:
        with pytest.raises(PerfxError, match=message.replace("?", r"\?")):
            apply_settings(args, base)


def test_unknown_commands_suggest_the_closest():
    assert "did you mean /stats?" in unknown_command("/stat")
    assert "did you mean /exit?" in unknown_command("/quti")
    assert "did you mean" not in unknown_command("/xyzzy")


def test_tab_completion(tmp_path):
    completer = slash_completer()

    def complete(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text), CompleteEvent(completion_requested=True))]

    assert complete("/he") == ["/help"]
    assert complete("/s") == ["/system", "/set", "/stats", "/show", "/save"]
    assert complete("/set temp=1 top") == ["top_k=", "top_p="]
    (tmp_path / "chat.json").write_text("{}")
    assert complete(f"/load {tmp_path}/ch") == ["at.json"]
    assert complete("hello /he") == []


def test_model_label():
    llm = SimpleNamespace(path=Path("m/SmolLM2-135M-Instruct.Q4_1.gguf"), metadata={"general.file_type": 3})
    assert model_label(llm) == ("SmolLM2-135M-Instruct", "Q4_1")
    assert model_label(SimpleNamespace(path=Path("tiny.gguf"), metadata={})) == ("tiny", "")


# ---------------------------------------------------------------------- scripts


def test_piped_stdin_gets_plain_replies(tiny_gguf, tmp_path):
    path, *_ = tiny_gguf
    script = "the thin\n/hepl\n/set top_p=0\n\nhen\n/exit\nnot read\n"
    result = subprocess.run(
        [sys.executable, "-m", "perfx.cli", "chat", "-m", str(path), "--device", "numpy", "--temp", "0", "-n", "6"],
        input=script.encode(), capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                         "PYTHONIOENCODING": "utf-8"}, timeout=120)
    assert result.returncode == 0, result.stderr
    session = ChatSession(load_model(path, device="numpy"), sampling=Sampling(temperature=0, max_tokens=6))
    expected = "".join("".join(session.send(text)) + "\n" for text in ("the thin", "hen"))
    assert result.stdout.decode() == expected
    assert result.stderr.decode().splitlines() == [
        "error: unknown command /hepl; did you mean /help? (/help lists them)",
        "error: bad sampling setting: top_p must be in (0, 1]",
    ]


# ---------------------------------------------------------------------- the real thing, in tmux


class Tmux:
    """One tmux server of its own (a private socket), running one command in a 100x40 window."""

    def __init__(self, socket: Path, command: str, env: dict[str, str]) -> None:
        self.base = ["tmux", "-S", str(socket)]
        subprocess.run([*self.base, "-f", "/dev/null", "new-session", "-d", "-s", "chat", "-x", "100", "-y", "40",
                        command], env=env, check=True, timeout=30)

    def send(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "chat", *keys], check=True, timeout=30)

    def screen(self) -> str:
        return subprocess.run([*self.base, "capture-pane", "-p", "-J", "-S", "-", "-t", "chat"], check=True,
                              capture_output=True, text=True, timeout=30).stdout

    def wait_for(self, text: str, after: str | None = None, timeout: float = 120) -> str:
        """The screen once `text` shows up (after the last `after`, if given)."""
        def ready(screen: str) -> bool:
            if after is not None:
                if after not in screen:
                    return False
                screen = screen.rpartition(after)[2]
            return text in screen

        return self.wait_until(ready, repr(text), timeout)

    def wait_until(self, ready, what: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if ready(screen):
                return screen
            assert "Traceback" not in screen, screen
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} on the screen after {timeout} s:\n{screen}")
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30)


@pytest.mark.model
@pytest.mark.slow
def test_end_to_end_in_tmux(default_model_path, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    home = tmp_path / "home"
    command = (f"{shlex.quote(sys.executable)} -m perfx.cli chat -m {shlex.quote(str(default_model_path))} "
               "--device numpy --temp 0; echo EXIT=$?; sleep 120")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PERFX_HOME": str(home), "TERM": "xterm-256color"}
    tmux = Tmux(tmp_path / "tmux.sock", f"cd {shlex.quote(str(ROOT))} && {command}", env)
    try:
        tmux.wait_for("Send a message")
        tmux.send("What is the capital of France?", "Enter")
        screen = tmux.wait_for("first token", after="❯ What is the capital")
        assert "Paris" in screen.rpartition("❯ What is the capital")[2]

        tmux.send("/stats", "Enter")
        screen = tmux.wait_for("tokens prefilled", after="❯ /stats")
        assert "SmolLM2-135M-Instruct Q4_1" in screen and "NumPy" in screen

        story = "Write a long story about a brave knight and a dragon."
        tmux.send(story, "Enter")

        def streaming(screen: str) -> bool:
            _, typed, shown = screen.rpartition(story)
            return bool(typed) and "reading" not in shown and len(shown.split()) > 20

        tmux.wait_until(streaming, "streaming reply")
        tmux.send("C-c")
        screen = tmux.wait_for("stopped · ", after=story)
        cached = re.search(r"prompt (\d+) tok \((\d+) cached\)", screen.rpartition("stopped · ")[2])
        assert cached and int(cached[1]) < 30 < int(cached[2])        # the first turn was not computed again
        tmux.send("/stats", "Enter")
        tmux.wait_for("cancelled", after="❯ /stats")            # back at the prompt; the reply was kept

        tmux.send("/exit", "Enter")
        tmux.wait_for("EXIT=0", timeout=30)
        assert "What is the capital of France?" in (home / "history").read_text()
    finally:
        tmux.close()


def test_a_paste_taller_than_the_screen_stays_visible(tiny_gguf, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    path, *_ = tiny_gguf
    command = (f"{shlex.quote(sys.executable)} -m perfx.cli chat -m {shlex.quote(str(path))} --device numpy "
               "--temp 0 -n 2; echo EXIT=$?; sleep 120")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PERFX_HOME": str(tmp_path / "home"), "TERM": "xterm-256color"}
    tmux = Tmux(tmp_path / "tmux.sock", f"cd {shlex.quote(str(ROOT))} && {command}", env)
    lines = [f"pasted line {i:02d}" for i in range(1, 61)]          # taller than the 40-line window
    paste = tmp_path / "paste.txt"
    paste.write_text("\n".join(lines))
    try:
        tmux.wait_for("Send a message")
        subprocess.run([*tmux.base, "load-buffer", str(paste)], check=True, timeout=30)
        subprocess.run([*tmux.base, "paste-buffer", "-p", "-t", "chat"], check=True, timeout=30)
        tmux.wait_for("pasted line 60")
        tmux.send("Enter")
        screen = tmux.wait_for("error: the message is too long")
        sent = screen.rpartition("❯ pasted line 01")[2].partition("error:")[0]
        assert [line.removeprefix("· ").strip() for line in sent.strip().splitlines()] == lines[1:]
    finally:
        tmux.close()
