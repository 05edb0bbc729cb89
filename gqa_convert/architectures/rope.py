"""Which dims of a head RoPE rotates together: the rotary planes of each family's layout."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rope:
    planes: tuple[tuple[int, int], ...]  # (a, b) dims of each rotary pair within a head
    linear: tuple[int, ...]  # head dims that are not rotated


def rope_layout(head_dim: int, rotary_dims: int, layout: str) -> Rope:
    """`half`: pairs (i, i + rot/2), as transformers' rotate_half; `interleaved`: (2i, 2i+1)."""
    half = rotary_dims // 2
    if layout == "interleaved":
        planes = tuple((2 * i, 2 * i + 1) for i in range(half))
    else:
        planes = tuple((i, i + half) for i in range(half))
    return Rope(planes, tuple(range(2 * half, head_dim)))
