"""The training loop shared by uptraining and the demo: AdamW, linear warmup then cosine
decay, gradient clipping, optional distillation from a teacher."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..architectures import Family
from ..architectures.objectives import predict


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Multiplier on the peak learning rate at `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # No weight decay on norms, biases and embeddings' 1-D parameters, as is usual.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of aligned (batch, T, vocab) logits and (batch, T) targets, in float32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on softened distributions, scaled by T^2 (Hinton et al.)."""
    t = temperature
    s_logp = F.log_softmax(student.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean") * t * t


def batch_loss(
    model: torch.nn.Module,
    ids: torch.Tensor,
    teacher: torch.nn.Module | None = None,
    kd_weight: float = 0.5,
    temperature: float = 1.0,
    family: Family | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, LM loss) under the family's objective (causal when None): the LM
    loss, mixed with distillation from `teacher` if given."""
    logits, targets = predict(model, family, ids)
    lm = lm_loss(logits, targets)
    if teacher is None:
        return lm, lm
    with torch.no_grad():
        t_logits, _ = predict(teacher, family, ids)
    return (1 - kd_weight) * lm + kd_weight * kd_loss(logits, t_logits, temperature), lm


@dataclass
class StepResult:
    step: int
    loss: float  # the loss optimised (LM, or LM mixed with KD)
    lm_loss: float
    lr: float
    tokens: int


def train(
    model: torch.nn.Module,
    batches: Iterator[torch.Tensor],
    *,
    steps: int,
    lr: float,
    warmup: int = 0,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    teacher: torch.nn.Module | None = None,
    kd_weight: float = 0.5,
    temperature: float = 1.0,
    device: str = "cpu",
    on_step: Callable[[StepResult], None] = lambda r: None,
) -> list[StepResult]:
    """Full-parameter training for `steps` steps on (batch, seq) token batches."""
    model.train()
    opt = make_optimizer(model, lr, weight_decay)
    history = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup)
        ids = next(batches).to(device)
        loss, lm = batch_loss(model, ids, teacher, kd_weight, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        r = StepResult(step + 1, loss.item(), lm.item(), opt.param_groups[0]["lr"], ids.numel())
        history.append(r)
        on_step(r)
    model.eval()
    return history
