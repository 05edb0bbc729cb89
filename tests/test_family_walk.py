"""The family table drives every command: for every supported family, on a tiny random model
with a tokenizer, convert, verify (the KV heads and saving it reports come from the table),
fold with --calib, and two steps of uptrain. An emulated conversion stays tied while it trains."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURE_KEYS, OTHER_FIXTURES, build_fixture, save_model

from gqa_convert import ConversionError, convert, verify
from gqa_convert.architectures import FAMILIES, family_for, gqa_native
from gqa_convert.demo import corpus
from gqa_convert.io.source import open_source
from gqa_convert.training import UptrainOptions, uptrain

H, HD, WORDS = 4, 8, 40


def test_every_family_in_the_table_has_a_fixture():
    covered = {OTHER_FIXTURES.get(k, (k,))[0] for k in FIXTURE_KEYS}
    assert covered == {t for f in FAMILIES for t in f.model_types}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("walk-text")
    corpus.write_text(root / "train.txt", seed=1, n_words=WORDS, n_docs=40, length=40)
    corpus.write_text(root / "eval.txt", seed=2, n_words=WORDS, n_docs=8, length=40)
    return root


def _target(config: dict) -> tuple[int, bool]:
    """(G, emulate) a walk uses: G = H/2 where the family holds it, else MQA, else emulated."""
    family = family_for(config)
    if gqa_native(family, config):
        return 2, False
    if family.mqa_flag:
        return 1, False
    return 2, True


def _kv_rows(state: dict, name: str, g: int, fused_rows) -> torch.Tensor:
    return state[name] if fused_rows is None else state[name][fused_rows]


@pytest.mark.parametrize("key", FIXTURE_KEYS)
def test_family_walk(tmp_path, text, key):
    model = build_fixture(key)
    src = save_model(model, tmp_path / "src")
    corpus.save_tokenizer(src, WORDS, 64)
    config = open_source(src).config
    family = family_for(config)
    g, emulate = _target(config)

    convert(src, g, out=tmp_path / "conv", emulate=emulate)
    data = dict(data=[str(text / "eval.txt")], max_tokens=256, seq_len=32, batch_size=4)
    v = verify(str(tmp_path / "conv"), **data)
    assert v.reference is not None and v.reference.kv_heads == H
    assert v.converted.kv_heads == (H if emulate else g), "KV heads come from the family table"
    assert v.converted.emulated is emulate
    assert v.kv_saving == pytest.approx(0.0 if emulate else 1 - g / H)
    assert v.converted.tokens == v.reference.tokens > 0 and v.ppl_ratio > 0
    assert v.checks[-1].name == f"loads with {family.auto_class}"

    convert(src, g, out=tmp_path / "fold", emulate=emulate, method="fold", calib=[str(text / "train.txt")])
    f = verify(str(tmp_path / "fold"), **data)
    assert f.converted.kv_heads == v.converted.kv_heads

    up = uptrain(
        str(tmp_path / "conv"),
        UptrainOptions(data=[str(text / "train.txt")], out=tmp_path / "up", steps=2, batch_size=2, seq_len=16, lr=1e-2),
    )
    assert up.steps == 2 and up.final_loss is not None and (up.tied_groups == g) is emulate
    trained = verify(str(tmp_path / "up"), reference=str(src), **data)
    assert trained.converted.kv_heads == v.converted.kv_heads
    if emulate:  # the repeated K/V heads moved, and moved together: still GQA-g
        _assert_tied(tmp_path / "up", tmp_path / "conv", g)


def _assert_tied(trained, before, g: int) -> None:
    from gqa_convert.conversion.layer import linear_inputs
    from gqa_convert.conversion.plan import build_plan

    def kv(path):
        source = open_source(path)
        plan = build_plan(source, H)  # identity plan: roles of every block
        out = []
        for lp in plan.layers:
            tensors = {n: source.read(n) for n in lp.input_names}
            by_role = linear_inputs(plan, lp, tensors)
            out += [by_role[r] for r in ("k.weight", "v.weight")]
        return out

    moved = False
    for new, old in zip(kv(trained), kv(before), strict=True):
        heads = new.reshape(g, H // g, HD, -1)
        assert torch.equal(heads, heads[:, :1].expand_as(heads)), "copies of a head stay identical"
        moved = moved or not torch.equal(new, old)
    assert moved, "training changed the K/V heads"


def test_t5_verify_scores_the_decoder_on_the_second_half(tmp_path, text):
    model = build_fixture("t5")
    src = save_model(model, tmp_path / "src")
    corpus.save_tokenizer(src, WORDS, 64)
    r = verify(str(src), data=[str(text / "eval.txt")], max_tokens=200, seq_len=20, use_manifest=False)
    assert r.settings["scheme"].startswith("each window")
    # 10 windows of 20 tokens: the decoder is scored on 10 tokens of each
    assert r.converted.tokens == 100
    with pytest.raises(ConversionError, match="at least 4"):
        verify(str(src), data=[str(text / "eval.txt")], seq_len=3, use_manifest=False)


def test_verify_cli_says_when_a_conversion_is_emulated(tmp_path, text):
    from typer.testing import CliRunner

    from gqa_convert.cli import app

    src = save_model(build_fixture("gpt2"), tmp_path / "src")
    corpus.save_tokenizer(src, WORDS, 64)
    convert(src, 2, out=tmp_path / "emu", emulate=True)
    r = CliRunner().invoke(
        app,
        ["verify", str(tmp_path / "emu"), "--data", str(text / "eval.txt"), "--seq-len", "32", "--max-tokens", "128"],
    )
    out = " ".join(r.output.split())
    assert r.exit_code == 0, r.output
    assert "emulated: the converted model repeats each pooled K/V head back to 4" in out
    assert "saves 0.0%" in out
