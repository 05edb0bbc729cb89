"""Tiny random models for every supported family, built and saved in fixtures, and the
independent reference the converter is checked against."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from gqa_convert.architectures import KV_ROLES, family_for  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    initializer_range=0.3,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# One tiny config per family; the extras switch on what makes the family different.
FAMILY_EXTRAS: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "mixtral": dict(num_local_experts=2, num_experts_per_tok=1),
    "qwen2": {},
    "qwen3": dict(head_dim=8),
    "gemma": dict(head_dim=8),
    "gemma2": dict(head_dim=8, query_pre_attn_scalar=8),
    "olmo": {},
    "stablelm": dict(qk_layernorm=True),
    "starcoder2": dict(use_bias=True),
    "granite": {},
    "cohere": dict(use_qk_norm=True),
    "phi": dict(partial_rotary_factor=0.5),
}


TINY = dict(vocab_size=64, bos_token_id=1, eos_token_id=2)
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
# Families outside FAMILY_EXTRAS (fused QKV, MQA-only, no GQA in transformers): their own config keys.
OTHER_FIXTURES: dict[str, tuple[str, dict]] = {
    "phi3": (
        "phi3",
        dict(**_SMALL, intermediate_size=48, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0),
    ),
    "falcon": ("falcon", dict(**_SMALL, num_kv_heads=4, new_decoder_architecture=True, bias=True)),
    "falcon-old": ("falcon", dict(**_SMALL, new_decoder_architecture=False, multi_query=False, bias=True)),
    "gpt_bigcode": ("gpt_bigcode", dict(n_embd=32, n_layer=2, n_head=4, multi_query=False, n_positions=64)),
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neox": ("gpt_neox", dict(**_SMALL, intermediate_size=48, max_position_embeddings=64)),
    "opt": ("opt", dict(**_SMALL, ffn_dim=48, max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0)),
    "gptj": ("gptj", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64)),
    "bloom": ("bloom", dict(hidden_size=32, n_layer=2, n_head=4)),
    "t5": (
        "t5",
        dict(
            d_model=32,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            num_decoder_layers=2,
            d_ff=48,
            decoder_start_token_id=0,
            pad_token_id=0,
            initializer_factor=3.0,
        ),
    ),
}
FIXTURE_KEYS = sorted(FAMILY_EXTRAS) + sorted(OTHER_FIXTURES)


def build_fixture(key: str, seed: int = 0):
    """A tiny random model of any supported family (4 heads, head_dim 8, vocab 64)."""
    if key in FAMILY_EXTRAS:
        return build_model(key, seed=seed)
    from transformers import AutoModelForSeq2SeqLM

    model_type, kw = OTHER_FIXTURES[key]
    cfg = AutoConfig.for_model(model_type, **TINY, **kw, initializer_range=0.3)
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the ../shared fixtures are not beside this checkout)")
    return path


def build_model(model_type: str = "llama", *, n_kv: int | None = None, dtype=torch.float32, seed: int = 0, **overrides):
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **FAMILY_EXTRAS[model_type], **overrides})
    cfg.num_key_value_heads = n_kv or cfg.num_attention_heads
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms and biases start at 1/0; randomise them so a wrong copy shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model.to(dtype)


def save_model(model, path: Path, *, max_shard_size: str = "20KB", fmt: str = "safetensors") -> Path:
    if fmt == "safetensors":
        model.save_pretrained(path, max_shard_size=max_shard_size)
    else:  # a pytorch_model.bin checkpoint, sharded in two when asked, as older hub repos are
        path.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(path)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        if fmt == "bin":
            torch.save(sd, path / "pytorch_model.bin")
        else:
            names = sorted(sd)
            halves = {
                "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
            }
            weight_map = {}
            for file, part in halves.items():
                torch.save({k: sd[k] for k in part}, path / file)
                weight_map |= {k: file for k in part}
            (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def make_checkpoint(
    tmp_path: Path,
    model_type: str = "llama",
    name: str = "src",
    fmt: str = "safetensors",
    max_shard_size: str = "20KB",
    **kwargs,
) -> tuple[Path, torch.nn.Module]:
    model = build_model(model_type, **kwargs)
    return save_model(model, tmp_path / name, max_shard_size=max_shard_size, fmt=fmt), model


def pooled_in_place(model, n_groups: int, how: str = "mean"):
    """The source model with each KV head replaced, in place, by its group's pooled head:
    the MHA model a GQA-G conversion must compute exactly. Written independently of
    gqa_convert's own pooling code."""
    ref = copy.deepcopy(model)
    family = family_for(model.config.to_dict())
    n_kv = model.config.num_key_value_heads
    r = n_kv // n_groups
    sd = ref.state_dict()
    prefix = "model.layers.{}.self_attn."
    for layer in range(model.config.num_hidden_layers):
        for role in KV_ROLES:
            rel = family.roles.get(role)
            if rel is None:
                continue
            if "{head}" in rel:  # per-head module list: average whole tensors across the group
                names = [prefix.format(layer) + rel.format(head=h) for h in range(n_kv)]
                if names[0] not in sd:
                    continue
                for g in range(n_groups):
                    members = names[g * r : (g + 1) * r]
                    pooled = torch.stack([sd[n].float() for n in members]).mean(0)
                    for n in members:
                        sd[n] = (pooled if how == "mean" else sd[members[0]].float()).to(sd[n].dtype).clone()
                continue
            name = prefix.format(layer) + rel
            if name not in sd:
                continue
            w = sd[name]
            rows = w.shape[0] // n_kv
            heads = [w[h * rows : (h + 1) * rows].float() for h in range(n_kv)]
            new = []
            for h in range(n_kv):
                members = heads[(h // r) * r : (h // r + 1) * r]
                new.append(sum(members) / r if how == "mean" else members[0])
            sd[name] = torch.cat(new).to(w.dtype)
    ref.load_state_dict(sd)
    return ref


def load(path: Path, dtype=None):
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def logits(model, seed: int = 1, length: int = 24) -> torch.Tensor:
    ids = torch.randint(3, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()
