"""`perfx chat`: an interactive chat in the terminal.

Input is a prompt-toolkit session: Enter sends, Alt-Enter (Esc Enter) or Ctrl-J adds a line,
pasted text stays one message, Tab completes slash commands, history persists across sessions.
Replies stream through rich and are then shown as Markdown. Ctrl-C during a reply stops it; the
part already shown stays in the conversation (see engine.conversation). Ctrl-C on an empty line,
Ctrl-D or /exit leaves.

With standard input or output not a terminal, it reads one message per line and prints plain
replies, one per message, for scripts.
"""
from __future__ import annotations

import difflib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Optional

import platformdirs
import typer
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.segment import Segment

from perfx.engine.errors import PerfxError
from perfx.engine.hub.registry import HOME_ENV
from perfx.engine.sampler import OPTIONS, Option, Sampling
from perfx.cli.main import CtxOpt, DeviceOpt, ModelOpt, ThreadsOpt, command, err, load, unexpected, valid_text
from perfx.cli.sampling import sampling_options

if TYPE_CHECKING:
    from prompt_toolkit.completion import Completer
    from prompt_toolkit.history import History
    from prompt_toolkit.key_binding import KeyBindings
    from rich.markdown import Markdown

    from perfx.engine.conversation import ChatSession, Reply
    from perfx.engine.llm import LLM

COMMANDS: dict[str, tuple[str, str]] = {
    "/help": ("", "this help"),
    "/reset": ("", "start over (the system prompt stays)"),
    "/system": ("TEXT", "set the system prompt; without TEXT, show it"),
    "/set": ("KEY=VALUE …", "sampling settings; without arguments, show them"),
    "/stats": ("", "timings of the last reply, context use"),
    "/show": ("", "the model: architecture, quantization, context, template, file"),
    "/save": ("FILE", "save the conversation as JSON"),
    "/load": ("FILE", "load a conversation saved by /save"),
    "/exit": ("", "leave (also Ctrl-D, or Ctrl-C on an empty line)"),
}
ALIASES = {"/quit": "/exit", "/bye": "/exit", "/?": "/help", "/clear": "/reset"}

KEYS_HELP = [
    ("Enter", "send"),
    ("Alt-Enter", "new line (also Esc Enter, Ctrl-J); pasted text stays one message"),
    ("Ctrl-C", "stop the reply (what was shown stays); on an empty line, leave"),
    ("Tab  ↑ ↓", "complete a command; earlier messages"),
    ("//text", "send a message that starts with /"),
]


SETTINGS: dict[str, Option] = {o.set_key: o for o in OPTIONS}    # /set keys
SETTING_ALIASES = {"temperature": "temp", "n": "max_tokens", "top-k": "top_k", "top-p": "top_p",
                   "min-p": "min_p"}


def apply_settings(args: str, sampling: Sampling) -> Sampling:
    """`sampling` changed by `KEY=VALUE …`; PerfxError names the first bad key or value."""
    changes: dict[str, Any] = {}
    for item in args.split():
        key, eq, value = item.partition("=")
        if not eq or not value:
            raise PerfxError(f"write settings as KEY=VALUE, e.g. /set temp=0.7 (got '{item}')")
        key = SETTING_ALIASES.get(key.lower(), key.lower())
        setting = SETTINGS.get(key)
        if setting is None:
            close = difflib.get_close_matches(key, SETTINGS, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}? " if close else ""
            raise PerfxError(f"unknown setting '{key}'; {hint}(settings: {', '.join(SETTINGS)})")
        try:
            changes[setting.name] = setting.parse(value)
        except ValueError:
            raise PerfxError(f"{key} must be {setting.kind} (got '{value}')") from None
    return sampling.with_(**changes)


def describe_settings(sampling: Sampling) -> str:
    values = {key: getattr(sampling, s.name) for key, s in SETTINGS.items()}
    values["seed"] = "random" if sampling.seed is None else sampling.seed
    return "  ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in values.items())


def unknown_command(name: str) -> str:
    close = difflib.get_close_matches(name, [*COMMANDS, *ALIASES], n=1, cutoff=0.5)
    if close:
        return f"unknown command {name}; did you mean {ALIASES.get(close[0], close[0])}? (/help lists them)"
    return f"unknown command {name} (/help lists them; start with // to send a message beginning with /)"


def history_path() -> Path:
    """Where input history persists: $PERFX_HOME/history, else in the user data directory."""
    home = os.environ.get(HOME_ENV)
    base = Path(home).expanduser() if home else Path(platformdirs.user_data_dir("perfx"))
    return base / "history"


def model_label(llm: LLM) -> tuple[str, str]:
    """A model's name (its file's) and quantization, e.g. ('SmolLM2-135M-Instruct', 'Q4_1')."""
    import gguf

    name = llm.path.stem
    quant = ""
    file_type = llm.metadata.get("general.file_type")
    if isinstance(file_type, int):
        try:
            quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    if quant and name[-len(quant) - 1:].lower() in (f"{sep}{quant.lower()}" for sep in ".-_"):
        name = name[: -len(quant) - 1]
    return name, quant


def stats_line(reply: Reply) -> str:
    """One line of figures: prompt tokens and speed, reply tokens and speed, time to first token."""
    s = reply.stats
    if s is None:
        return ""
    parts = [f"prompt {s.prompt_tokens} tok" + (f" ({reply.reused_tokens} cached)" if reply.reused_tokens else "")
             + (f", {s.prompt_tps:.0f} t/s" if s.prompt_tokens else "")]
    if reply.tokens:
        parts.append(f"reply {len(reply.tokens)} tok" + (f", {s.gen_tps:.1f} t/s" if s.gen_tps else ""))
        parts.append(f"first token {s.ttft_s:.2f} s")
    return " · ".join(parts)


def slash_completer() -> Completer:
    """Tab completion: command names with their help, /set keys, and paths after /save and /load."""
    from prompt_toolkit.completion import Completer, Completion, PathCompleter
    from prompt_toolkit.document import Document

    paths = PathCompleter(expanduser=True)

    class SlashCompleter(Completer):
        def get_completions(self, document, complete_event):
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            name, space, rest = text.partition(" ")
            if not space:
                for command_name, (args, help_text) in COMMANDS.items():
                    if command_name.startswith(name):
                        yield Completion(command_name, -len(name), display=f"{command_name} {args}".rstrip(),
                                         display_meta=help_text)
            elif name == "/set":
                word = rest.rsplit(" ", 1)[-1]
                if "=" not in word:
                    for key, setting in SETTINGS.items():
                        if key.startswith(word):
                            yield Completion(f"{key}=", -len(word), display_meta=setting.kind)
            elif name in ("/save", "/load"):
                yield from paths.get_completions(Document(rest, len(rest)), complete_event)

    return SlashCompleter()


def key_bindings() -> KeyBindings:
    """Enter sends; Alt-Enter, Esc Enter and Ctrl-J add a line; Ctrl-C clears the line, or leaves when it is empty."""
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @kb.add("enter")
    def _send(event) -> None:
        event.current_buffer.validate_and_handle()

    @kb.add("escape", "enter")
    @kb.add("c-j")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    @kb.add("c-c")
    def _cancel(event) -> None:
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=EOFError())

    return kb


def chat_markdown(text: str) -> Markdown:
    """Markdown as a chat model means it: a single newline breaks the line."""
    from rich.markdown import Markdown

    markdown = Markdown(text, code_theme="monokai")
    for token in markdown.parsed:
        for child in token.children or ():
            if child.type == "softbreak":
                child.type = "hardbreak"
    return markdown


class Tail:
    """The last lines of a renderable that fit in `height`, so a live view follows the end of a long reply."""

    def __init__(self, renderable: Any, height: int) -> None:
        self.renderable = renderable
        self.height = max(1, height)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.renderable, options, pad=False)
        for line in lines[-self.height:]:
            yield from line
            yield Segment.line()


@contextmanager
def quiet_keyboard(stream: IO[str]) -> Iterator[None]:
    """Keys typed meanwhile (while the model loads, while a reply streams) are not echoed over the
    output; they stay queued, Enter included, for the next prompt. Ctrl-C still interrupts."""
    try:
        import termios
    except ImportError:             # Windows: keys echo as they are typed
        termios = None              # type: ignore[assignment]
    if termios is None or not stream.isatty():
        yield
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[0] &= ~termios.ICRNL
    quiet[3] &= ~(termios.ECHO | termios.ICANON)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


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
        if reply.finish == "context":
            self.warn("the context is full: the reply stops here; the oldest turns will make room for the next")
        elif reply.finish == "length":
            self.note(f"the reply reached max_tokens={self.session.sampling.max_tokens} (/set max_tokens=N)")

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
        ChatUI(session, Console(highlight=False)).run_tui(_file_history())
    else:
        ChatUI(session, Console(highlight=False, soft_wrap=True), rich_output=False, errors=err).run_lines(sys.stdin)


def _file_history() -> History:
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    except OSError as e:
        err.print(f"[dim]history is not kept: cannot write {path} ({e.strerror or e})[/]")
        return InMemoryHistory()
    return FileHistory(str(path))
