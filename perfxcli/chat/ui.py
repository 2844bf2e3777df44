"""The chat loop and its commands, on a rich console (the TUI) or in plain lines (scripts)."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from perfx.cli.chat.commands import ALIASES, COMMANDS, KEYS_HELP, apply_settings, describe_settings, unknown_command
from perfx.cli.chat.commands import slash_completer
from perfx.cli.chat.render import Tail, chat_markdown, model_label, stats_line
from perfx.cli.chat.terminal import key_bindings, quiet_keyboard
from perfx.cli.main import unexpected, valid_text
from perfx.engine.errors import PerfxError

if TYPE_CHECKING:
    from prompt_toolkit.history import History

    from perfx.engine.conversation import ChatSession, Reply
    from perfx.engine.llm import LLM


class ChatUI:
    """The chat loop and its commands, on a rich console (the TUI) or in plain lines (scripts)."""

    REFRESH_S = 1 / 15          # the fastest a streaming reply is redrawn

    def __init__(self, session: ChatSession, console: Console, *, rich_output: bool = True,
                 errors: Console | None = None) -> None:
        self.session = session
        self.console = console
        self.rich_output = rich_output
        self.errors = errors or console
        self.name, self.quant = model_label(session.llm)
        self.handlers: dict[str, Callable[[str], None]] = {
            "/help": self.help, "/reset": self.reset, "/system": self.system, "/set": self.set,
            "/stats": self.stats, "/show": self.show, "/save": self.save, "/load": self.load,
        }

    @property
    def llm(self) -> LLM:
        return self.session.llm

    # ------------------------------------------------------------------ loops

    def run_tui(self, history: History | None = None) -> None:
        """The interactive loop, on the current prompt-toolkit app session's input and output."""
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
        from prompt_toolkit.styles import Style

        prompt: PromptSession[str] = PromptSession(
            [("class:prompt", "❯ ")], multiline=True, key_bindings=key_bindings(), history=history,
            completer=slash_completer(), complete_while_typing=True, auto_suggest=AutoSuggestFromHistory(),
            prompt_continuation=lambda width, line, wrap: "· ".rjust(width), placeholder=self._placeholder,
            erase_when_done=True,       # the sent message is printed whole by echo(), however tall
            bottom_toolbar=self._toolbar, style=Style.from_dict(
                {"prompt": "ansigreen bold", "placeholder": "ansibrightblack",
                 "bottom-toolbar": "noreverse ansibrightblack"}),
        )
        self.header()
        while True:
            try:
                line = prompt.prompt()
            except (EOFError, KeyboardInterrupt):
                break
            self.echo(line)
            if not self.handle(line):
                break
            if line.strip():
                self.console.print()

    def run_lines(self, lines: Iterable[str]) -> None:
        """One message (or command) per line; replies go out plain."""
        for line in lines:
            if not self.handle(line.rstrip("\r\n")):
                break

    def handle(self, line: str) -> bool:
        """Act on one input: a message or a slash command. False means leave. No error ends the chat."""
        text = valid_text(line).strip()
        if not text:
            return True
        try:
            if text.startswith("/") and not text.startswith("//"):
                return self.command(text)
            self.reply(text[1:] if text.startswith("//") else text)
        except PerfxError as e:
            self.error(str(e))
        except KeyboardInterrupt:
            self.note("interrupted")
        except Exception as e:
            unexpected(e)
        return True

    def command(self, text: str) -> bool:
        typed, _, arg = text.replace("\n", " ", 1).partition(" ")
        name = ALIASES.get(typed.lower(), typed.lower())
        if name == "/exit":
            return False
        handler = self.handlers.get(name)
        if handler is None:
            raise PerfxError(unknown_command(typed))
        handler(arg.strip())
        return True

    # ------------------------------------------------------------------ replies

    def reply(self, text: str) -> None:
        reply = self.session.send(text)
        if reply.dropped:
            n = len(reply.dropped)
            self.warn(f"the context is full: dropped the {'oldest turn' if n == 1 else f'{n} oldest turns'}"
                      " (the system prompt stays)")
        if self.rich_output:
            self._stream_rich(reply)
        else:
            self._stream_plain(reply)
        if reply.finish == "length":                 # max_tokens, or else the context is full
            max_tokens = self.session.sampling.max_tokens
            if len(reply.tokens) >= max_tokens:
                self.note(f"the reply reached max_tokens={max_tokens} (/set max_tokens=N)")
            else:
                self.warn("the context is full: the reply stops here; the oldest turns will make room for the next")

    def _stream_plain(self, reply: Reply) -> None:
        out = self.console.file
        try:
            for piece in reply:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            reply.close()
        out.write("\n")
        out.flush()

    def _stream_rich(self, reply: Reply) -> None:
        from rich.live import Live

        from perfx.engine.llm import common_prefix

        console = self.console
        pieces: list[str] = []
        new = len(reply.prompt_ids) - common_prefix(self.llm.cached, reply.prompt_ids)
        try:
            with quiet_keyboard(sys.stdin):
                stream = iter(reply)
                with console.status(f"[dim]reading {new} new tokens…[/]", spinner="dots"):
                    first = next(stream, None)
                if first is not None:
                    pieces.append(first)
                    with Live(console=console, transient=True, auto_refresh=False) as live:
                        interval, shown = self.REFRESH_S, 0.0
                        for piece in stream:
                            pieces.append(piece)
                            now = time.perf_counter()
                            if now - shown >= interval:
                                live.update(Tail(chat_markdown("".join(pieces)), console.height - 2), refresh=True)
                                shown = time.perf_counter()
                                interval = max(self.REFRESH_S, 4 * (shown - now))
        except KeyboardInterrupt:
            reply.close()
        if reply.text.strip():
            console.print(chat_markdown(reply.text))
        if reply.interrupted and not reply.tokens:
            console.print("[dim]stopped before the reply began; the message is dropped[/]")
        else:
            console.print(f"[dim]{'stopped · ' if reply.interrupted else ''}{stats_line(reply)}[/]", highlight=False)

    # ------------------------------------------------------------------ commands

    def help(self, _: str = "") -> None:
        from rich.table import Table

        commands = Table.grid(padding=(0, 2))
        commands.add_column(style="bold")
        commands.add_column(style="dim")
        commands.add_column()
        for name, (args, text) in COMMANDS.items():
            commands.add_row(name, args, text)
        keys = Table.grid(padding=(0, 2))
        keys.add_column(style="bold")
        keys.add_column()
        for key, text in KEYS_HELP:
            keys.add_row(key, text)
        self.console.print(commands, "", keys)

    def reset(self, _: str = "") -> None:
        self.session.reset()
        self.note("conversation cleared" + (" (the system prompt stays)" if self.session.conversation.system else ""))

    def system(self, text: str) -> None:
        conversation = self.session.conversation
        if text:
            conversation.system = text
            self.note("system prompt set")
        elif conversation.system:
            self.console.print(escape(conversation.system), highlight=False)
        else:
            self.note("no system prompt (the model's template may use its own); set one with /system TEXT")

    def set(self, args: str) -> None:
        if args:
            self.session.sampling = apply_settings(args, self.session.sampling)
        self.console.print(describe_settings(self.session.sampling), highlight=False)

    def stats(self, _: str = "") -> None:
        from rich.table import Table

        session, llm = self.session, self.llm
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        reply = session.last
        if reply is not None and reply.stats is not None:
            s = reply.stats
            table.add_row("prompt", f"{s.prompt_tokens} tokens prefilled ({reply.reused_tokens} cached) in "
                                    f"{s.prompt_s:.2f} s, {s.prompt_tps:.1f} t/s")
            rate = f", {s.gen_tps:.1f} t/s" if len(reply.tokens) > 1 else ""   # one token has no rate
            table.add_row("reply", f"{len(reply.tokens)} tokens in {s.gen_s:.2f} s{rate} · "
                                   f"first token {s.ttft_s:.2f} s · {reply.finish}")
        else:
            table.add_row("last reply", "none yet")
        used = session.context_used
        turns = len(session.conversation.turns)
        table.add_row("context", f"{used} / {llm.ctx} tokens ({100 * used / llm.ctx:.0f}%) · "
                                 f"{turns} turn{'' if turns == 1 else 's'}")
        table.add_row("model", f"{self.name} {self.quant}".rstrip())
        table.add_row("device", llm.device)
        table.add_row("sampling", describe_settings(session.sampling))
        self.console.print(table, highlight=False)

    def show(self, _: str = "") -> None:
        from perfx.cli.models_cmd import describe, show_lines

        for line in show_lines(describe(None, self.llm.path)):
            self.console.print(escape(line), highlight=False)

    def save(self, arg: str) -> None:
        path = self.session.conversation.save(arg or time.strftime("chat-%Y%m%d-%H%M%S.json"))
        self.note(f"saved {len(self.session.conversation.turns)} turns to {path}")

    def load(self, arg: str) -> None:
        from perfx.engine.conversation import Conversation

        if not arg:
            raise PerfxError("give the file to load: /load FILE")
        self.session.conversation = Conversation.load(arg)
        self.note(f"loaded {len(self.session.conversation.turns)} turns from {arg}")

    # ------------------------------------------------------------------ output

    def echo(self, line: str) -> None:
        """The message as it was typed, all of it: prompt-toolkit shows only the part of a tall input
        that fits the screen, and leaves that behind when it is sent."""
        from rich.text import Text

        if not line.strip():
            return
        text = Text()
        for i, part in enumerate(line.rstrip("\n").split("\n")):
            text.append("\n" if i else "")
            text.append("❯ " if i == 0 else "· ", style="bold green" if i == 0 else "dim")
            text.append(part)
        self.console.print(text, highlight=False)

    def header(self) -> None:
        quant = f" [cyan]{self.quant}[/]" if self.quant else ""
        self.console.print(f"[bold]perfx chat[/] · [bold green]{escape(self.name)}[/]{quant} · ctx {self.llm.ctx}",
                           highlight=False)
        self.console.print(f"[dim]on[/] {escape(self.llm.device)}", highlight=False)
        self.console.print("[dim]Enter sends · Alt-Enter new line · Ctrl-C stops a reply · /help · Ctrl-D quits[/]")
        self.console.print()

    def _placeholder(self) -> Any:
        return [("class:placeholder", "Send a message (/help for commands)")]

    def _toolbar(self) -> Any:
        s = self.session
        seed = "" if s.sampling.seed is None else f" · seed {s.sampling.seed}"
        text = f" {self.name} · {s.context_used}/{self.llm.ctx} tokens · temp {s.sampling.temperature:g}{seed} "
        return [("class:bottom-toolbar", text)]

    def note(self, text: str) -> None:
        """A remark for the person at the terminal; scripts do without."""
        if self.rich_output:
            self.console.print(f"[dim]{escape(text)}[/]", highlight=False)

    def warn(self, text: str) -> None:
        if self.rich_output:
            self.console.print(f"[yellow]{escape(text)}[/]", highlight=False)
        else:
            self.errors.print(text, highlight=False, markup=False)

    def error(self, text: str) -> None:
        target = self.console if self.rich_output else self.errors
        target.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
