"""Fused-QKV, MQA-only and emulated families: each fused layout's split and re-fuse, and
for every family G = H exact and G < H equal to the source with K/V heads pooled in place
(the reference locates each head's rows with its own index arithmetic)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import build_fixture, load, logits, save_model

from gqa_convert import ConversionError, convert
from gqa_convert.architectures import layouts

# fixture key -> (how q/k/v rows are laid out, emulation needed for G < H); configs in conftest
CASES = {
    "phi3": ("concat", False),
    "falcon": ("grouped", False),
    "falcon-old": ("per_head", "mqa"),
    "gpt_bigcode": ("per_head", "mqa"),
    "gpt2": ("concat-t", True),
    "gpt_neox": ("per_head", True),
    "opt": ("separate", True),
    "gptj": ("separate", True),
    "bloom": ("per_head", True),
}
H, HD = 4, 8


def build(case: str):
    return build_fixture(case)


def kv_rows(layout: str, kind: str, h: int) -> list[int]:
    """Row indices of head h's K or V in the fused (Linear) tensor, written out plainly."""
    off = {"k": 1, "v": 2}[kind]
    if layout.startswith("concat"):
        return [H * HD + (off - 1) * H * HD + h * HD + i for i in range(HD)]
    if layout == "per_head":
        return [h * 3 * HD + off * HD + i for i in range(HD)]
    if layout == "grouped":  # one query per KV group here (MHA): [q, k, v] per group
        return [h * 3 * HD + off * HD + i for i in range(HD)]
    raise AssertionError(layout)


def pooled_reference(model, case: str, g: int):
    """The source with each K/V head replaced in place by its group's mean."""
    layout, _ = CASES[case]
    ref = copy.deepcopy(model)
    sd = ref.state_dict()
    r = H // g
    for name in list(sd):
        w = sd[name]
        if layout == "separate":
            if not any(x in name for x in (".k_proj.", ".v_proj.")):
                continue
            heads = w.reshape(H, HD, *w.shape[1:])
            pooled = heads.reshape(g, r, HD, *w.shape[1:]).mean(1, keepdim=True).expand(g, r, HD, *w.shape[1:])
            sd[name] = pooled.reshape(w.shape).clone()
            continue
        if not any(x in name for x in ("qkv_proj", "query_key_value", "c_attn")):
            continue
        t = w.T if layout == "concat-t" and w.dim() == 2 else w
        t = t.clone()
        for kind in ("k", "v"):
            for grp in range(g):
                members = [kv_rows(layout, kind, h) for h in range(grp * r, (grp + 1) * r)]
                mean = sum(t[rows] for rows in members) / r
                for rows in members:
                    t[rows] = mean
        sd[name] = t.T.contiguous() if layout == "concat-t" and w.dim() == 2 else t
    ref.load_state_dict(sd)
    return ref


@pytest.mark.parametrize("case", sorted(CASES))
def test_family(tmp_path, case):
    layout, emulated = CASES[case]
    model = build(case)
    src = save_model(model, tmp_path / "src")
    want = logits(model)
    convert(src, H, out=tmp_path / "same")
    assert torch.equal(logits(load(tmp_path / "same")), want), "G = H is exact"
    for g in (2, 1):
        native = emulated is False or (emulated == "mqa" and g == 1)
        if not native:
            with pytest.raises(ConversionError, match="--emulate"):
                convert(src, g, out=tmp_path / f"x{g}")
        report = convert(src, g, out=tmp_path / f"g{g}", emulate=not native)
        assert report.emulated is (not native)
        out = load(tmp_path / f"g{g}")
        if native:
            cfg = out.config.to_dict()
            n_kv = (
                1
                if cfg.get("multi_query") and not cfg.get("new_decoder_architecture")
                else cfg.get("num_kv_heads", cfg.get("num_key_value_heads"))
            )
            assert n_kv == g and report.kv_cache["saving"] == 1 - g / H
            raw = json.loads((tmp_path / f"g{g}" / "config.json").read_text())
            assert raw.get("num_key_value_heads", g) == g, "a generic KV count beside the family's own is updated too"
        else:
            assert report.kv_cache["saving"] == 0.0, "emulation saves no memory and says so"
        torch.testing.assert_close(logits(out), logits(pooled_reference(model, case, g)), rtol=1e-4, atol=1e-4)
    card = (tmp_path / "g2" / "README.md").read_text()
    assert ("Emulated" in card) is (emulated is not False)


@pytest.mark.parametrize(
    "layout, n_kv", [("concat", 4), ("concat", 2), ("per_head", 4), ("grouped", 4), ("grouped", 2)]
)
def test_fused_split_and_refuse(layout, n_kv):
    rows = (H + 2 * n_kv) * HD if layout != "per_head" else 3 * H * HD
    w = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
    q, k, v = layouts.split(w, layout, H, n_kv, HD)
    assert q.shape == (H * HD, 3) and k.shape == v.shape == (n_kv * HD, 3)
    assert torch.equal(layouts.fuse(q, k, v, layout, H, n_kv, HD), w)
    # where head 1's key really lives, by hand
    m = H // n_kv
    first_k_row = {"concat": H * HD + HD, "per_head": 3 * HD + HD, "grouped": (m + 2) * HD + m * HD}[layout]
    assert torch.equal(k[HD : 2 * HD], w[first_k_row : first_k_row + HD])
    bias = torch.arange(rows, dtype=torch.float32)
    assert torch.equal(layouts.fuse(*layouts.split(bias, layout, H, n_kv, HD), layout, H, n_kv, HD), bias)


def test_mqa_only_family_refuses_other_groups(tmp_path):
    src = save_model(build("gpt_bigcode"), tmp_path / "src")
    with pytest.raises(ConversionError, match="support only multi-query"):
        convert(src, 2, out=tmp_path / "o")
    report = convert(src, 1, out=tmp_path / "mqa")
    assert load(tmp_path / "mqa").config.multi_query is True and not report.emulated


@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_on_fused_and_emulated_families(tmp_path, case):
    """fold at G = H reproduces the source (checks each family's rotary layout, or none),
    and at G = 2 it is closer to the source than mean pooling."""
    _, emulated = CASES[case]
    model = build(case)
    src = save_model(model, tmp_path / "src")
    want = logits(model)
    convert(src, H, out=tmp_path / "same", method="fold")
    torch.testing.assert_close(logits(load(tmp_path / "same")), want, rtol=1e-3, atol=1e-3)
    emulate = emulated is not False
    convert(src, 2, out=tmp_path / "fold", method="fold", emulate=emulate)
    convert(src, 2, out=tmp_path / "mean", emulate=emulate)
    err = {m: (logits(load(tmp_path / m)) - want).square().mean() for m in ("fold", "mean")}
    assert err["fold"] < err["mean"]


def test_gpt2_to_gpt_bigcode_real_mqa(tmp_path):
    """GPT-2 has no GQA, but its sibling GPT-BigCode has multi-query attention with the same
    weights (as Linear layers): --sibling writes a real MQA checkpoint."""
    model = build("gpt2")
    src = save_model(model, tmp_path / "src")
    with pytest.raises(ConversionError, match="--sibling"):
        convert(src, 1, out=tmp_path / "x")
    with pytest.raises(ConversionError, match="--groups 1"):
        convert(src, 2, out=tmp_path / "x", sibling=True)
    report = convert(src, 1, out=tmp_path / "mqa", sibling=True)
    out = load(tmp_path / "mqa")
    assert type(out).__name__ == "GPTBigCodeForCausalLM" and out.config.multi_query is True
    assert out.transformer.h[0].attn.c_attn.weight.shape == ((H + 2) * HD, 32)
    assert report.kv_cache["saving"] == 1 - 1 / H and not report.emulated
    torch.testing.assert_close(logits(out), logits(pooled_reference(model, "gpt2", 1)), rtol=1e-4, atol=1e-4)


def test_t5_decoder_self_and_cross_attention_emulated(tmp_path):
    """The paper's own model: only the decoder's self- and cross-attention are converted."""
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        d_ff=48,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        initializer_factor=3.0,
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg).eval()
    src = save_model(model, tmp_path / "src")
    ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    dec = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(2))

    def out(m):
        with torch.no_grad():
            return m(input_ids=ids, decoder_input_ids=dec).logits

    with pytest.raises(ConversionError, match="--emulate"):
        convert(src, 2, out=tmp_path / "x")
    convert(src, 4, out=tmp_path / "same")
    assert torch.equal(out(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "same")), out(model))
    for g in (2, 1):
        report = convert(src, g, out=tmp_path / f"g{g}", emulate=True)
        converted = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / f"g{g}").eval()
        ref = copy.deepcopy(model)
        sd = ref.state_dict()
        for name in sd:
            if name.startswith("decoder.") and name.endswith((".k.weight", ".v.weight")):
                w = sd[name].reshape(g, H // g, HD, -1)
                sd[name] = w.mean(1, keepdim=True).expand_as(w).reshape(H * HD, -1).clone()
        ref.load_state_dict(sd)
        torch.testing.assert_close(out(converted), out(ref), rtol=1e-4, atol=1e-4)
        assert report.emulated
        enc = "encoder.block.0.layer.0.SelfAttention.k.weight"
        assert torch.equal(converted.state_dict()[enc], model.state_dict()[enc]), "the encoder is left alone"
        changed = [c["name"] for c in report.attention_changes]
        assert changed == [], "emulation keeps every shape"
    fold = convert(src, 1, out=tmp_path / "fold", emulate=True, method="fold")
    err = {
        p: (out(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / p)) - out(model)).square().mean()
        for p in ("fold", "g1")
    }
    assert err["fold"] < err["g1"] and fold.emulated
