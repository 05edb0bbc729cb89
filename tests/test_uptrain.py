"""uptrain on CPU with a tiny model: loss falls, resume is exact, teacher and LoRA paths
work, and two processes (torchrun, gloo) match one with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load, save_model
from typer.testing import CliRunner

from gqa_convert import ConversionError, convert
from gqa_convert.cli import app
from gqa_convert.demo import corpus
from gqa_convert.training import UptrainOptions, uptrain


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with the demo's word-level tokenizer, its MQA conversion and training text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("up")
    cfg = LlamaConfig(
        vocab_size=36,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    src = save_model(LlamaForCausalLM(cfg), root / "src")
    corpus.save_tokenizer(src, 32, 64)
    convert(src, 1, out=root / "mqa")
    # counting text (each word followed by the next): learnable in a few dozen steps
    for name, n, seed in (("train.txt", 200, 1), ("eval.txt", 10, 2)):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, 32, (n,), generator=g).tolist()
        docs = [" ".join(f"w{(k + j) % 32}" for j in range(40)) for k in starts]
        (root / name).write_text("\n\n".join(docs) + "\n")
    return root


def opts(tiny: Path, out: Path, **kw) -> UptrainOptions:
    base = dict(data=[str(tiny / "train.txt")], out=out, steps=30, lr=3e-3, batch_size=4, seq_len=32, warmup=3, seed=0)
    return UptrainOptions(**{**base, **kw})


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in h]


def test_loss_falls_and_output_is_a_stock_checkpoint(tiny, tmp_path):
    r = uptrain(str(tiny / "mqa"), opts(tiny, tmp_path / "o", eval_data=[str(tiny / "eval.txt")], eval_every=10))
    ls = losses(tmp_path / "o")
    assert len(ls) == 30 and sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.3
    assert r.eval_ppl_after < r.eval_ppl_before
    model = load(tmp_path / "o")
    assert model.config.num_key_value_heads == 1
    m = json.loads((tmp_path / "o" / "gqa_convert.json").read_text())
    assert m["conversion"]["kv_heads_after"] == 1 and m["uptraining"]["steps"] == 30
    assert m["output_name"] == "o", "the manifest names the uptrained output, not its start"
    card = (tmp_path / "o" / "README.md").read_text()
    assert "Uptrained after conversion for 30 steps" in card and "has not been uptrained" not in card
    assert (tmp_path / "o" / "training.png").stat().st_size > 1000
    assert (tmp_path / "o" / "tokenizer.json").is_file()
    assert not (tmp_path / "o.uptrain-state").exists()


def test_resume_gives_the_same_losses(tiny, tmp_path):
    uptrain(str(tiny / "mqa"), opts(tiny, tmp_path / "full", steps=12))

    def interrupt(info):
        if info.step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        uptrain(str(tiny / "mqa"), opts(tiny, tmp_path / "cut", steps=12, save_every=5), on_step=interrupt)
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.uptrain-state" / "step-5").is_dir()
    r = uptrain(str(tiny / "mqa"), opts(tiny, tmp_path / "cut", steps=12, save_every=5, resume=True))
    assert r.resumed_from == 5
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(b) == 12
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)


def test_teacher_and_lora(tiny, tmp_path):
    r = uptrain(str(tiny / "mqa"), opts(tiny, tmp_path / "kd", steps=5, teacher=str(tiny / "src")))
    assert r.teacher and all(torch.isfinite(torch.tensor(losses(tmp_path / "kd"))))
    r = uptrain(str(tiny / "mqa"), opts(tiny, tmp_path / "lora", steps=5, lora=True, lora_rank=4))
    assert r.lora and r.cost.params_trained < r.cost.params_total / 2
    sd = load(tmp_path / "lora").state_dict()
    assert not any("lora" in k for k in sd), "adapters are merged: the output is a stock checkpoint"


def test_budget_and_bad_options(tiny, tmp_path):
    r = uptrain(
        str(tiny / "mqa"), opts(tiny, tmp_path / "d", steps=None, alpha=0.05, pretrain_tokens=12800), dry_run=True
    )
    assert r.steps == 5 and r.dry_run and not (tmp_path / "d").exists()  # 640 tokens / (4 x 32)
    with pytest.raises(ConversionError, match="exactly one budget"):
        uptrain(str(tiny / "mqa"), opts(tiny, tmp_path / "x", tokens=100))
    with pytest.raises(ConversionError, match="needs a GPU"):
        uptrain(str(tiny / "mqa"), opts(tiny, tmp_path / "x", dtype="bf16"))
    res = CliRunner().invoke(
        app,
        [
            "uptrain",
            str(tiny / "mqa"),
            "--data",
            str(tiny / "train.txt"),
            "--out",
            str(tmp_path / "c"),
            "--steps",
            "3",
            "--seq-len",
            "32",
            "--dry-run",
        ],
    )
    assert res.exit_code == 0 and "activations" in res.output


def test_two_processes_match_one(tiny, tmp_path):
    if shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists():
        pytest.skip("torchrun is not installed")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    common = [
        "-m",
        "gqa_convert",
        "uptrain",
        str(tiny / "mqa"),
        "--data",
        str(tiny / "train.txt"),
        "--steps",
        "6",
        "--seq-len",
        "32",
        "--lr",
        "3e-3",
        "--warmup",
        "2",
        "-q",
        "--eval-data",
        str(tiny / "eval.txt"),
        "--eval-every",
        "3",
        "--eval-tokens",
        "256",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, *common, "--batch-size", "4", "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            "2",
            "--master-port",
            "29533",
            *common,
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")), rtol=1e-3, atol=1e-4
    )
    evals = [
        [
            h["eval_ppl"]
            for h in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
            if "eval_ppl" in h
        ]
        for d in ("one", "two")
    ]
    assert len(evals[0]) == 3  # before, at step 3, after
    torch.testing.assert_close(torch.tensor(evals[1]), torch.tensor(evals[0]), rtol=1e-3, atol=1e-4)
    w = [load(tmp_path / d).model.layers[0].self_attn.k_proj.weight for d in ("one", "two")]
    torch.testing.assert_close(w[1], w[0], rtol=1e-3, atol=1e-4)


def test_token_files_and_gradient_checkpointing(tiny, tmp_path):
    import numpy as np

    np.save(tmp_path / "tokens.npy", np.arange(4, 36, dtype=np.int32).repeat(20))
    r = uptrain(
        str(tiny / "mqa"),
        opts(tiny, tmp_path / "o", data=[str(tmp_path / "tokens.npy")], steps=3, gradient_checkpointing=True),
    )
    assert r.steps == 3 and len(losses(tmp_path / "o")) == 3
    with pytest.raises(ConversionError, match="one kind of --data"):
        uptrain(
            str(tiny / "mqa"), opts(tiny, tmp_path / "x", data=[str(tmp_path / "tokens.npy"), str(tiny / "train.txt")])
        )


def test_lora_merge_into_a_fresh_base_equals_peft_merge(tiny):
    """A 4-bit run's adapters are merged into the source loaded again in full precision
    (peft's own merge on a 4-bit base re-quantizes, and the model cannot be cast back):
    the result equals merging the same adapters into the base they were trained on."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gqa_convert.training.uptrainer import merge_lora_into

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny / "mqa", dtype=torch.float32)

    trained = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)  # B starts at zero: a real delta must be there to be merged
    merged = merge_lora_into(trained, base())
    expected = trained.merge_and_unload().state_dict()
    got = merged.state_dict()
    assert set(got) == set(expected) and not any("lora" in k for k in got)
    changed = [k for k in got if not torch.equal(got[k], base().state_dict()[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)


def test_deterministic_runs_repeat(tiny, tmp_path):
    """--deterministic is process-wide (torch.use_deterministic_algorithms, as transformers'
    full determinism): switched back off here so later tests run as users' would."""
    try:
        a = uptrain(str(tiny / "mqa"), opts(tiny, tmp_path / "a", steps=4, deterministic=True))
        b = uptrain(str(tiny / "mqa"), opts(tiny, tmp_path / "b", steps=4, deterministic=True))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    losses = [[h["loss"] for h in r.history if "loss" in h] for r in (a, b)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
