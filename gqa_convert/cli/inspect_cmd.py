"""`gqa-convert inspect`: what a checkpoint is, and what each G would save."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from ..architectures.kvcache import human_bytes
from ..evaluation import InspectReport, inspect_model
from .common import console, print_json, user_errors
from .options import Json, Revision

EPILOG = """[bold]Examples[/]

  gqa-convert inspect ./llama-2-7b

  gqa-convert inspect mistralai/Mistral-7B-v0.1 --json | jq '.options[] | {groups, kv_saving}'

Reads config.json and the safetensors headers only; no weights are loaded."""


def render(r: InspectReport) -> None:
    t = Table(title=escape(r.path), title_justify="left", show_header=False)
    t.add_row("family", escape(f"{r.family or '-'} ({r.model_type}); {r.layout or ''}"))
    t.add_row("conversion", escape(r.conversion))
    if r.n_heads:
        t.add_row(
            "shape",
            f"{r.n_layers} layers, hidden {r.hidden}, {r.n_heads} query heads, "
            f"{r.n_kv_heads} KV heads, head_dim {r.head_dim}",
        )
    t.add_row("parameters", f"{r.params:,} ({human_bytes(r.bytes)}, mostly {r.dtype})")
    console.print(t)
    if r.options:
        o = Table(title="KV heads G: cache per sequence (batch 1) and what changes", title_justify="left")
        for col in ("G", "KV / token", "at 4k", "at 32k", "saving", "parameters removed"):
            o.add_column(col, justify="right")
        for opt in r.options:
            o.add_row(
                str(opt.groups)
                + (" (MQA)" if opt.groups == 1 else " (now)" if opt.groups == r.n_kv_heads else "")
                + (" --emulate" if opt.emulated else ""),
                human_bytes(opt.kv_bytes_per_token),
                human_bytes(opt.kv_bytes_at["4096"]),
                human_bytes(opt.kv_bytes_at["32768"]),
                f"{opt.kv_saving:.1%}",
                f"{opt.params_removed:,} ({human_bytes(opt.bytes_removed)})",
            )
        console.print(o)


def inspect_command(
    model: str = typer.Argument(..., help="A local model directory or a hub id."),
    revision: Revision = None,
    json_out: Json = False,
) -> None:
    """Show a checkpoint's attention layout and, for every valid G, the KV cache it would need."""
    with user_errors():
        report = inspect_model(model, revision)
    if json_out:
        print_json(report.to_dict())
    else:
        render(report)
