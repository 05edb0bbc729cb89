"""`uptrain(...) -> UptrainReport`: the GQA paper's short continued pre-training of a
converted checkpoint, on one device or many (torchrun / accelerate launch, through
Accelerate: DDP, or FSDP from an accelerate config), optionally distilled from the
original MHA model, optionally with LoRA adapters merged back at the end.

The run is a recipe of small steps (`Uptraining`): check every precondition, set up,
resume, train (evaluating as asked), save. Everything that can be wrong with the options,
the data or the output path is found by `check`, before a model is loaded."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..architectures import Family, attention_modules, check_length, context_length, family_for, head_shape
from ..conversion.plan import build_plan
from ..data import blocks, build_stream, check_data, global_batches, iter_documents, token_stream
from ..errors import ConversionError, first_line
from ..evaluation.perplexity import score
from ..io.hf import TORCH_DTYPES, config_dtype, load_model, load_tokenizer, quiet_transformers, refuse_remote_code
from ..io.outdir import OutputDir, writing_errors
from ..io.paths import copy_files, other_files
from ..io.source import Location, open_source, read_config, resolve
from ..manifest import MANIFEST, Manifest, model_card
from ..options import DEFAULT_MAX_SHARD, MAX_TRAIN_SEQ_LEN, check, parse_size
from .costs import CostEstimate, estimate
from .loop import batch_loss, lr_factor, make_optimizer
from .tying import tie_repeated_heads

STATE_SUFFIX = ".uptrain-state"
_MIXED = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


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
    compile_backend: str = "inductor"  # torch.compile's backend (e.g. "aot_eager" or "eager" to debug)
    deterministic: bool = False  # deterministic kernels (cuBLAS, attention, scatter): slower, repeatable on a GPU
    lora: bool = False
    lora_rank: int = 16
    lora_targets: tuple[str, ...] | None = None  # default: the family's attention projections
    load_in_4bit: bool = False
    save_every: int | None = None
    resume: bool = False
    force: bool = False
    trust_remote_code: bool = False
    max_shard_size: str = DEFAULT_MAX_SHARD


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
    tied_groups: int | None = None  # an emulated checkpoint: its repeated K/V heads were kept tied
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
    if steps > 1 << 40:
        raise ConversionError(f"the budget comes to {steps:,} steps; check --tokens / --alpha")
    return steps


def mixed_precision(dtype: str, cuda: bool) -> str:
    """Accelerate's mixed-precision setting for --dtype."""
    if dtype == "auto":
        return "bf16" if cuda else "no"
    if dtype not in TORCH_DTYPES:
        raise ConversionError(f"--dtype {dtype[:40]!r}: choose auto, bf16, fp16 or fp32")
    mode = _MIXED[TORCH_DTYPES[dtype]]
    if mode != "no" and not cuda:
        raise ConversionError(f"--dtype {dtype} needs a GPU; on CPU train in fp32")
    return mode


def _state_dir(out: Path) -> Path:
    return out.parent / (out.name + STATE_SUFFIX)


def _latest_state(state: Path) -> tuple[Path, dict[str, Any]] | None:
    if not state.is_dir():
        return None
    steps = []
    for p in state.iterdir():
        name = p.name
        if name.startswith("step-") and name[5:].isdigit() and (p / "progress.json").is_file():
            steps.append((int(name[5:]), p))
    if not steps:
        return None
    path = max(steps)[1]
    try:
        progress = json.loads((path / "progress.json").read_text())
        kinds = {"step": int, "steps": int, "global_batch": int, "seq_len": int, "scheduler": dict, "history": list}
        for key, kind in kinds.items():
            if not isinstance(progress[key], kind) or isinstance(progress[key], bool):
                raise TypeError(key)
        if not 0 < progress["step"] <= progress["steps"] or not all(isinstance(h, dict) for h in progress["history"]):
            raise ValueError("step")
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise ConversionError(f"--resume: {path / 'progress.json'} is damaged; start without --resume") from None
    return path, progress


class Uptraining:
    """One uptraining run, step by step: check, setup, resume, train, save."""

    def __init__(
        self,
        model: str,
        o: UptrainOptions,
        on_step: Callable[[StepInfo], None] = lambda s: None,
        on_eval: Callable[[int, float], None] = lambda step, ppl: None,
    ) -> None:
        self.spec, self.o, self.on_step, self.on_eval = model, o, on_step, on_eval
        self.started = time.perf_counter()
        self.history: list[dict[str, Any]] = []
        self.start_step = 0

    # -- 1. every precondition, before any model is loaded ---------------------------------
    def check(self, dry_run: bool) -> None:
        o = self.o
        check(
            steps=o.steps,
            tokens=o.tokens,
            alpha=o.alpha,
            pretrain_tokens=o.pretrain_tokens,
            lr=o.lr,
            warmup=o.warmup,
            batch_size=o.batch_size,
            grad_accum=o.grad_accum,
            seq_len=o.seq_len,
            weight_decay=o.weight_decay,
            seed=o.seed,
            kd_weight=o.kd_weight,
            temperature=o.temperature,
            eval_every=o.eval_every,
            eval_tokens=o.eval_tokens,
            lora_rank=o.lora_rank,
            save_every=o.save_every,
        )
        self.shard_bytes = parse_size(o.max_shard_size)
        self.where: Location = resolve(self.spec)
        self.root = self.where.root
        self.config = read_config(self.root)
        refuse_remote_code(self.config, self.root, o.trust_remote_code)
        self.family: Family = family_for(self.config)
        self.shape = head_shape(self.family, self.config)
        # the config against the tensor headers, before transformers allocates anything from it
        build_plan(open_source(self.root), self.shape.n_kv_heads)
        self.manifest = Manifest.read(self.root)
        check_data(o.data)
        self.seq_len = o.seq_len or min(context_length(self.family, self.config), MAX_TRAIN_SEQ_LEN)
        if self.family.objective == "seq2seq" and self.seq_len < 4:
            raise ConversionError(
                f"--seq-len must be at least 4 for {self.family.name} (sequences are split in halves)"
            )
        check_length(self.family, self.config, self.seq_len, "--seq-len")
        if o.eval_data:
            check_data(o.eval_data, "--eval-data")
        if o.load_in_4bit and not o.lora:
            raise ConversionError("--load-in-4bit trains adapters only: add --lora")
        self.lora_targets = tuple(o.lora_targets or attention_modules(self.family))
        self.tied = self.manifest.conversion.kv_heads_after if self.manifest and self.manifest.emulated else None
        if self.tied and o.lora and set(self.lora_targets) & set(_kv_modules(self.family)):
            raise ConversionError(
                "--lora on the K/V projections of an emulated checkpoint would untie its repeated K/V heads; "
                f"choose --lora-targets without {', '.join(_kv_modules(self.family))}, or train without --lora"
            )
        if not str(o.out).strip():
            raise ConversionError("--out is empty; name the output directory (an unset shell variable?)")
        self.out = Path(o.out).absolute()
        self.state_dir = _state_dir(self.out)
        if not dry_run:
            self.outdir = OutputDir(self.out, self.root, o.force or (o.resume and self.out.exists()))
            self.outdir.check()
            self.outdir.check_writable()
            if o.resume and _latest_state(self.state_dir) is None:
                raise ConversionError(f"--resume: no saved state in {self.state_dir}; start without --resume")
            if self.state_dir.exists() and not self.state_dir.is_dir():
                raise ConversionError(
                    f"{self.state_dir} exists and is not a directory; remove it or choose another --out"
                )
        self.copied = other_files(self.root, {"config.json", MANIFEST, "README.md"}, hub=self.where.hub_id is not None)
        self.teacher_root = None
        if o.teacher:
            self.teacher_root = resolve(o.teacher).root
            t_config = read_config(self.teacher_root)
            refuse_remote_code(t_config, self.teacher_root, o.trust_remote_code)
            t_family = family_for(t_config)
            if t_family.objective != self.family.objective:
                raise ConversionError(f"--teacher: a {t_family.name} model cannot teach a {self.family.name} model")
            t_vocab, vocab = t_config.get("vocab_size"), self.config.get("vocab_size")
            if t_vocab is not None and vocab is not None and t_vocab != vocab:
                raise ConversionError(f"--teacher has a vocabulary of {t_vocab}, the model {vocab}: they must match")

    # -- 2. accelerator, models, optimizer -------------------------------------------------
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        o = self.o
        quiet_transformers()
        logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)  # "removed shared tensor": tied embeddings
        cuda = torch.cuda.is_available()
        self.accelerator = Accelerator(mixed_precision=mixed_precision(o.dtype, cuda), cpu=not cuda)
        self.device = str(self.accelerator.device)
        self.world = self.accelerator.num_processes
        self.global_batch = o.batch_size * o.grad_accum * self.world
        self.steps = resolve_steps(o, self.global_batch * self.seq_len)
        self.warmup = o.warmup if o.warmup is not None else min(200, max(1, self.steps // 20))
        if self.tied and self.accelerator.distributed_type.name == "FSDP":
            raise ConversionError(
                "uptrain: keeping an emulated checkpoint's K/V heads tied is not supported under FSDP"
            )
        set_seed(o.seed)
        if o.deterministic:  # before any cuBLAS handle exists: it reads CUBLAS_WORKSPACE_CONFIG once
            from transformers import enable_full_determinism

            enable_full_determinism(o.seed, warn_only=True)  # an op with no such kernel warns, not fails
        self.tokenizer = load_tokenizer(self.root, o.trust_remote_code, why="to tokenize the training text")
        self.student = self._load_student()
        if o.gradient_checkpointing:  # transformers 5.x renamed it; older releases have only the first name
            getattr(self.student, "activation_checkpointing_enable", self.student.gradient_checkpointing_enable)()
        if self.tied:
            tie_repeated_heads(self.student, self.family, self.config, self.tied)
        if o.lora:
            self.student = self._apply_lora(self.student)
        self.vocab = self.student.get_input_embeddings().num_embeddings

    def _load_student(self) -> torch.nn.Module:
        o = self.o
        if o.load_in_4bit:
            if self.device == "cpu":
                raise ConversionError("--load-in-4bit needs a CUDA GPU (bitsandbytes)")
            import transformers
            from peft import prepare_model_for_kbit_training
            from transformers import BitsAndBytesConfig

            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
            auto = getattr(transformers, self.family.auto_class)
            model = auto.from_pretrained(self.root, quantization_config=q, attn_implementation="sdpa")
            return prepare_model_for_kbit_training(model)
        model = load_model(self.root, self.family, torch.float32, self.device, o.trust_remote_code)  # fp32 masters
        if o.deterministic:  # SDPA's fused backward kernels accumulate with atomics: eager attention is plain matmuls
            model.set_attn_implementation("eager")
        return model

    def _load_base_full_precision(self) -> torch.nn.Module:
        """The source model again, unquantized in float32 on the CPU: what a 4-bit run's
        adapters are merged into (its frozen base weights were never trained)."""
        base = load_model(self.root, self.family, torch.float32, "cpu", self.o.trust_remote_code)
        if self.tied:
            tie_repeated_heads(base, self.family, self.config, self.tied)
        return base

    def _apply_lora(self, model: torch.nn.Module) -> torch.nn.Module:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConversionError("--lora needs the peft package: pip install 'gqa-convert[uptrain]'") from None
        o = self.o
        cfg = LoraConfig(
            r=o.lora_rank, lora_alpha=2 * o.lora_rank, target_modules=list(self.lora_targets), lora_dropout=0.0
        )
        try:
            return get_peft_model(model, cfg)
        except ValueError as e:
            raise ConversionError(f"--lora-targets {','.join(self.lora_targets)}: {first_line(e)}") from None

    def plan(self, dry_run: bool) -> UptrainReport:
        """The report before training: budget, parameters and memory per GPU."""
        o, student, s = self.o, self.student, self.shape
        n_total = sum(p.numel() for p in student.parameters())
        n_trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
        report = UptrainReport(
            str(self.root),
            str(self.out),
            self.steps,
            self.steps * self.global_batch * self.seq_len,
            self.global_batch,
            self.seq_len,
            o.lr,
            o.teacher,
            o.lora,
            dry_run,
            self.world,
            tied_groups=self.tied,
        )
        report.cost = estimate(
            params_total=n_total,
            params_trained=n_trained,
            weight_bytes=sum(p.numel() * p.element_size() for p in student.parameters()),
            n_layers=s.n_layers,
            hidden=s.hidden,
            n_heads=s.n_heads,
            vocab=self.vocab,
            micro_batch=o.batch_size,
            seq_len=self.seq_len,
            tokens=report.tokens,
            act_bytes=2 if self.accelerator.mixed_precision != "no" else 4,
            checkpointing=o.gradient_checkpointing,
            world_size=self.world,
        )
        if dry_run and self.device.startswith("cuda"):  # a short measured warm-up gives the time estimate
            report.cost.seconds = self._time_estimate()
        return report

    def prepare(self) -> None:
        o = self.o
        self.teacher = None
        if self.teacher_root is not None:
            t_family = family_for(read_config(self.teacher_root))
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
            self.teacher = load_model(self.teacher_root, t_family, dtype, self.device, o.trust_remote_code)
            self.teacher.requires_grad_(False)
        self.opt = make_optimizer(self.student, o.lr, o.weight_decay)
        steps, warmup = self.steps, self.warmup
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, steps, warmup))
        if o.compile:
            self.student = torch.compile(self.student, backend=o.compile_backend)
        self.student, self.opt = self.accelerator.prepare(self.student, self.opt)

    # -- 3. resume ----------------------------------------------------------------------------
    def resume(self) -> None:
        if not self.o.resume:
            if self.state_dir.exists():
                shutil.rmtree(self.state_dir)  # a previous run's state; we start afresh
            return
        latest = _latest_state(self.state_dir)
        if latest is None:
            raise ConversionError(f"--resume: no saved state in {self.state_dir}; start without --resume")
        path, progress = latest
        same = (progress["global_batch"], progress["seq_len"], progress["steps"])
        if same != (self.global_batch, self.seq_len, self.steps):
            raise ConversionError(
                "--resume: batch size, seq-len or budget differ from the interrupted run; use the same options"
            )
        self.accelerator.load_state(str(path))
        self.sched.load_state_dict(progress["scheduler"])
        self.start_step = progress["step"]
        self.history = progress["history"]

    # -- 4. evaluation --------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Held-out perplexity; every process runs it (sharded models need all ranks in forward)."""
        o = self.o
        docs = iter_documents(o.eval_data, separator=o.separator, text_field=o.text_field)
        ids = build_stream(self.tokenizer, docs, o.eval_tokens, bos=self.tokenizer.bos_token_id is not None).ids
        if len(ids) < 2:
            raise ConversionError("--eval-data gives fewer than 2 tokens")
        model = self.student
        was_training = model.training
        model.eval()
        workers = 1 if self.world > 1 else None  # no evaluation threads beside collectives
        s = score(model, self.family, ids, self.seq_len, self.seq_len, o.batch_size, self.device, workers=workers)
        model.train(was_training)
        return s.ppl

    # -- 5. the training loop ---------------------------------------------------------------------
    def batches(self) -> Iterator[torch.Tensor]:
        o = self.o
        stream = token_stream(self.tokenizer, o.data, separator=o.separator, text_field=o.text_field, vocab=self.vocab)
        return global_batches(blocks(stream, self.seq_len), self.global_batch, skip=self.start_step)

    def step(self, ids_all: torch.Tensor) -> tuple[float, float]:
        o, acc, student = self.o, self.accelerator, self.student
        rank, local = acc.process_index, o.batch_size * o.grad_accum
        mine = ids_all[rank * local : (rank + 1) * local]
        total, total_lm = 0.0, 0.0
        for i, ids in enumerate(mine.split(o.batch_size)):
            ids = ids.to(self.device)
            sync = contextlib.nullcontext() if i == o.grad_accum - 1 else acc.no_sync(student)
            with sync, acc.autocast():
                loss, lm = batch_loss(student, ids, self.teacher, o.kd_weight, o.temperature, self.family)
                acc.backward(loss / o.grad_accum)
            total += loss.detach() / o.grad_accum
            total_lm += lm.detach() / o.grad_accum
        acc.clip_grad_norm_(student.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        loss_v, lm_v = acc.reduce(total, "mean").item(), acc.reduce(total_lm, "mean").item()
        if not math.isfinite(loss_v):
            raise ConversionError(
                f"the loss became {loss_v} at step {len([h for h in self.history if 'loss' in h]) + 1}; nothing was "
                "written. Lower --lr, or check the data."
            )
        return loss_v, lm_v

    def train(self, report: UptrainReport) -> None:
        o, steps = self.o, self.steps
        tokens_per_step = self.global_batch * self.seq_len
        batches = self.batches()
        self.student.train()
        t_loop, tokens_done = time.perf_counter(), 0
        for step in range(self.start_step, steps):
            loss_v, lm_v = self.step(next(batches))
            tokens_done += tokens_per_step
            elapsed = time.perf_counter() - t_loop
            info = StepInfo(
                step + 1,
                steps,
                loss_v,
                lm_v,
                self.sched.get_last_lr()[0],
                (step + 1) * tokens_per_step,
                tokens_done / elapsed,
                elapsed,
            )
            self.history.append(
                {
                    "step": info.step,
                    "loss": loss_v,
                    "lm_loss": lm_v,
                    "lr": info.lr,
                    "tokens": info.tokens,
                    "tokens_per_second": round(info.tokens_per_second, 1),
                }
            )
            self.on_step(info)
            if o.eval_data and o.eval_every and info.step % o.eval_every == 0 and info.step < steps:
                ppl = self.evaluate()
                self.history.append({"step": info.step, "eval_ppl": ppl})
                self.on_eval(info.step, ppl)
            if o.save_every and info.step % o.save_every == 0 and info.step < steps:
                self.save_state(info.step)
        report.final_loss = self.history[-1]["loss"] if self.history and "loss" in self.history[-1] else None

    def save_state(self, step: int) -> None:
        acc = self.accelerator
        path = self.state_dir / f"step-{step}"
        with writing_errors(self.state_dir, what="saving the training state"):
            acc.save_state(str(path))
            if acc.is_main_process:
                progress = {
                    "step": step,
                    "steps": self.steps,
                    "scheduler": self.sched.state_dict(),
                    "history": self.history,
                    "global_batch": self.global_batch,
                    "seq_len": self.seq_len,
                }
                (path / "progress.json").write_text(json.dumps(progress))
                saved = sorted(
                    (p for p in self.state_dir.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit()),
                    key=lambda p: int(p.name[5:]),
                )
                for old in saved[:-2]:  # keep the newest two
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    # -- 6. the output ------------------------------------------------------------------------------
    def save(self, report: UptrainReport) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        final = acc.unwrap_model(self.student)
        # gathered on every rank (FSDP shards the weights); LoRA adapters are merged into the base instead
        state_dict = None if self.o.lora else acc.get_state_dict(self.student)
        if acc.is_main_process:
            if self.o.lora and self.o.load_in_4bit:  # a 4-bit base cannot be cast back: merge into the source's
                final = merge_lora_into(final, self._load_base_full_precision())
            elif self.o.lora:
                final = final.merge_and_unload()  # the output stays a stock checkpoint
            report.seconds = time.perf_counter() - self.started
            with writing_errors(self.out):
                self._write_output(final, state_dict, report)
            shutil.rmtree(self.state_dir, ignore_errors=True)
        acc.wait_for_everyone()

    def _write_output(self, model, state_dict, report: UptrainReport) -> None:
        o, od = self.o, self.outdir
        with od as tmp:
            dtype = config_dtype(self.config)
            model = model.to(dtype)
            if state_dict is not None:
                state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
            model.save_pretrained(tmp, state_dict=state_dict, max_shard_size=self.shard_bytes)
            copy_files(self.root, self.copied, tmp)  # the source's own tokenizer and generation config
            (tmp / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in report.history))
            from ..evaluation.plots import plot_training

            plot_training(report.history, tmp / "training.png", title=f"uptraining {self.root.name}")
            manifest = self.manifest or Manifest()
            manifest.uptraining = {
                "from": str(self.root),
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
            if self.tied:
                manifest.uptraining["tied_kv_groups"] = self.tied
            manifest.output_name = self.out.name
            manifest.write(tmp)
            if manifest.conversion is not None:
                (tmp / "README.md").write_text(model_card(manifest), encoding="utf-8")
            od.commit()

    def _time_estimate(self) -> float:
        """Seconds for the whole run, from three timed steps after one warm-up step."""
        o, acc, model = self.o, self.accelerator, self.student
        opt = make_optimizer(model, o.lr, o.weight_decay)
        ids = torch.randint(0, self.vocab, (o.batch_size, self.seq_len), device=acc.device)
        times = []
        for i in range(4):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(o.grad_accum):
                with acc.autocast():
                    loss, _ = batch_loss(model, ids, family=self.family)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t)
        return sum(times) / len(times) * self.steps


def _kv_modules(family: Family) -> tuple[str, ...]:
    """The attention modules that hold K or V weights (fused QKV modules included)."""
    roles = ("qkv.weight", "k.weight", "v.weight")
    return tuple(family.roles[r].removesuffix(".weight") for r in roles if r in family.roles)


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
    run = Uptraining(model, o, on_step, on_eval)
    run.check(dry_run)
    if dry_run:
        run.setup()
        return run.plan(dry_run)
    if int(os.environ.get("RANK", "0")) == 0:  # the main process of a launch holds it for all
        run.outdir.acquire()  # held until the output is written: one run per --out (and its saved state)
    try:
        return _run(run, o, on_start, on_eval)
    finally:
        run.outdir.release()


def _run(run: Uptraining, o: UptrainOptions, on_start, on_eval) -> UptrainReport:
    run.setup()
    report = run.plan(False)
    run.prepare()
    run.resume()
    report.resumed_from = run.start_step
    if o.eval_data:
        report.eval_ppl_before = run.evaluate()
        if run.start_step == 0:
            run.history.append({"step": 0, "eval_ppl": report.eval_ppl_before})
        on_eval(run.start_step, report.eval_ppl_before)
    on_start(report)
    run.train(report)
    if o.eval_data:
        report.eval_ppl_after = run.evaluate()
        run.history.append({"step": run.steps, "eval_ppl": report.eval_ppl_after})
        on_eval(run.steps, report.eval_ppl_after)
    report.history = run.history
    run.save(report)
    report.seconds = time.perf_counter() - run.started
    return report


def merge_lora_into(trained: torch.nn.Module, base: torch.nn.Module) -> torch.nn.Module:
    """`base` with the LoRA adapters of `trained` (a peft model) merged into its weights.
    For a 4-bit run: peft's own merge would re-quantize the sum, and a bitsandbytes model
    cannot be cast back to the checkpoint's dtype; the frozen base is the source itself."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapters = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(trained).items()}
    merged = get_peft_model(base, trained.peft_config["default"])
    result = set_peft_model_state_dict(merged, adapters)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"LoRA adapters do not fit the base model: {result.unexpected_keys[:3]}")  # a bug
    return merged.merge_and_unload()
