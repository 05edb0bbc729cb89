"""`gqa-convert uptrain`: short continued pre-training of a converted checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..architectures.kvcache import human_bytes
from ..options import DEFAULT_MAX_SHARD, check
from ..training import StepInfo, UptrainOptions, UptrainReport, uptrain
from .common import console, print_json, user_errors
from .options import Force, Json, Quiet, Separator, TextField, TrustRemoteCode

EPILOG = """[bold]Examples[/]

  gqa-convert uptrain ./llama-mqa --data train.txt --out ./llama-mqa-up --steps 2000 --lr 1e-4

  gqa-convert uptrain ./llama-mqa --data train.jsonl --alpha 0.05 --pretrain-tokens 2e12 --dry-run

  gqa-convert uptrain ./m-mqa --data t.txt --out ./m-up --steps 300 --teacher ./m --kd-weight 0.5

  torchrun --nproc-per-node 8 -m gqa_convert uptrain ./m-mqa --data t.txt --out ./m-up --tokens 1e9

  accelerate launch --config_file configs/accelerate/fsdp.yaml -m gqa_convert uptrain ...

The global batch is batch-size x grad-accum x processes; each step sees batch x seq-len tokens."""


def _cost_table(r: UptrainReport) -> Table:
    c = r.cost
    t = Table(title="uptraining plan (per GPU)", title_justify="left", show_header=False)
    t.add_row("parameters", f"{c.params_total:,} ({c.params_trained:,} trained{', LoRA' if r.lora else ''})")
    t.add_row("weights", human_bytes(c.bytes_weights))
    t.add_row("gradients", human_bytes(c.bytes_grads))
    t.add_row("optimizer (AdamW)", human_bytes(c.bytes_optimizer))
    t.add_row("activations", human_bytes(c.bytes_activations))
    t.add_row("memory in all", human_bytes(c.bytes_total))
    t.add_row(
        "budget",
        f"{r.steps:,} steps x {r.global_batch} x {r.seq_len} = {r.tokens:,} tokens on {r.world_size} process(es)",
    )
    t.add_row(
        "estimated time", f"{c.seconds / 60:.1f} min (measured warm-up)" if c.seconds else "needs a GPU to measure"
    )
    return t


def uptrain_command(
    model: str = typer.Argument(..., help="The converted checkpoint to train."),
    data: list[str] = typer.Option(
        ...,
        "--data",
        "-d",
        help="Training text: plain text files (documents split on blank lines, or on every --separator), .jsonl, "
        "or .npy arrays of token ids. Repeat for several.",
        rich_help_panel="Data",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Output directory (a complete checkpoint, written at the end).",
        rich_help_panel="Output",
    ),
    separator: Separator = None,
    text_field: TextField = "text",
    eval_data: Optional[list[str]] = typer.Option(
        None, "--eval-data", help="Held-out text for perplexity before, during and after.", rich_help_panel="Data"
    ),
    eval_every: Optional[int] = typer.Option(
        None, "--eval-every", help="Evaluate every N steps.", rich_help_panel="Data"
    ),
    eval_tokens: int = typer.Option(
        8192, "--eval-tokens", help="Tokens of --eval-data to score.", rich_help_panel="Data"
    ),
    steps: Optional[int] = typer.Option(None, "--steps", help="Budget in optimizer steps.", rich_help_panel="Budget"),
    tokens: Optional[float] = typer.Option(
        None, "--tokens", help="Budget in training tokens (e.g. 1e9).", rich_help_panel="Budget"
    ),
    alpha: Optional[float] = typer.Option(
        None,
        "--alpha",
        help="Budget as a fraction of pre-training (the paper uses 0.05); needs --pretrain-tokens.",
        rich_help_panel="Budget",
    ),
    pretrain_tokens: Optional[float] = typer.Option(
        None, "--pretrain-tokens", help="The original pre-training tokens, for --alpha.", rich_help_panel="Budget"
    ),
    lr: float = typer.Option(
        1e-4, "--lr", help="Peak learning rate (low: this continues pre-training).", rich_help_panel="Optimizer"
    ),
    warmup: Optional[int] = typer.Option(
        None,
        "--warmup",
        help="Warmup steps \\[default: 5% of steps, at most 200], then cosine decay to 10%.",
        rich_help_panel="Optimizer",
    ),
    batch_size: int = typer.Option(
        8, "--batch-size", help="Sequences per device per micro-step.", rich_help_panel="Optimizer"
    ),
    grad_accum: int = typer.Option(
        1, "--grad-accum", help="Micro-steps per optimizer step.", rich_help_panel="Optimizer"
    ),
    seq_len: Optional[int] = typer.Option(
        None,
        "--seq-len",
        help="Tokens per sequence \\[default: the model's context, at most 2048].",
        rich_help_panel="Optimizer",
    ),
    weight_decay: float = typer.Option(0.1, "--weight-decay", rich_help_panel="Optimizer"),
    seed: int = typer.Option(0, "--seed", rich_help_panel="Optimizer"),
    teacher: Optional[str] = typer.Option(
        None, "--teacher", help="Distil from this model (usually the MHA source).", rich_help_panel="Distillation"
    ),
    kd_weight: float = typer.Option(
        0.5, "--kd-weight", help="Loss = (1-w) LM + w KL(teacher||student).", rich_help_panel="Distillation"
    ),
    temperature: float = typer.Option(1.0, "--temperature", rich_help_panel="Distillation"),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="auto (bf16 autocast on GPU, fp32 on CPU), bf16, fp16, fp32.",
        rich_help_panel="Performance",
    ),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", rich_help_panel="Performance"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model.", rich_help_panel="Performance"),
    deterministic: bool = typer.Option(
        False,
        "--deterministic",
        help="Deterministic GPU kernels (slower): the same seed gives the same losses, run after run.",
        rich_help_panel="Performance",
    ),
    compile_backend: str = typer.Option(
        "inductor",
        "--compile-backend",
        help="torch.compile backend for --compile (inductor; aot_eager or eager to debug).",
        rich_help_panel="Performance",
    ),
    lora: bool = typer.Option(
        False, "--lora", help="Train LoRA adapters (peft) and merge them back at the end.", rich_help_panel="LoRA"
    ),
    lora_rank: int = typer.Option(16, "--lora-rank", rich_help_panel="LoRA"),
    lora_targets: Optional[str] = typer.Option(
        None,
        "--lora-targets",
        help="Comma-separated module names \\[default: the family's attention projections].",
        rich_help_panel="LoRA",
    ),
    load_in_4bit: bool = typer.Option(
        False, "--load-in-4bit", help="4-bit base under LoRA (GPU only, bitsandbytes).", rich_help_panel="LoRA"
    ),
    save_every: Optional[int] = typer.Option(
        None,
        "--save-every",
        help="Save resumable state every N steps (in OUT.uptrain-state).",
        rich_help_panel="Output",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run from its last saved state.", rich_help_panel="Output"
    ),
    force: Force = False,
    max_shard_size: str = typer.Option(DEFAULT_MAX_SHARD, "--max-shard-size", rich_help_panel="Output"),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print parameters, memory per GPU, tokens and time; train nothing.",
        rich_help_panel="Output",
    ),
    trust_remote_code: TrustRemoteCode = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Recover quality after conversion by continued pre-training (GQA paper, section 2.1).

    Every option, the data and the output path are checked before a model is loaded. An
    --emulate checkpoint keeps its repeated K/V heads tied while it trains (it stays GQA).
    """
    with user_errors():
        check(tokens=tokens, pretrain_tokens=pretrain_tokens)  # floats on the command line (1e9)
    opts = UptrainOptions(
        data=data,
        out=out,
        steps=steps,
        tokens=int(tokens) if tokens else None,
        alpha=alpha,
        pretrain_tokens=int(pretrain_tokens) if pretrain_tokens else None,
        lr=lr,
        warmup=warmup,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seq_len=seq_len,
        weight_decay=weight_decay,
        seed=seed,
        teacher=teacher,
        kd_weight=kd_weight,
        temperature=temperature,
        eval_data=eval_data,
        eval_every=eval_every,
        eval_tokens=eval_tokens,
        separator=separator,
        text_field=text_field,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        compile=compile,
        compile_backend=compile_backend,
        deterministic=deterministic,
        lora=lora,
        lora_rank=lora_rank,
        lora_targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip()) if lora_targets else None,
        load_in_4bit=load_in_4bit,
        save_every=save_every,
        resume=resume,
        force=force,
        trust_remote_code=trust_remote_code,
        max_shard_size=max_shard_size,
    )
    progress = Progress(
        TextColumn("[bold]uptraining"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=True,
    )
    task = progress.add_task("up", total=None, status="")

    def on_start(r: UptrainReport) -> None:
        progress.update(task, total=r.steps, completed=r.resumed_from)
        progress.start()

    def on_step(s: StepInfo) -> None:
        progress.update(
            task, completed=s.step, status=f"loss {s.loss:.3f}  lr {s.lr:.2e}  {s.tokens_per_second:,.0f} tok/s"
        )

    def on_eval(step: int, ppl: float) -> None:
        if not quiet:
            console.print(f"step {step}: eval perplexity {ppl:.3f}")

    with user_errors("the output path was left as it was; with --save-every, --resume continues"):
        try:
            report = uptrain(model, opts, dry_run=dry_run, on_start=on_start, on_step=on_step, on_eval=on_eval)
        finally:
            progress.stop()
    if not quiet:
        if dry_run:
            console.print(_cost_table(report))
        else:
            console.print(
                f"wrote {report.output}: {report.steps} steps, {report.tokens:,} tokens, final loss "
                f"{report.final_loss:.3f}, {report.seconds:.0f} s"
            )
    if json_out:
        print_json(report.to_dict())
