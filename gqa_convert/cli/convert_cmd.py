"""`gqa-convert convert` (also the bare `gqa-convert MODEL ...`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from ..architectures.kvcache import human_bytes
from ..conversion import ConversionPlan, ConvertReport, convert
from ..methods import METHODS
from ..options import (
    DEFAULT_CALIB_TOKENS,
    DEFAULT_MAX_SHARD,
    DEFAULT_REFINE_BATCH_TOKENS,
    DEFAULT_REFINE_LR,
    DEFAULT_REFINE_STEPS,
    DEFAULT_REFINE_TOKENS,
)
from .common import console, print_json, user_errors
from .options import Force, Json, Quiet, Revision, TrustRemoteCode

EPILOG = """[bold]Examples[/]

  gqa-convert ./llama-2-7b --groups 8                 [dim]# writes ./llama-2-7b-gqa8[/]

  gqa-convert meta-llama/Llama-2-7b-hf --mqa --out ./l2-mqa

  gqa-convert ./model --groups 4 --dry-run            [dim]# show the plan, write nothing[/]

  gqa-convert ./model --groups 2 --method first --json > report.json

  gqa-convert ./model --groups 2 --method fold --grouping search --calib train.txt

  gqa-convert ./model --mqa --method refine --calib train.txt --refine-steps 400

Exit codes: 0 success, 2 bad input or usage, 1 unexpected failure, 130 interrupted."""


def _summary(r: ConvertReport) -> Table:
    kv = r.kv_cache
    t = Table(title="dry run: nothing written" if r.dry_run else "converted", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("source", escape(r.source))
    t.add_row("output", escape(r.output))
    t.add_row("family", f"{r.family}, {r.n_layers} layers, head_dim {r.head_dim}")
    t.add_row("heads", f"{r.n_heads} query; KV {r.kv_heads_before} -> {r.kv_heads_after} ({r.method})")
    if r.emulated:
        t.add_row(
            "[bold yellow]emulated[/]",
            f"each pooled K/V head repeated back to {r.kv_heads_before}: "
            "GQA quality, same architecture, no memory saved",
        )
    t.add_row(
        "KV cache / token",
        f"{human_bytes(kv['bytes_per_token_before'])} -> {human_bytes(kv['bytes_per_token_after'])} "
        f"(saves {kv['saving']:.1%})",
    )
    t.add_row("size", f"{human_bytes(r.bytes_in)} -> {human_bytes(r.bytes_out)} in {len(r.shards)} shard(s)")
    if r.refinement:
        layers = r.refinement["layers"]
        before = sum(x["heldout_before"] for x in layers) / max(len(layers), 1)
        after = sum(x["heldout_after"] for x in layers) / max(len(layers), 1)
        t.add_row(
            "refined",
            f"held-out attention error {before:.4g} -> {after:.4g} (mean of {len(layers)} layers), "
            f"{r.refinement['seconds']:.1f} s on {r.refinement['device']}",
        )
    if not r.dry_run:
        t.add_row("time", f"{r.seconds:.1f} s")
    for note in r.notes:
        t.add_row("[bold yellow]note[/]", escape(note))
    for stale in r.removed_stale:
        t.add_row("cleaned", f"removed a stale temporary directory from an interrupted run: {escape(stale)}")
    return t


def _plan_table(r: ConvertReport) -> Table:
    t = Table(title="attention tensors that change", title_justify="left")
    for col in ("layer", "tensor", "before", "after"):
        t.add_column(col)
    for c in r.attention_changes:
        count = f" x{c['count_before']} -> x{c['count_after']}" if c["count_before"] > 1 else ""
        t.add_row(str(c["layer"]), c["name"], str(c["before"]), str(c["after"]) + count)
    return t


def convert_command(
    model: str = typer.Argument(
        ..., help="A local Hugging Face model directory, or a hub id (uses the local cache; honours HF_HUB_OFFLINE)."
    ),
    groups: Optional[int] = typer.Option(
        None,
        "--groups",
        "-g",
        help="Number of KV heads (G) to keep; must divide the query heads and the current KV heads.",
        rich_help_panel="Method",
    ),
    mqa: bool = typer.Option(
        False, "--mqa", help="Multi-query attention: the same as --groups 1.", rich_help_panel="Method"
    ),
    method: str = typer.Option(
        "mean",
        "--method",
        "-m",
        help=f"How K/V heads become groups: {', '.join(f'{k} ({v.summary})' for k, v in METHODS.items())}.",
        rich_help_panel="Method",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for --method random.", rich_help_panel="Method"),
    emulate: bool = typer.Option(
        False,
        "--emulate",
        help="For families without native GQA (GPT-2, GPT-NeoX, OPT, GPT-J, BLOOM, ...): write the same architecture with each pooled K/V head repeated back to H. Shows GQA-G quality; saves no memory.",
        rich_help_panel="Method",
    ),
    sibling: bool = typer.Option(
        False,
        "--sibling",
        help="With --groups 1: write the family's native-MQA sibling architecture (GPT-2 -> GPT-BigCode with multi_query), a real MQA checkpoint.",
        rich_help_panel="Method",
    ),
    grouping: str = typer.Option(
        "contiguous",
        "--grouping",
        help="Which KV heads share a group: contiguous (transformers' order) or search (least conversion error; heads are permuted, the function is unchanged).",
        rich_help_panel="Method",
    ),
    calib: Optional[list[str]] = typer.Option(
        None,
        "--calib",
        help="Calibration text for --method fold and refine (same formats as verify; never your evaluation text). Repeat for several.",
        rich_help_panel="Method",
    ),
    calib_tokens: int = typer.Option(
        DEFAULT_CALIB_TOKENS,
        "--calib-tokens",
        help="Tokens of --calib to run through the model.",
        rich_help_panel="Method",
    ),
    calib_separator: Optional[str] = typer.Option(
        None,
        "--calib-separator",
        help="Document separator in --calib text files \\[default: blank lines].",
        rich_help_panel="Method",
    ),
    refine_steps: int = typer.Option(
        DEFAULT_REFINE_STEPS,
        "--refine-steps",
        help="--method refine: Adam steps per layer at most (stops early when the held-out loss stalls).",
        rich_help_panel="Method",
    ),
    refine_lr: float = typer.Option(
        DEFAULT_REFINE_LR, "--refine-lr", help="--method refine: Adam learning rate.", rich_help_panel="Method"
    ),
    refine_tokens: int = typer.Option(
        DEFAULT_REFINE_TOKENS,
        "--refine-tokens",
        help="--method refine: tokens of --calib to use; 1/8 is held out (after fold's calibration tokens when the text is long enough).",
        rich_help_panel="Method",
    ),
    refine_batch_tokens: int = typer.Option(
        DEFAULT_REFINE_BATCH_TOKENS,
        "--refine-batch-tokens",
        help="--method refine: tokens per Adam step (whole windows of up to 256 tokens; at least one).",
        rich_help_panel="Method",
    ),
    refine_device: Optional[str] = typer.Option(
        None,
        "--refine-device",
        help="--method refine: cpu, cuda or cuda:N \\[default: cuda when present].",
        rich_help_panel="Performance",
    ),
    trust_remote_code: TrustRemoteCode = False,
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        "-o",
        help="Output directory \\[default: beside the source, named SOURCE-gqaG or SOURCE-mqa].",
        rich_help_panel="Output",
    ),
    force: Force = False,
    max_shard_size: str = typer.Option(
        DEFAULT_MAX_SHARD,
        "--max-shard-size",
        help="Largest output shard, e.g. 5GB, 500MB, 2GiB.",
        rich_help_panel="Output",
    ),
    revision: Revision = None,
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print the plan (tensor shapes, KV saving, output size); write nothing.",
        rich_help_panel="Output",
    ),
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Convert an MHA (or GQA) checkpoint to GQA-G or MQA by pooling K/V heads.

    Query head h reads KV head h // (H/G), as in transformers. The source is never
    modified; the output appears only when it is complete.
    """
    if groups is None and not mqa:
        raise typer.BadParameter("give --groups G (or --mqa for G = 1)", param_hint="--groups")
    if groups is not None and mqa and groups != 1:
        raise typer.BadParameter("--mqa means --groups 1; give one or the other", param_hint="--mqa")
    n_groups = 1 if mqa else groups
    progress = Progress(
        TextColumn("[bold]converting"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet or dry_run,
        transient=True,
    )
    task = None

    def on_start(plan: ConversionPlan) -> None:
        nonlocal task
        progress.start()
        task = progress.add_task("convert", total=plan.bytes_out)

    def on_bytes(n: int) -> None:
        if task is not None:
            progress.advance(task, n)

    with user_errors("the output path was left as it was (nothing new was written)"):
        try:
            report = convert(
                model,
                n_groups,
                out=out,
                method=method,
                seed=seed,
                max_shard_size=max_shard_size,
                force=force,
                dry_run=dry_run,
                revision=revision,
                grouping=grouping,
                emulate=emulate,
                sibling=sibling,
                calib=calib,
                calib_tokens=calib_tokens,
                calib_separator=calib_separator,
                refine_steps=refine_steps,
                refine_lr=refine_lr,
                refine_tokens=refine_tokens,
                refine_batch_tokens=refine_batch_tokens,
                refine_device=refine_device,
                trust_remote_code=trust_remote_code,
                on_start=on_start,
                on_bytes=on_bytes,
            )
        finally:
            if task is not None:
                progress.stop()
    if not quiet:
        if dry_run:
            console.print(_plan_table(report))
        console.print(_summary(report))
    if json_out:
        print_json(report.to_dict())
