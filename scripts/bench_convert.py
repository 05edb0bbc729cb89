"""Benchmark the converter against a copy that also syncs, side by side, in one run.

Builds a synthetic checkpoint with a real model's shapes (random bf16 values, two shards as
on the hub: `--shape 1.1b` is TinyLlama-1.1B in MHA form, `--shape 7b` Llama-2-7B), then
runs, each in its own process, in alternating pairs (A B A B ...):

  copy:   sh -c 'cp -r SRC DST && sync'          the floor: every byte read and written once, durable
  convert: gqa-convert SRC --groups G             fsyncs every shard, hashes everything

with a cold page cache (dropped before every run; needs root) and a warm one (the source
read once beforehand), and prints per command the medians of wall time, CPU seconds (user,
sys) and CPU seconds per GB, the whole machine's busy CPU per GB (/proc/stat: counts the
kernel's writeback threads, which a buffered copy leaves its dirty pages to; the machine
must be otherwise idle), peak RSS, and the median of the per-pair ratio convert / copy.
The start-up cost alone (imports) is printed first, then the hash floor: start-up plus the
two SHA-256 streams the manifest records (every source and output byte, at this CPU's measured
rate, spread over its cores), the least time any conversion with that integrity can take; each
comparison prints it as a ratio to its copy.

Every run starts from the same memory state (--memory): 'hot' pauses a VM's free page
reporting and backs all memory (as on bare metal), 'settled' first lets the VM hand its free
pages back to the host. On a VM with free page reporting, a run that needs fresh page-cache pages (`cp`)
is 2.5-3x as fast in 'hot' as in 'settled'; without either, it depends on what ran before.

Further sections (--sections):
  fold     `--method fold` (data-free) at G=8 and G=1 against mean pooling, warm cache
  search   `--grouping search` cost per layer at 32 and 64 KV heads, in process
  calib    calibration tokens/s on this CPU (fold --calib vs data-free fold, same process setup)
  naive    the transformers route (from_pretrained, edit, save_pretrained), once

    python scripts/bench_convert.py --shape 1.1b                   # ~2.2 GB, a few minutes
    python scripts/bench_convert.py --shape 7b --pairs 3           # ~13.5 GB on disk, ~30 GB free
    python scripts/bench_convert.py --shape 7b --sections fold,search
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gqa_convert.io.safetensors_format import build_header  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
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
SHAPES = {
    "7b": (LLAMA2_7B, 10 * 1000**3),
    "1.1b": (
        {
            **LLAMA2_7B,
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 22,
            "max_position_embeddings": 2048,
        },
        2 * 1000**3,
    ),
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
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


REPORTING = Path("/sys/module/page_reporting/parameters")  # Linux free page reporting (a VM's balloon)
NO_REPORTING = 11  # above the largest page order: no free block qualifies to be reported


def mem_free() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemFree:"):
            return int(line.split()[1]) * 1024
    return 0


def prefault() -> None:
    """Touch every free page (less 1 GiB, so a warm source stays cached) and free it again,
    so that the host backs them all."""
    import mmap

    n = max(0, mem_free() - 2**30)
    if n:
        m = mmap.mmap(-1, n)
        block = b"\1" * (64 << 20)
        for off in range(0, n, len(block)):
            m.write(block[: n - off])
        m.close()


def reported_kib() -> int | None:
    try:
        return int((REPORTING / "reported_kib").read_text())
    except (OSError, ValueError):
        return None


def settle() -> None:
    """Wait until the kernel has reported its free pages to the host (the count stops moving
    for 2 s; at most 60 s); 6 s where the kernel does not say."""
    last, still, t0 = reported_kib(), 0.0, time.monotonic()
    if last is None:
        time.sleep(6.0)
        return
    while still < 2.0 and time.monotonic() - t0 < 60:
        time.sleep(0.5)
        now = reported_kib()
        still = still + 0.5 if now == last else 0.0
        last = now


@contextlib.contextmanager
def memory_state(mode: str) -> Iterator[None]:
    """The memory every run of a comparison starts from. On a VM whose balloon reports free
    pages to the host (virtio-balloon free page reporting), the host takes them back, and a
    page's next touch faults on the host, which shows in the guest as a slow memcpy: a 1.1B
    `cp` cold took 4.5-6.7 s (3.4-5.5 s sys) where it got such pages, and 1.8-2.1 s (0.7 s)
    where it reused pages the run just before it had touched. So an alternating benchmark's
    baseline depended on which command ran before it.
      hot      reporting paused (needs root; restored afterwards) and every free page touched
               once: all memory stays backed, as on bare metal
      settled  reporting on; before each run, wait until it has handed every free page back"""
    order = REPORTING / "page_reporting_order"
    saved = None
    if mode == "hot" and order.exists():
        saved = order.read_text().strip()
        try:
            order.write_text(f"{NO_REPORTING}\n")
        except OSError as err:
            raise SystemExit(f"--memory hot needs root on a VM with free page reporting ({err})") from None
        prefault()
    try:
        yield
    finally:
        if saved is not None:
            order.write_text(saved + "\n")


def warm_up(root: Path) -> None:
    """Read every file of `root` once, so the source sits in the page cache."""
    for p in sorted(root.iterdir()):
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


class Run:
    def __init__(self, wall: float, user: float, sys_: float, rss: int, machine: float = float("nan")) -> None:
        self.wall, self.user, self.sys, self.rss = wall, user, sys_, rss
        self.machine = machine  # busy CPU seconds of the whole machine (kernel flusher threads included)

    @property
    def cpu(self) -> float:
        return self.user + self.sys


CODE: Path | None = None  # --code: run gqa-convert from this checkout (to measure another version)


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (/proc/stat: all but idle and iowait).
    A child's own user+sys misses writeback done by kernel threads (cp's, with buffered
    writes); the machine's count includes it, provided nothing else runs meanwhile."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run_once(cmd: list[str]) -> Run:
    """Wall time, CPU time and peak RSS of one child process (and what it waited for).
    GNU time measures its own fresh child, so this (large) process's pages, which a forked
    child carries until it execs, are not counted as the command's."""
    with tempfile.NamedTemporaryFile("r") as stats:
        start, busy = time.perf_counter(), machine_busy()
        proc = subprocess.run(
            ["/usr/bin/time", "-q", "-f", "%U %S %M", "-o", stats.name, *cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=CODE,
        )
        wall, busy = time.perf_counter() - start, machine_busy() - busy
        if proc.returncode != 0:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.decode()[-2000:]}")
        user, sys_, rss_kib = stats.read().split()[-3:]
    return Run(wall, float(user), float(sys_), int(rss_kib) * 1024, busy)


def pairs(
    a: tuple[str, list[str], Path],
    b: tuple[str, list[str], Path],
    n: int,
    cache: str,
    src: Path,
    memory: str = "hot",
) -> tuple[list[Run], list[Run]]:
    """n alternating runs of A and B (A first in odd pairs, B first in even ones); outputs
    are removed, and written-back, between runs. cache: 'cold' drops the page cache before
    every run, 'warm' reads the source once before every run. memory: see memory_state;
    either way every run starts from the same state, whatever ran before it."""
    with memory_state(memory):
        return _pairs(a, b, n, cache, src, memory)


def _pairs(
    a: tuple[str, list[str], Path], b: tuple[str, list[str], Path], n: int, cache: str, src: Path, memory: str
) -> tuple[list[Run], list[Run]]:
    runs: dict[str, list[Run]] = {a[0]: [], b[0]: []}
    for k in range(n):
        for label, cmd, out in (a, b) if k % 2 == 0 else (b, a):
            shutil.rmtree(out, ignore_errors=True)
            if cache == "cold":
                if not drop_caches():
                    raise SystemExit("a cold cache needs root (/proc/sys/vm/drop_caches); use --cache warm")
            else:
                os.sync()
                warm_up(src)
            if memory == "settled":
                settle()
            r = run_once(cmd)
            runs[label].append(r)
            print(
                f"    {label:<12} {r.wall:7.2f} s wall  {r.user:6.2f} user  {r.sys:6.2f} sys  "
                f"{r.machine:6.2f} machine  {r.rss / 2**30:5.2f} GiB",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
    os.sync()
    return runs[a[0]], runs[b[0]]


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def report_pairs(label_a: str, ra: list[Run], label_b: str, rb: list[Run], gb: float, cache: str) -> dict:
    ratio = med([x.wall / y.wall for x, y in zip(ra, rb, strict=True)])
    print(f"\n  {cache}, {len(ra)} pairs, {gb:.2f} GB; medians")
    print(
        f"  {'run':<12} {'wall s':>7} {'user s':>7} {'sys s':>6} {'CPU s/GB':>9} {'machine s/GB':>12} "
        f"{'peak RSS GiB':>13}"
    )
    row = {}
    for label, rs in ((label_b, rb), (label_a, ra)):
        w, u, s_, c, mc, m = (
            med([getattr(r, f) for r in rs]) for f in ("wall", "user", "sys", "cpu", "machine", "rss")
        )
        print(f"  {label:<12} {w:7.2f} {u:7.2f} {s_:6.2f} {c / gb:9.2f} {mc / gb:12.2f} {m / 2**30:13.2f}")
        row[label] = {"wall": w, "user": u, "sys": s_, "cpu_per_gb": c / gb, "machine_cpu_per_gb": mc / gb, "rss": m}
    print(f"  {label_a} / {label_b}: {ratio:.2f}x wall (median of per-pair ratios)\n", flush=True)
    row["ratio"] = ratio
    return row


def sha256_rate(seconds: float = 1.0) -> float:
    """SHA-256 throughput of one core, bytes/s: hashlib (OpenSSL) on a reused 4 MB piece, the
    converter's chunk size, for about `seconds`."""
    import hashlib

    from gqa_convert.io.hashing import CHUNK

    piece, h, n = os.urandom(CHUNK), hashlib.sha256(), 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        h.update(piece)
        n += len(piece)
    return n / (time.perf_counter() - t0)


def hash_floor(bytes_in: int, bytes_out: int, rate: float, startup: float) -> float:
    """The least wall time a conversion that hashes every source and output byte can take here:
    start-up, then the two SHA-256 streams (one thread each, an update of a digest never runs on
    two cores) on however many cores there are, and nothing else — no reading, pooling or writing."""
    cores = os.cpu_count() or 1
    hashing = max(max(bytes_in, bytes_out) / rate, (bytes_in + bytes_out) / rate / cores)
    return startup + hashing


def output_bytes(cmd: list[str]) -> int:
    """bytes_out of a conversion, from its --dry-run --json report (nothing is written)."""
    out = subprocess.run([*cmd, "--dry-run", "--json"], capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)["bytes_out"])


def search_calls(n_kv: int, g: int) -> tuple[int, int]:
    """Cost evaluations of --grouping search, by counting: (greedy phase, one swap round at most).
    Greedy grows each group from its seed, scanning every head left at each step; a swap round
    tries every pair of heads in every pair of groups, two new groups each."""
    r = n_kv // g
    greedy = sum(n_kv - k * r - s for k in range(g) for s in range(1, r)) + g  # + the contiguous groups
    return greedy, math.comb(g, 2) * r * r * 2


def search_scaling(budget: float) -> list[dict]:
    """--grouping search at 7B-like head_dim 128: seconds per cost evaluation (one group's
    data-free fold residual) measured, cost evaluations counted, and a search run for up to
    `budget` seconds to see how far it gets. Time per layer >= (greedy + rounds x round) x call."""
    from gqa_convert.architectures.rope import rope_layout
    from gqa_convert.methods import grouping
    from gqa_convert.methods.fold import FoldProblem

    class Budget(Exception):
        pass

    rows = []
    print(
        f"  {'KV heads':>8} {'hidden':>7} {'G':>3} {'s / call':>8} {'greedy calls':>12} {'calls / round':>13} "
        f"{'greedy + 1 round':>16} {'in budget':>22}"
    )
    for n_kv in (32, 64):
        hd, d, g = 128, 128 * n_kv, 8
        gen = torch.Generator().manual_seed(0)
        t = {
            r: (torch.randn(d, d, generator=gen) * 0.02).to(torch.bfloat16)
            for r in ("q.weight", "k.weight", "v.weight", "o.weight")
        }
        problem = FoldProblem(t, n_kv, n_kv, hd, None, rope_layout(hd, hd, "half"), key_norm=False)
        r = n_kv // g
        for h in range(n_kv):  # per-head quantities are cached on first use: time calls after that
            problem.cost([h])
        times = []
        for k in range(5):
            group = [(k * 7 + i * 5) % n_kv for i in range(r)]
            t0 = time.perf_counter()
            problem.cost(sorted(set(group)))
            times.append(time.perf_counter() - t0)
        per_call = med(times)
        greedy, per_round = search_calls(n_kv, g)
        calls, t0 = [0], time.perf_counter()

        def cost(group: list[int], p: FoldProblem = problem, t0: float = t0, calls: list[int] = calls) -> float:
            if time.perf_counter() - t0 > budget:
                raise Budget
            calls[0] += 1
            return p.cost(group)

        try:
            grouping.search(n_kv, g, cost)
            done = f"finished, {calls[0]} calls"
        except Budget:
            done = f"{calls[0]} calls in {budget:.0f} s"
        low = (greedy + per_round) * per_call
        print(
            f"  {n_kv:>8} {d:>7} {g:>3} {per_call:8.3f} {greedy:>12} {per_round:>13} {low / 60:13.0f} min {done:>22}",
            flush=True,
        )
        rows.append(
            {
                "kv_heads": n_kv,
                "hidden": d,
                "groups": g,
                "s_per_call": per_call,
                "greedy_calls": greedy,
                "calls_per_round": per_round,
                "greedy_plus_round_s": low,
                "budget_run": done,
            }
        )
        del t, problem
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count (a quick run)")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=3, help="alternating pairs per comparison (medians)")
    ap.add_argument("--cache", default="cold,warm", help="cold, warm or both")
    ap.add_argument(
        "--memory",
        default="hot,settled",
        help="hot (a VM's free page reporting paused and all memory backed, as on bare metal; needs root "
        "there), settled (each run waits until the VM has handed its free pages back), or both; see memory_state()",
    )
    ap.add_argument("--sections", default="copy", help="comma list of copy, fold, search, calib, naive")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--search-budget", type=float, default=120, help="seconds each search run may take")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--code", type=Path, default=None, help="a checkout whose gqa_convert to run (default: this one)")
    args = ap.parse_args()
    for name, allowed in (("cache", {"cold", "warm"}), ("memory", {"hot", "settled"})):
        if not set(getattr(args, name).split(",")) <= allowed:
            ap.error(f"--{name}: a comma list of {' and '.join(sorted(allowed))}")
    if args.pairs < 1:
        ap.error("--pairs: at least 1")
    global CODE
    CODE = args.code
    sections = set(args.sections.split(","))

    cfg, shard_bytes = SHAPES[args.shape]
    cfg = {**cfg, "num_hidden_layers": args.layers or cfg["num_hidden_layers"]}
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gqa-bench-", dir=args.workdir))
    figures: dict = {"shape": args.shape, "layers": cfg["num_hidden_layers"], "groups": args.groups}
    try:
        src = work / f"llama-{args.shape}-shapes"
        t0 = time.perf_counter()
        total = build_checkpoint(src, cfg, shard_bytes=shard_bytes)
        gb = total / 1e9
        print(
            f"built {src.name}: {cfg['num_hidden_layers']} layers, {gb:.2f} GB bf16 in "
            f"{len(list(src.glob('*.safetensors')))} shards ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        py = [sys.executable, "-m", "gqa_convert"]

        def gqa(out: Path, *extra: str, groups: int = args.groups) -> list[str]:
            return py + [str(src), "--groups", str(groups), "--quiet", "--out", str(out), *extra]

        copy = ("cp && sync", ["sh", "-c", f'cp -r "{src}" "{work / "copy"}" && sync'], work / "copy")
        conv = ("gqa-convert", gqa(work / "gqa"), work / "gqa")
        if "copy" in sections:
            start = [run_once([*py, "--version"]) for _ in range(3)]
            figures["startup"] = {"wall": med([r.wall for r in start]), "cpu": med([r.cpu for r in start])}
            print(
                f"start-up alone (gqa-convert --version, imports included): {figures['startup']['wall']:.2f} s wall, "
                f"{figures['startup']['cpu']:.2f} s CPU (median of 3)",
                flush=True,
            )
            rate = sha256_rate()
            out_bytes = output_bytes([a for a in conv[1] if a != "--quiet"])
            floor = hash_floor(total, out_bytes, rate, figures["startup"]["wall"])
            figures["hash_floor"] = {"sha256_bytes_per_s": rate, "bytes_out": out_bytes, "wall": floor}
            print(
                f"hash floor: SHA-256 at {rate / 1e9:.2f} GB/s a core; {gb:.2f} GB in + {out_bytes / 1e9:.2f} GB out "
                f"on {os.cpu_count()} cores, plus start-up: {floor:.2f} s before any byte is read or written",
                flush=True,
            )
            for memory in args.memory.split(","):
                for cache in args.cache.split(","):
                    print(
                        f"{cache} cache, {memory} memory: convert --groups {args.groups} vs cp -r && sync", flush=True
                    )
                    ra, rb = pairs(conv, copy, args.pairs, cache, src, memory)
                    row = report_pairs("gqa-convert", ra, "cp && sync", rb, gb, f"{cache} cache, {memory} memory")
                    row["floor_ratio"] = floor / row["cp && sync"]["wall"]
                    print(
                        f"  the hash floor alone is {row['floor_ratio']:.2f}x this cp+sync (targets: 1.2x cold, 1.5x warm)\n",
                        flush=True,
                    )
                    figures[f"copy_{cache}_{memory}"] = row
        if "fold" in sections:
            for g in (8, 1):
                print(f"warm cache: fold (data-free) vs mean, G={g}", flush=True)
                fold = ("fold", gqa(work / "fold", "--method", "fold", groups=g), work / "fold")
                mean = ("mean", gqa(work / "mean", groups=g), work / "mean")
                ra, rb = pairs(fold, mean, args.pairs, "warm", src)
                figures[f"fold_g{g}"] = report_pairs("fold", ra, "mean", rb, gb, "warm cache")
        if "calib" in sections:
            tok = SHARED / "models" / "stories260K"
            text = SHARED / "data" / "tinystories-valid-train.txt"
            if not tok.is_dir() or not text.is_file():
                print("calib: skipped, ../shared is absent", flush=True)
            else:
                for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
                    if (tok / f).is_file():
                        shutil.copy(tok / f, src / f)
                n = args.calib_tokens
                print(f"warm cache: fold --calib ({n} tokens) vs data-free fold, G={args.groups}", flush=True)
                calib = (
                    "fold --calib",
                    gqa(
                        work / "cal",
                        "--method",
                        "fold",
                        "--calib",
                        str(text),
                        "--calib-tokens",
                        str(n),
                        "--calib-separator",
                        "<|endoftext|>",
                    ),
                    work / "cal",
                )
                free = ("fold", gqa(work / "free", "--method", "fold"), work / "free")
                ra, rb = pairs(calib, free, 1, "warm", src)
                extra = ra[0].wall - rb[0].wall
                print(
                    f"  calibration: {extra:.1f} s for {n} tokens = {n / max(extra, 1e-9):.0f} tokens/s, "
                    f"peak RSS {ra[0].rss / 2**30:.2f} GiB\n",
                    flush=True,
                )
                figures["calib"] = {
                    "tokens": n,
                    "seconds": extra,
                    "tokens_per_s": n / max(extra, 1e-9),
                    "rss": ra[0].rss,
                }
        if "search" in sections:
            print(f"--grouping search, data-free fold costs, per layer (runs stopped after {args.search_budget:.0f} s)")
            figures["search"] = search_scaling(args.search_budget)
        if "naive" in sections:
            r = run_once([sys.executable, "-c", NAIVE, str(src), str(work / "naive"), str(args.groups)])
            print(f"  transformers route: {r.wall:.1f} s, peak RSS {r.rss / 2**30:.2f} GiB", flush=True)
            figures["naive"] = {"wall": r.wall, "rss": r.rss}
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
