"""Uptraining on real weights: convert ../shared stories260K-mha to MQA (mean pooling), then
uptrain it on the shared *training* text with and without the MHA teacher, and measure
perplexity on the shared *evaluation* text (never trained on) before and after.

    python scripts/report_uptrain.py [--steps 300] [--lr 1e-3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gqa_convert import UptrainOptions, convert, uptrain, verify  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
SEP = "<|endoftext|>"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models" / "stories260K-mha"))
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    train = str(SHARED / "data" / "tinystories-valid-train.txt")
    evaluation = str(SHARED / "data" / "tinystories-valid-head64k.txt")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gqa-uptrain-"))
    conv = work / "converted"
    convert(args.model, args.groups, out=conv, force=True)

    def ppl(path: str) -> float:
        return verify(
            path,
            reference=None,
            use_manifest=False,
            data=[evaluation],
            separator=SEP,
            seq_len=256,
            stride=128,
            max_tokens=32768,
        ).converted.ppl

    source, before = ppl(args.model), ppl(str(conv))
    rows = [("source (MHA)", source), (f"converted G={args.groups}, mean, no uptraining", before)]
    for teacher in (None, args.model):
        out = work / ("up-teacher" if teacher else "up-lm")
        r = uptrain(
            str(conv),
            UptrainOptions(
                data=[train],
                out=out,
                steps=args.steps,
                lr=args.lr,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                separator=SEP,
                teacher=teacher,
                force=True,
            ),
        )
        label = f"+ {args.steps} steps ({r.tokens:,} tokens), " + ("teacher KD 0.5" if teacher else "LM loss only")
        rows.append((label, ppl(str(out))))
    print(f"\nevaluation perplexity on {Path(evaluation).name} (BOS per story, seq-len 256, stride 128)")
    print(f"{'model':<58} {'ppl':>8} {'gap recovered':>14}")
    for label, p in rows:
        rec = (before - p) / (before - source) if p != source else float("nan")
        print(f"{label:<58} {p:8.3f} {'' if p in (source, before) else f'{rec:13.1%}':>14}")


if __name__ == "__main__":
    main()
