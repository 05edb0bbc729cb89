"""The one user-facing error type, and the exit codes the CLI maps errors to."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected failure, or a check that did not pass (verify)
EXIT_USAGE = 2  # bad input or usage: fix the command line or the input files
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT / SIGTERM


class ConversionError(Exception):
    """A problem the user can fix. The message says what is wrong and how to fix it.

    `exit_code` is what the CLI exits with (2 for bad input, 1 for a failed check).
    """

    def __init__(self, message: str, *, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class CheckFailed(ConversionError):
    """A verification check failed (the input was readable, but is not sane)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=EXIT_FAILURE)


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, bounded (or its type when it has none)."""
    text = str(e).strip()
    return (text.splitlines()[0][:limit] if text else "") or type(e).__name__


def shown(value: object, limit: int = 60) -> str:
    """repr() of user data, bounded: a message must never grow with the input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
