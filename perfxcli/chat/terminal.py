"""The chat's terminal input: key bindings, the input history, and keys kept quiet while the model works."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING

from perfx.cli.main import err
from perfx.engine.dirs import history_path

if TYPE_CHECKING:
    from prompt_toolkit.history import History
    from prompt_toolkit.key_binding import KeyBindings


def file_history() -> History:
    """The input history, kept in history_path(); in memory only where that cannot be written."""
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    except OSError as e:
        err.print(f"[dim]history is not kept: cannot write {path} ({e.strerror or e})[/]")
        return InMemoryHistory()
    return FileHistory(str(path))


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
