"""`gqa-convert demo`: the whole pipeline offline, on an embedded default model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..demo import DemoReport, run_demo
from .common import console, print_json, user_errors
from .options import Json

EPILOG = """[bold]Examples[/]

  gqa-convert demo                   [dim]# a few minutes on a 2-core CPU the first time[/]

  gqa-convert demo --quick --json    [dim]# under a minute; results on stdout[/]"""


def render(r: DemoReport) -> None:
    groups = sorted({row["groups"] for row in r.rows}, reverse=True)
    methods = list(dict.fromkeys(row["method"] for row in r.rows))
    t = Table(title="perplexity ratio converted / source (lower is better; 1.000 = lossless)", title_justify="left")
    t.add_column("method")
    for g in groups:
        t.add_column(f"G={g}" + (" (MQA)" if g == 1 else ""), justify="right")
    for m in methods:
        cells = {row["groups"]: f"{row['ppl_ratio']:.3f}" for row in r.rows if row["method"] == m}
        t.add_row(m, *[cells.get(g, "-") for g in groups])
    saving = {row["groups"]: row["kv_saving"] for row in r.rows}
    t.add_row("[dim]KV cache saving[/]", *[f"[dim]{saving[g]:.1%}[/]" for g in groups])
    console.print(t)
    u = r.uptrained
    if u:
        console.print(
            f"MQA (mean pooling) before uptraining: x{u['ppl_ratio_before']:.3f}; after {u['steps']} steps "
            f"({u['tokens']:,} tokens): x{u['ppl_ratio_after']:.3f}"
        )
    if r.plot:
        console.print(f"plot: {r.plot}")
    console.print(f"[dim]base model: {r.base_model} ({'trained now' if r.trained else 'cached'}); {r.seconds:.0f} s[/]")


def demo_command(
    quick: bool = typer.Option(False, "--quick", help="Fewer steps and group counts: well under a minute."),
    out: Path = typer.Option(
        Path("gqa-demo"), "--out", "-o", help="Where the converted models, plot and results.json go."
    ),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="Where the trained demo model is cached \\[default: ~/.cache/gqa-convert]."
    ),
    json_out: Json = False,
) -> None:
    """Train a small MHA model offline (cached), convert it with every method at several G,
    verify each, uptrain the MQA model briefly, and print a GQA-paper-style table."""
    with user_errors():
        report = run_demo(quick=quick, out=out, cache=cache_dir, log=lambda m: console.print(m, highlight=False))
    render(report)
    if json_out:
        print_json(report.to_dict())
