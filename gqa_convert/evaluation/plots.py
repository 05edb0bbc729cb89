"""PNG plots (matplotlib, headless): training curves and the demo's method x G table."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(history: list[dict[str, Any]], path: Path, title: str = "uptraining") -> None:
    """Training loss (and eval perplexity, if measured) against step."""
    plt = _plt()
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_ppl" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="training loss", color="tab:blue")
        ax.set_ylabel("training loss (nats/token)")
    ax.set_xlabel("step")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(
            [h["step"] for h in evals], [h["eval_ppl"] for h in evals], "o-", color="tab:red", label="eval perplexity"
        )
        ax2.set_ylabel("eval perplexity")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality(rows: list[dict[str, Any]], path: Path, title: str, extra: dict[str, float] | None = None) -> None:
    """Perplexity ratio (converted / source) against G, one line per method; `extra`
    marks single points (e.g. MQA after uptraining) as stars at G = 1."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    methods = sorted({r["method"] for r in rows}, key=[r["method"] for r in rows].index)
    for m in methods:
        pts = sorted((r["groups"], r["ppl_ratio"]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
    for label, value in (extra or {}).items():
        ax.plot([1], [value], "*", markersize=14, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    gs = sorted({r["groups"] for r in rows})
    ax.xaxis.set_major_locator(FixedLocator(gs))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("KV heads G (log scale)")
    ax.set_ylabel("perplexity ratio converted / source (log)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
