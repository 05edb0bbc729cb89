"""One attention block's conversion: stored tensors -> roles in Linear layout -> the method
-> the output's stored layout. No I/O here."""

from __future__ import annotations

import torch

from ..architectures import KV_ROLES, layouts
from ..errors import ConversionError
from ..io.safetensors_format import tensor_bytes
from ..methods import LayerContext, fold_problem
from ..methods import grouping as head_grouping
from .plan import ConversionPlan, LayerPlan


def _linear_roles(plan: ConversionPlan, by_role: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Conv1D weights transposed to (out, in), fused QKV split into q/k/v."""
    s = plan.shape
    by_role = {r: (t.T if r in plan.family.transposed else t) for r, t in by_role.items()}
    if plan.layout_in:
        by_role = layouts.unfuse_roles(by_role, plan.layout_in, s.n_heads, s.n_kv_heads, s.head_dim)
    return by_role


def _stored_roles(plan: ConversionPlan, by_role: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of _linear_roles, in the output's layout; with --emulate, pooled K/V heads are
    first repeated back to the source's count (query head h still reads group h // (H/G))."""
    s = plan.shape
    n_kv = plan.n_groups
    if plan.emulate:
        r = s.n_kv_heads // plan.n_groups
        by_role = {
            role: (
                t.reshape(plan.n_groups, -1, *t.shape[1:]).repeat_interleave(r, dim=0).reshape(-1, *t.shape[1:])
                if role in KV_ROLES
                else t
            )
            for role, t in by_role.items()
        }
        n_kv = s.n_kv_heads
    if plan.layout_out:
        by_role = layouts.fuse_roles(by_role, plan.layout_out, s.n_heads, n_kv, s.head_dim)
    return {r: (t.T.contiguous() if r in plan.transposed_out else t) for r, t in by_role.items()}


def layer_context(plan: ConversionPlan, lp: LayerPlan, roles: list[str], moment: torch.Tensor | None) -> LayerContext:
    return LayerContext(
        layer=lp.layer,
        shape=plan.shape,
        n_groups=plan.n_groups,
        seed=plan.seed,
        init_range=plan.init_range,
        names={
            role: lp.inputs[role][0] if role in lp.inputs else f"{lp.inputs['qkv.weight'][0]}#{role}" for role in roles
        },
        rope=plan.rope,
        key_norm=plan.key_norm,
        moment=moment,
    )


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`. One pass: min and max propagate NaN, and an Inf is the min or
    the max (several times faster than isfinite(t).all() on bf16)."""
    if t.numel() == 0:
        return True
    try:
        lo, hi = torch.aminmax(t)
    except RuntimeError:  # a dtype without an aminmax kernel (float8)
        return bool(torch.isfinite(t.to(torch.float16)).all())
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def linear_inputs(plan: ConversionPlan, lp: LayerPlan, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The block's tensors by role, in Linear layout with q/k/v apart; K/V checked finite."""
    by_role: dict[str, torch.Tensor] = {}
    for role, names in lp.inputs.items():
        parts = [tensors[n] for n in names]
        # Per-head module lists ("{head}" roles) are stacked: (n_heads, *per_head_shape).
        by_role[role] = parts[0] if len(names) == 1 and "{head}" not in plan.family.roles[role] else torch.stack(parts)
    by_role = _linear_roles(plan, by_role)
    for role, t in by_role.items():
        if role in KV_ROLES and not all_finite(t):
            name = lp.inputs.get(role, lp.inputs.get("qkv." + role.split(".")[1], ["?"]))[0]
            raise ConversionError(f"{name}: contains NaN or Inf; the checkpoint is damaged, fetch it again.")
    return by_role


def convert_layer(
    plan: ConversionPlan, lp: LayerPlan, tensors: dict[str, torch.Tensor], moment: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """Run the method on one block: (output tensors by output name, the KV heads of each group)."""
    converted, groups = method_roles(plan, lp, tensors, moment)
    return stored_outputs(plan, lp, converted), groups


def method_roles(
    plan: ConversionPlan, lp: LayerPlan, tensors: dict[str, torch.Tensor], moment: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """The method's converted block by role, in Linear layout (what refinement starts from),
    and the KV heads of each group."""
    by_role = linear_inputs(plan, lp, tensors)
    ctx = layer_context(plan, lp, list(by_role), moment)
    s = plan.shape
    groups = head_grouping.contiguous(s.n_kv_heads, plan.n_groups)
    if plan.grouping == "search" and plan.n_groups < s.n_kv_heads:
        groups = head_grouping.search(s.n_kv_heads, plan.n_groups, fold_problem(by_role, ctx).cost)
        # make each group contiguous; a head permutation leaves the function unchanged
        by_role = head_grouping.permute(by_role, [h for g in groups for h in g], s.n_heads, s.n_kv_heads)
    return plan.method.convert_layer(by_role, ctx), groups


def stored_outputs(plan: ConversionPlan, lp: LayerPlan, converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Converted roles (Linear layout) -> output tensors by name, checked against the plan."""
    stored = _stored_roles(plan, converted)
    out: dict[str, torch.Tensor] = {}
    for role, targets in lp.outputs.items():
        t = stored[role]
        parts = list(t.unbind(0)) if "{head}" in plan.family.roles[role] else [t]
        for target, part in zip(targets, parts, strict=True):
            if tuple(part.shape) != target.shape or tensor_bytes(part).nbytes != target.nbytes:
                raise RuntimeError(f"method {plan.method.name} produced {tuple(part.shape)} for {target.name}")
            out[target.name] = part
    return out
