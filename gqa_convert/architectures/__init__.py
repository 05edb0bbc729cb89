"""What differs between model families, kept as data: one `Family` entry per family.

A family names where each layer's attention tensors live (by role), which config keys
hold the head counts, and which config settings it cannot convert. The converter and
the methods only ever see roles ("q.weight", "k.bias", ...), never family names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConversionError

# Roles whose rows (axis 0) are indexed by KV head: these are what GQA shares.
KV_ROLES = ("k.weight", "k.bias", "v.weight", "v.bias", "k.norm")
# Roles indexed by query head: rows of q, columns (axis 1) of o.
Q_ROLES = ("q.weight", "q.bias", "q.norm")
O_ROLES = ("o.weight",)
REQUIRED_ROLES = ("q.weight", "k.weight", "v.weight", "o.weight")

_SEPARATE_QKVO = {
    "q.weight": "q_proj.weight",
    "q.bias": "q_proj.bias",
    "k.weight": "k_proj.weight",
    "k.bias": "k_proj.bias",
    "v.weight": "v_proj.weight",
    "v.bias": "v_proj.bias",
    "o.weight": "o_proj.weight",
}


@dataclass(frozen=True)
class Family:
    """One model family's attention layout.

    roles: role -> tensor name relative to the layer's attention prefix. A name with
        "{head}" is a per-head module list (one tensor per KV head), stacked on axis 0
        for conversion and split back afterwards.
    refuse: (config key, value, reason) triples for settings this entry cannot convert.
    """

    name: str
    model_types: tuple[str, ...]
    roles: dict[str, str]
    attn_prefixes: tuple[str, ...] = ("model.layers.{layer}.self_attn.", "layers.{layer}.self_attn.")
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"
    layers_key: str = "num_hidden_layers"
    hidden_key: str = "hidden_size"
    head_dim_key: str | None = "head_dim"
    layout: str = "separate q/k/v/o"
    native_gqa: bool = True
    rope_layout: str = "half"  # rotary pairs: "half" (i, i + rot/2) or "interleaved" (2i, 2i+1)
    default_partial_rotary: float = 1.0  # fraction of head_dim rotated when the config does not say
    key_norm: str | None = None  # config flag (or "always") for a per-head norm between k_proj and RoPE
    refuse: tuple[tuple[str, Any, str], ...] = field(default=())
    notes: str = ""


FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",), _SEPARATE_QKVO, notes="Llama 1/2/3, and checkpoints in its format"),
    Family("Mistral", ("mistral",), _SEPARATE_QKVO),
    Family("Mixtral", ("mixtral",), _SEPARATE_QKVO),
    Family("Qwen2", ("qwen2",), _SEPARATE_QKVO, notes="q/k/v biases pooled like the weights"),
    Family("Qwen3", ("qwen3",), _SEPARATE_QKVO, key_norm="always", notes="q/k norms act on head_dim and are shared"),
    Family("Gemma", ("gemma",), _SEPARATE_QKVO),
    Family("Gemma2", ("gemma2",), _SEPARATE_QKVO),
    Family("OLMo", ("olmo",), _SEPARATE_QKVO),
    Family(
        "StableLM",
        ("stablelm",),
        {
            **_SEPARATE_QKVO,
            "k.norm": "k_layernorm.norms.{head}.weight",
            "q.norm": "q_layernorm.norms.{head}.weight",
        },
        default_partial_rotary=0.25,
        key_norm="qk_layernorm",
        notes="per-head k layernorms (qk_layernorm) pooled like the K heads",
    ),
    Family("Starcoder2", ("starcoder2",), _SEPARATE_QKVO),
    Family("Granite", ("granite",), _SEPARATE_QKVO),
    Family(
        "Cohere",
        ("cohere",),
        {**_SEPARATE_QKVO, "k.norm": "k_norm.weight", "q.norm": "q_norm.weight"},
        rope_layout="interleaved",
        key_norm="use_qk_norm",
        notes="per-head k norm (use_qk_norm) pooled like the K heads",
    ),
    Family(
        "Phi",
        ("phi",),
        {**_SEPARATE_QKVO, "o.weight": "dense.weight"},
        default_partial_rotary=0.5,
        key_norm="qk_layernorm",
        notes="Phi 1/1.5/2: partial rotary, biases, `dense` output",
    ),
)

_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_for(config: dict[str, Any]) -> Family:
    """The family entry for a config.json dict, or a ConversionError naming the supported ones."""
    model_type = config.get("model_type")
    family = _BY_MODEL_TYPE.get(model_type or "")
    if family is None:
        what = f"model_type {model_type!r}" if model_type else "a config.json without model_type"
        raise ConversionError(
            f"unsupported architecture: {what}. gqa-convert converts these families: "
            f"{', '.join(supported_model_types())}."
        )
    for key, value, reason in family.refuse:
        if config.get(key) == value:
            raise ConversionError(f"cannot convert this {family.name} checkpoint: {reason}")
    return family


@dataclass(frozen=True)
class HeadShape:
    """Head counts of one checkpoint, read from its config."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


def _positive_int(config: dict[str, Any], key: str, where: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConversionError(
            f"{where}: config.json has no valid {key!r} (found {value!r}); "
            "it must be a positive integer for gqa-convert to know the head layout."
        )
    return value


def head_shape(family: Family, config: dict[str, Any], where: str = "config.json") -> HeadShape:
    n_heads = _positive_int(config, family.heads_key, where)
    hidden = _positive_int(config, family.hidden_key, where)
    n_layers = _positive_int(config, family.layers_key, where)
    # Old Llama configs predate GQA and omit the KV head count: then it is MHA.
    if config.get(family.kv_heads_key) is None:
        n_kv = n_heads
    else:
        n_kv = _positive_int(config, family.kv_heads_key, where)
    head_dim = config.get(family.head_dim_key) if family.head_dim_key else None
    if head_dim is None:
        if hidden % n_heads:
            raise ConversionError(f"{where}: hidden size {hidden} is not divisible by {n_heads} heads")
        head_dim = hidden // n_heads
    elif not isinstance(head_dim, int) or head_dim <= 0:
        raise ConversionError(f"{where}: invalid head_dim {head_dim!r}")
    if n_heads % n_kv:
        raise ConversionError(
            f"{where}: {family.kv_heads_key}={n_kv} does not divide {family.heads_key}={n_heads}; "
            "the config is inconsistent."
        )
    return HeadShape(n_layers, hidden, n_heads, n_kv, head_dim)


def rotary_dims(family: Family, config: dict[str, Any], head_dim: int) -> int:
    """How many dims of each head RoPE rotates (partial rotary for Phi, StableLM, ...)."""
    factor = config.get("partial_rotary_factor")
    if factor is None:
        factor = (config.get("rope_parameters") or {}).get("partial_rotary_factor", family.default_partial_rotary)
    return int(head_dim * factor) // 2 * 2


def normalises_keys(family: Family, config: dict[str, Any]) -> bool:
    return family.key_norm == "always" or bool(family.key_norm and config.get(family.key_norm))
