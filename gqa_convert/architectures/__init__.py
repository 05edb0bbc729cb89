"""What differs between model families, kept as data: one `Family` entry per family.

A family names where each layer's attention tensors live (by role), which config keys
hold the head counts, and which config settings it cannot convert. The converter and
the methods only ever see roles ("q.weight", "k.bias", ...), never family names.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    native_gqa: bool = True  # False: only --emulate (or the mqa_flag's G = 1) can convert it
    rope_layout: str = "half"  # rotary pairs: "half" (i, i + rot/2), "interleaved" (2i, 2i+1), or "none"
    rotary_dim_key: str | None = None  # config key giving the rotated dims directly (GPT-J)
    fused: str | None = None  # fused QKV layout (layouts.py), or "auto": grouped / concat / per_head by config
    transposed: tuple[str, ...] = ()  # roles stored as Conv1D (in, out) rather than Linear (out, in)
    mqa_flag: str | None = None  # config flag of a native multi-query layout (GPT-BigCode, old Falcon)
    gqa_flag: str | None = None  # config flag that enables native GQA (Falcon's new_decoder_architecture)
    sibling: dict[str, Any] | None = None  # a native-MQA sibling architecture (see GPT-2), for --sibling
    blocks: tuple[str, ...] = ()  # several attention blocks per layer (T5's decoder), converted alike
    auto_class: str = "AutoModelForCausalLM"
    default_partial_rotary: float = 1.0  # fraction of head_dim rotated when the config does not say
    key_norm: str | None = None  # config flag (or "always") for a per-head norm between k_proj and RoPE
    notes: str = ""


_FUSED = {"qkv.weight": "query_key_value.weight", "qkv.bias": "query_key_value.bias", "o.weight": "dense.weight"}
_GPT = {"heads_key": "n_head", "layers_key": "n_layer", "hidden_key": "n_embd", "head_dim_key": None}

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
    # Fused QKV layouts, MQA-only families and families without GQA in transformers.
    Family(
        "Phi-3",
        ("phi3",),
        {"qkv.weight": "qkv_proj.weight", "qkv.bias": "qkv_proj.bias", "o.weight": "o_proj.weight"},
        fused="concat",
        layout="fused qkv_proj [Q|K|V]",
    ),
    Family(
        "Falcon",
        ("falcon",),
        _FUSED,
        attn_prefixes=("transformer.h.{layer}.self_attention.",),
        kv_heads_key="num_kv_heads",
        head_dim_key=None,
        fused="auto",
        native_gqa=False,
        gqa_flag="new_decoder_architecture",
        mqa_flag="multi_query",
        layout="fused query_key_value: grouped (new_decoder_architecture), [Q|K|V] (multi_query) or per head",
    ),
    Family(
        "GPT-BigCode",
        ("gpt_bigcode",),
        {"qkv.weight": "c_attn.weight", "qkv.bias": "c_attn.bias", "o.weight": "c_proj.weight"},
        attn_prefixes=("transformer.h.{layer}.attn.",),
        **_GPT,
        kv_heads_key="n_kv_heads",
        fused="auto",
        native_gqa=False,
        mqa_flag="multi_query",
        rope_layout="none",
        layout="fused c_attn, per head (MHA) or [Q|K|V] (multi_query)",
    ),
    Family(
        "GPT-2",
        ("gpt2",),
        {"qkv.weight": "c_attn.weight", "qkv.bias": "c_attn.bias", "o.weight": "c_proj.weight"},
        attn_prefixes=("transformer.h.{layer}.attn.", "h.{layer}.attn."),
        **_GPT,
        kv_heads_key="n_kv_heads",
        fused="concat",
        transposed=("qkv.weight", "o.weight"),
        native_gqa=False,
        rope_layout="none",
        layout="Conv1D c_attn [Q|K|V], transposed",
        # GPT-BigCode is GPT-2 with Linear layers and an optional multi-query c_attn: a real MQA target.
        sibling={
            "name": "GPT-BigCode",
            "model_type": "gpt_bigcode",
            "architectures": ["GPTBigCodeForCausalLM"],
            "config": {"multi_query": True},
            "refuse_if_set": ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"],
            "drop_suffixes": [".attn.bias", ".attn.masked_bias"],  # old causal-mask buffers
            "transpose_suffixes": [".mlp.c_fc.weight", ".mlp.c_proj.weight"],  # Conv1D -> Linear
        },
    ),
    Family(
        "GPT-NeoX",
        ("gpt_neox",),
        _FUSED,
        attn_prefixes=("gpt_neox.layers.{layer}.attention.",),
        kv_heads_key="num_key_value_heads",
        fused="per_head",
        native_gqa=False,
        default_partial_rotary=0.25,
        layout="fused query_key_value, per head",
    ),
    Family(
        "OPT",
        ("opt",),
        {**_SEPARATE_QKVO, "o.weight": "out_proj.weight"},
        attn_prefixes=("model.decoder.layers.{layer}.self_attn.",),
        kv_heads_key="num_key_value_heads",
        head_dim_key=None,
        native_gqa=False,
        rope_layout="none",
        layout="separate q/k/v, out_proj",
    ),
    Family(
        "GPT-J",
        ("gptj",),
        {**_SEPARATE_QKVO, "o.weight": "out_proj.weight"},
        attn_prefixes=("transformer.h.{layer}.attn.",),
        **_GPT,
        kv_heads_key="n_kv_heads",
        native_gqa=False,
        rope_layout="interleaved",
        rotary_dim_key="rotary_dim",
        layout="separate q/k/v, out_proj, partial interleaved rotary",
    ),
    Family(
        "BLOOM",
        ("bloom",),
        _FUSED,
        attn_prefixes=("transformer.h.{layer}.self_attention.", "h.{layer}.self_attention."),
        heads_key="n_head",
        layers_key="n_layer",
        kv_heads_key="n_kv_heads",
        head_dim_key=None,
        fused="per_head",
        native_gqa=False,
        rope_layout="none",
        layout="fused query_key_value, per head (ALiBi)",
    ),
    # The GQA paper's own model. As in the paper, only the decoder's self- and cross-attention
    # are converted; the encoder is left alone. transformers' T5 has no GQA: --emulate.
    Family(
        "T5",
        ("t5",),
        {"q.weight": "q.weight", "k.weight": "k.weight", "v.weight": "v.weight", "o.weight": "o.weight"},
        blocks=("decoder.block.{layer}.layer.0.SelfAttention.", "decoder.block.{layer}.layer.1.EncDecAttention."),
        heads_key="num_heads",
        layers_key="num_decoder_layers",
        hidden_key="d_model",
        head_dim_key="d_kv",
        native_gqa=False,
        rope_layout="none",
        auto_class="AutoModelForSeq2SeqLM",
        layout="decoder self- and cross-attention, separate q/k/v/o (encoder unchanged)",
    ),
)

_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def families_line() -> str:
    """The supported model types, as the error message and --help list them."""
    native = sorted(t for f in FAMILIES if f.native_gqa or f.gqa_flag for t in f.model_types)
    other = sorted(t for f in FAMILIES if not (f.native_gqa or f.gqa_flag) for t in f.model_types)
    return (
        f"gqa-convert converts these families: {', '.join(native)} (native GQA); "
        f"and {', '.join(other)} (MQA through their own layout, --sibling, or --emulate)."
    )


def family_for(config: dict[str, Any]) -> Family:
    """The family entry for a config.json dict, or a ConversionError naming the supported ones."""
    model_type = config.get("model_type")
    family = _BY_MODEL_TYPE.get(model_type or "")
    if family is None:
        what = f"model_type {model_type!r}" if model_type else "a config.json without model_type"
        raise ConversionError(f"unsupported architecture: {what}. {families_line()}")
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
    if family.rope_layout == "none":
        return 0
    if family.rotary_dim_key and config.get(family.rotary_dim_key):
        return int(config[family.rotary_dim_key])
    factor = config.get("partial_rotary_factor")
    if factor is None:
        factor = (config.get("rope_parameters") or {}).get("partial_rotary_factor", family.default_partial_rotary)
    return int(head_dim * factor) // 2 * 2


def normalises_keys(family: Family, config: dict[str, Any]) -> bool:
    return family.key_norm == "always" or bool(family.key_norm and config.get(family.key_norm))


def gqa_native(family: Family, config: dict[str, Any]) -> bool:
    return family.native_gqa or bool(family.gqa_flag and config.get(family.gqa_flag))


def fused_layout(family: Family, config: dict[str, Any]) -> str | None:
    """The fused QKV layout of this checkpoint (None for separate projections)."""
    if family.fused != "auto":
        return family.fused
    if gqa_native(family, config):
        return "grouped"
    return "concat" if family.mqa_flag and config.get(family.mqa_flag) else "per_head"


def key_role(family: Family) -> str:
    return "qkv.weight" if family.fused else "k.weight"


def required_roles(family: Family) -> tuple[str, ...]:
    return ("qkv.weight", "o.weight") if family.fused else REQUIRED_ROLES
