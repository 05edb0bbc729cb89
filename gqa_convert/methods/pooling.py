"""Pure tensor math for turning KV heads into groups: the paper's mean pooling and its
two ablation baselines. No I/O here, so it can be tested on tiny tensors."""

from __future__ import annotations

import zlib

import torch


def _grouped(weight: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """View rows of `weight` as (n_out groups, n_in/n_out heads, rows per head, ...)."""
    if n_in % n_out:
        raise ValueError(f"{n_out} groups do not divide {n_in} heads")
    if weight.shape[0] % n_in:
        raise ValueError(f"axis 0 of shape {tuple(weight.shape)} is not a multiple of {n_in} heads")
    rows = weight.shape[0] // n_in
    # (n_in * rows, *rest) -> (n_out, n_in // n_out, rows, *rest); heads of a group are
    # contiguous, matching transformers' repeat_kv (query head h reads KV head h // (H/G)).
    return weight.reshape(n_out, n_in // n_out, rows, *weight.shape[1:])


def pool_heads(weight: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """Mean of each group's heads along axis 0: (n_in*rows, ...) -> (n_out*rows, ...).

    Pools in float32 (bf16/fp16 sums lose bits) and casts back to the input's dtype.
    """
    pooled = _grouped(weight.float(), n_in, n_out).mean(dim=1)
    return pooled.reshape(-1, *weight.shape[1:]).to(weight.dtype)


def first_heads(weight: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """Each group keeps its first head (the paper's "first head" baseline)."""
    return _grouped(weight, n_in, n_out)[:, 0].reshape(-1, *weight.shape[1:]).clone()


def random_heads(
    weight: torch.Tensor, n_in: int, n_out: int, *, std: float, seed: int, name: str, fill: float | None = None
) -> torch.Tensor:
    """Fresh heads (the paper's "random init" baseline): N(0, std) weights, or a constant
    `fill` (0 for biases, 1 for norm scales). Seeded by (seed, tensor name), so the
    result does not depend on the order tensors are converted in."""
    shape = (weight.shape[0] // n_in * n_out, *weight.shape[1:])
    if fill is not None:
        return torch.full(shape, fill, dtype=weight.dtype)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(weight.dtype)
