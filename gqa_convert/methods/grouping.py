"""Which KV heads share a group. Contiguous grouping is arbitrary; `search` looks for the
assignment to equal-size groups with the least conversion error, and the heads are then
permuted so each group is contiguous — a permutation changes nothing about the function."""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations

import torch

from ..architectures import KV_ROLES, Q_ROLES

Tensor = torch.Tensor


def contiguous(n_kv: int, n_groups: int) -> list[list[int]]:
    r = n_kv // n_groups
    return [list(range(g * r, (g + 1) * r)) for g in range(n_groups)]


def search(n_kv: int, n_groups: int, cost: Callable[[list[int]], float], max_rounds: int = 50) -> list[list[int]]:
    """Greedy start (grow each group from its most compatible seed), then pairwise swaps
    between groups while any lowers the total cost. Costs are cached per group."""
    r = n_kv // n_groups
    cache: dict[tuple[int, ...], float] = {}

    def c(group: list[int]) -> float:
        key = tuple(sorted(group))
        if key not in cache:
            cache[key] = cost(list(key))
        return cache[key]

    def total(groups: list[list[int]]) -> float:
        return sum(c(g) for g in groups)

    greedy: list[list[int]] = []
    left = list(range(n_kv))
    while left:
        group = [left.pop(0)]
        while len(group) < r:
            best = min(left, key=lambda h: c(group + [h]))
            group.append(best)
            left.remove(best)
        greedy.append(group)
    groups = min((contiguous(n_kv, n_groups), greedy), key=total)
    for _ in range(max_rounds):
        best_gain, best_move = 1e-12, None
        for i, j in combinations(range(n_groups), 2):
            for a in groups[i]:
                for b in groups[j]:
                    gi = [h for h in groups[i] if h != a] + [b]
                    gj = [h for h in groups[j] if h != b] + [a]
                    gain = c(groups[i]) + c(groups[j]) - c(gi) - c(gj)
                    if gain > best_gain:
                        best_gain, best_move = gain, (i, j, gi, gj)
        if best_move is None:
            break
        i, j, gi, gj = best_move
        groups[i], groups[j] = gi, gj
    return [sorted(g) for g in sorted(groups, key=min)]


def permute(tensors: dict[str, Tensor], order: list[int], n_heads: int, n_kv: int) -> dict[str, Tensor]:
    """Reorder KV heads to `order` (and each one's query heads with it): q rows, o columns,
    k/v rows, per-head norms. The attention function is unchanged."""
    m = n_heads // n_kv
    q_order = [k * m + i for k in order for i in range(m)]
    out = {}
    for role, t in tensors.items():
        if role in KV_ROLES:
            out[role] = t.reshape(n_kv, -1, *t.shape[1:])[order].reshape(t.shape)
        elif role in Q_ROLES:
            out[role] = t.reshape(n_heads, -1, *t.shape[1:])[q_order].reshape(t.shape)
        elif role == "o.weight":
            out[role] = t.reshape(t.shape[0], n_heads, -1)[:, q_order].reshape(t.shape)
        else:
            out[role] = t
    return out
