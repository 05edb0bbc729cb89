"""What every command shares: the stderr console, error-to-exit-code mapping, --json output."""

from __future__ import annotations

import errno
import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import EXIT_INTERRUPTED, EXIT_USAGE, ConversionError, first_line

_USER_ERRNOS = {
    errno.ENAMETOOLONG,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ELOOP,
    errno.EISDIR,
}

console = Console(stderr=True, highlight=False)


def fail(message: str, code: int) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # paths may hold [brackets]
    return typer.Exit(code)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def user_errors(interrupted_note: str = "") -> Iterator[None]:
    """Turn ConversionError into one red line and its exit code; Ctrl-C/SIGTERM into exit 130
    (after the library's own clean-up has run). Anything else is a bug and keeps its traceback."""
    # SIGINT too: a process started in the background by a non-interactive shell inherits an
    # ignored SIGINT, and `kill -INT` must still stop it cleanly.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except ConversionError as e:
        raise fail(str(e), e.exit_code) from None
    except OSError as e:  # the system refused a path we were given (too long, no permission, ...)
        where = f"{str(e.filename)[:200]}: " if e.filename else ""
        raise fail(f"{where}{e.strerror or first_line(e)}", EXIT_USAGE if e.errno in _USER_ERRNOS else 1) from None
    except KeyboardInterrupt as e:
        note = str(e) or interrupted_note  # the library says when the output was already complete
        raise fail("interrupted" + (f"; {note}" if note else ""), EXIT_INTERRUPTED) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()
