"""Conversion quality, training-free: perplexity ratio converted / source on evaluation text,
methods x G, for every model in ../shared/models. Calibration uses the shared *training*
text only; the evaluation text is never calibrated or trained on. Writes the table as
Markdown and a PNG plot; with --uptrain-steps, also uptrains the MQA model from mean pooling
and from the best method with the same budget and plots both evaluation curves.

    python scripts/bench_quality.py --out bench-out/quality
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gqa_convert import UptrainOptions, convert, uptrain, valid_groups, verify  # noqa: E402
from gqa_convert.io.source import open_source  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
SEP = "<|endoftext|>"
TRAIN = str(SHARED / "data" / "tinystories-valid-train.txt")
EVAL = str(SHARED / "data" / "tinystories-valid-head64k.txt")
METHODS = {
    "mean": dict(method="mean"),
    "first": dict(method="first"),
    "random": dict(method="random"),
    "fold (data-free)": dict(method="fold"),
    "fold + search": dict(method="fold", grouping="search"),
    "fold + calib": dict(method="fold", calib=[TRAIN], calib_separator=SEP),
    "fold + calib + search": dict(method="fold", grouping="search", calib=[TRAIN], calib_separator=SEP),
    "refine": dict(method="refine", calib=[TRAIN], calib_separator=SEP),
    "refine + search": dict(method="refine", grouping="search", calib=[TRAIN], calib_separator=SEP),
}
BASELINES = ("mean", "first", "random")


def ppl(path: str, tokens: int) -> float:
    return verify(
        path, use_manifest=False, data=[EVAL], separator=SEP, seq_len=256, stride=128, max_tokens=tokens
    ).converted.ppl


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    for ax, (model, rows) in zip(axes[0], results.items(), strict=True):
        for method in {m for m, _ in rows}:
            pts = sorted((g, r) for (m, g), r in rows.items() if m == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({g for _, g in rows}), [str(g) for g in sorted({g for _, g in rows})])
        ax.set_title(model)
        ax.set_xlabel("KV heads G")
        ax.set_ylabel("perplexity ratio converted / source")
        ax.axhline(1, color="grey", lw=0.8, ls="--")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def uptrain_compare(model: str, best: dict, steps: int, work: Path, out: Path, tokens: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, kw in (("mean pooling", {"method": "mean"}), ("fold + calib + search", best)):
        conv = work / f"start-{kw['method']}"
        convert(model, 1, out=conv, force=True, **kw)
        r = uptrain(
            str(conv),
            UptrainOptions(
                data=[TRAIN],
                out=work / f"up-{kw['method']}",
                steps=steps,
                lr=1e-3,
                batch_size=16,
                seq_len=256,
                separator=SEP,
                eval_data=[EVAL],
                eval_every=max(1, steps // 6),
                eval_tokens=8192,
                force=True,
            ),
        )
        ev = [h for h in r.history if "eval_ppl" in h]
        ax.plot([h["step"] for h in ev], [h["eval_ppl"] for h in ev], "o-", label=f"MQA from {label}")
        lines.append(f"| {label} | {ev[0]['eval_ppl']:.3f} | {ev[-1]['eval_ppl']:.3f} |")
    ax.axhline(ppl(model, 8192), color="grey", ls="--", label="source (MHA)")
    ax.set_yscale("log")
    ax.set_xlabel("uptraining step")
    ax.set_ylabel("eval perplexity (8k tokens)")
    ax.set_title(f"{Path(model).name}: MQA uptraining, same budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "uptrain_from_start.png", dpi=110)
    return "\n".join([f"| MQA start ({steps} steps) | eval ppl before | after |", "|---|---|---|", *lines])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-out/quality"))
    ap.add_argument("--tokens", type=int, default=16384, help="evaluation tokens per model")
    ap.add_argument("--uptrain-steps", type=int, default=0)
    ap.add_argument("--models", nargs="*", help="model directory names in ../shared/models [default: all]")
    ap.add_argument("--methods", nargs="*", help=f"rows to run [default: all of {', '.join(METHODS)}]")
    args = ap.parse_args()
    methods = {k: v for k, v in METHODS.items() if not args.methods or k in args.methods}
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gqa-quality-"))
    results: dict[str, dict] = {}
    md = []
    for model_dir in sorted((SHARED / "models").iterdir()):
        if args.models and model_dir.name not in args.models:
            continue
        src = open_source(model_dir)
        n_heads = src.config["num_attention_heads"]
        n_kv = src.config.get("num_key_value_heads") or n_heads
        gs = [g for g in valid_groups(n_heads, n_kv) if g < n_kv]
        base = ppl(str(model_dir), args.tokens)
        rows = {}
        for name, kw in methods.items():
            for g in gs:
                plain = name.replace(" + search", "")
                if g == 1 and plain != name and (plain, 1) in rows:  # one group holds every head: search is a no-op
                    rows[(name, 1)] = rows[(plain, 1)]
                    continue
                r = convert(model_dir, g, out=work / "c", force=True, **kw)
                rows[(name, g)] = ppl(str(work / "c"), args.tokens) / base
                extra = ""
                if r.refinement:
                    layers = r.refinement["layers"]
                    extra = f"  refine {r.refinement['seconds']:.1f} s, " + ", ".join(
                        f"L{x['layer']} {x['heldout_before']:.3f}->{x['heldout_after']:.3f} "
                        f"({x['steps']} steps, {x['seconds']:.1f} s)"
                        for x in layers
                    )
                print(
                    f"{model_dir.name:<16} G={g} {name:<24} x{rows[(name, g)]:.3f}  {r.seconds:.1f} s{extra}",
                    flush=True,
                )
        results[f"{model_dir.name} (H={n_heads}, KV={n_kv})"] = rows
        md.append(f"**{model_dir.name}** (source perplexity {base:.3f}; {n_heads} query heads, {n_kv} KV heads)\n")
        md.append("| method | " + " | ".join(f"G={g}" for g in gs) + " |")
        md.append("|---|" + "---|" * len(gs))
        for name in methods:
            md.append(f"| {name} | " + " | ".join(f"{rows[(name, g)]:.3f}" for g in gs) + " |")
        if "mean" in methods and set(methods) - set(BASELINES):
            mean = {g: rows[("mean", g)] - 1 for g in gs}
            best = {g: min(rows[(n, g)] for n in methods if n not in BASELINES) - 1 for g in gs}
            md.append(
                "| best excess / mean excess | "
                + " | ".join(f"{best[g] / mean[g]:.3f}" if mean[g] > 1e-6 else "-" for g in gs)
                + " |\n"
            )
    plot(results, args.out / "quality.png")
    if args.uptrain_steps:
        md.append(
            uptrain_compare(
                str(SHARED / "models" / "stories260K-mha"),
                METHODS["fold + calib + search"],
                args.uptrain_steps,
                work,
                args.out,
                args.tokens,
            )
        )
    table = "\n".join(md)
    (args.out / "quality.md").write_text(table + "\n")
    (args.out / "quality.json").write_text(
        json.dumps({m: {f"{k[0]}|{k[1]}": v for k, v in r.items()} for m, r in results.items()}, indent=2)
    )
    print("\n" + table)
    print(
        f"evaluation: {Path(EVAL).name}, {args.tokens} tokens, seq-len 256, stride 128; calibration: "
        f"{Path(TRAIN).name}, 32768 tokens"
    )


if __name__ == "__main__":
    main()
