"""The `gqa-convert` executable: the CLI, imported with Python's garbage collector paused,
while the kernel starts reading the model named on the command line.

Importing torch and transformers creates a few hundred thousand objects; with the collector
on, it traces them again and again while they are created. Afterwards they are frozen
(never traced again): this process is one command.

The import takes seconds, during which the disk would sit idle: the first weight files of
the directory named by one of the first two arguments get a read-ahead hint
(POSIX_FADV_WILLNEED, at most PREFETCH bytes). A hint only — nothing is read into this
process, nothing is validated or trusted here; the command checks its inputs as always."""

from __future__ import annotations

import gc
import os
import stat
import sys
import threading

from .errors import EXIT_INTERRUPTED  # a module of constants: the start stays light

PREFETCH = 1 << 30  # bytes: about what a disk reads while torch is imported
WEIGHTS = (".safetensors", ".bin")


def _weight_files(args: list[str]) -> list[str]:
    """Regular weight files (by name, in name order) of the first directory among args[:2]."""
    for arg in args[:2]:
        try:
            if not stat.S_ISDIR(os.stat(arg).st_mode):
                continue
            names = sorted(e.name for e in os.scandir(arg) if e.name.endswith(WEIGHTS) and e.is_file())
        except (OSError, ValueError):
            continue
        return [os.path.join(arg, n) for n in names]
    return []


def prefetch(args: list[str], budget: int = PREFETCH) -> None:
    """Ask the kernel to read ahead the first `budget` bytes of the model's weight files."""
    for path in _weight_files(args):
        if budget <= 0:
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the start
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                n = min(st.st_size, budget)
                os.posix_fadvise(fd, 0, n, os.POSIX_FADV_WILLNEED)
                budget -= n
        except (OSError, AttributeError):
            pass
        finally:
            os.close(fd)


def main() -> None:
    threading.Thread(target=prefetch, args=(sys.argv[1:],), daemon=True).start()
    try:
        gc.disable()
        try:
            from .cli import main as cli_main
        finally:
            gc.enable()
        gc.freeze()
        cli_main()
    except KeyboardInterrupt:
        # Ctrl-C outside a command's own handling: while torch is imported (the first second or
        # so) or the command line is parsed. Nothing has been written; one line, not a traceback.
        sys.stderr.write("error: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
