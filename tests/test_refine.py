"""--method refine: fold's blocks fitted through the converted model. Exact where fold is
exact, never worse than fold on the held-out slice, deterministic, stock-loadable."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import build_fixture, build_model, load, logits, save_model
from typer.testing import CliRunner

from gqa_convert import ConversionError, convert
from gqa_convert.architectures import FAMILIES, refine_refusal
from gqa_convert.cli import app, normalize_argv
from gqa_convert.demo import corpus

WORDS = 40
REFINE_TYPES = sorted(t for f in FAMILIES if f.refine for t in f.model_types)
FAST = dict(method="refine", refine_steps=30, refine_tokens=1024)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine-text")
    corpus.write_text(root / "train.txt", seed=1, n_words=WORDS, n_docs=60, length=40)
    return str(root / "train.txt")


def _source(tmp_path, key: str = "llama"):
    model = build_fixture(key)
    src = save_model(model, tmp_path / f"src-{key}")
    corpus.save_tokenizer(src, WORDS, 64)
    return src, model


def _weights(path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(path.glob("*.safetensors")))


def test_g_equals_h_stays_exact(tmp_path, text):
    src, model = _source(tmp_path)
    r = convert(src, 4, out=tmp_path / "r4", calib=[text], **FAST)
    torch.testing.assert_close(logits(load(tmp_path / "r4")), logits(model), rtol=1e-3, atol=1e-3)
    assert all(x["steps"] == 0 for x in r.refinement["layers"]), "a lossless block is never moved"


@pytest.mark.parametrize("key", REFINE_TYPES)
def test_refined_never_worse_than_fold_on_held_out(tmp_path, text, key):
    src, _ = _source(tmp_path, key)
    r = convert(src, 1, out=tmp_path / "r1", calib=[text], **FAST)
    layers = r.refinement["layers"]
    assert [x["layer"] for x in layers] == [0, 1]
    assert all(x["heldout_after"] <= x["heldout_before"] for x in layers)
    if key == "llama":  # (some fixtures' tokenizers give so few tokens that fold is already exact on them)
        assert any(x["heldout_after"] < 0.9 * x["heldout_before"] for x in layers), "refinement found nothing"
    m = json.loads((tmp_path / "r1" / "gqa_convert.json").read_text())["conversion"]
    assert m["method"] == "refine" and m["refinement"]["steps"] == 30
    assert m["refinement"]["tokens"] > m["refinement"]["heldout_tokens"] > 0
    assert m["refinement"]["calibration"]["files"][text]
    stock = load(tmp_path / "r1")  # stock transformers, no gqa_convert code
    assert stock.config.num_key_value_heads == 1
    assert torch.isfinite(logits(stock)).all()


def test_zero_steps_is_fold(tmp_path, text):
    src, _ = _source(tmp_path)
    convert(src, 2, out=tmp_path / "r", calib=[text], **{**FAST, "refine_steps": 0})
    convert(src, 2, out=tmp_path / "f", method="fold", calib=[text])
    assert _weights(tmp_path / "r") == _weights(tmp_path / "f")


def test_deterministic_given_seed(tmp_path, text):
    src, _ = _source(tmp_path)
    convert(src, 2, out=tmp_path / "a", calib=[text], seed=3, **FAST)
    convert(src, 2, out=tmp_path / "b", calib=[text], seed=3, **FAST)
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")


def test_batch_tokens_sets_the_windows_per_step(tmp_path, text):
    """--refine-batch-tokens is whole windows per Adam step (at least one); a different batch
    is a different fit."""
    src, _ = _source(tmp_path)
    small = convert(src, 2, out=tmp_path / "small", calib=[text], refine_batch_tokens=1, **FAST).refinement
    big = convert(src, 2, out=tmp_path / "big", calib=[text], **FAST).refinement
    assert small["batch_tokens"] == small["seq_len"] < big["batch_tokens"]
    assert _weights(tmp_path / "small") != _weights(tmp_path / "big")


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--refine-steps", "-1"], "--refine-steps"),
        (["--refine-lr", "0"], "--refine-lr"),
        (["--refine-lr", "nan"], "--refine-lr"),
        (["--refine-tokens", "1"], "--refine-tokens"),
        (["--refine-batch-tokens", "0"], "--refine-batch-tokens"),
        (["--refine-device", "tpu"], "--refine-device"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, text, args, flag):
    src, _ = _source(tmp_path)
    r = CliRunner().invoke(
        app, normalize_argv([str(src), "-g", "2", "-m", "refine", "--calib", text, "-o", str(tmp_path / "o"), *args])
    )
    assert r.exit_code == 2, r.output
    assert flag in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_refuses_unsupported_families_and_missing_calib(tmp_path, text):
    src, _ = _source(tmp_path, "gpt2")
    with pytest.raises(ConversionError, match="--method refine does not support GPT-2"):
        convert(src, 2, out=tmp_path / "o", emulate=True, calib=[text], **FAST)
    src, _ = _source(tmp_path, "llama")
    with pytest.raises(ConversionError, match="--method refine needs --calib"):
        convert(src, 2, out=tmp_path / "o", **FAST)
    r = CliRunner().invoke(app, normalize_argv([str(src), "-g", "2", "-m", "refine", "-o", str(tmp_path / "o")]))
    assert r.exit_code == 2 and "needs --calib" in r.output


def test_one_decoder_layer_in_memory_at_a_time(tmp_path, text, monkeypatch):
    """Refine streams the model: whenever weights are materialised, they are the embedding's or
    one decoder layer's (its source attention and its converted layer), never two layers'."""
    from gqa_convert.conversion import refine as refine_module

    model = build_model("llama", num_hidden_layers=3)
    src = save_model(model, tmp_path / "src")
    corpus.save_tokenizer(src, WORDS, 64)
    per_layer = sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n)
    attn = sum(p.numel() for n, p in model.named_parameters() if ".layers.0.self_attn." in n)
    skeletons, seen = [], []
    skeleton, materialise = refine_module._skeleton, refine_module._materialise

    def spy_skeleton(*args, **kwargs):
        skeletons.append(skeleton(*args, **kwargs))
        return skeletons[-1]

    def spy_materialise(*args, **kwargs):
        materialise(*args, **kwargs)
        live = [(n, p.numel()) for m in skeletons for n, p in m.named_parameters() if p.device.type != "meta"]
        layers = {int(m.group(1)) for n, _ in live if (m := re.search(r"\.layers\.(\d+)\.", n))}
        seen.append((layers, sum(k for _, k in live)))

    monkeypatch.setattr(refine_module, "_skeleton", spy_skeleton)
    monkeypatch.setattr(refine_module, "_materialise", spy_materialise)
    convert(src, 1, out=tmp_path / "r", calib=[text], **FAST)
    assert len(skeletons) == 2 and len(seen) == 1 + 2 * 3  # the embedding, then per layer: source attn, converted
    assert all(len(layers) <= 1 for layers, _ in seen), seen
    assert set().union(*(layers for layers, _ in seen)) == {0, 1, 2}
    assert max(n for layers, n in seen if layers) <= per_layer + attn
    assert max(n for layers, n in seen if not layers) == model.get_input_embeddings().weight.numel()


def test_refine_flags_match_the_facts_and_the_readme():
    """`Family.refine` is what the family's facts allow, and README's table says the same,
    with the reason for every family refine refuses."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("| family | model_type |") :].split("\n\n")[0].splitlines()[2:]
    by_type = {t: f for f in FAMILIES for t in f.model_types}
    seen = set()
    for row in table:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        for model_type in re.findall(r"`([^`]+)`", cells[1]):
            family = by_type[model_type]
            seen.add(family.name)
            assert family.refine == (refine_refusal(family) is None), family.name
            if family.refine:
                assert cells[4] == "yes", row
            else:
                assert cells[4].startswith("no: ") and refine_refusal(family) in cells[4], row
    assert seen == {f.name for f in FAMILIES}
