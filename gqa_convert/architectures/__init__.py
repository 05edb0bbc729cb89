"""Architecture facts, as data: the family table (families.py), what a checkpoint's config
says through it (shape.py), fused QKV layouts (layouts.py) and KV cache arithmetic."""

from .families import (
    FAMILIES,
    KV_ROLES,
    Q_ROLES,
    REQUIRED_ROLES,
    Family,
    attention_modules,
    families_line,
    family_for,
    key_module,
    key_role,
    module_path,
    refine_refusal,
    required_roles,
)
from .shape import (
    HeadShape,
    check_length,
    context_length,
    fused_layout,
    gqa_native,
    head_shape,
    normalises_keys,
    rotary_dims,
    valid_groups,
)

__all__ = [
    "FAMILIES",
    "KV_ROLES",
    "Q_ROLES",
    "REQUIRED_ROLES",
    "Family",
    "HeadShape",
    "check_length",
    "attention_modules",
    "context_length",
    "families_line",
    "family_for",
    "fused_layout",
    "gqa_native",
    "head_shape",
    "key_module",
    "key_role",
    "module_path",
    "normalises_keys",
    "refine_refusal",
    "required_roles",
    "rotary_dims",
    "valid_groups",
]
