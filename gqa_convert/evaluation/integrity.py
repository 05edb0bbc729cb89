"""Integrity checks on a checkpoint before anything runs: index and shards agree, shapes
match config.json, head counts are consistent, every tensor is finite. Each failure is a
CheckFailed (exit 1) naming the fault; a path that cannot be found, or a checkpoint of a
family gqa-convert does not know, is a ConversionError (exit 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..architectures import Family, family_for, head_shape
from ..conversion.plan import build_plan
from ..errors import CheckFailed, ConversionError
from ..io.hf import refuse_remote_code
from ..io.source import Source, open_source, read_config, resolve


@dataclass
class Check:
    """One integrity check that passed (a failed one raises CheckFailed instead)."""

    name: str
    detail: str = ""


def _finite(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.to(torch.float16)  # isfinite has no float8 kernel
    return torch.isfinite(t)


def open_checked(spec: str, trust_remote_code: bool = False) -> tuple[Source, Family, list[Check]]:
    """Open a checkpoint and check everything that needs no forward pass."""
    root = resolve(spec).root  # exit 2 if missing
    try:
        config = read_config(root)
    except ConversionError as e:
        raise CheckFailed(str(e)) from None
    refuse_remote_code(config, root, trust_remote_code)
    family = family_for(config)  # exit 2: verify needs to know the architecture
    checks: list[Check] = []
    try:
        source = open_source(root)
    except ConversionError as e:
        raise CheckFailed(str(e)) from None
    checks.append(
        Check("index and shards agree", f"{len(source.tensors)} tensors in {len(source.weight_files)} file(s)")
    )
    try:
        shape = head_shape(family, config)
        build_plan(source, shape.n_kv_heads)  # checks every layer's q/k/v/o shapes against the config
    except ConversionError as e:
        raise CheckFailed(str(e)) from None
    checks.append(
        Check(
            "shapes match config.json",
            f"{shape.n_heads} query heads, {shape.n_kv_heads} KV heads x head_dim {shape.head_dim}",
        )
    )
    for name in source.tensors:
        t = source.read(name)
        if t.is_floating_point() and not _finite(t).all():
            bad = (~_finite(t)).sum().item()
            raise CheckFailed(f"{name}: {bad} NaN/Inf value(s); this checkpoint is damaged.")
    checks.append(Check("all tensors finite"))
    return source, family, checks
