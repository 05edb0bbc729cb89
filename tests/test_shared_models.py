"""Real checkpoints from ../shared/models (skipped with a reason when absent)."""

from __future__ import annotations

import torch
from conftest import load, logits, shared_path
from transformers import AutoTokenizer

from gqa_convert import convert


def test_stories260k_mha_to_4_groups_is_lossless(tmp_path):
    mha = shared_path("models", "stories260K-mha")
    original = load(shared_path("models", "stories260K"))  # the same function with 4 KV heads
    convert(mha, 4, out=tmp_path / "g4")
    out = load(tmp_path / "g4")
    assert out.config.num_key_value_heads == 4
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(out(ids).logits, original(ids).logits)
        torch.testing.assert_close(out(ids).logits, load(mha)(ids).logits, rtol=1e-5, atol=1e-5)


def test_stories260k_mha_to_2_and_1_groups_loads_and_generates(tmp_path):
    mha = shared_path("models", "stories260K-mha")
    tok = AutoTokenizer.from_pretrained(mha)
    prompt = tok("Once upon a time", return_tensors="pt")
    for g in (2, 1):
        convert(mha, g, out=tmp_path / f"g{g}")
        model = load(tmp_path / f"g{g}")
        assert model.config.num_key_value_heads == g
        assert model.model.layers[0].self_attn.k_proj.weight.shape == (g * 8, 64)
        with torch.no_grad():
            ids = model.generate(**prompt, max_new_tokens=20, do_sample=False)
        text = tok.decode(ids[0][prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        assert ids.shape[1] == prompt["input_ids"].shape[1] + 20 and text.strip()
        assert torch.isfinite(logits(model)).all()


def test_true_mha_and_regroup_already_gqa(tmp_path):
    convert(shared_path("models", "ts-mha-8h"), 2, out=tmp_path / "ts")
    assert load(tmp_path / "ts").config.num_key_value_heads == 2
    convert(shared_path("models", "stories260K"), 2, out=tmp_path / "s2")  # 4 KV heads -> 2
    assert load(tmp_path / "s2").config.num_key_value_heads == 2
