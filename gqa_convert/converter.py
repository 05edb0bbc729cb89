"""`convert(...) -> ConvertReport`: the streaming MHA -> GQA/MQA converter.

Tensors are read in the order they lie on disk; untouched ones are copied byte for byte
into their output shard, and each layer's attention tensors are converted as soon as the
last of them has been read. Peak memory is about one layer's attention tensors."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .architectures import KV_ROLES, family_for, layouts
from .card import MANIFEST, model_card, write_manifest
from .errors import ConversionError
from .io.hashing import Hashes, sha256_file
from .io.outdir import OutputDir, writing_errors
from .io.reader import SequentialReader
from .io.safetensors_format import itemsize as _itemsize
from .io.safetensors_format import tensor_bytes, tensor_from_bytes
from .io.source import open_source
from .io.writer import ShardWriter, check_written, shard_file_names
from .kvcache import kv_summary
from .methods import LayerContext, fold_problem
from .methods import grouping as head_grouping
from .plan import DEFAULT_MAX_SHARD, ConversionPlan, LayerPlan, _source_order, build_plan

# Files never copied from the source: weights (ours replace them) and what we write ourselves.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_OWN_FILES = {"config.json", "README.md", MANIFEST, "model.safetensors.index.json", "pytorch_model.bin.index.json"}


@dataclass
class ConvertReport:
    """What a conversion did (or, with dry_run, would do). `to_dict()` is the --json output."""

    source: str
    output: str
    family: str
    n_layers: int
    n_heads: int
    kv_heads_before: int
    kv_heads_after: int
    head_dim: int
    method: str
    seed: int
    kv_cache: dict[str, Any]
    bytes_in: int
    bytes_out: int
    dry_run: bool
    seconds: float = 0.0
    shards: list[str] = field(default_factory=list)
    attention_changes: list[dict[str, Any]] = field(default_factory=list)
    removed_stale: list[str] = field(default_factory=list)
    emulated: bool = False  # K/V heads repeated back to the source count: GPT-G quality, no memory saved

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_output(spec: str, root: Path, n_groups: int) -> Path:
    suffix = "-mqa" if n_groups == 1 else f"-gqa{n_groups}"
    if Path(spec).expanduser().exists():
        return root.parent / f"{root.name}{suffix}"
    return Path.cwd() / f"{spec.rstrip('/').split('/')[-1]}{suffix}"  # a hub id: beside where we run


def _attention_changes(plan: ConversionPlan) -> list[dict[str, Any]]:
    """Every attention tensor whose shape changes, before -> after (for --dry-run)."""
    changes = []
    for lp in plan.layers:
        for role, names in lp.inputs.items():
            outs = lp.outputs[role]
            before = [list(plan.source.tensors[n].shape) for n in names]
            after = [list(t.shape) for t in outs]
            if before != after:
                changes.append(
                    {
                        "layer": lp.layer,
                        "role": role,
                        "name": names[0],
                        "before": before[0],
                        "after": after[0],
                        "count_before": len(before),
                        "count_after": len(after),
                    }
                )
    return changes


def _report(plan: ConversionPlan, out: Path, dry_run: bool) -> ConvertReport:
    s = plan.shape
    return ConvertReport(
        source=plan.source.spec,
        output=str(out),
        family=plan.family.name,
        n_layers=s.n_layers,
        n_heads=s.n_heads,
        kv_heads_before=s.n_kv_heads,
        kv_heads_after=plan.n_groups,
        head_dim=s.head_dim,
        method=plan.method.name,
        seed=plan.seed,
        kv_cache=kv_summary(plan.kv_bytes_per_token(), plan.kv_bytes_per_token(plan.n_groups)),
        bytes_in=plan.bytes_in,
        bytes_out=plan.bytes_out,
        dry_run=dry_run,
        shards=shard_file_names(len(plan.shards)),
        attention_changes=_attention_changes(plan),
        emulated=plan.emulate,
    )


def _linear_roles(plan: ConversionPlan, by_role: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Conv1D weights transposed to (out, in), fused QKV split into q/k/v."""
    s = plan.shape
    by_role = {r: (t.T if r in plan.family.transposed else t) for r, t in by_role.items()}
    if plan.layout_in:
        by_role = layouts.unfuse_roles(by_role, plan.layout_in, s.n_heads, s.n_kv_heads, s.head_dim)
    return by_role


def _stored_roles(plan: ConversionPlan, by_role: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of _linear_roles, in the output's layout; with --emulate, pooled K/V heads are
    first repeated back to the source's count (query head h still reads group h // (H/G))."""
    s = plan.shape
    n_kv = plan.n_groups
    if plan.emulate:
        r = s.n_kv_heads // plan.n_groups
        by_role = {
            role: (
                t.reshape(plan.n_groups, -1, *t.shape[1:]).repeat_interleave(r, dim=0).reshape(-1, *t.shape[1:])
                if role in KV_ROLES
                else t
            )
            for role, t in by_role.items()
        }
        n_kv = s.n_kv_heads
    if plan.layout_out:
        by_role = layouts.fuse_roles(by_role, plan.layout_out, s.n_heads, n_kv, s.head_dim)
    return {r: (t.T.contiguous() if r in plan.transposed_out else t) for r, t in by_role.items()}


def convert_layer(plan: ConversionPlan, lp: LayerPlan, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the method on one layer; returns output tensors by output name."""
    by_role: dict[str, torch.Tensor] = {}
    for role, names in lp.inputs.items():
        parts = [tensors[n] for n in names]
        # Per-head module lists ("{head}" roles) are stacked: (n_heads, *per_head_shape).
        by_role[role] = parts[0] if len(names) == 1 and "{head}" not in plan.family.roles[role] else torch.stack(parts)
    by_role = _linear_roles(plan, by_role)
    for role, t in by_role.items():
        if role in KV_ROLES and t.is_floating_point() and not torch.isfinite(t).all():
            name = lp.inputs.get(role, lp.inputs.get("qkv." + role.split(".")[1], ["?"]))[0]
            raise ConversionError(f"{name}: contains NaN or Inf; the checkpoint is damaged, fetch it again.")
    ctx = LayerContext(
        layer=lp.layer,
        shape=plan.shape,
        n_groups=plan.n_groups,
        seed=plan.seed,
        init_range=float(plan.source.config.get("initializer_range", 0.02)),
        names={
            role: lp.inputs[role][0] if role in lp.inputs else f"{lp.inputs['qkv.weight'][0]}#{role}"
            for role in by_role
        },
        rope=plan.rope,
        key_norm=plan.key_norm,
        moment=plan.calibration.moments[lp.layer] if plan.calibration is not None else None,
    )
    s = plan.shape
    groups = head_grouping.contiguous(s.n_kv_heads, plan.n_groups)
    if plan.grouping == "search" and plan.n_groups < s.n_kv_heads:
        groups = head_grouping.search(s.n_kv_heads, plan.n_groups, fold_problem(by_role, ctx).cost)
        # make each group contiguous; a head permutation leaves the function unchanged
        by_role = head_grouping.permute(by_role, [h for g in groups for h in g], s.n_heads, s.n_kv_heads)
    plan.groupings[lp.layer] = groups
    converted = _stored_roles(plan, plan.method.convert_layer(by_role, ctx))
    out: dict[str, torch.Tensor] = {}
    for role, targets in lp.outputs.items():
        t = converted[role]
        parts = list(t.unbind(0)) if "{head}" in plan.family.roles[role] else [t]
        for target, part in zip(targets, parts, strict=True):
            if tuple(part.shape) != target.shape or tensor_bytes(part).nbytes != target.nbytes:
                raise RuntimeError(f"method {plan.method.name} produced {tuple(part.shape)} for {target.name}")
            out[target.name] = part
    return out


def _write_weights(plan: ConversionPlan, tmp: Path, on_bytes: Callable[[int], None], hashes: Hashes) -> dict[str, str]:
    """Stream every output tensor into its shard; returns SHA-256 of every source and output file."""
    source = plan.source
    member_of = {n: lp for lp in plan.layers for n in lp.input_names}
    writer = ShardWriter(tmp, plan.shards, hashes, on_bytes=on_bytes)
    pending: dict[int, dict[str, torch.Tensor]] = {}
    digests: dict[str, str] = {}
    reader: SequentialReader | None = None

    def read_bytes(name: str) -> Iterator[bytes | memoryview]:
        nonlocal reader
        info = source.tensors[name]
        if source.format != "safetensors":
            yield tensor_bytes(source.read(name))
            return
        if reader is None or reader.path != info.path:
            if reader is not None:
                digests[reader.path.name] = reader.finish()
            reader = SequentialReader(info.path, hashes)
        yield from reader.chunks(info.begin, info.end)

    try:
        for name in _source_order(source):
            lp = member_of.get(name)
            if name in plan.dropped:
                for _ in read_bytes(name):  # still read, so the source file's hash covers it
                    pass
            elif lp is None and name in plan.transpose_copies:  # Conv1D -> Linear for a sibling architecture
                info = source.tensors[name]
                t = tensor_from_bytes(b"".join(read_bytes(name)), info.dtype, info.shape)
                writer.write(name, [tensor_bytes(t.T.contiguous())])
            elif lp is None:
                writer.write(name, read_bytes(name))  # untouched: bytes go straight through
            else:
                info = source.tensors[name]
                pending.setdefault(lp.layer, {})[name] = tensor_from_bytes(
                    b"".join(read_bytes(name)), info.dtype, info.shape
                )
                if name in plan.emit_after:
                    for out_name, t in convert_layer(plan, lp, pending.pop(lp.layer)).items():
                        writer.write(out_name, [tensor_bytes(t)])
        if reader is not None:
            digests[reader.path.name] = reader.finish()
        for path in source.weight_files:  # .bin sources, and files that held no tensor
            if path.name not in digests:
                digests[path.name] = sha256_file(path)
        out_digests = writer.close()
    except BaseException:
        writer.abort()
        if reader is not None:
            reader.close()
        raise
    return digests | {"out/" + k: v for k, v in out_digests.items()}


def copy_other_files(root: Path, dest: Path) -> list[str]:
    """Copy every non-weight file of a checkpoint (tokenizer, generation config, chat
    template, custom code) into `dest`; returns their relative paths."""
    copied = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue
        if str(rel) in _OWN_FILES or path.name.endswith(_WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / rel)  # follows hub-cache symlinks to the real file
        copied.append(str(rel))
    return copied


def _manifest(
    plan: ConversionPlan, report: ConvertReport, hashes: dict[str, str], copied: list[str], command: str
) -> dict[str, Any]:
    src = plan.source
    hub = None if Path(src.spec).expanduser().exists() else src.spec
    return {
        "tool": {"name": "gqa-convert", "version": __version__, "torch": torch.__version__},
        "output_name": Path(report.output).name,
        "source": {
            "name": str(src.root) if hub is None else hub,
            "path": str(src.root),
            "hub_id": hub,
            "revision": src.revision,
            "format": src.format,
            "files": {p.name: hashes[p.name] for p in src.weight_files},
        },
        "conversion": {
            "family": plan.family.name,
            "method": plan.method.name,
            "method_summary": plan.method.summary,
            "seed": plan.seed,
            "n_layers": plan.shape.n_layers,
            "n_heads": plan.shape.n_heads,
            "kv_heads_before": plan.shape.n_kv_heads,
            "kv_heads_after": plan.n_groups,
            "head_dim": plan.shape.head_dim,
            "grouping_mode": plan.grouping,
            # KV heads of the source in each group, per layer (all layers alike for contiguous)
            "grouping": {str(k): v for k, v in sorted(plan.groupings.items())},
            "calibration": plan.calibration.describe() if plan.calibration is not None else None,
            "keys": "mean pooling (per-head key norm: no exact fold)"
            if plan.key_norm and plan.method.name == "fold"
            else None,
            "emulated": plan.emulate,
            "dropped_tensors": plan.dropped,
        },
        "kv_cache": report.kv_cache,
        "output": {
            "bytes": plan.bytes_out,
            "files": {name: hashes["out/" + name] for name in report.shards},
            "copied_files": copied,
        },
        "command": command,
    }


def convert(
    model: str | os.PathLike[str],
    n_groups: int,
    *,
    out: str | os.PathLike[str] | None = None,
    method: str = "mean",
    seed: int = 0,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    force: bool = False,
    dry_run: bool = False,
    revision: str | None = None,
    grouping: str = "contiguous",
    emulate: bool = False,
    sibling: bool = False,
    calib: list[str] | None = None,
    calib_tokens: int = 32768,
    calib_separator: str | None = None,
    trust_remote_code: bool = False,
    on_start: Callable[[ConversionPlan], None] | None = None,
    on_bytes: Callable[[int], None] = lambda n: None,
    command: str | None = None,
) -> ConvertReport:
    """Convert `model` (a local directory or hub id) to `n_groups` KV heads.

    Writes a complete checkpoint at `out` (default: beside the source, suffixed -gqaG or
    -mqa) or nothing at all. `on_start` receives the plan before writing begins and
    `on_bytes` the number of bytes each write added (for progress bars).
    Raises ConversionError for every problem a user can fix.
    """
    started = time.perf_counter()
    source = open_source(model, revision, check_config=family_for)
    plan = build_plan(
        source,
        n_groups,
        method,
        seed=seed,
        max_shard_size=max_shard_size,
        grouping=grouping,
        emulate=emulate,
        sibling=sibling,
    )
    target = Path(out) if out is not None else default_output(str(model), source.root, n_groups)
    if calib and method != "fold":
        raise ConversionError(f"--calib is used by --method fold only (not {method!r})")
    if calib and plan.family.auto_class != "AutoModelForCausalLM":
        raise ConversionError(f"--calib is not supported for {plan.family.name} (not a causal LM)")
    if calib and not dry_run:
        OutputDir(target, source.root, force).check()  # refuse a bad --out before calibrating
        from .calibrate import collect

        fp32_bytes = sum(t.nbytes * 4 // _itemsize(t.dtype) for t in source.tensors.values())
        plan.calibration = collect(
            source.root,
            source.config,
            plan.family,
            plan.attn_prefix,
            plan.shape.n_layers,
            calib,
            tokens=calib_tokens,
            separator=calib_separator,
            bytes_fp32=fp32_bytes,
            trust_remote_code=trust_remote_code,
        )
    report = _report(plan, target.absolute(), dry_run)
    if dry_run:
        OutputDir(target, source.root, force).check()  # same refusals as a real run; nothing is created
        return report
    if on_start:
        on_start(plan)
    command = command or shlex.join(["gqa-convert", *sys.argv[1:]])
    od = OutputDir(target, source.root, force)
    with writing_errors(target), od as tmp, Hashes() as hashes:
        digests = _write_weights(plan, tmp, on_bytes, hashes)
        (tmp / "config.json").write_text(json.dumps(plan.config_out, indent=2) + "\n", encoding="utf-8")
        copied = copy_other_files(source.root, tmp)
        check_written(tmp, plan.shards)
        manifest = _manifest(plan, report, digests, copied, command)
        write_manifest(tmp, manifest)
        (tmp / "README.md").write_text(model_card(manifest), encoding="utf-8")
        od.commit()
    report.removed_stale = [str(p) for p in od.removed_stale]
    report.seconds = time.perf_counter() - started
    return report
