"""The `gqa-convert` command line: thin Typer wrappers over the library API."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape
from typer.core import TyperGroup

from .._version import __version__
from ..architectures import families_line
from .batch_cmd import EPILOG as BATCH_EPILOG
from .batch_cmd import batch_command
from .common import console
from .convert_cmd import EPILOG as CONVERT_EPILOG
from .convert_cmd import convert_command
from .demo_cmd import EPILOG as DEMO_EPILOG
from .demo_cmd import demo_command
from .inspect_cmd import EPILOG as INSPECT_EPILOG
from .inspect_cmd import inspect_command
from .uptrain_cmd import EPILOG as UPTRAIN_EPILOG
from .uptrain_cmd import uptrain_command
from .verify_cmd import EPILOG as VERIFY_EPILOG
from .verify_cmd import verify_command

ROOT_EPILOG = """[bold]Examples[/]

  gqa-convert demo                                   [dim]# see it all work offline[/]

  gqa-convert inspect ./llama-2-7b                   [dim]# what each G would save[/]

  gqa-convert ./llama-2-7b --groups 8                [dim]# convert (the paper's mean pooling)[/]

  gqa-convert ./llama-2-7b -g 8 --method fold --calib train.txt

  gqa-convert verify ./llama-2-7b-gqa8 --data eval.txt

  gqa-convert uptrain ./llama-2-7b-gqa8 --data train.txt --out ./up --steps 2000

  gqa-convert batch jobs.yaml

Run gqa-convert COMMAND --help for each command's options. Exit codes: 0 success, 1 a check or
job failed (or a bug), 2 bad input or usage, 130 interrupted."""


class _OneLineErrors(TyperGroup):
    """Usage errors (a bad option value, a missing argument) as one `error:` line with exit 2,
    like every other refusal, instead of a boxed panel. Help stays as it is."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as e:  # Typer's own copy of Click raises these; matched by shape, not imported
            if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
                raise
            if type(e).__name__ == "NoArgsIsHelpError" or not standalone_mode:
                if not standalone_mode:
                    raise
                e.show()  # the help, as Click would show it; exit 2: something was missing
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            console.print(f"[bold red]error:[/] {escape(e.format_message())}{hint}", soft_wrap=True)
            sys.exit(e.exit_code)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="gqa-convert",
    help=(
        "Convert multi-head-attention checkpoints to grouped-query (GQA) or multi-query (MQA) attention, "
        "as in Ainslie et al. 2023 (arXiv 2305.13245). GQA-G keeps G KV heads, so the KV cache is G/H the size.\n\n"
        "[bold]gqa-convert MODEL --groups G[/] is short for [bold]gqa-convert convert MODEL --groups G[/].\n\n"
        + families_line()
    ),
    epilog=ROOT_EPILOG,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("convert", epilog=CONVERT_EPILOG, no_args_is_help=True)(convert_command)
app.command("verify", epilog=VERIFY_EPILOG, no_args_is_help=True)(verify_command)
app.command("inspect", epilog=INSPECT_EPILOG, no_args_is_help=True)(inspect_command)
app.command("uptrain", epilog=UPTRAIN_EPILOG, no_args_is_help=True)(uptrain_command)
app.command("demo", epilog=DEMO_EPILOG)(demo_command)
app.command("batch", epilog=BATCH_EPILOG, no_args_is_help=True)(batch_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gqa-convert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


_ROOT_FLAGS = {"--help", "-h", "--version"}


def command_names() -> set[str]:
    return {c.name or c.callback.__name__ for c in app.registered_commands}


def normalize_argv(args: list[str]) -> list[str]:
    """`gqa-convert MODEL --groups 8` means `gqa-convert convert MODEL --groups 8`."""
    if args and args[0] not in command_names() and args[0] not in _ROOT_FLAGS:
        return ["convert", *args]
    return args


def main(argv: list[str] | None = None) -> None:
    app(args=normalize_argv(list(sys.argv[1:] if argv is None else argv)), prog_name="gqa-convert")
