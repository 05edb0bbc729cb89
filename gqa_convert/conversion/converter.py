"""`convert(...) -> ConvertReport`: the streaming MHA -> GQA/MQA converter.

Checks everything it can before writing (the plan from headers, the output path, the files to
copy, calibration), then streams the weights into a temporary directory beside the target,
writes config, copied files, manifest and card, re-checks every shard, and renames the
directory into place."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..architectures import family_for
from ..architectures.kvcache import kv_summary
from ..errors import ConversionError, shown
from ..io.hashing import Hashes
from ..io.outdir import OutputDir, writing_errors
from ..io.paths import copy_files, other_files
from ..io.safetensors_format import itemsize
from ..io.source import Source, open_source
from ..io.writer import check_written, shard_file_names
from ..manifest import MANIFEST, ConversionRecord, Manifest, SourceRecord, model_card
from ..methods import get_method
from ..options import (
    DEFAULT_CALIB_TOKENS,
    DEFAULT_MAX_SHARD,
    DEFAULT_REFINE_BATCH_TOKENS,
    DEFAULT_REFINE_LR,
    DEFAULT_REFINE_STEPS,
    DEFAULT_REFINE_TOKENS,
    check,
)
from .calibrate import Calibration, collect
from .plan import ConversionPlan, build_plan
from .stream import StreamResult, write_weights

# What the output writes itself, so never copies from the source.
OWN_FILES = {"config.json", "README.md", MANIFEST, "model.safetensors.index.json", "pytorch_model.bin.index.json"}


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
    emulated: bool = False  # K/V heads repeated back to the source count: GQA-G quality, no memory saved
    notes: list[str] = field(default_factory=list)  # what changed beyond K/V (e.g. an untied output head)
    refinement: dict[str, Any] | None = None  # --method refine: held-out loss per layer, seconds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_output(source: Source, n_groups: int) -> Path:
    suffix = "-mqa" if n_groups == 1 else f"-gqa{n_groups}"
    if source.hub_id is None:
        return source.root.parent / f"{source.root.name}{suffix}"
    return Path.cwd() / f"{source.hub_id.rstrip('/').split('/')[-1]}{suffix}"  # a hub id: beside where we run


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
        notes=list(plan.notes),
    )


def build_manifest(
    plan: ConversionPlan,
    report: ConvertReport,
    streamed: StreamResult,
    copied: list[str],
    command: str,
    calibration: Calibration | None,
    refinement: dict[str, Any] | None = None,
) -> Manifest:
    src, hashes = plan.source, streamed.digests
    return Manifest(
        tool={"name": "gqa-convert", "version": __version__, "torch": torch.__version__},
        output_name=Path(report.output).name,
        source=SourceRecord(
            name=str(src.root) if src.hub_id is None else src.hub_id,
            path=str(src.root),
            hub_id=src.hub_id,
            revision=src.revision,
            format=src.format,
            files={p.name: hashes[p.name] for p in src.weight_files},
        ),
        conversion=ConversionRecord(
            family=plan.family.name,
            method=plan.method.name,
            method_summary=plan.method.summary,
            seed=plan.seed,
            n_layers=plan.shape.n_layers,
            n_heads=plan.shape.n_heads,
            kv_heads_before=plan.shape.n_kv_heads,
            kv_heads_after=plan.n_groups,
            head_dim=plan.shape.head_dim,
            grouping_mode=plan.grouping,
            # KV heads of the source in each group, per block (all alike for contiguous)
            grouping={str(k): v for k, v in sorted(streamed.groupings.items())},
            calibration=calibration.describe() if calibration is not None else None,
            keys="mean pooling (per-head key norm: no exact fold)"
            if plan.key_norm and plan.method.name in ("fold", "refine")
            else None,
            emulated=plan.emulate,
            dropped_tensors=list(plan.dropped),
            notes=list(plan.notes),
            refinement=refinement,
        ),
        kv_cache=report.kv_cache,
        output={
            "bytes": plan.bytes_out,
            "files": {name: hashes["out/" + name] for name in report.shards},
            "copied_files": copied,
        },
        command=command,
    )


def _calibrate(plan: ConversionPlan, calib: list[str], tokens: int, separator: str | None, trust: bool) -> Calibration:
    source = plan.source
    fp32_bytes = sum(t.nbytes * 4 // itemsize(t.dtype) for t in source.tensors.values())
    return collect(
        source.root,
        source.config,
        plan.family,
        [lp.prefix for lp in plan.layers],
        calib,
        tokens=tokens,
        separator=separator,
        bytes_fp32=fp32_bytes,
        trust_remote_code=trust,
        checkpoint_dtype=plan.kv_dtype,
    )


@contextmanager
def _intra_op_threads(one: bool) -> Iterator[None]:
    """One torch intra-op thread while `one` (restored after)."""
    before = torch.get_num_threads()
    if one:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if one:
            torch.set_num_threads(before)


# glibc's mallopt parameters and defaults (malloc.h): big blocks are mmap'd, and freed ones given back
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _glibc():  # noqa: ANN202
    """The C library when it is glibc (mallopt, malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def _freed_memory_reused() -> Iterator[None]:
    """While converting, freed blocks stay in the process for the next ones instead of going
    back to the kernel. Every block's attention tensors get buffers of their own (4 x 32 MB a
    7B layer), and fold makes ~1.6 GB of float64 temporaries a 7B layer; glibc maps each block
    over 32 MB afresh and unmaps it when freed, so every layer faulted its pages in again (fold:
    2.46M page faults and 20 s of kernel time for 6 layers at G = 1, about 0.5M and 9-13 s
    reused; mean pooling, 8 7B-shaped layers warm: 0.89x the wall time, sys 1.45 -> 0.89 s, 4
    alternating pairs). Costs ~0.2 GB of peak memory. Afterwards the defaults are set back and
    the heap trimmed; glibc's adaptive mmap threshold stays off in this process (setting either
    parameter turns it off)."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def convert(
    model: str | os.PathLike[str],
    n_groups: int,
    *,
    out: str | os.PathLike[str] | None = None,
    method: str = "mean",
    seed: int = 0,
    max_shard_size: int | str = DEFAULT_MAX_SHARD,
    force: bool = False,
    dry_run: bool = False,
    revision: str | None = None,
    grouping: str = "contiguous",
    emulate: bool = False,
    sibling: bool = False,
    calib: list[str] | None = None,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    calib_separator: str | None = None,
    refine_steps: int = DEFAULT_REFINE_STEPS,
    refine_lr: float = DEFAULT_REFINE_LR,
    refine_tokens: int = DEFAULT_REFINE_TOKENS,
    refine_batch_tokens: int = DEFAULT_REFINE_BATCH_TOKENS,
    refine_device: str | None = None,
    trust_remote_code: bool = False,
    on_start: Callable[[ConversionPlan], None] | None = None,
    on_bytes: Callable[[int], None] = lambda n: None,
    command: str | None = None,
) -> ConvertReport:
    """Convert `model` (a local directory or hub id) to `n_groups` KV heads.

    Writes a complete checkpoint at `out` (default: beside the source, suffixed -gqaG or
    -mqa) or nothing at all. `on_start` receives the plan before writing begins and
    `on_bytes` the number of bytes each write added (for progress bars).
    `refine_*` tune --method refine: Adam steps per layer at most, learning rate, calibration
    tokens (1/8 held out), tokens per Adam step and device (default: CUDA when present).
    Raises ConversionError for every problem a user can fix.
    """
    started = time.perf_counter()
    check(
        seed=seed,
        calib_tokens=calib_tokens,
        refine_steps=refine_steps,
        refine_lr=refine_lr,
        refine_tokens=refine_tokens,
        refine_batch_tokens=refine_batch_tokens,
    )
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
    if out is not None and not str(out).strip():
        raise ConversionError("--out is empty; name the output directory (an unset shell variable?)")
    target = Path(out) if out is not None else default_output(source, n_groups)
    if calib and method not in ("fold", "refine"):
        raise ConversionError(f"--calib is used by --method fold and refine only (not {shown(method)})")
    if method == "refine":
        from .refine import check_refinable, resolve_device

        check_refinable(plan)
        refine_device = resolve_device(refine_device)
    if get_method(method).needs_calib and not calib:
        raise ConversionError(f"--method {method} needs --calib TEXT (training text, never your evaluation text)")
    od = OutputDir(target, source.root, force)
    od.check()  # refuse a bad --out before any work; a dry run refuses it too, and creates nothing
    od.check_writable()
    copied = other_files(source.root, OWN_FILES, hub=source.hub_id is not None)
    calibration = None
    if calib:
        from ..data import check_data

        check_data(calib, "--calib")
    report = _report(plan, target.absolute(), dry_run)
    if dry_run:
        return report
    if calib:
        calibration = _calibrate(plan, calib, calib_tokens, calib_separator, trust_remote_code)
    refined = None
    if method == "refine" and calibration is not None:
        from .refine import refine

        refined = refine(
            plan,
            calibration,
            calib,
            steps=refine_steps,
            lr=refine_lr,
            tokens=refine_tokens,
            batch_tokens=refine_batch_tokens,
            device=refine_device,
            separator=calib_separator,
        )
        report.refinement = refined.record
    if on_start:
        on_start(plan)
    command = command or shlex.join(["gqa-convert", *sys.argv[1:]])
    moments = calibration.moments if calibration is not None else None
    light = plan.method.light
    with (
        writing_errors(target),
        od as tmp,
        Hashes() as hashes,
        _intra_op_threads(light),
        _freed_memory_reused(),
    ):
        block = refined.convert_block if refined is not None else None
        streamed = write_weights(plan, tmp, hashes, on_bytes, moments, convert_block=block)
        (tmp / "config.json").write_text(json.dumps(plan.config_out, indent=2) + "\n", encoding="utf-8")
        copy_files(source.root, copied, tmp)
        check_written(tmp, [list(s) for s in plan.shards])
        manifest = build_manifest(plan, report, streamed, copied, command, calibration, report.refinement)
        manifest.write(tmp)
        (tmp / "README.md").write_text(model_card(manifest), encoding="utf-8")
        od.commit()
    report.removed_stale = [str(p) for p in od.removed_stale]
    report.seconds = time.perf_counter() - started
    return report
