"""What differs between model families, kept as data: one `Family` entry per family.

An entry names where each layer's attention tensors live (by role), which config keys hold
the head counts and the context length, how the family is loaded and trained, and what its
transformers implementation can hold. Every command reads these facts from here; the
converter and the methods only ever see roles ("q.weight", "k.bias", ...), never names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConversionError

# Roles whose rows (axis 0) are indexed by KV head: these are what GQA shares.
KV_ROLES = ("k.weight", "k.bias", "v.weight", "v.bias", "k.norm")
# Roles indexed by query head: rows of q (columns of o are per query head too).
Q_ROLES = ("q.weight", "q.bias", "q.norm")
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


# transformers' own name for the KV head count; a config saved by transformers may carry it
# beside a family's own key (Falcon's num_kv_heads), and the output must keep both true
GENERIC_KV_HEADS_KEY = "num_key_value_heads"


@dataclass(frozen=True)
class Family:
    """One model family.

    roles: role -> tensor name relative to the attention block's prefix. A name with
        "{head}" is a per-head module list (one tensor per KV head), stacked on axis 0
        for conversion and split back afterwards.
    attn: the attention blocks of layer {layer}, as module paths in the model that
        `auto_class` loads (one block for most families; T5's decoder has two). A
        checkpoint saved from the base model (names without `base_prefix`) is accepted too.
    objective: how the model is scored, calibrated and trained: "causal" (next token), or
        "seq2seq" (each window split in halves: the encoder reads the first, the decoder
        predicts the second with teacher forcing).
    """

    name: str
    model_types: tuple[str, ...]
    roles: dict[str, str]
    attn: tuple[str, ...] = ("model.layers.{layer}.self_attn.",)
    base_prefix: str = "model."
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = GENERIC_KV_HEADS_KEY
    layers_key: str = "num_hidden_layers"
    hidden_key: str = "hidden_size"
    head_dim_key: str | None = "head_dim"
    context_key: str | None = "max_position_embeddings"
    default_context: int = 2048  # when the config names no context length (ALiBi, relative positions)
    learned_positions: bool = False  # a position table: no sequence may be longer than the context
    layout: str = "separate q/k/v/o"
    native_gqa: bool = True  # False: only --emulate (or the mqa_flag's G = 1) can convert it
    rope_layout: str = "half"  # rotary pairs: "half" (i, i + rot/2), "interleaved" (2i, 2i+1), or "none"
    rotary_dim_key: str | None = None  # config key giving the rotated dims directly (GPT-J)
    fused: str | None = None  # fused QKV layout (layouts.py), or "auto": grouped / concat / per_head by config
    transposed: tuple[str, ...] = ()  # roles stored as Conv1D (in, out) rather than Linear (out, in)
    mqa_flag: str | None = None  # config flag of a native multi-query layout (GPT-BigCode, old Falcon)
    gqa_flag: str | None = None  # config flag that enables native GQA (Falcon's new_decoder_architecture)
    sibling: dict[str, Any] | None = None  # a native-MQA sibling architecture (see GPT-2), for --sibling
    auto_class: str = "AutoModelForCausalLM"
    objective: str = "causal"
    default_partial_rotary: float = 1.0  # fraction of head_dim rotated when the config does not say
    key_norm: str | None = None  # config flag (or "always") for a per-head norm between k_proj and RoPE
    embed: str = "model.embed_tokens.weight"  # the input embedding, which a tied output head shares
    lm_head: str = "lm_head.weight"
    refine: bool = False  # --method refine fits this family's own attention module (separate q/k/v/o, native GQA)


_FUSED = {"qkv.weight": "query_key_value.weight", "qkv.bias": "query_key_value.bias", "o.weight": "dense.weight"}
_C_ATTN = {"qkv.weight": "c_attn.weight", "qkv.bias": "c_attn.bias", "o.weight": "c_proj.weight"}
_GPT = {"heads_key": "n_head", "layers_key": "n_layer", "hidden_key": "n_embd", "head_dim_key": None}

FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",), _SEPARATE_QKVO, refine=True),
    Family("Mistral", ("mistral",), _SEPARATE_QKVO, refine=True),
    Family("Mixtral", ("mixtral",), _SEPARATE_QKVO, refine=True),
    Family("Qwen2", ("qwen2",), _SEPARATE_QKVO, refine=True),
    Family("Qwen3", ("qwen3",), _SEPARATE_QKVO, key_norm="always"),
    Family("Gemma", ("gemma",), _SEPARATE_QKVO, refine=True),
    Family("Gemma2", ("gemma2",), _SEPARATE_QKVO, refine=True),
    Family("OLMo", ("olmo",), _SEPARATE_QKVO, refine=True),
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
    ),
    Family("Starcoder2", ("starcoder2",), _SEPARATE_QKVO, refine=True),
    Family("Granite", ("granite",), _SEPARATE_QKVO, refine=True),
    Family(
        "Cohere",
        ("cohere",),
        {**_SEPARATE_QKVO, "k.norm": "k_norm.weight", "q.norm": "q_norm.weight"},
        rope_layout="interleaved",
        key_norm="use_qk_norm",
    ),
    Family(
        "Phi",
        ("phi",),
        {**_SEPARATE_QKVO, "o.weight": "dense.weight"},
        default_partial_rotary=0.5,
        key_norm="qk_layernorm",
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
        attn=("transformer.h.{layer}.self_attention.",),
        base_prefix="transformer.",
        kv_heads_key="num_kv_heads",
        head_dim_key=None,
        fused="auto",
        native_gqa=False,
        gqa_flag="new_decoder_architecture",
        embed="transformer.word_embeddings.weight",
        mqa_flag="multi_query",
        layout="fused query_key_value: grouped (new_decoder_architecture), [Q|K|V] (multi_query) or per head",
    ),
    Family(
        "GPT-BigCode",
        ("gpt_bigcode",),
        _C_ATTN,
        attn=("transformer.h.{layer}.attn.",),
        base_prefix="transformer.",
        **_GPT,
        kv_heads_key="n_kv_heads",
        context_key="n_positions",
        fused="auto",
        native_gqa=False,
        mqa_flag="multi_query",
        rope_layout="none",
        learned_positions=True,
        layout="fused c_attn, per head (MHA) or [Q|K|V] (multi_query)",
        embed="transformer.wte.weight",
    ),
    Family(
        "GPT-2",
        ("gpt2",),
        _C_ATTN,
        attn=("transformer.h.{layer}.attn.",),
        base_prefix="transformer.",
        **_GPT,
        kv_heads_key="n_kv_heads",
        context_key="n_positions",
        fused="concat",
        transposed=("qkv.weight", "o.weight"),
        native_gqa=False,
        rope_layout="none",
        learned_positions=True,
        layout="Conv1D c_attn [Q|K|V], transposed",
        embed="transformer.wte.weight",
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
        attn=("gpt_neox.layers.{layer}.attention.",),
        base_prefix="gpt_neox.",
        kv_heads_key="num_key_value_heads",
        fused="per_head",
        native_gqa=False,
        default_partial_rotary=0.25,
        layout="fused query_key_value, per head",
        embed="gpt_neox.embed_in.weight",
        lm_head="embed_out.weight",
    ),
    Family(
        "OPT",
        ("opt",),
        {**_SEPARATE_QKVO, "o.weight": "out_proj.weight"},
        attn=("model.decoder.layers.{layer}.self_attn.",),
        kv_heads_key="num_key_value_heads",
        head_dim_key=None,
        native_gqa=False,
        rope_layout="none",
        learned_positions=True,
        layout="separate q/k/v, out_proj",
        embed="model.decoder.embed_tokens.weight",
    ),
    Family(
        "GPT-J",
        ("gptj",),
        {**_SEPARATE_QKVO, "o.weight": "out_proj.weight"},
        attn=("transformer.h.{layer}.attn.",),
        base_prefix="transformer.",
        **_GPT,
        kv_heads_key="n_kv_heads",
        context_key="n_positions",
        native_gqa=False,
        rope_layout="interleaved",
        rotary_dim_key="rotary_dim",
        layout="separate q/k/v, out_proj, partial interleaved rotary",
        embed="transformer.wte.weight",
    ),
    Family(
        "BLOOM",
        ("bloom",),
        _FUSED,
        attn=("transformer.h.{layer}.self_attention.",),
        base_prefix="transformer.",
        heads_key="n_head",
        layers_key="n_layer",
        kv_heads_key="n_kv_heads",
        head_dim_key=None,
        context_key=None,  # ALiBi: no position table; BLOOM was trained on 2048-token sequences
        fused="per_head",
        native_gqa=False,
        rope_layout="none",
        layout="fused query_key_value, per head (ALiBi)",
        embed="transformer.word_embeddings.weight",
    ),
    # The GQA paper's own model. As in the paper, only the decoder's self- and cross-attention
    # are converted; the encoder is left alone. transformers' T5 has no GQA: --emulate.
    Family(
        "T5",
        ("t5",),
        {"q.weight": "q.weight", "k.weight": "k.weight", "v.weight": "v.weight", "o.weight": "o.weight"},
        attn=("decoder.block.{layer}.layer.0.SelfAttention.", "decoder.block.{layer}.layer.1.EncDecAttention."),
        base_prefix="",
        heads_key="num_heads",
        layers_key="num_decoder_layers",
        hidden_key="d_model",
        head_dim_key="d_kv",
        context_key=None,  # relative position buckets: no fixed context; T5 was pre-trained on 512 tokens
        default_context=512,
        native_gqa=False,
        rope_layout="none",
        auto_class="AutoModelForSeq2SeqLM",
        objective="seq2seq",
        layout="decoder self- and cross-attention, separate q/k/v/o (encoder unchanged)",
        embed="shared.weight",
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
    family = _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        what = f"model_type {_short(model_type)}" if model_type else "a config.json without model_type"
        raise ConversionError(f"unsupported architecture: {what}. {families_line()}")
    return family


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def key_role(family: Family) -> str:
    """The role that locates a layer's attention block (and holds its keys)."""
    return "qkv.weight" if family.fused else "k.weight"


def required_roles(family: Family) -> tuple[str, ...]:
    return ("qkv.weight", "o.weight") if family.fused else REQUIRED_ROLES


def key_module(family: Family) -> str:
    """The module, relative to an attention block, whose input is what keys and values see."""
    return family.roles[key_role(family)].removesuffix(".weight")


def attention_modules(family: Family) -> tuple[str, ...]:
    """Names of the attention block's projection modules (LoRA's default targets)."""
    names = (r.removesuffix(".weight") for role, r in family.roles.items() if role.endswith(".weight"))
    return tuple(dict.fromkeys(n for n in names if "{head}" not in n))


def refine_refusal(family: Family) -> str | None:
    """Why `--method refine` cannot fit this family, from its facts; None where it can. Refine
    fits separate q/k/v/o Linear weights inside the family's own natively grouped attention
    module of a causal model, with keys that reach RoPE unnormalised. (`Family.refine` says
    the same as data; tests keep the two, and the README's table, in step.)"""
    why = []
    if family.objective != "causal":
        why.append("encoder-decoder")
    if family.fused:
        why.append("fused qkv")
    if not (family.native_gqa or family.gqa_flag):
        why.append("no GQA in transformers")
    if family.key_norm:
        why.append("per-head key norm")
    return "; ".join(why) or None


def module_path(family: Family, prefix: str) -> str:
    """The module path (no trailing dot) of an attention block in the model `auto_class` loads;
    `prefix` is the block's tensor-name prefix as the checkpoint names it (with or without the
    base model's prefix)."""
    if family.base_prefix and not prefix.startswith(family.base_prefix):
        prefix = family.base_prefix + prefix
    return prefix.rstrip(".")
