"""Pre-tokenizer regexes as `tokenizers` (Oniguruma) reads them, compiled for Python.

The regexes use ``\\p{L}``, ``\\p{N}`` and other Unicode classes, which Python's `re` lacks. With the
`regex` module installed they run there as written. Without it they are rewritten for `re`: each
``\\p{..}`` becomes a character class built once from `unicodedata` (0.2 s on a desktop core).
Both engines class every character that Python's `unicodedata` knows as `tokenizers`
(Oniguruma) does. The difference is in characters newer than that: `re` knows the Unicode of
Python's `unicodedata` (14.0 in Python 3.11, 15.1 in 3.13), Oniguruma in `tokenizers` 0.2x knows
16.0, so a letter or digit assigned since (Unicode 16 adds ~9,000 letters, mostly historic
scripts) is not one to `re`, and text containing such characters may split differently. The
`regex` module follows its own, usually newer, Unicode version. ``\\s`` is written out as
Unicode White_Space in both engines, as Oniguruma reads it (Python would add U+001C..U+001F).
"""
from __future__ import annotations

import re
import sys
import unicodedata
from functools import cache

from perfx.engine.errors import PerfxError

try:
    import regex as _regex
except ImportError:
    _regex = None

ENGINE = "regex" if _regex is not None else "re"

# Unicode White_Space, which Oniguruma's \s matches.
_WHITE_SPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@cache
def _category_table() -> dict[str, list[tuple[int, int]]]:
    """Runs of code points of each two-letter general category, from one pass over Unicode."""
    table: dict[str, list[tuple[int, int]]] = {}
    category = unicodedata.category
    last, start, prev = "", 0, -1
    for cp in range(sys.maxunicode + 1):
        cat = category(chr(cp))
        if cat != last:
            if last:
                table.setdefault(last, []).append((start, prev))
            last, start = cat, cp
        prev = cp
    table.setdefault(last, []).append((start, prev))
    return table


def _escape(cp: int) -> str:
    return f"\\U{cp:08x}" if cp > 0xFFFF else f"\\u{cp:04x}"


@cache
def _class_body(name: str) -> str:
    """The inside of a `re` character class for a Unicode general category (``L``, ``Lu``...)."""
    table = _category_table()
    cats = [c for c in table if c == name or (len(name) == 1 and c[0] == name)]
    if not cats:
        raise PerfxError(f"unknown Unicode category \\p{{{name}}} in a pre-tokenizer regex")
    runs = sorted(r for c in cats for r in table[c])
    merged: list[list[int]] = []
    for a, b in runs:
        if merged and a == merged[-1][1] + 1:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return "".join(_escape(a) if a == b else f"{_escape(a)}-{_escape(b)}" for a, b in merged)


_TOKEN = re.compile(r"\\[pP]\{(\w+)\}|\\[sS]|\\.|\[\^?|\]|.", re.DOTALL)


def translate(pattern: str, engine: str | None = None) -> str:
    """The pattern with ``\\s``/``\\S`` written out, and for `re` each ``\\p{..}``/``\\P{..}`` too."""
    engine = engine or ENGINE
    out: list[str] = []
    depth = 0                                   # inside a [...] class when > 0
    for m in _TOKEN.finditer(pattern):
        tok = m.group()
        if tok.startswith("["):
            depth += 1
        elif tok == "]" and depth:
            depth -= 1
        elif tok in (r"\s", r"\S"):
            negate = tok == r"\S"
            if depth and negate:
                raise PerfxError(f"\\S inside a character class is not supported: {pattern!r}")
            tok = _WHITE_SPACE if depth else f"[{'^' if negate else ''}{_WHITE_SPACE}]"
        elif m.group(1) and engine == "re":
            negate = tok[1] == "P"
            if depth and negate:
                raise PerfxError(f"\\P{{..}} inside a character class is not supported: {pattern!r}")
            body = _class_body(m.group(1))
            tok = body if depth else f"[{'^' if negate else ''}{body}]"
        out.append(tok)
    return "".join(out)


def compile_pattern(pattern: str, engine: str | None = None) -> re.Pattern[str]:
    """A pre-tokenizer regex compiled for `engine` ("regex" or "re"; default: `ENGINE`), with
    Oniguruma's ``^``/``$`` (line anchors)."""
    engine = engine or ENGINE
    text = translate(pattern, engine)
    if engine == "regex":
        if _regex is None:
            raise PerfxError("the regex module is not installed; pip install regex")
        return _regex.compile(text, _regex.MULTILINE | _regex.VERSION0)
    return re.compile(text, re.MULTILINE)
