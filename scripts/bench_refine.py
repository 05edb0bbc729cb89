"""Cost of `--method refine`: seconds per layer and peak memory, against hidden size and
--refine-tokens, on tiny random Llama models (8 heads, MHA, converted to G = 1).

Each configuration runs in its own process: the model is built and saved, fold's calibration
runs, the peak-RSS mark is reset (Linux /proc/self/clear_refs), then refine runs alone, so
`refine peak` is the peak resident set while refining (from `RSS at start`: Python, torch and
transformers, the tokenized text) and `process peak` the whole process's (set by calibration
when that loads the model). The tokenizer is ../shared's 512-token TinyStories one,
the text ../shared/data/tinystories-valid-train.txt (training text, never the evaluation file).

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/bench_refine.py --hidden 256 512 1024 --tokens 4096
    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/bench_refine.py --hidden 256 --tokens 4096 16384 65536

Point PYTHONPATH at another checkout to measure its refine the same way (the script only uses
`build_plan`, `collect` and `refine`). The CPU may be shared: `--repeat` runs each
configuration several times, one after the other, and the table shows every run."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED / "models" / "ts-mha-8h"
TEXT = SHARED / "data" / "tinystories-valid-train.txt"
SEPARATOR = "<|endoftext|>"


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def build(root: Path, hidden: int, layers: int) -> Path:
    """A random MHA Llama (8 heads, SwiGLU width 8/3 hidden, vocab 512) with the shared tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, root / name)
    return root


def one(hidden: int, tokens: int, layers: int, steps: int) -> dict:
    """Build, calibrate, refine once in this process; the row's figures."""
    from gqa_convert.conversion.calibrate import collect
    from gqa_convert.conversion.plan import build_plan
    from gqa_convert.conversion.refine import refine
    from gqa_convert.io.source import open_source

    with tempfile.TemporaryDirectory() as tmp:
        source = open_source(build(Path(tmp) / "model", hidden, layers))
        plan = build_plan(source, 1, "refine")
        calib = collect(
            source.root, source.config, plan.family, [lp.prefix for lp in plan.layers], [str(TEXT)], separator=SEPARATOR
        )
        before = _kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        result = refine(plan, calib, [str(TEXT)], steps=steps, lr=3e-3, tokens=tokens, separator=SEPARATOR)
    per_layer = [x["seconds"] for x in result.record["layers"]]
    return {
        "hidden": hidden,
        "tokens": result.record["tokens"],
        "layers": layers,
        "steps": [x["steps"] for x in result.record["layers"]],
        "s_per_layer": sum(per_layer) / len(per_layer),
        "refine_s": result.record["seconds"],
        "rss_before_mib": before / 1024,
        "refine_mib": _kib("VmHWM") / 1024,
        "process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # run one row here, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.hidden[0], args.tokens[0], args.layers, args.steps)))
        return
    print(
        "| hidden | tokens | layers | steps | s/layer | refine s | RSS at start MiB | refine peak MiB | process peak MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for hidden in args.hidden:
        for tokens in args.tokens:
            for _ in range(args.repeat):
                cmd = [sys.executable, __file__, "--one", "--hidden", str(hidden), "--tokens", str(tokens)]
                cmd += ["--layers", str(args.layers), "--steps", str(args.steps)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(
                    f"| {r['hidden']} | {r['tokens']} | {r['layers']} | {max(r['steps'])} | {r['s_per_layer']:.2f} "
                    f"| {r['refine_s']:.1f} | {r['rss_before_mib']:.0f} | {r['refine_mib']:.0f} | {r['process_mib']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
