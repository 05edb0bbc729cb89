"""The `gqa-convert` executable: the CLI, imported with Python's garbage collector paused.

Importing torch and transformers creates a few hundred thousand objects; with the collector
on, it traces them again and again while they are created (about a tenth of the start-up
CPU). Afterwards they are frozen (never traced again): this process is one command."""

from __future__ import annotations

import gc


def main() -> None:
    gc.disable()
    try:
        from .cli import main as cli_main
    finally:
        gc.enable()
    gc.freeze()
    cli_main()
