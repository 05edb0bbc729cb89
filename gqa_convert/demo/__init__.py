"""`gqa-convert demo`: the whole pipeline offline, on a model it trains itself.

Trains (once; cached) a small Llama-architecture MHA model on a generated corpus whose
tokens copy earlier tokens at fixed distances, so each head learns a job; converts it with
every method at several G, verifies each against the source, uptrains the mean-pooled MQA
model briefly, and tabulates it all as in the GQA paper (method x G: perplexity ratio and
KV cache saving; MQA before and after uptraining)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..conversion import convert
from ..errors import ConversionError
from ..evaluation import verify
from ..io.hf import quiet_transformers
from ..methods import METHODS
from ..training import UptrainOptions, uptrain
from ..training.loop import train
from . import corpus

DEMO_VERSION = 1  # bump when the model or corpus recipe changes, to retrain the cache


@dataclass(frozen=True)
class DemoSettings:
    layers: int
    hidden: int
    heads: int
    words: int
    seq_len: int
    steps: int
    batch: int
    lr: float
    groups: tuple[int, ...]
    uptrain_steps: int
    eval_docs: int

    def key(self) -> str:
        raw = json.dumps([DEMO_VERSION, asdict(self)], sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:12]


FULL = DemoSettings(
    layers=2,
    hidden=64,
    heads=8,
    words=32,
    seq_len=96,
    steps=1500,
    batch=16,
    lr=1e-2,
    groups=(8, 4, 2, 1),
    uptrain_steps=150,
    eval_docs=48,
)
QUICK = DemoSettings(
    layers=2,
    hidden=64,
    heads=8,
    words=32,
    seq_len=96,
    steps=250,
    batch=16,
    lr=1e-2,
    groups=(4, 1),
    uptrain_steps=25,
    eval_docs=16,
)


@dataclass
class DemoReport:
    base_model: str
    trained: bool  # False when the cached model was used
    rows: list[dict[str, Any]] = field(default_factory=list)  # method, groups, ppl_ratio, kv_saving
    uptrained: dict[str, Any] = field(default_factory=dict)
    plot: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gqa-convert"


def base_model(s: DemoSettings, cache: Path, log: Callable[[str], None]) -> tuple[Path, bool]:
    """The trained MHA model, from the cache or trained now (then cached)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    path = cache / f"demo-mha-{s.key()}"
    if all((path / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        log(f"using the cached demo model {path}")
        return path, False
    if path.exists() or path.is_symlink():  # an incomplete cache entry: train it again
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink()
    vocab = len(corpus.SPECIALS) + s.words
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=s.hidden,
        intermediate_size=2 * s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=2 * s.seq_len,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    log(f"training a {s.layers}-layer, {s.heads}-head MHA model on the generated corpus ({s.steps} steps, CPU)…")
    start = time.perf_counter()
    hist = train(
        model,
        corpus.token_batches(0, s.words, s.batch, s.seq_len),
        steps=s.steps,
        lr=s.lr,
        warmup=30,
        on_step=lambda r: log(f"  step {r.step}/{s.steps}  loss {r.lm_loss:.3f}") if r.step % 250 == 0 else None,
    )
    log(f"trained in {time.perf_counter() - start:.0f} s, final loss {hist[-1].lm_loss:.3f}")
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    corpus.save_tokenizer(tmp, s.words, cfg.max_position_embeddings)
    os.replace(tmp, path)
    return path, True


def run_demo(
    quick: bool = False,
    out: Path | str = "gqa-demo",
    cache: Path | None = None,
    log: Callable[[str], None] = print,
) -> DemoReport:
    """Run the demo; outputs (converted checkpoints, plot, results.json) go under `out`."""
    started = time.perf_counter()
    s = QUICK if quick else FULL
    out = Path(out).absolute()
    cache = Path(cache or cache_root()).absolute()
    marker = out / ".gqa-demo"
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():
        raise ConversionError(
            f"--out {out}: exists and holds other files; the demo writes its models and data there and would "
            "replace them. Choose a new or empty folder (or one an earlier demo wrote)."
        )
    for folder, flag in ((out, "--out"), (cache, "--cache-dir")):
        if folder.exists() and not folder.is_dir():
            raise ConversionError(f"{flag} {folder}: exists and is not a directory; choose another")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConversionError(f"{flag} {folder}: cannot create it ({e.strerror})") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConversionError(f"{flag} {folder}: cannot write in it; choose another")
    src, trained = base_model(s, cache, log)
    report = DemoReport(str(src), trained)

    marker.write_text("written by gqa-convert demo; it may replace what it wrote here\n")
    eval_text, train_text = out / "eval.txt", out / "train.txt"
    corpus.write_text(eval_text, seed=1234, n_words=s.words, n_docs=s.eval_docs, length=s.seq_len - 1)
    corpus.write_text(train_text, seed=99, n_words=s.words, n_docs=400 if quick else 2000, length=s.seq_len - 1)
    common = dict(data=[str(eval_text)], seq_len=s.seq_len, stride=s.seq_len, max_tokens=s.eval_docs * s.seq_len)
    for method in METHODS:
        if METHODS[method].needs_calib:
            continue  # refine: calibrated fitting takes minutes here; the README's quality tables show it
        for g in s.groups:
            if g == s.heads and method != "mean":
                continue  # G = H is the source itself for every method
            dest = out / f"{method}-g{g}"
            conv = convert(src, g, out=dest, method=method, force=True, command=f"gqa-convert demo ({method}, G={g})")
            v = verify(str(dest), reference=str(src), **common)
            report.rows.append(
                {
                    "method": method,
                    "groups": g,
                    "ppl": v.converted.ppl,
                    "source_ppl": v.reference.ppl,
                    "ppl_ratio": v.ppl_ratio,
                    "kv_saving": conv.kv_cache["saving"],
                }
            )
            log(f"  {method:>7} G={g}: perplexity x{v.ppl_ratio:.3f}, KV cache saves {conv.kv_cache['saving']:.1%}")

    log(f"uptraining the mean-pooled MQA model for {s.uptrain_steps} steps…")
    up = uptrain(
        str(out / "mean-g1"),
        UptrainOptions(
            data=[str(train_text)],
            out=out / "mean-g1-uptrained",
            steps=s.uptrain_steps,
            lr=3e-3,
            batch_size=16,
            seq_len=s.seq_len,
            force=True,
            warmup=5,
        ),
    )
    v = verify(str(out / "mean-g1-uptrained"), reference=str(src), **common)
    before = next(r for r in report.rows if r["method"] == "mean" and r["groups"] == 1)
    report.uptrained = {
        "method": "mean",
        "groups": 1,
        "steps": s.uptrain_steps,
        "tokens": up.tokens,
        "ppl_ratio_before": before["ppl_ratio"],
        "ppl_ratio_after": v.ppl_ratio,
    }
    from ..evaluation.plots import plot_quality

    report.plot = str(out / "demo.png")
    plot_quality(
        report.rows,
        Path(report.plot),
        "gqa-convert demo: quality after conversion",
        extra={f"mean, MQA + {s.uptrain_steps} uptraining steps": v.ppl_ratio},
    )
    report.seconds = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
