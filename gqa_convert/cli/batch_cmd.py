"""`gqa-convert batch`: run a YAML list of conversion jobs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..batch import BatchReport, JobResult, load_config, run_batch
from ..errors import EXIT_FAILURE
from .common import console, print_json, user_errors
from .options import Json

EPILOG = """[bold]Examples[/]

  gqa-convert batch configs/shared-models.yaml        [dim]# runs here, on ../shared[/]

  gqa-convert batch configs/sweep-g.yaml --check      [dim]# validate only[/]

  gqa-convert batch jobs.yaml --json > results.json

Exit codes: 0 every job done or skipped, 1 a job failed, 2 the file is malformed (nothing ran)."""


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(r: BatchReport) -> None:
    t = Table(title=f"batch {r.config}", title_justify="left")
    for col in ("job", "G", "method", "output", "KV saving", "ppl ratio", "after uptrain", "status", "time"):
        t.add_column(col)
    colour = {"done": "green", "skipped": "cyan", "failed": "red"}
    for x in r.results:
        t.add_row(
            x.job,
            str(x.groups),
            x.method,
            Path(x.output).name,
            _fmt(x.kv_saving, ".1%"),
            _fmt(x.ppl_ratio, ".3f"),
            _fmt(x.ppl_ratio_uptrained, ".3f"),
            f"[{colour[x.status]}]{x.status}[/]",
            f"{x.seconds:.1f} s",
        )
    console.print(t)
    for x in r.results:
        if x.message:
            console.print(f"[dim]{escape(f'{x.job} G={x.groups}: {x.message}')}[/]")


def batch_command(
    config: Path = typer.Argument(..., help="YAML file with 'defaults' and 'jobs' (see configs/)."),
    check: bool = typer.Option(False, "--check", help="Validate the file and list the jobs; run nothing."),
    json_out: Json = False,
) -> None:
    """Run many conversions (and their verify/uptrain steps) from one YAML file.

    The whole file is checked first; jobs whose output exists with a matching manifest are
    skipped; a failed job does not stop the others.
    """
    with user_errors():
        if check:
            for job in load_config(config):
                console.print(escape(f"{job.name}: {job.model} -> G={job.groups} ({job.method}) -> {job.out}"))
            return

        def progress(r: JobResult) -> None:
            console.print(escape(f"{r.job} G={r.groups}: {r.status}" + (f" — {r.message}" if r.message else "")))

        report = run_batch(config, on_result=progress)
    render(report)
    if json_out:
        print_json(report.to_dict())
    if report.failed:
        raise typer.Exit(EXIT_FAILURE)
