"""`uptrain(...) -> UptrainReport`: the GQA paper's short continued pre-training of a
converted checkpoint, on one device or many (torchrun / accelerate launch, through
Accelerate: DDP, or FSDP from an accelerate config), optionally distilled from the
original MHA model, optionally with LoRA adapters merged back at the end."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .card import model_card, read_manifest, write_manifest
from .costs import CostEstimate, estimate
from .errors import ConversionError
from .integrity import load_model, quiet_transformers, refuse_remote_code
from .io.outdir import OutputDir
from .io.source import read_config, resolve
from .packing import blocks, global_batches, token_stream
from .perplexity import build_stream, score_stream
from .training import batch_loss, lm_loss, lr_factor, make_optimizer

STATE_SUFFIX = ".uptrain-state"


@dataclass
class UptrainOptions:
    data: list[str]
    out: Path
    steps: int | None = None
    tokens: int | None = None
    alpha: float | None = None
    pretrain_tokens: int | None = None
    lr: float = 1e-4  # continued pre-training: well below from-scratch rates
    warmup: int | None = None  # default: 5% of steps, at most 200
    batch_size: int = 8  # per device, per micro-step
    grad_accum: int = 1
    seq_len: int | None = None  # default: the model's context, at most 2048
    weight_decay: float = 0.1
    seed: int = 0
    teacher: str | None = None
    kd_weight: float = 0.5
    temperature: float = 1.0
    eval_data: list[str] | None = None
    eval_every: int | None = None
    eval_tokens: int = 8192
    separator: str | None = None
    text_field: str = "text"
    dtype: str = "auto"  # bf16 autocast on GPU, float32 on CPU
    gradient_checkpointing: bool = False
    compile: bool = False
    lora: bool = False
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    load_in_4bit: bool = False
    save_every: int | None = None
    resume: bool = False
    force: bool = False
    trust_remote_code: bool = False
    max_shard_size: str = "5GB"


@dataclass
class StepInfo:
    step: int
    steps: int
    loss: float
    lm_loss: float
    lr: float
    tokens: int
    tokens_per_second: float
    seconds: float


@dataclass
class UptrainReport:
    model: str
    output: str | None
    steps: int
    tokens: int
    global_batch: int
    seq_len: int
    lr: float
    teacher: str | None
    lora: bool
    dry_run: bool
    world_size: int
    resumed_from: int = 0
    cost: CostEstimate | None = None
    final_loss: float | None = None
    eval_ppl_before: float | None = None
    eval_ppl_after: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")
        return d


def resolve_steps(o: UptrainOptions, tokens_per_step: int) -> int:
    given = [x is not None for x in (o.steps, o.tokens, o.alpha)]
    if sum(given) != 1:
        raise ConversionError("give exactly one budget: --steps N, --tokens N, or --alpha A with --pretrain-tokens N")
    if o.steps is not None:
        steps = o.steps
    elif o.tokens is not None:
        steps = math.ceil(o.tokens / tokens_per_step)
    else:
        if not o.pretrain_tokens:
            raise ConversionError("--alpha needs --pretrain-tokens (the original pre-training budget, in tokens)")
        steps = math.ceil(o.alpha * o.pretrain_tokens / tokens_per_step)
    if steps < 1:
        raise ConversionError("the budget comes to less than one step")
    return steps


def _mixed_precision(dtype: str, cuda: bool) -> str:
    if dtype == "auto":
        return "bf16" if cuda else "no"
    table = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "fp32": "no", "float32": "no"}
    if dtype not in table:
        raise ConversionError(f"--dtype {dtype!r}: choose auto, bf16, fp16 or fp32")
    if table[dtype] != "no" and not cuda:
        raise ConversionError(f"--dtype {dtype} needs a GPU; on CPU train in fp32")
    return table[dtype]


def _source_dtype(config: dict[str, Any]) -> torch.dtype:
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def _apply_lora(model: torch.nn.Module, o: UptrainOptions) -> torch.nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConversionError("--lora needs the peft package: pip install 'gqa-convert[uptrain]'") from None
    cfg = LoraConfig(r=o.lora_rank, lora_alpha=2 * o.lora_rank, target_modules=list(o.lora_targets), lora_dropout=0.0)
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise ConversionError(f"--lora-targets {','.join(o.lora_targets)}: {str(e).splitlines()[0]}") from None


def _load_student(root: Path, o: UptrainOptions, device: str) -> torch.nn.Module:
    if o.load_in_4bit:
        if not o.lora:
            raise ConversionError("--load-in-4bit trains adapters only: add --lora")
        if device == "cpu":
            raise ConversionError("--load-in-4bit needs a CUDA GPU (bitsandbytes)")
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
        model = AutoModelForCausalLM.from_pretrained(root, quantization_config=q, attn_implementation="sdpa")
        return prepare_model_for_kbit_training(model)
    return load_model(root, torch.float32, device, o.trust_remote_code)  # float32 master weights


def _eval_ppl(
    model, tokenizer, specs, o: UptrainOptions, seq_len: int, device: str, workers: int | None = None
) -> float:
    """Held-out perplexity; every process runs it (sharded models need all ranks in forward)."""
    from .data import load_documents

    docs, _ = load_documents(specs, separator=o.separator, text_field=o.text_field)
    ids, _, _ = build_stream(tokenizer, docs, o.eval_tokens, bos=tokenizer.bos_token_id is not None)
    was_training = model.training
    model.eval()
    score = score_stream(model, ids, seq_len, seq_len, batch_size=o.batch_size, device=device, workers=workers)
    model.train(was_training)
    return score.ppl


def _state_dir(out: Path) -> Path:
    return out.parent / (out.name + STATE_SUFFIX)


def _latest_state(state: Path) -> tuple[Path, dict[str, Any]] | None:
    steps = sorted(
        (p for p in state.glob("step-*") if (p / "progress.json").is_file()), key=lambda p: int(p.name.split("-")[1])
    )
    if not steps:
        return None
    return steps[-1], json.loads((steps[-1] / "progress.json").read_text())


def uptrain(
    model: str,
    o: UptrainOptions,
    *,
    dry_run: bool = False,
    on_start: Callable[[UptrainReport], None] = lambda r: None,
    on_step: Callable[[StepInfo], None] = lambda s: None,
    on_eval: Callable[[int, float], None] = lambda step, ppl: None,
) -> UptrainReport:
    """Continue pre-training `model` on `o.data`; writes a complete checkpoint at `o.out`."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    started = time.perf_counter()
    quiet_transformers()
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)  # "removed shared tensor": tied embeddings
    root, _ = resolve(model)
    config = read_config(root)
    refuse_remote_code(config, root, o.trust_remote_code)
    out = Path(o.out).absolute()
    if not o.data:
        raise ConversionError("give training data with --data FILE")
    if o.batch_size < 1 or o.grad_accum < 1:
        raise ConversionError("--batch-size and --grad-accum must be at least 1")
    if out.exists() and not o.force and not dry_run:
        raise ConversionError(f"output {out} already exists; pass --force to replace it, or choose another --out.")
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=_mixed_precision(o.dtype, cuda), cpu=not cuda)
    device = str(accelerator.device)
    world = accelerator.num_processes
    seq_len = o.seq_len or min(int(config.get("max_position_embeddings") or 2048), 2048)
    global_batch = o.batch_size * o.grad_accum * world
    steps = resolve_steps(o, global_batch * seq_len)
    warmup = o.warmup if o.warmup is not None else min(200, max(1, steps // 20))
    set_seed(o.seed)

    tokenizer = AutoTokenizer.from_pretrained(root)
    student = _load_student(root, o, device)
    if o.gradient_checkpointing:  # transformers 5.x renamed it; older releases have only the first name
        getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()
    if o.lora:
        student = _apply_lora(student, o)
    n_total = sum(p.numel() for p in student.parameters())
    n_trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    report = UptrainReport(
        str(root),
        str(out),
        steps,
        steps * global_batch * seq_len,
        global_batch,
        seq_len,
        o.lr,
        o.teacher,
        o.lora,
        dry_run,
        world,
    )
    cfg = student.config
    report.cost = estimate(
        params_total=n_total,
        params_trained=n_trained,
        weight_bytes=sum(p.numel() * p.element_size() for p in student.parameters()),
        n_layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        n_heads=cfg.num_attention_heads,
        vocab=cfg.vocab_size,
        micro_batch=o.batch_size,
        seq_len=seq_len,
        tokens=report.tokens,
        act_bytes=2 if accelerator.mixed_precision != "no" else 4,
        checkpointing=o.gradient_checkpointing,
        world_size=world,
    )
    if dry_run:
        if cuda:  # a short measured warm-up gives the time estimate
            report.cost.seconds = _time_estimate(student, o, seq_len, steps, accelerator)
        return report

    teacher = None
    if o.teacher:
        t_root, _ = resolve(o.teacher)
        refuse_remote_code(read_config(t_root), t_root, o.trust_remote_code)
        teacher = load_model(t_root, torch.bfloat16 if cuda else torch.float32, device, o.trust_remote_code)
        teacher.requires_grad_(False)
    opt = make_optimizer(student, o.lr, o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    if o.compile:
        student = torch.compile(student)
    student, opt = accelerator.prepare(student, opt)

    state_dir = _state_dir(out)
    start_step = 0
    history: list[dict[str, Any]] = []
    if o.resume:
        latest = _latest_state(state_dir)
        if latest is None:
            raise ConversionError(f"--resume: no saved state in {state_dir}; start without --resume")
        path, progress = latest
        if progress["global_batch"] != global_batch or progress["seq_len"] != seq_len or progress["steps"] != steps:
            raise ConversionError(
                "--resume: batch size, seq-len or budget differ from the interrupted run; use the same options"
            )
        accelerator.load_state(str(path))
        sched.load_state_dict(progress["scheduler"])
        start_step = progress["step"]
        history = progress["history"]
        report.resumed_from = start_step
    elif state_dir.exists():
        shutil.rmtree(state_dir)  # a previous run's state; we start afresh

    workers = 1 if world > 1 else None  # no evaluation threads beside collectives

    def evaluate() -> float:
        return _eval_ppl(student, tokenizer, o.eval_data, o, seq_len, device, workers)

    if o.eval_data:
        report.eval_ppl_before = evaluate()
        if start_step == 0:
            history.append({"step": 0, "eval_ppl": report.eval_ppl_before})
        on_eval(start_step, report.eval_ppl_before)
    on_start(report)

    batches = global_batches(
        blocks(token_stream(tokenizer, o.data, separator=o.separator, text_field=o.text_field), seq_len),
        global_batch,
        skip=start_step,
    )
    rank, local = accelerator.process_index, o.batch_size * o.grad_accum
    student.train()
    t_loop, tokens_done = time.perf_counter(), 0
    for step in range(start_step, steps):
        mine = next(batches)[rank * local : (rank + 1) * local]
        total, total_lm = 0.0, 0.0
        for i, ids in enumerate(mine.split(o.batch_size)):
            ids = ids.to(device)
            sync = contextlib.nullcontext() if i == o.grad_accum - 1 else accelerator.no_sync(student)
            with sync, accelerator.autocast():
                loss, lm = batch_loss(student, ids, teacher, o.kd_weight, o.temperature)
                accelerator.backward(loss / o.grad_accum)
            total += loss.detach() / o.grad_accum
            total_lm += lm.detach() / o.grad_accum
        accelerator.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_v = accelerator.reduce(total, "mean").item()
        lm_v = accelerator.reduce(total_lm, "mean").item()
        tokens_done += global_batch * seq_len
        elapsed = time.perf_counter() - t_loop
        info = StepInfo(
            step + 1,
            steps,
            loss_v,
            lm_v,
            sched.get_last_lr()[0],
            (step + 1) * global_batch * seq_len,
            tokens_done / elapsed,
            elapsed,
        )
        history.append(
            {
                "step": info.step,
                "loss": loss_v,
                "lm_loss": lm_v,
                "lr": info.lr,
                "tokens": info.tokens,
                "tokens_per_second": round(info.tokens_per_second, 1),
            }
        )
        on_step(info)
        if o.eval_data and o.eval_every and info.step % o.eval_every == 0 and info.step < steps:
            ppl = evaluate()
            history.append({"step": info.step, "eval_ppl": ppl})
            on_eval(info.step, ppl)
        if o.save_every and info.step % o.save_every == 0 and info.step < steps:
            _save_state(accelerator, state_dir, info.step, sched, history, global_batch, seq_len, steps)

    report.final_loss = history[-1]["loss"] if history and "loss" in history[-1] else None
    if o.eval_data:
        report.eval_ppl_after = evaluate()
        history.append({"step": steps, "eval_ppl": report.eval_ppl_after})
        on_eval(steps, report.eval_ppl_after)
    report.history = history
    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(student)
    # gathered on every rank (FSDP shards the weights); LoRA adapters are merged into the base instead
    state_dict = None if o.lora else accelerator.get_state_dict(student)
    if accelerator.is_main_process:
        if o.lora:
            final = final.merge_and_unload()  # the output stays a stock checkpoint
        report.seconds = time.perf_counter() - started
        _write_output(final, state_dict, root, config, out, o, report)
        shutil.rmtree(state_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    report.seconds = time.perf_counter() - started
    return report


def _save_state(
    accelerator, state_dir: Path, step: int, sched, history, global_batch: int, seq_len: int, steps: int
) -> None:
    path = state_dir / f"step-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        progress = {
            "step": step,
            "steps": steps,
            "scheduler": sched.state_dict(),
            "history": history,
            "global_batch": global_batch,
            "seq_len": seq_len,
        }
        (path / "progress.json").write_text(json.dumps(progress))
        saved = sorted(state_dir.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in saved[:-2]:  # keep the newest two
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _write_output(
    model, state_dict, root: Path, config: dict[str, Any], out: Path, o: UptrainOptions, report: UptrainReport
) -> None:
    from .converter import copy_other_files

    od = OutputDir(out, root, o.force)
    with od as tmp:
        dtype = _source_dtype(config)
        model = model.to(dtype)
        if state_dict is not None:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        model.save_pretrained(tmp, state_dict=state_dict, max_shard_size=o.max_shard_size)
        copy_other_files(root, tmp)
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in report.history))
        try:
            from .plots import plot_training

            plot_training(report.history, tmp / "training.png", title=f"uptraining {root.name}")
        except ImportError:
            pass
        manifest = read_manifest(root) or {}
        manifest.setdefault("tool", {"name": "gqa-convert", "version": __version__})
        manifest["uptraining"] = {
            "from": str(root),
            "steps": report.steps,
            "tokens": report.tokens,
            "lr": o.lr,
            "warmup": o.warmup,
            "global_batch": report.global_batch,
            "seq_len": report.seq_len,
            "teacher": o.teacher,
            "kd_weight": o.kd_weight if o.teacher else None,
            "lora": o.lora,
            "final_loss": report.final_loss,
            "eval_ppl_before": report.eval_ppl_before,
            "eval_ppl_after": report.eval_ppl_after,
            "data": o.data,
            "seed": o.seed,
            "resumed_from": report.resumed_from,
        }
        write_manifest(tmp, manifest)
        if "conversion" in manifest:
            manifest["output_name"] = out.name
            (tmp / "README.md").write_text(model_card(manifest), encoding="utf-8")
        od.commit()


def _time_estimate(model, o: UptrainOptions, seq_len: int, steps: int, accelerator) -> float:
    """Seconds for the whole run, from three timed steps after one warm-up step."""
    device = accelerator.device
    opt = make_optimizer(model, o.lr, o.weight_decay)
    ids = torch.randint(0, model.config.vocab_size, (o.batch_size, seq_len), device=device)
    times = []
    for i in range(4):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(o.grad_accum):
            with accelerator.autocast():
                loss = lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return sum(times) / len(times) * steps
