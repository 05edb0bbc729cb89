"""Fused QKV layouts: split a fused projection into q/k/v (rows = output features) and fuse
them back. Kept beside the family table because a wrong interleave still loads — these
are tested on their own.

- concat:  [Q (H*hd) | K (n_kv*hd) | V (n_kv*hd)]            Phi-3, Falcon multi-query, GPT-2
- per_head: for each head h: [q_h | k_h | v_h]  (MHA only)    GPT-NeoX, BLOOM, GPT-BigCode MHA, old Falcon
- grouped: for each KV group: [q x (H/n_kv) | k | v]          Falcon new_decoder_architecture
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def split(w: Tensor, layout: str, n_heads: int, n_kv: int, hd: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, v) with rows (H*hd, ...), (n_kv*hd, ...), (n_kv*hd, ...); works for weights and biases."""
    rest = w.shape[1:]
    if layout == "concat":
        q, k, v = w.split([n_heads * hd, n_kv * hd, n_kv * hd])
        return q, k, v
    if layout == "per_head":
        if n_kv != n_heads:
            raise ValueError("the per-head fused layout holds MHA only")
        parts = w.reshape(n_heads, 3, hd, *rest)  # (head, q/k/v, hd, ...)
        return tuple(parts[:, i].reshape(n_heads * hd, *rest) for i in range(3))  # type: ignore[return-value]
    if layout == "grouped":
        m = n_heads // n_kv
        parts = w.reshape(n_kv, m + 2, hd, *rest)  # (kv group, m queries + k + v, hd, ...)
        q = parts[:, :m].reshape(n_heads * hd, *rest)
        return q, parts[:, m].reshape(n_kv * hd, *rest), parts[:, m + 1].reshape(n_kv * hd, *rest)
    raise ValueError(f"unknown fused layout {layout!r}")


def fuse(q: Tensor, k: Tensor, v: Tensor, layout: str, n_heads: int, n_kv: int, hd: int) -> Tensor:
    """Inverse of `split`."""
    rest = q.shape[1:]
    if layout == "concat":
        return torch.cat([q, k, v])
    if layout == "per_head":
        parts = [x.reshape(n_heads, 1, hd, *rest) for x in (q, k, v)]
        return torch.cat(parts, dim=1).reshape(3 * n_heads * hd, *rest)
    if layout == "grouped":
        m = n_heads // n_kv
        parts = [q.reshape(n_kv, m, hd, *rest), k.reshape(n_kv, 1, hd, *rest), v.reshape(n_kv, 1, hd, *rest)]
        return torch.cat(parts, dim=1).reshape((n_heads + 2 * n_kv) * hd, *rest)
    raise ValueError(f"unknown fused layout {layout!r}")


def fused_rows(layout: str, n_heads: int, n_kv: int, hd: int) -> int:
    return (n_heads + 2 * n_kv) * hd if layout != "per_head" else 3 * n_heads * hd


def unfuse_roles(by_role: dict[str, Tensor], layout: str, n_heads: int, n_kv: int, hd: int) -> dict[str, Tensor]:
    """Replace qkv.weight/qkv.bias by q/k/v roles."""
    out = {r: t for r, t in by_role.items() if not r.startswith("qkv.")}
    for kind in ("weight", "bias"):
        if f"qkv.{kind}" in by_role:
            q, k, v = split(by_role[f"qkv.{kind}"], layout, n_heads, n_kv, hd)
            out |= {f"q.{kind}": q, f"k.{kind}": k, f"v.{kind}": v}
    return out


def fuse_roles(by_role: dict[str, Tensor], layout: str, n_heads: int, n_kv: int, hd: int) -> dict[str, Tensor]:
    """Replace q/k/v roles by qkv.weight/qkv.bias in `layout`."""
    out = {r: t for r, t in by_role.items() if r[0] not in "qkv" or r.startswith(("q.norm", "k.norm"))}
    for kind in ("weight", "bias"):
        if f"q.{kind}" in by_role:
            out[f"qkv.{kind}"] = fuse(
                by_role[f"q.{kind}"], by_role[f"k.{kind}"], by_role[f"v.{kind}"], layout, n_heads, n_kv, hd
            )
    return out
