"""`gqa-convert verify`: integrity and perplexity checks for a converted checkpoint."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..architectures.kvcache import human_bytes
from ..errors import EXIT_FAILURE
from ..evaluation import VerifyReport, verify
from ..options import DEFAULT_VERIFY_TOKENS
from .common import console, print_json, user_errors
from .options import Data, Json, Quiet, Separator, TextField, TrustRemoteCode

EPILOG = """[bold]Examples[/]

  gqa-convert verify ./llama-gqa8 --data wiki.test.txt

  gqa-convert verify ./stories-mqa --data ../shared/data/tinystories-valid-head64k.txt --separator '<|endoftext|>'

  gqa-convert verify ./out --reference ./src --data eval.jsonl --max-ppl-ratio 1.5 --json

  gqa-convert verify ./out --generate 40 --prompt 'Once upon a time'

Exit codes: 0 all checks passed, 1 a check failed (integrity, or --max-ppl-ratio exceeded), 2 bad input or a missing path."""


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def render(r: VerifyReport) -> None:
    checks = Table(title="integrity", title_justify="left", show_header=False)
    for c in r.checks:  # a failed check stops verify with its message instead
        checks.add_row("[green]ok[/]", c.name, escape(c.detail))
    console.print(checks)
    models = [m for m in (r.reference, r.converted) if m is not None]
    t = Table(title="perplexity and KV cache", title_justify="left")
    t.add_column("")
    for m in models:
        t.add_column(m.role, justify="right")
    if r.reference:
        t.add_column("converted / reference", justify="right")
    ratio = lambda a, b: _fmt(a / b if a is not None and b else None, ".3f")  # noqa: E731
    rows = [
        ("token perplexity", "ppl", ".4f"),
        ("loss (nats/token)", "loss", ".4f"),
        ("bits per byte", "bits_per_byte", ".4f"),
        ("word perplexity", "word_ppl", ".3f"),
        ("tokens scored", "tokens", "d"),
        ("tokens / s", "tokens_per_second", ".0f"),
    ]
    for label, attr, spec in rows:
        vals = [getattr(m, attr) for m in models]
        if all(v is None for v in vals):
            continue
        extra = (
            [ratio(r.converted.__dict__[attr], r.reference.__dict__[attr])]
            if r.reference and attr in ("ppl", "word_ppl")
            else [""]
            if r.reference
            else []
        )
        t.add_row(label, *[_fmt(v, spec) for v in vals], *extra)
    t.add_row(
        "KV heads",
        *[f"{m.kv_heads} (emulated: repeated)" if m.emulated else str(m.kv_heads) for m in models],
        *([""] if r.reference else []),
    )
    t.add_row(
        "KV cache / token",
        *[human_bytes(m.kv_bytes_per_token) if m.kv_bytes_per_token else "-" for m in models],
        *(
            [f"saves {r.kv_saving:.1%}" + (" (emulated: no memory saved)" if r.converted.emulated else "")]
            if r.reference
            else []
        ),
    )
    for c, _ in (r.converted.kv_at_context or {}).items():
        t.add_row(
            f"KV cache at {int(c) // 1024}k tokens",
            *[human_bytes(m.kv_at_context.get(c, 0)) for m in models],
            *([""] if r.reference else []),
        )
    console.print(t)
    if r.converted.emulated:
        console.print(
            "[bold yellow]emulated:[/] the converted model repeats each pooled K/V head back to "
            f"{r.converted.kv_heads}; it shows the quality of GQA but its KV cache is as large as before."
        )
    if r.settings:
        s = r.settings
        console.print(
            f"[dim]settings: {s.get('tokens_in_stream', '-')} tokens in stream, seq-len {s.get('seq_len')}, "
            f"stride {s.get('stride')} ({s.get('scheme')}), {s.get('bos')}, {s.get('dtype')} on {s.get('device')}, "
            f"documents split on {s.get('separator')}[/]"
        )
        for d in r.data:
            console.print(f"[dim]data: {escape(d.spec)} ({d.bytes} bytes, sha256 {d.sha256[:12]}…)[/]")
    for m in models:
        if m.sample is not None:
            console.print(f"[bold]{m.role}[/] {escape(repr(r.settings.get('prompt', '')))} -> {escape(repr(m.sample))}")
    if r.max_ppl_ratio is not None and r.ppl_ratio is not None:
        verdict = "[green]passed[/]" if r.passed else "[bold red]FAILED[/]"
        console.print(f"perplexity ratio {r.ppl_ratio:.3f} vs limit {r.max_ppl_ratio}: {verdict}")


def verify_command(
    converted: str = typer.Argument(..., help="The checkpoint to check (usually gqa-convert's output)."),
    reference: Optional[str] = typer.Option(
        None,
        "--reference",
        "-r",
        help="Model to compare with \\[default: the source named in the conversion manifest].",
        rich_help_panel="Data",
    ),
    no_reference: bool = typer.Option(
        False,
        "--no-reference",
        help="Measure the converted model alone, even if a manifest names a source.",
        rich_help_panel="Data",
    ),
    data: Data = None,
    separator: Separator = None,
    text_field: TextField = "text",
    max_tokens: int = typer.Option(
        DEFAULT_VERIFY_TOKENS,
        "--max-tokens",
        help="Tokens of data to use (the stream is cut there).",
        rich_help_panel="Data",
    ),
    bos: Optional[bool] = typer.Option(
        None,
        "--bos/--no-bos",
        help="Put BOS before each document \\[default: when the tokenizer has one].",
        rich_help_panel="Data",
    ),
    seq_len: Optional[int] = typer.Option(
        None,
        "--seq-len",
        help="Window length \\[default: the model's context, at most 1024].",
        rich_help_panel="Perplexity",
    ),
    stride: Optional[int] = typer.Option(
        None,
        "--stride",
        help="Window step; each token is scored once with up to seq-len of context \\[default: seq-len/2].",
        rich_help_panel="Perplexity",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass.", rich_help_panel="Performance"),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="auto (float32 on CPU, the checkpoint's dtype on GPU), float32, bfloat16, float16.",
        rich_help_panel="Performance",
    ),
    device: Optional[str] = typer.Option(
        None, "--device", help="cpu, cuda, cuda:1 ... \\[default: cuda when present].", rich_help_panel="Performance"
    ),
    max_ppl_ratio: Optional[float] = typer.Option(
        None,
        "--max-ppl-ratio",
        help="Exit 1 when converted/reference perplexity exceeds this.",
        rich_help_panel="Checks",
    ),
    generate: int = typer.Option(
        0,
        "--generate",
        help="Greedy-generate this many tokens from both models, side by side.",
        rich_help_panel="Checks",
    ),
    prompt: str = typer.Option("Once upon a time", "--prompt", help="Prompt for --generate.", rich_help_panel="Checks"),
    trust_remote_code: TrustRemoteCode = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Check a converted checkpoint: integrity, perplexity against its source, KV cache saving.

    Integrity comes first (index and shards agree, shapes match config.json, no NaN/Inf,
    loads with the family's Auto class); then both models score exactly the same tokens.
    Encoder-decoder models (T5) are scored on each window's second half given its first.
    """
    progress = Progress(
        TextColumn("[bold]scoring {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def on_stage(stage: str, total: int) -> None:
        progress.start()
        tasks["now"] = progress.add_task(stage, total=total)

    with user_errors(), progress:
        report = verify(
            converted,
            reference=reference,
            use_manifest=not no_reference,
            data=data,
            separator=separator,
            text_field=text_field,
            max_tokens=max_tokens,
            seq_len=seq_len,
            stride=stride,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            bos=bos,
            max_ppl_ratio=max_ppl_ratio,
            generate=generate,
            prompt=prompt,
            trust_remote_code=trust_remote_code,
            on_stage=on_stage,
            on_tokens=lambda n: progress.advance(tasks["now"], n),
        )
    if not quiet:
        render(report)
    if json_out:
        print_json(report.to_dict())
    if not report.passed:
        raise typer.Exit(EXIT_FAILURE)
