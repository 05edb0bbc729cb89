"""Facts about one checkpoint read from its config through its family entry: head counts,
head_dim, rotary dims, context length, and which layout it is stored in."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConversionError
from .families import Family


@dataclass(frozen=True)
class HeadShape:
    """Head counts of one checkpoint, read from its config."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int


def _positive_int(config: dict[str, Any], key: str, where: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:39] + "…"
        raise ConversionError(
            f"{where}: config.json has no valid {key!r} (found {shown}); "
            "it must be a positive integer for gqa-convert to know the head layout."
        )
    return value


def gqa_native(family: Family, config: dict[str, Any]) -> bool:
    return family.native_gqa or bool(family.gqa_flag and config.get(family.gqa_flag))


def head_shape(family: Family, config: dict[str, Any], where: str = "config.json") -> HeadShape:
    n_heads = _positive_int(config, family.heads_key, where)
    hidden = _positive_int(config, family.hidden_key, where)
    n_layers = _positive_int(config, family.layers_key, where)
    if not gqa_native(family, config):  # MHA, or a multi-query layout flag
        n_kv = 1 if family.mqa_flag and config.get(family.mqa_flag) else n_heads
    elif config.get(family.kv_heads_key) is None:  # old Llama configs predate GQA: MHA
        n_kv = n_heads
    else:
        n_kv = _positive_int(config, family.kv_heads_key, where)
    head_dim = config.get(family.head_dim_key) if family.head_dim_key else None
    if head_dim is None:
        if hidden % n_heads:
            raise ConversionError(f"{where}: hidden size {hidden} is not divisible by {n_heads} heads")
        head_dim = hidden // n_heads
    elif not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0:
        raise ConversionError(f"{where}: invalid head_dim {str(head_dim)[:40]!r}")
    if n_heads % n_kv:
        raise ConversionError(
            f"{where}: {family.kv_heads_key}={n_kv} does not divide {family.heads_key}={n_heads}; "
            "the config is inconsistent."
        )
    return HeadShape(n_layers, hidden, n_heads, n_kv, head_dim)


def valid_groups(n_heads: int, n_kv: int) -> list[int]:
    """Every G that divides both head counts (the divisors of their gcd, found in O(sqrt))."""
    g = math.gcd(n_heads, n_kv)
    small = [d for d in range(1, math.isqrt(g) + 1) if g % d == 0]
    return sorted(set(small + [g // d for d in small]))


def rotary_dims(family: Family, config: dict[str, Any], head_dim: int) -> int:
    """How many dims of each head RoPE rotates (partial rotary for Phi, StableLM, ...)."""
    if family.rope_layout == "none":
        return 0
    if family.rotary_dim_key and config.get(family.rotary_dim_key):
        dims = config[family.rotary_dim_key]
        if not isinstance(dims, int) or isinstance(dims, bool) or not 0 < dims <= head_dim:
            raise ConversionError(f"config.json: {family.rotary_dim_key} {str(dims)[:40]!r} is not in 1..{head_dim}")
        return dims
    factor = config.get("partial_rotary_factor")
    if factor is None:
        rope = config.get("rope_parameters")
        factor = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    if factor is None:
        factor = family.default_partial_rotary
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor <= 1:
        raise ConversionError(f"config.json: partial_rotary_factor {str(factor)[:40]!r} is not in [0, 1]")
    return int(head_dim * factor) // 2 * 2


def normalises_keys(family: Family, config: dict[str, Any]) -> bool:
    return family.key_norm == "always" or bool(family.key_norm and config.get(family.key_norm))


def fused_layout(family: Family, config: dict[str, Any]) -> str | None:
    """The fused QKV layout of this checkpoint (None for separate projections)."""
    if family.fused != "auto":
        return family.fused
    if gqa_native(family, config):
        return "grouped"
    return "concat" if family.mqa_flag and config.get(family.mqa_flag) else "per_head"


def context_length(family: Family, config: dict[str, Any]) -> int:
    """The longest sequence the model was built for: the family's context key, or its default."""
    value = config.get(family.context_key) if family.context_key else None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return family.default_context


def check_length(family: Family, config: dict[str, Any], length: int, what: str) -> None:
    """Refuse a sequence longer than a learned position table (GPT-2, OPT, ...): it would index
    past the table. Rotary and relative positions run longer (with lower quality), as transformers allows."""
    if family.learned_positions and length > context_length(family, config):
        raise ConversionError(
            f"{what} is {length} tokens, but {family.name} has learned positions for "
            f"{context_length(family, config)} only; use at most that many"
        )
