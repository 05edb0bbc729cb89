"""Property-based: over random head layouts, group counts and dtypes, G = H leaves every
tensor byte-identical, and any G equals an independent pooled reference."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from gqa_convert import convert

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def layouts(draw):
    n_heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    n_kv = draw(st.sampled_from([d for d in range(1, n_heads + 1) if n_heads % d == 0]))
    groups = draw(st.sampled_from([g for g in range(1, n_kv + 1) if n_kv % g == 0]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    hidden = draw(st.sampled_from([8, 16]))
    layers = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return n_heads, n_kv, groups, head_dim, hidden, layers, dtype, bias, seed


def write_checkpoint(root: Path, n_heads, n_kv, head_dim, hidden, layers, dtype, bias, seed) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    t = {
        "model.embed_tokens.weight": rnd(10, hidden),
        "model.norm.weight": rnd(hidden),
        "lm_head.weight": rnd(10, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = rnd(n_heads * head_dim, hidden)
        t[p + "self_attn.k_proj.weight"] = rnd(n_kv * head_dim, hidden)
        t[p + "self_attn.v_proj.weight"] = rnd(n_kv * head_dim, hidden)
        t[p + "self_attn.o_proj.weight"] = rnd(hidden, n_heads * head_dim)
        if bias:
            for x, n in (("q", n_heads), ("k", n_kv), ("v", n_kv)):
                t[p + f"self_attn.{x}_proj.bias"] = rnd(n * head_dim)
        t[p + "mlp.up_proj.weight"] = rnd(12, hidden)
        t[p + "input_layernorm.weight"] = rnd(hidden)
    root.mkdir()
    save_file(t, root / "model.safetensors", metadata={"format": "pt"})
    cfg = {
        "model_type": "qwen2" if bias else "llama",
        "hidden_size": hidden,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "num_hidden_layers": layers,
        "vocab_size": 10,
    }
    (root / "config.json").write_text(json.dumps(cfg))
    return t


@settings(max_examples=30, deadline=None)
@given(layouts())
def test_conversion_equals_pooled_reference(layout):
    n_heads, n_kv, groups, head_dim, hidden, layers, dtype, bias, seed = layout
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src"
        original = write_checkpoint(src, n_heads, n_kv, head_dim, hidden, layers, dtype, bias, seed)
        convert(src, groups, out=Path(d) / "out")
        out = load_file(Path(d) / "out" / "model.safetensors")
        assert set(out) == set(original)
        r = n_kv // groups
        for name, w in original.items():
            if ".k_proj." in name or ".v_proj." in name:
                ref = (
                    w.float()
                    .reshape(groups, r, head_dim, *w.shape[1:])
                    .mean(1)
                    .reshape(groups * head_dim, *w.shape[1:])
                )
                assert out[name].dtype == dtype
                assert torch.equal(out[name], ref.to(dtype))
                if groups == n_kv:
                    assert torch.equal(out[name], w)
            else:
                assert torch.equal(out[name], w), f"{name} must be copied byte for byte"
        cfg = json.loads((Path(d) / "out" / "config.json").read_text())
        assert cfg["num_key_value_heads"] == groups
