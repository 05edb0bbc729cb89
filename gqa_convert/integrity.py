"""Integrity checks on a checkpoint before anything runs: index and shards agree, shapes
match config.json, head counts are consistent, every tensor is finite, and the model
loads with AutoModelForCausalLM. Each failure is a CheckFailed (exit 1) naming the fault;
a path that cannot be found or read is a ConversionError (exit 2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .architectures import family_for, head_shape
from .errors import CheckFailed, ConversionError
from .io.source import Source, open_source, read_config, resolve
from .plan import build_plan


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


def refuse_remote_code(config: dict[str, Any], root: Path, trust_remote_code: bool) -> None:
    if config.get("auto_map") and not trust_remote_code:
        raise ConversionError(
            f"{root}: config.json asks for custom model code (auto_map); running the model would execute "
            "that code. Pass --trust-remote-code only if you trust where this checkpoint came from."
        )


def open_checked(spec: str, trust_remote_code: bool = False) -> tuple[Source, list[Check]]:
    """Open a checkpoint and check everything that needs no forward pass."""
    root, _ = resolve(spec)  # exit 2 if missing
    try:
        config = read_config(root)
    except ConversionError as e:
        raise CheckFailed(str(e)) from None
    refuse_remote_code(config, root, trust_remote_code)
    checks: list[Check] = []
    try:
        source = open_source(root)
    except ConversionError as e:
        raise CheckFailed(str(e)) from None
    checks.append(
        Check("index and shards agree", True, f"{len(source.tensors)} tensors in {len(source.weight_files)} file(s)")
    )
    try:
        family = family_for(config)
    except ConversionError:
        checks.append(
            Check(
                "shapes match config.json",
                True,
                f"skipped: model_type {config.get('model_type')!r} is not in the family table",
            )
        )
    else:
        try:
            shape = head_shape(family, config)
            build_plan(source, shape.n_kv_heads)  # checks every layer's q/k/v/o shapes against the config
        except ConversionError as e:
            raise CheckFailed(str(e)) from None
        checks.append(
            Check(
                "shapes match config.json",
                True,
                f"{shape.n_heads} query heads, {shape.n_kv_heads} KV heads x head_dim {shape.head_dim}",
            )
        )
    for name in source.tensors:
        t = source.read(name)
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise CheckFailed(f"{name}: {bad} NaN/Inf value(s); this checkpoint is damaged.")
    checks.append(Check("all tensors finite", True))
    return source, checks


def quiet_transformers() -> None:
    """transformers' own progress bars and warnings would drown ours; our checks report what matters."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(root: Path, dtype: torch.dtype, device: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """AutoModelForCausalLM, refusing a load that left weights missing or unused."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            root, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckFailed(f"{root}: does not load with AutoModelForCausalLM: {str(e).splitlines()[0][:300]}") from None
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in info.get("missing_keys", []) if k not in tied]
    problems = missing or info.get("unexpected_keys") or info.get("mismatched_keys")
    if problems:
        raise CheckFailed(f"{root}: loads with AutoModelForCausalLM but weights do not fit: {sorted(problems)[:3]}")
    return model.to(device).eval()
