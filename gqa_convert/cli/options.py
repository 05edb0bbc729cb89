"""Typer options that several commands share, declared once (as huggingface_hub's CLI does).
Each command's own options stay in its module."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Data = Annotated[
    Optional[list[str]],
    typer.Option(
        "--data",
        "-d",
        help="Text: plain text files (documents split on blank lines, or on every --separator), .jsonl with a "
        "text field, or 'wikitext-2' (needs `datasets` and the network or its cache). Repeat for several.",
        rich_help_panel="Data",
    ),
]
Separator = Annotated[
    Optional[str],
    typer.Option(
        "--separator",
        help="Document separator in plain text files, matched anywhere in a line, e.g. '<|endoftext|>' "
        "\\[default: blank lines].",
        rich_help_panel="Data",
    ),
]
TextField = Annotated[
    str, typer.Option("--text-field", help="Field holding the text in .jsonl files.", rich_help_panel="Data")
]
Force = Annotated[
    bool,
    typer.Option(
        "--force", help="Replace an existing output (only once the new one is complete).", rich_help_panel="Output"
    ),
]
OutDir = Annotated[
    Optional[Path],
    typer.Option("--out", "-o", help="Output directory.", rich_help_panel="Output"),
]
Json = Annotated[
    bool, typer.Option("--json", help="Print a machine-readable report on stdout.", rich_help_panel="Output")
]
Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="No progress bars or tables (errors are still printed).", rich_help_panel="Output"
    ),
]
TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Allow a checkpoint whose config or tokenizer config asks for custom code (auto_map) to run it. "
        "Only for checkpoints you trust.",
        rich_help_panel="Security",
    ),
]
Revision = Annotated[
    Optional[str],
    typer.Option(
        "--revision", help="Hub revision (branch, tag or commit) when MODEL is a hub id.", rich_help_panel="Input"
    ),
]
