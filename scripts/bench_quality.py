"""Conversion quality, training-free: perplexity ratio converted / source on evaluation text,
methods x G, for every model in ../shared/models. Calibration uses the shared *training*
text only; the evaluation text is never calibrated or trained on. Writes the table as
Markdown and a PNG plot; with --uptrain-steps, also uptrains the MQA model from mean pooling,
fold + calib + search and refine with the same budget, and with --uptrain-match-steps, from
mean pooling for longer, to see how many tokens it needs to reach refine without training.

    python scripts/bench_quality.py --out bench-out/quality
    python scripts/bench_quality.py --models stories260K-mha --methods mean --out bench-out/uptrain \\
        --uptrain-steps 200 --uptrain-match-steps 2000
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


UPTRAIN_STARTS = ("mean", "fold + calib + search", "refine")  # rows of METHODS, at G = 1
UPTRAIN_EVAL = dict(tokens=8192, seq_len=256, stride=256)  # uptrain's own evaluation, before and after


def uptrain_curve(start: Path, steps: int, eval_every: int, out: Path) -> tuple[list[tuple[int, float]], float]:
    """Uptrain `start` for `steps` (seq-len 256, batch 16, lr 1e-3); ([(step, eval ppl)], seconds)."""
    r = uptrain(
        str(start),
        UptrainOptions(
            data=[TRAIN],
            out=out,
            steps=steps,
            lr=1e-3,
            batch_size=16,
            seq_len=UPTRAIN_EVAL["seq_len"],
            separator=SEP,
            eval_data=[EVAL],
            eval_every=eval_every,
            eval_tokens=UPTRAIN_EVAL["tokens"],
            force=True,
        ),
    )
    return [(h["step"], h["eval_ppl"]) for h in r.history if "eval_ppl" in h], r.seconds


def uptrain_compare(model: str, steps: int, match_steps: int, work: Path, out: Path) -> str:
    """MQA uptraining from each start in UPTRAIN_STARTS with the same budget of `steps`; with
    `match_steps`, also a longer run from mean pooling, to find the first evaluated step at
    which it reaches refine's training-free eval perplexity. Writes uptrain_from_start.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_per_step = 16 * UPTRAIN_EVAL["seq_len"]
    ev = UPTRAIN_EVAL
    source = verify(
        model,
        use_manifest=False,
        data=[EVAL],
        separator=SEP,
        seq_len=ev["seq_len"],
        stride=ev["stride"],
        max_tokens=ev["tokens"],
    ).converted.ppl
    curves, lines = {}, []
    for name in UPTRAIN_STARTS:
        start = work / f"start-{name.replace(' ', '')}"
        c = convert(model, 1, out=start, force=True, **METHODS[name])
        curves[name], seconds = uptrain_curve(start, steps, max(1, steps // 8), work / "up")
        (_, before), (_, after) = curves[name][0], curves[name][-1]
        lines.append(f"| {name} | {before:.3f} | {after:.3f} | {c.seconds:.0f} s + {seconds:.0f} s |")
        print(f"uptrain {Path(model).name} MQA from {name}: {before:.3f} -> {after:.3f} in {steps} steps", flush=True)
    md = [
        f"eval: {Path(EVAL).name}, first {ev['tokens']} tokens, seq-len {ev['seq_len']}, stride {ev['stride']}; "
        f"source (MHA) {source:.3f}\n",
        f"| MQA start | eval ppl before | after {steps} steps ({steps * tokens_per_step:,} tokens) "
        "| wall: convert + uptrain |",
        "|---|---|---|---|",
        *lines,
    ]
    panels = 2 if match_steps else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    for name, pts in curves.items():
        ax.plot([s for s, _ in pts], [p for _, p in pts], "o-", ms=3, label=f"MQA from {name}")
    ax.set_title(f"{Path(model).name}: MQA uptraining, {steps} steps from each start")
    if match_steps:
        target = curves["refine"][0][1]
        long, seconds = uptrain_curve(work / "start-mean", match_steps, max(1, match_steps // 80), work / "up")
        hit = next(((s, p) for s, p in long if p <= target), None)
        if hit:
            # the curve is noisy while the lr is high: also where it stays at or below for good
            stay = next(s for i, (s, _) in enumerate(long) if all(p <= target for _, p in long[i:]))
            reach = (
                f"first reached at step {hit[0]} ({hit[0] * tokens_per_step:,} tokens): eval ppl {hit[1]:.3f}; "
                f"at or below from step {stay} ({stay * tokens_per_step:,} tokens) on; last {long[-1][1]:.3f}"
            )
        else:
            reach = (
                f"not reached within {match_steps * tokens_per_step:,} tokens ({match_steps} steps): "
                f"best eval ppl {min(p for _, p in long):.3f}, last {long[-1][1]:.3f}"
            )
        md.append(
            f"\nmean pooling uptrained for {match_steps} steps (its own schedule), evaluated every "
            f"{max(1, match_steps // 80)} steps, against refine's training-free {target:.3f}: {reach} "
            f"(uptrain wall {seconds:.0f} s)"
        )
        print(md[-1].strip(), flush=True)
        ax2 = axes[0][1]
        ax2.plot([s * tokens_per_step / 1e6 for s, _ in long], [p for _, p in long], "-", label="MQA from mean")
        ax2.axhline(target, color="C2", ls=":", label="refine, training-free")
        if hit:
            ax2.plot([hit[0] * tokens_per_step / 1e6], [hit[1]], "kx", ms=8)
        ax2.set_title(f"from mean pooling, {match_steps} steps")
        ax2.set_xlabel("uptraining tokens (millions)")
    for a in axes[0]:
        a.axhline(source, color="grey", ls="--", label="source (MHA)")
        a.set_yscale("log")
        a.set_ylabel(f"eval perplexity ({ev['tokens'] // 1024}k tokens, stride {ev['stride']})")
        a.legend(fontsize=8)
    ax.set_xlabel("uptraining step")
    fig.tight_layout()
    fig.savefig(out / "uptrain_from_start.png", dpi=100)
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-out/quality"))
    ap.add_argument("--tokens", type=int, default=16384, help="evaluation tokens per model")
    ap.add_argument("--uptrain-steps", type=int, default=0, help="MQA uptraining steps from each start [0: none]")
    ap.add_argument(
        "--uptrain-match-steps",
        type=int,
        default=0,
        help="also uptrain from mean pooling this long, until it reaches refine's training-free perplexity",
    )
    ap.add_argument("--uptrain-model", default="stories260K-mha", help="model directory name in ../shared/models")
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
                str(SHARED / "models" / args.uptrain_model),
                args.uptrain_steps,
                args.uptrain_match_steps,
                work,
                args.out,
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
