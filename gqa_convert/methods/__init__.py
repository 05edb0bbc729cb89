"""How K/V heads become groups. Each method maps one layer's attention tensors, by role,
to the converted layer's tensors; the converter handles everything else."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..architectures import KV_ROLES, HeadShape
from ..architectures.rope import Rope, rope_layout
from ..errors import ConversionError, shown
from .fold import FoldProblem
from .pooling import first_heads, pool_heads, random_heads


@dataclass(frozen=True)
class LayerContext:
    layer: int
    shape: HeadShape  # of the source
    n_groups: int
    seed: int
    init_range: float
    names: dict[str, str]  # role -> full tensor name, for seeding and messages
    rope: Rope | None = None
    key_norm: bool = False  # a per-head norm between k_proj and RoPE (no exact fold through it)
    moment: torch.Tensor | None = None  # second moment of [x; 1], x the attention input; None: data-free


def fold_problem(tensors: dict[str, torch.Tensor], ctx: LayerContext) -> FoldProblem:
    s = ctx.shape
    rope = ctx.rope or rope_layout(s.head_dim, s.head_dim, "half")
    return FoldProblem(tensors, s.n_heads, s.n_kv_heads, s.head_dim, ctx.moment, rope, ctx.key_norm)


LayerFn = Callable[[dict[str, torch.Tensor], LayerContext], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    convert_layer: LayerFn
    needs_calib: bool = False  # refuses to run without --calib
    # a few elementwise ops per block: one intra-op thread, so the other cores hash and write
    # (with more, torch's worker threads spin between ops and take CPU from the hash threads)
    light: bool = False


def _per_kv_role(fn: Callable[[str, torch.Tensor, LayerContext], torch.Tensor]) -> LayerFn:
    """Apply `fn` to every KV-indexed tensor of the layer; q and o stay as they are."""

    def convert_layer(tensors: dict[str, torch.Tensor], ctx: LayerContext) -> dict[str, torch.Tensor]:
        return {role: fn(role, t, ctx) if role in KV_ROLES else t for role, t in tensors.items()}

    return convert_layer


def _fold(tensors: dict[str, torch.Tensor], ctx: LayerContext) -> dict[str, torch.Tensor]:
    r = ctx.shape.n_kv_heads // ctx.n_groups
    return fold_problem(tensors, ctx).convert([list(range(g * r, (g + 1) * r)) for g in range(ctx.n_groups)])


def _mean(role: str, t: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    return pool_heads(t, ctx.shape.n_kv_heads, ctx.n_groups)


def _first(role: str, t: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    return first_heads(t, ctx.shape.n_kv_heads, ctx.n_groups)


def _random(role: str, t: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    # Fresh heads initialised as transformers would: normal weights, zero biases, unit norms.
    fill = 0.0 if role.endswith(".bias") else 1.0 if role == "k.norm" else None
    return random_heads(
        t, ctx.shape.n_kv_heads, ctx.n_groups, std=ctx.init_range, seed=ctx.seed, name=ctx.names[role], fill=fill
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("mean", "mean of each group's K/V heads (the GQA paper's method)", _per_kv_role(_mean), light=True),
        Method("first", "each group keeps its first K/V head (paper's ablation)", _per_kv_role(_first), light=True),
        Method("random", "fresh random K/V heads, seeded (paper's ablation)", _per_kv_role(_random), light=True),
        Method(
            "fold",
            "best shared K/V projection per group, per-head corrections folded into q/o; RoPE-aware; "
            "uses --calib statistics when given",
            _fold,
        ),
        # The converter refines fold's blocks through the model (conversion/refine.py); alone, a block is fold's.
        Method(
            "refine",
            "fold's solution (with --calib), then each layer's attention fitted in order through the converted "
            "model to the source layer's output, with a held-out slice",
            _fold,
            needs_calib=True,
        ),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConversionError(f"unknown method {shown(name)}; choose one of: {', '.join(METHODS)}") from None
