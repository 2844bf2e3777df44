"""The one exception type that the CLI turns into a one-line message."""


class PerfxError(Exception):
    """A user-facing error: its message says what went wrong and what to do."""
