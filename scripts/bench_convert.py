"""Benchmark the converter against `cp -r` and the naive transformers route, side by side.

Builds a synthetic checkpoint with a real model's shapes (Llama-2-7B in bf16 by default:
random values, two shards as on the hub), then runs, each in its own process:
  cp -r SRC DST                                  (the floor: just moving the bytes)
  gqa-convert SRC --groups G                     (this project)
  transformers: from_pretrained, edit, save_pretrained   (what people do by hand)
and prints wall time and peak RSS of each, with ratios against cp.

    python scripts/bench_convert.py                     # full 7B shapes: ~13.5 GB on disk, ~27 GB free needed
    python scripts/bench_convert.py --layers 4          # a quick run with fewer layers
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gqa_convert.io.safetensors_format import build_header  # noqa: E402

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "num_hidden_layers": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "initializer_range": 0.02,
}

NAIVE = r"""
import sys, torch
from transformers import AutoModelForCausalLM
src, dst, g = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
cfg = model.config
h, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
for layer in model.model.layers:
    for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
        w = proj.weight.data.float().view(g, h // g, hd, -1).mean(1).reshape(g * hd, -1)
        proj.weight = torch.nn.Parameter(w.to(torch.bfloat16))
        proj.out_features = g * hd
cfg.num_key_value_heads = g
model.save_pretrained(dst, max_shard_size="5GB")
"""


def tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        out += [
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def build_checkpoint(root: Path, cfg: dict, shard_bytes: int) -> int:
    """Write random bf16 weights, sharded like the hub's copy, streaming (no full model in RAM)."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    items = tensors(cfg)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in items:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    pool = (torch.randn(64 * 1024 * 1024) * 0.02).to(torch.bfloat16)  # 128 MB of random values, reused
    n = len(shards)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        header, _ = build_header([(nm, "BF16", s) for nm, s in shard], {"format": "pt"})
        with open(root / fname, "wb") as f:
            f.write(header)
            for j, (name, shape) in enumerate(shard):
                left = math.prod(shape)
                start = (j * 7919) % 1000
                while left:
                    take = min(left, pool.numel() - start)
                    f.write(pool[start : start + take].view(torch.uint8).numpy().tobytes())
                    left -= take
                    start = 0
                weight_map[name] = fname
                total += math.prod(shape) * 2
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return total


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(cmd: list[str], cold: bool) -> tuple[float, int, bool]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    dropped = drop_caches() if cold else False
    # GNU time measures its own fresh child: our (large) process's pages are not counted.
    with tempfile.NamedTemporaryFile("r") as rss_file:
        start = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-q", "-f", "%M", "-o", rss_file.name, *cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.decode()[-2000:]}")
        rss_kib = int(rss_file.read().split()[-1])
    return wall, rss_kib * 1024, dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="layers (32 = Llama-2-7B)")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir)")
    ap.add_argument("--skip-naive", action="store_true", help="skip the transformers route (needs ~14 GB RAM at 7B)")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache before each run")
    args = ap.parse_args()

    cfg = {**LLAMA2_7B, "num_hidden_layers": args.layers}
    work = Path(tempfile.mkdtemp(prefix="gqa-bench-", dir=args.workdir))
    try:
        src = work / "llama-2-7b-shapes"
        t0 = time.perf_counter()
        total = build_checkpoint(src, cfg, shard_bytes=10 * 1000**3)
        print(
            f"built {src.name}: {args.layers} layers, {total / 1e9:.2f} GB bf16 in "
            f"{len(list(src.glob('*.safetensors')))} shards ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        gqa = [sys.executable, "-m", "gqa_convert", str(src), "--groups", str(args.groups), "--quiet"]
        runs = [
            ("cp -r", ["cp", "-r", str(src), str(work / "copy")], work / "copy"),
            ("gqa-convert", gqa + ["--out", str(work / "gqa")], work / "gqa"),
        ]
        if not args.skip_naive:
            runs.append(
                (
                    "transformers",
                    [sys.executable, "-c", NAIVE, str(src), str(work / "naive"), str(args.groups)],
                    work / "naive",
                )
            )
        results = []
        for label, cmd, out in runs:
            wall, rss, cold = measure(cmd, not args.warm)
            results.append((label, wall, rss))
            print(
                f"  {label:<13} {wall:8.1f} s  peak RSS {rss / 2**30:6.2f} GiB  ({'cold' if cold else 'warm'} cache)",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
        base = results[0][1]
        print(f"\n{'run':<13} {'wall s':>8} {'x cp':>6} {'peak RSS GiB':>13}")
        for label, wall, rss in results:
            print(f"{label:<13} {wall:8.1f} {wall / base:6.2f} {rss / 2**30:13.2f}")
        print(
            f"\ntargets: gqa-convert within 1.5x of cp's wall time, peak RSS under 2 GB "
            f"(G={args.groups}, {args.layers} layers, {total / 1e9:.1f} GB)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
