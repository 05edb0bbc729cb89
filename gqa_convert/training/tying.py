"""Keeping an emulated GQA checkpoint GQA while it trains.

An `--emulate` output stores each pooled K/V head r times. Trained as it is, the copies
would drift apart and the model would be MHA again. Here every copy's gradient is replaced
by the sum over its group's copies — exactly the gradient of one shared head — so copies
that start equal stay equal under any optimizer that updates elementwise (AdamW)."""

from __future__ import annotations

import torch

from ..architectures import KV_ROLES, Family, fused_layout, head_shape, layouts, module_path
from ..errors import ConversionError


def _tie_rows(g: torch.Tensor, n_groups: int, r: int) -> torch.Tensor:
    """(n_kv*hd, ...) rows: each group's r heads get the sum of their gradients."""
    grouped = g.reshape(n_groups, r, -1, *g.shape[1:])  # (G, r, hd, ...)
    return grouped.sum(1, keepdim=True).expand_as(grouped).reshape(g.shape)


def _hook(family: Family, role: str, layout: str | None, n_heads: int, n_kv: int, hd: int, n_groups: int):
    r = n_kv // n_groups
    transposed = role in family.transposed

    def tie(grad: torch.Tensor) -> torch.Tensor:
        g = grad.T if transposed else grad
        if role.startswith("qkv."):
            q, k, v = layouts.split(g, layout, n_heads, n_kv, hd)
            g = layouts.fuse(q, _tie_rows(k, n_groups, r), _tie_rows(v, n_groups, r), layout, n_heads, n_kv, hd)
        else:
            g = _tie_rows(g, n_groups, r)
        return g.T.contiguous() if transposed else g.contiguous()

    return tie


def tie_repeated_heads(
    model: torch.nn.Module, family: Family, config: dict, n_groups: int
) -> list[torch.utils.hooks.RemovableHandle]:
    """Register gradient hooks that keep each group's repeated K/V heads equal."""
    shape = head_shape(family, config)
    layout = fused_layout(family, config)
    params = dict(model.named_parameters())
    handles = []
    for layer in range(shape.n_layers):
        for template in family.attn:
            prefix = module_path(family, template.format(layer=layer)) + "."
            for role, rel in family.roles.items():
                if not (role in KV_ROLES or role.startswith("qkv.")):
                    continue
                if "{head}" in rel:
                    raise ConversionError(f"uptrain: per-head {role} modules cannot be tied (not an emulated family)")
                p = params.get(prefix + rel)
                if p is None or not p.requires_grad:
                    continue
                fn = _hook(family, role, layout, shape.n_heads, shape.n_kv_heads, shape.head_dim, n_groups)
                handles.append(p.register_hook(fn))
    if not handles:
        raise ConversionError("uptrain: found no K/V parameters to keep tied in this emulated checkpoint")
    return handles
