"""`perfx chat`: an interactive chat in the terminal.

Input is a prompt-toolkit session: Enter sends, Alt-Enter (Esc Enter) or Ctrl-J adds a line,
pasted text stays one message, Tab completes slash commands, history persists across sessions.
Replies stream through rich and are then shown as Markdown. Ctrl-C during a reply stops it; the
part already shown stays in the conversation (see engine.conversation). Ctrl-C on an empty line,
Ctrl-D or /exit leaves.

With standard input or output not a terminal, it reads one message per line and prints plain
replies, one per message, for scripts.

The chat's parts: `ui` (the loop, replies and commands), `commands` (the slash commands' table,
settings and completion), `terminal` (key bindings, input history, the quiet keyboard), `render`
(Markdown, the live tail, the figures line).
"""
from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console

from perfx.cli.chat.terminal import file_history, quiet_keyboard
from perfx.cli.chat.ui import ChatUI
from perfx.cli.main import CtxOpt, DeviceOpt, ModelOpt, ThreadsOpt, command, err, load, valid_text
from perfx.cli.sampling import sampling_options


@command
@sampling_options
def chat(
    model: Optional[str] = ModelOpt,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    ctx: Optional[int] = CtxOpt,
    sampling=None,  # --temp, --top-k, ... (perfxcli.sampling)
    n: Optional[int] = typer.Option(None, "-n", "--n-predict", min=1, help="Most tokens per reply (default: what the context holds)."),
):
    """Chat with a model in the terminal. With standard input not a terminal: one message per line, plain replies."""
    from perfx.engine.conversation import ChatSession, Conversation

    if n is not None:
        sampling = sampling.with_(max_tokens=n)
    with quiet_keyboard(sys.stdin):
        llm = load(model, device, ctx, threads)
    if n is None:
        sampling = sampling.with_(max_tokens=llm.ctx)
    session = ChatSession(llm, Conversation(system=None if system is None else valid_text(system)), sampling)
    if sys.stdin.isatty() and sys.stdout.isatty():
        ChatUI(session, Console(highlight=False)).run_tui(file_history())
    else:
        ChatUI(session, Console(highlight=False, soft_wrap=True), rich_output=False, errors=err).run_lines(sys.stdin)
