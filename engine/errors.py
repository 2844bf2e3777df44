"""The exception types that the CLI turns into a one-line message."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator


class PerfxError(Exception):
    """A user-facing error: its message says what went wrong and what to do."""


class ModelFileError(PerfxError):
    """A model file that cannot be run as it is: corrupt, inconsistent, or asking for what perfx lacks."""


class TokenIdError(PerfxError, ValueError):
    """A token id outside the model's vocabulary, caught before it reaches a backend."""


@contextlib.contextmanager
def reading_model(path) -> Iterator[None]:
    """Any exception but a PerfxError raised while reading the model file `path` becomes one line,
    "PATH is corrupt (...)"; a file can hold anything, so no reader can foresee every way to fail."""
    try:
        yield
    except PerfxError as e:
        if "\n" not in str(e):
            raise
        raise ModelFileError(" ".join(str(e).split())) from None     # a library's message over many lines
    except (Exception, RecursionError, MemoryError) as e:
        detail = " ".join(f"{type(e).__name__}: {e}".split())
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise ModelFileError(f"{path} is corrupt ({detail}); download or convert it again") from None
