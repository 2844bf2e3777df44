"""The chat's slash commands: their table and help, `/set`'s settings, and Tab completion."""
from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from perfx.engine.errors import PerfxError
from perfx.engine.sampler import OPTIONS, Option, Sampling

if TYPE_CHECKING:
    from prompt_toolkit.completion import Completer

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
