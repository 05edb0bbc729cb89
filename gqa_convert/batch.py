"""`run_batch(...) -> BatchReport`: many conversions from one YAML file.

Each job names a model, one or several G, a method (and calibration), an output pattern,
and optional verify and uptrain steps. The whole file is checked before any work starts
(a bad field is reported with its line); a job whose output already exists with a
matching manifest is skipped; a failed job does not stop the others."""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .card import read_manifest
from .converter import convert
from .errors import ConversionError
from .methods import METHODS
from .plan import GROUPINGS
from .uptrainer import UptrainOptions, uptrain
from .verifier import verify

# field -> (type check, description); "list[str]" accepts one string too
JOB_FIELDS: dict[str, tuple[str, str]] = {
    "name": ("str", "job name, used in {name}"),
    "model": ("str", "local directory or hub id"),
    "groups": ("int|list[int]", "G, or several"),
    "method": ("str", "mean, first, random, fold"),
    "grouping": ("str", "contiguous or search"),
    "seed": ("int", "seed for random"),
    "calib": ("list[str]", "calibration text for fold"),
    "calib_tokens": ("int", "calibration tokens"),
    "calib_separator": ("str", "document separator in calib text"),
    "out": ("str", "output pattern: {name} {model_name} {groups} {method}"),
    "max_shard_size": ("str", "e.g. 5GB"),
    "force": ("bool", "replace an existing output whose manifest differs"),
    "verify": ("dict", "verify step"),
    "uptrain": ("dict", "uptrain step"),
}
VERIFY_FIELDS = {
    "data": ("list[str]", ""),
    "separator": ("str", ""),
    "max_tokens": ("int", ""),
    "seq_len": ("int", ""),
    "stride": ("int", ""),
    "batch_size": ("int", ""),
    "max_ppl_ratio": ("float", ""),
    "reference": ("str", ""),
}
UPTRAIN_FIELDS = {
    "data": ("list[str]", ""),
    "out": ("str", ""),
    "steps": ("int", ""),
    "tokens": ("int", ""),
    "lr": ("float", ""),
    "batch_size": ("int", ""),
    "grad_accum": ("int", ""),
    "seq_len": ("int", ""),
    "separator": ("str", ""),
    "teacher": ("str", ""),
    "kd_weight": ("float", ""),
    "warmup": ("int", ""),
    "eval_data": ("list[str]", ""),
}


class _LineLoader(yaml.SafeLoader):
    """Records each mapping's line so errors can point at it."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    mapping["__lines__"] = {k.value: k.start_mark.line + 1 for k, _ in node.value if hasattr(k, "value")}
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _type_ok(value: Any, kind: str) -> bool:
    checks = {
        "str": lambda v: isinstance(v, str),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "dict": lambda v: isinstance(v, dict),
        "list[str]": lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
        "int|list[int]": lambda v: (
            (isinstance(v, int) and not isinstance(v, bool))
            or (isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v))
        ),
    }
    return checks[kind](value)


def _check_fields(where: str, path: Path, d: dict, fields: dict[str, tuple[str, str]]) -> None:
    lines = d.get("__lines__", {})
    for key, value in d.items():
        if key.startswith("__"):
            continue
        line = lines.get(key, d.get("__line__", "?"))
        if key not in fields:
            hint = difflib.get_close_matches(key, fields, n=1)
            raise ConversionError(
                f"{path}:{line}: {where}: unknown field {key!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else f"; fields are {', '.join(fields)}")
            )
        kind = fields[key][0]
        if not _type_ok(value, kind):
            raise ConversionError(f"{path}:{line}: {where}: field {key!r} must be {kind}, not {value!r}")


def _clean(d: dict) -> dict:
    return {k: (_clean(v) if isinstance(v, dict) else v) for k, v in d.items() if not k.startswith("__")}


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


@dataclass
class Job:
    name: str
    model: str
    groups: int
    settings: dict[str, Any]
    line: int

    @property
    def out(self) -> Path:
        pattern = self.settings.get("out", "{model_name}-{method}-g{groups}")
        model_name = self.model.rstrip("/").split("/")[-1]
        return Path(
            pattern.format(
                name=self.name, model_name=model_name, groups=self.groups, method=self.settings.get("method", "mean")
            )
        )


def load_config(path: Path) -> list[Job]:
    """Parse and check the whole file; every problem names its line and field."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConversionError(
            f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML ({getattr(e, 'problem', e)})"
        ) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("jobs"), list) or not raw["jobs"]:
        raise ConversionError(f"{path}: expected a mapping with a non-empty 'jobs' list (see configs/ for examples)")
    for key in raw:
        if not key.startswith("__") and key not in ("jobs", "defaults"):
            raise ConversionError(
                f"{path}:{raw['__lines__'].get(key, '?')}: unknown top-level field {key!r} (use 'defaults' and 'jobs')"
            )
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConversionError(f"{path}: 'defaults' must be a mapping")
    _check_fields("defaults", path, defaults, JOB_FIELDS)
    jobs: list[Job] = []
    names: set[str] = set()
    for i, entry in enumerate(raw["jobs"], 1):
        if not isinstance(entry, dict):
            raise ConversionError(f"{path}: job {i} must be a mapping with at least 'model' and 'groups'")
        line = entry["__line__"]
        where = f"job {entry.get('name', i)!r}"
        _check_fields(where, path, entry, JOB_FIELDS)
        merged = {**_clean(defaults), **_clean(entry)}
        for sub, fields in (("verify", VERIFY_FIELDS), ("uptrain", UPTRAIN_FIELDS)):
            if sub in entry:
                _check_fields(f"{where} {sub}", path, entry[sub], fields)
            elif sub in defaults:
                _check_fields(f"defaults {sub}", path, defaults[sub], fields)
        for required in ("model", "groups"):
            if required not in merged:
                raise ConversionError(f"{path}:{line}: {where}: missing field {required!r}")
        if merged.get("method", "mean") not in METHODS:
            raise ConversionError(
                f"{path}:{entry['__lines__'].get('method', line)}: {where}: unknown method "
                f"{merged['method']!r}; choose one of {', '.join(METHODS)}"
            )
        if merged.get("grouping", "contiguous") not in GROUPINGS:
            raise ConversionError(f"{path}:{line}: {where}: grouping must be one of {', '.join(GROUPINGS)}")
        if "verify" in merged and not merged["verify"].get("data"):
            raise ConversionError(f"{path}:{line}: {where}: verify needs 'data'")
        if "uptrain" in merged and not merged["uptrain"].get("data"):
            raise ConversionError(f"{path}:{line}: {where}: uptrain needs 'data'")
        name = merged.get("name") or f"job{i}"
        if name in names:
            raise ConversionError(f"{path}:{line}: job name {name!r} is used twice")
        names.add(name)
        for g in _as_list(merged["groups"]):
            if g < 1:
                raise ConversionError(f"{path}:{line}: {where}: groups must be at least 1")
            jobs.append(Job(name, merged["model"], g, merged, line))
    outs = [j.out for j in jobs]
    dup = next((o for o in outs if outs.count(o) > 1), None)
    if dup:
        raise ConversionError(f"{path}: two jobs write to {dup}; put {{groups}} or {{name}} in 'out'")
    return jobs


@dataclass
class JobResult:
    job: str
    groups: int
    method: str
    output: str
    status: str  # done, skipped, failed
    kv_saving: float | None = None
    ppl_ratio: float | None = None
    ppl_ratio_uptrained: float | None = None
    message: str = ""
    seconds: float = 0.0


@dataclass
class BatchReport:
    config: str
    results: list[JobResult] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(r.status == "failed" for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "failed": self.failed, "results": [asdict(r) for r in self.results]}


def _matches(manifest: dict | None, job: Job, model: str) -> bool:
    """Same source, G, method and grouping: the output is what this job would write."""
    if not manifest:
        return False
    src = manifest.get("source", {})
    same_source = src.get("hub_id") == model or (Path(model).exists() and src.get("path") == str(Path(model).resolve()))
    conv = manifest.get("conversion", {})
    return same_source and (
        conv.get("kv_heads_after") == job.groups
        and conv.get("method") == job.settings.get("method", "mean")
        and conv.get("grouping_mode", "contiguous") == job.settings.get("grouping", "contiguous")
    )


def _run_job(job: Job, base: Path) -> JobResult:
    s = job.settings
    out = job.out if job.out.is_absolute() else base / job.out
    method = s.get("method", "mean")
    r = JobResult(job.name, job.groups, method, str(out), "done")
    model = s["model"] if not (base / s["model"]).exists() else str(base / s["model"])
    manifest = read_manifest(out) if out.is_dir() else None
    if _matches(manifest, job, model):
        r.status, r.message = "skipped", "output exists with a matching manifest"
        r.kv_saving = manifest.get("kv_cache", {}).get("saving")
        return r
    rel = lambda v: [str(base / x) if (base / x).exists() else x for x in _as_list(v)]  # noqa: E731
    report = convert(
        model,
        job.groups,
        out=out,
        method=method,
        seed=s.get("seed", 0),
        grouping=s.get("grouping", "contiguous"),
        calib=rel(s["calib"]) if s.get("calib") else None,
        calib_tokens=s.get("calib_tokens", 32768),
        calib_separator=s.get("calib_separator"),
        force=bool(s.get("force")),
        command=f"gqa-convert batch (job {job.name}, G={job.groups})",
    )
    r.kv_saving = report.kv_cache["saving"]
    v = s.get("verify")
    if v:
        kw = {k: v[k] for k in ("separator", "max_tokens", "seq_len", "stride", "batch_size") if k in v}
        check = verify(
            str(out), reference=v.get("reference"), data=rel(v["data"]), max_ppl_ratio=v.get("max_ppl_ratio"), **kw
        )
        r.ppl_ratio = check.ppl_ratio
        if not check.passed:
            r.status, r.message = "failed", f"perplexity ratio {check.ppl_ratio:.3f} > {v['max_ppl_ratio']}"
            return r
    u = s.get("uptrain")
    if u:
        up_out = Path(u.get("out", str(out) + "-uptrained"))
        opts = UptrainOptions(
            data=rel(u["data"]),
            out=up_out if up_out.is_absolute() else base / up_out,
            force=True,
            **{k: (rel(val) if k == "eval_data" else val) for k, val in u.items() if k not in ("data", "out")},
        )
        uptrain(str(out), opts)
        if v:
            kw = {k: v[k] for k in ("separator", "max_tokens", "seq_len", "stride", "batch_size") if k in v}
            ref = v.get("reference") or model
            r.ppl_ratio_uptrained = verify(str(opts.out), reference=ref, data=rel(v["data"]), **kw).ppl_ratio
    return r


def run_batch(config: Path, on_result: Callable[[JobResult], None] = lambda r: None) -> BatchReport:
    """Run every job of `config`; relative paths in it are relative to the file's folder."""
    jobs = load_config(config)
    base = config.resolve().parent
    report = BatchReport(str(config))
    for job in jobs:
        start = time.perf_counter()
        try:
            r = _run_job(job, base)
        except ConversionError as e:
            r = JobResult(
                job.name, job.groups, job.settings.get("method", "mean"), str(job.out), "failed", message=str(e)
            )
        r.seconds = time.perf_counter() - start
        report.results.append(r)
        on_result(r)
    return report
