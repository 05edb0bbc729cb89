"""One prepared check of every GPU code path, for a short lease of one GPU (an H200).

    bash scripts/gpu_check.sh --out gpu-report                 # on the GPU machine: ~6 min
    bash scripts/gpu_check.sh --cpu --out /tmp/gpu-check        # tiny shapes on CPU (CI runs this)

Steps, each in its own process under its own time box (one failure does not stop the rest):
  1 environment   versions of torch/CUDA/transformers/accelerate/peft/bitsandbytes
  2 convert       a ~1.1B Llama-shaped random MHA checkpoint (bf16, made on the device) to
                  GQA-4 with mean pooling and with fold --calib (calibration on CUDA)
  3 throughput    uptrain in bf16 at seq-len 2048: tokens/s and MFU, against the Hugging Face
                  Trainer on the same model, batch and sequence length
  4 lora_4bit     uptrain --lora --load-in-4bit, merged back; the merged model loads and scores
  5 fsdp_compile  accelerate launch with configs/accelerate/fsdp.yaml on one process, and
                  --compile on one run
  6 verify        verify on the device against the one-window-at-a-time loop on the same
                  tokens: perplexity to 1e-4 in float32, and the tokens/s ratio
  7 resume        kill an uptraining run after its first save, --resume, compare the losses
Steps that need CUDA report "skipped: no GPU" in CPU mode; they never pass silently.
Writes report.json and plots (PNG) into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

H200_PEAK_BF16 = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM by the datasheet (~790 measured on random data)
SHAPES = {
    # ~1.1B, Llama-shaped, MHA (32 KV heads) so that the conversion to GQA-4 is real
    "gpu": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "cpu": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=512,
        max_position_embeddings=128,
    ),
}
RUN = {  # per mode: seq-len, batch, timed steps, warm-up steps, calibration tokens
    "gpu": dict(seq=2048, batch=8, steps=20, warmup=5, calib_tokens=32768, verify_tokens=65536),
    "cpu": dict(seq=64, batch=4, steps=4, warmup=2, calib_tokens=2048, verify_tokens=2048),
}
STEP_SECONDS = {"gpu": 200, "cpu": 240}
SKIP = "skipped: no GPU"


class Skip(Exception):
    pass


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _env(**extra: str) -> dict:
    """The environment of a child: the repository first on PYTHONPATH, whatever was there kept
    (the wheels carried in .whl/ are installed into a folder on it)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", **extra}


def gqa(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in a child process."""
    cmd = [sys.executable, "-m", "gqa_convert", *args]
    full_env = _env(**(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if p.returncode != 0:
        raise RuntimeError(f"gqa-convert {' '.join(args[:3])} ... exit {p.returncode}: {p.stderr.strip()[-600:]}")
    return p


# -- the steps; each returns a dict of figures, raises Skip or fails ---------------------------


def step_environment(work: Path, mode: str) -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "accelerate", "peft", "bitsandbytes", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    out["device"] = torch.cuda.get_device_name() if cuda() else "CPU"
    return out


def _model(work: Path, mode: str) -> Path:
    """The random MHA checkpoint (made once, on the device, in bf16 there)."""
    path = work / "mha"
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gqa_convert.demo import corpus

    cfg = LlamaConfig(**SHAPES[mode], tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    device = "cuda" if cuda() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16 if cuda() else torch.float32)
    model.save_pretrained(path)
    corpus.save_tokenizer(path, cfg.vocab_size - 4, cfg.max_position_embeddings)
    return path


def _text(work: Path, mode: str) -> tuple[Path, Path]:
    from gqa_convert.demo import corpus

    words = SHAPES[mode]["vocab_size"] - 4
    train, held = work / "train.txt", work / "eval.txt"
    if not train.exists():
        corpus.write_text(train, seed=1, n_words=words, n_docs=400, length=500)
        corpus.write_text(held, seed=2, n_words=words, n_docs=60, length=500)
    return train, held


def _converted(work: Path, mode: str) -> Path:
    """The GQA-4 mean-pooled model the later steps train and score (made here if the convert
    step did not run in this work folder, so any step can be rerun alone)."""
    path = work / "gqa4-mean"
    if not (path / "config.json").is_file():
        gqa(str(_model(work, mode)), "-g", "4", "-o", str(path), "--force", "-q")
    return path


def step_convert(work: Path, mode: str) -> dict:
    src = _model(work, mode)
    train, _ = _text(work, mode)
    r = RUN[mode]
    out = {}
    t = time.perf_counter()
    gqa(str(src), "-g", "4", "-o", str(work / "gqa4-mean"), "--force", "-q")
    out["mean_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    gqa(
        str(src),
        "-g",
        "4",
        "--method",
        "fold",
        "--calib",
        str(train),
        "--calib-tokens",
        str(r["calib_tokens"]),
        "-o",
        str(work / "gqa4-fold"),
        "--force",
        "-q",
    )
    out["fold_calib_seconds"] = time.perf_counter() - t
    manifest = json.loads((work / "gqa4-fold" / "gqa_convert.json").read_text())
    out["calibration"] = manifest["conversion"]["calibration"]
    if cuda() and out["calibration"].get("device") != "cuda":
        raise RuntimeError(f"calibration ran on {out['calibration'].get('device')}, not on the GPU")
    return out


def step_throughput(work: Path, mode: str) -> dict:
    import bench_uptrain

    step_convert(work, mode) if not (work / "gqa4-mean").exists() else None
    r = RUN[mode]
    args = argparse.Namespace(
        batch=r["batch"], seq=r["seq"], steps=r["steps"], warmup=r["warmup"], compile=False, checkpointing=False
    )
    model = work / "gqa4-mean"
    data = bench_uptrain.write_data(
        work, (r["warmup"] + r["steps"] + 2) * r["batch"] * r["seq"], SHAPES[mode]["vocab_size"]
    )
    ours = bench_uptrain.run_ours(model, data, work / "up-ours", args)
    hf = bench_uptrain.run_trainer(model, data, work / "up-hf", args)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model).to_dict()
    n_params = bench_uptrain.count_params(model)
    fpt = bench_uptrain.flops_per_token(cfg, n_params, r["seq"])
    out = {
        "params": n_params,
        "batch": r["batch"],
        "seq_len": r["seq"],
        "tokens_per_s": ours,
        "trainer_tokens_per_s": hf,
        "x_trainer": ours / hf,
        "flops_per_token": fpt,
    }
    if cuda():
        out["mfu"] = ours * fpt / H200_PEAK_BF16
        out["trainer_mfu"] = hf * fpt / H200_PEAK_BF16
        out["peak_flops"] = H200_PEAK_BF16
    return out


def step_lora_4bit(work: Path, mode: str) -> dict:
    if not cuda():
        raise Skip(SKIP + " (bitsandbytes 4-bit needs CUDA)")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("bitsandbytes is not installed: carry its wheel (see README, 'GPU check')")
    train, held = _text(work, mode)
    _converted(work, mode)
    out_dir = work / "lora4"
    gqa("uptrain", str(work / "gqa4-mean"), "--data", str(train), "--out", str(out_dir), "--steps", "10",
        "--seq-len", "512", "--batch-size", "4", "--lora", "--load-in-4bit", "--force", "-q")  # fmt: skip
    v = json.loads(
        gqa(
            "verify",
            str(out_dir),
            "--reference",
            str(work / "gqa4-mean"),
            "--data",
            str(held),
            "--seq-len",
            "512",
            "--max-tokens",
            "8192",
            "--json",
            "-q",
        ).stdout  # fmt: skip
    )
    if not math.isfinite(v["converted"]["ppl"]):
        raise RuntimeError("the merged LoRA model scores a non-finite perplexity")
    return {
        "ppl": v["converted"]["ppl"],
        "reference_ppl": v["reference"]["ppl"],
        "kv_heads": v["converted"]["kv_heads"],
    }


def step_fsdp_compile(work: Path, mode: str) -> dict:
    train, _ = _text(work, mode)
    r = RUN[mode]
    out: dict = {}
    common = ["--data", str(train), "--steps", "4", "--seq-len", str(r["seq"]), "--batch-size", "2", "--force", "-q"]
    if cuda():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs/accelerate/fsdp.yaml"), "--num_processes", "1",
               "-m", "gqa_convert", "uptrain", str(work / "gqa4-mean"), "--out", str(work / "fsdp"), *common]  # fmt: skip
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
        if p.returncode != 0:
            raise RuntimeError(f"FSDP run failed: {p.stderr.strip()[-800:]}")
        out["fsdp_seconds"] = time.perf_counter() - t
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(work / "fsdp")  # the gathered state dict is a stock checkpoint
        out["fsdp_output_loads"] = True
    else:
        out["fsdp"] = SKIP + " (FSDP is run on CUDA only here)"
    t = time.perf_counter()
    # inductor on the GPU; on CPU the same code path with the eager backend (inductor's CPU build takes minutes)
    backend = "inductor" if cuda() else "eager"
    gqa("uptrain", str(work / "gqa4-mean"), "--out", str(work / "compiled"), "--compile", "--compile-backend", backend,
        *common)  # fmt: skip
    out["compile_seconds"], out["compile_backend"] = time.perf_counter() - t, backend
    return out


def step_verify(work: Path, mode: str) -> dict:
    import torch
    from bench_verify import guide_loop

    from gqa_convert.data import build_stream, iter_documents
    from gqa_convert.io.hf import load_tokenizer

    _, held = _text(work, mode)
    r = RUN[mode]
    device = "cuda" if cuda() else "cpu"
    seq = min(1024, r["seq"] * 4)
    v = json.loads(
        gqa("verify", str(work / "gqa4-mean"), "--no-reference", "--data", str(held), "--seq-len", str(seq),
            "--max-tokens", str(r["verify_tokens"]), "--dtype", "float32", "--device", device, "--json", "-q").stdout
    )  # fmt: skip
    tok = load_tokenizer(work / "gqa4-mean")
    ids = build_stream(tok, iter_documents([str(held)]), r["verify_tokens"], bos=True).ids
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "gqa4-mean", dtype=torch.float32).to(device).eval()
    t = time.perf_counter()
    nll, count = guide_loop(model, ids, seq, seq // 2, device)
    ppl = math.exp(nll / count)
    loop_tps = count / (time.perf_counter() - t)
    rel = abs(v["converted"]["ppl"] / ppl - 1)
    if rel > 1e-4 or count != v["converted"]["tokens"]:
        raise RuntimeError(f"verify and the loop disagree: {v['converted']['ppl']} vs {ppl} ({count} tokens)")
    return {
        "device": device,
        "ppl": v["converted"]["ppl"],
        "loop_ppl": ppl,
        "relative_difference": rel,
        "tokens": count,
        "verify_tokens_per_s": v["converted"]["tokens_per_second"],
        "loop_tokens_per_s": loop_tps,
        "ratio": v["converted"]["tokens_per_second"] / loop_tps,
    }


def step_resume(work: Path, mode: str) -> dict:
    train, _ = _text(work, mode)
    r = RUN[mode]
    steps, every = 12, 4
    common = ["--data", str(train), "--steps", str(steps), "--seq-len", str(r["seq"]), "--batch-size", "2",
              "--lr", "1e-3", "--warmup", "2", "--save-every", str(every), "--deterministic", "-q"]  # fmt: skip
    model = str(_converted(work, mode))
    gqa("uptrain", model, "--out", str(work / "full"), *common, "--force")
    cut = work / "cut"
    env = _env()
    proc = subprocess.Popen([sys.executable, "-m", "gqa_convert", "uptrain", model, "--out", str(cut), *common],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)  # fmt: skip
    first = cut.parent / (cut.name + ".uptrain-state") / f"step-{every}" / "progress.json"
    deadline = time.time() + 500
    while not first.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(
                f"the run to interrupt ended or stalled before its first save: {proc.stderr.read()[-400:]}"
            )
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gqa("uptrain", model, "--out", str(cut), *common, "--resume")

    def losses(d: Path) -> list[float]:
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [h["loss"] for h in rows if "loss" in h]

    a, b = losses(work / "full"), losses(cut)
    worst = max(abs(x - y) for x, y in zip(a, b, strict=True))
    if len(a) != steps or len(b) != steps or worst > 1e-3:
        raise RuntimeError(f"resumed losses differ (max abs difference {worst}): {a} vs {b}")
    return {"steps": steps, "saved_every": every, "max_abs_loss_difference": worst, "losses": a, "resumed_losses": b}


STEPS = {
    "environment": step_environment,
    "convert": step_convert,
    "throughput": step_throughput,
    "lora_4bit": step_lora_4bit,
    "fsdp_compile": step_fsdp_compile,
    "verify": step_verify,
    "resume": step_resume,
}


def run_one(name: str, work: Path, mode: str, result: Path) -> None:
    """Child process: run one step, write its result."""
    t = time.perf_counter()
    try:
        figures = STEPS[name](work, mode)
        status = "ok"
    except Skip as e:
        figures, status = {}, str(e)
    except Exception as e:  # a failure is a result: it is reported, the other steps still run
        figures, status = {"traceback": traceback.format_exc()[-2000:]}, f"failed: {str(e)[:400]}"
    result.write_text(json.dumps({"status": status, "seconds": time.perf_counter() - t, **figures}, default=str))


def plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    res = report["steps"].get("resume", {})
    if res.get("losses"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, len(res["losses"]) + 1), res["losses"], "o-", label="uninterrupted")
        ax.plot(range(1, len(res["resumed_losses"]) + 1), res["resumed_losses"], "x--", label="killed + --resume")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        ax.set_title(f"resume after SIGKILL ({report['mode']})")
        fig.tight_layout()
        fig.savefig(out / "resume.png", dpi=100)
        plt.close(fig)
        made.append("resume.png")
    thr = report["steps"].get("throughput", {})
    if thr.get("tokens_per_s"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.bar(["gqa-convert uptrain", "HF Trainer"], [thr["tokens_per_s"], thr["trainer_tokens_per_s"]])
        ax.set_ylabel("tokens / s")
        ax.set_title(f"uptraining throughput, batch {thr['batch']} x {thr['seq_len']} ({report['mode']})")
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=100)
        plt.close(fig)
        made.append("throughput.png")
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on CPU: every step's code path, no GPU needed")
    ap.add_argument("--out", type=Path, required=True, help="where report.json and the plots go")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder [default: OUT/work]")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of the steps")
    ap.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    mode = "cpu" if args.cpu else "gpu"
    work = args.work or args.out / "work"
    if args.step:
        run_one(args.step, work, mode, args.result)
        return
    if mode == "gpu" and not cuda():
        raise SystemExit("no CUDA GPU here: run with --cpu, or on the GPU machine")
    args.out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"mode": mode, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}
    t0 = time.perf_counter()
    for name in args.steps.split(","):
        result = work / f"step-{name}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--out", str(args.out), "--work", str(work), "--step", name,
               "--result", str(result)] + (["--cpu"] if args.cpu else [])  # fmt: skip
        try:
            subprocess.run(cmd, timeout=STEP_SECONDS[mode], check=False)
            entry = json.loads(result.read_text()) if result.exists() else {"status": "failed: the step died"}
        except subprocess.TimeoutExpired:
            entry = {"status": f"failed: over its time box of {STEP_SECONDS[mode]} s"}
        report["steps"][name] = entry
        print(f"{name:<13} {entry['status'][:100]}  ({entry.get('seconds', 0):.0f} s)", flush=True)
    report["seconds"] = time.perf_counter() - t0
    report["plots"] = plots(report, args.out)
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    failed = [n for n, e in report["steps"].items() if e["status"].startswith("failed")]
    print(f"report: {args.out / 'report.json'}; {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
