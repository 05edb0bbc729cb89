"""Training throughput of `gqa-convert uptrain` against the Hugging Face Trainer, side by side,
on the same ~1B-parameter Llama-shaped GQA model (random weights), batch and data, seq-len
2048, bf16 — and model FLOPs utilisation (MFU) for both.

    python scripts/bench_uptrain.py                  # on a GPU: ~1.1B params, 20 timed steps each
    python scripts/bench_uptrain.py --tiny           # a CPU smoke run of the same code paths

MFU = 6 * params * tokens/s (+ attention 12 * layers * hidden * seq per token) / peak FLOP/s,
with the peak given by --peak-tflops (default: H100/H200 dense bf16, 989).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=128,
)


def flops_per_token(cfg: dict, n_params: int, seq: int) -> float:
    return 6 * n_params + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq


def count_params(model: Path) -> int:
    """Parameters of a checkpoint, from its safetensors headers (nothing is loaded)."""
    from gqa_convert.io.source import open_source

    return sum(math.prod(t.shape) for t in open_source(model).tensors.values())


def build(work: Path, shape: dict) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(work / "model")
    from gqa_convert.demo import corpus

    corpus.save_tokenizer(work / "model", shape["vocab_size"] - 4, shape["max_position_embeddings"])
    return work / "model"


def write_data(work: Path, n_tokens: int, vocab: int) -> Path:
    import numpy as np

    path = work / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(4, vocab, n_tokens, dtype=np.int32))
    return path


def run_ours(model: Path, data: Path, out: Path, args) -> float:
    from gqa_convert.training import UptrainOptions, uptrain

    times: list[float] = []

    def on_step(s):
        times.append(time.perf_counter())

    uptrain(
        str(model),
        UptrainOptions(
            data=[str(data)],
            out=out,
            steps=args.warmup + args.steps,
            lr=1e-4,
            batch_size=args.batch,
            seq_len=args.seq,
            dtype="auto",
            compile=args.compile,
            gradient_checkpointing=args.checkpointing,
            force=True,
        ),
        on_step=on_step,
    )
    elapsed = times[-1] - times[args.warmup - 1]
    return args.steps * args.batch * args.seq / elapsed


def run_trainer(model: Path, data: Path, out: Path, args) -> float:
    import numpy as np
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    tokens = np.load(data)
    blocks = torch.from_numpy(tokens[: len(tokens) // args.seq * args.seq].astype(np.int64)).view(-1, args.seq)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            return {"input_ids": blocks[i], "labels": blocks[i]}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    cuda = torch.cuda.is_available()
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa")
    targs = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-4,
        bf16=cuda,
        use_cpu=not cuda,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        gradient_checkpointing=args.checkpointing,
        torch_compile=args.compile,
        dataloader_num_workers=0,
    )
    Trainer(model=m, args=targs, train_dataset=Blocks(), callbacks=[Clock()]).train()
    return args.steps * args.batch * args.seq / (times[-1] - times[args.warmup - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    shape = TINY if args.tiny else LLAMA_1B
    if args.tiny:
        args.seq, args.batch, args.steps, args.warmup = 64, 4, 5, 2
    work = Path(tempfile.mkdtemp(prefix="gqa-bench-up-"))
    model = build(work, shape)
    n_params = count_params(model)
    data = write_data(work, (args.warmup + args.steps + 2) * args.batch * args.seq, shape["vocab_size"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    ours = run_ours(model, data, work / "ours", args)
    hf = run_trainer(model, data, work / "hf", args)
    fpt = flops_per_token(shape, n_params, args.seq)
    rows = [("gqa-convert uptrain", ours), ("HF Trainer", hf)]
    print(
        f"\n{device}; {n_params / 1e9:.2f}B params (KV heads {shape['num_key_value_heads']}), batch {args.batch} x "
        f"seq {args.seq}, bf16 autocast on GPU, {args.steps} timed steps"
    )
    print(f"{'trainer':<22} {'tokens/s':>10} {'MFU':>7} {'x Trainer':>10}")
    for name, tps in rows:
        print(f"{name:<22} {tps:>10.0f} {tps * fpt / (args.peak_tflops * 1e12):>7.1%} {tps / hf:>10.2f}")
    print(json.dumps({"device": device, "params": n_params, "ours_tokens_per_s": ours, "trainer_tokens_per_s": hf}))


if __name__ == "__main__":
    main()
