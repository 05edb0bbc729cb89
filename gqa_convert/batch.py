"""`run_batch(...) -> BatchReport`: many conversions from one YAML file.

Each job names a model, one or several G, the options of `convert()`, an output pattern,
and optional `verify:` and `uptrain:` sections. The fields a job may hold are not written
out here: they are read from the library's own signatures (`convert`, `verify`,
`UptrainOptions`), so every option of the library is accepted and passed through, with the
same types, defaults and ranges. The whole file is checked before any work starts (a bad
field is reported with its line); a job whose output already exists with a matching
manifest is skipped; a failed job does not stop the others."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import string
import time
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .conversion import convert
from .errors import ConversionError
from .evaluation import verify
from .io.source import is_local
from .manifest import Manifest
from .options import accepts as _accepts
from .options import describe_type as _describe
from .options import problem
from .training import UptrainOptions, uptrain

MAX_CONFIG_BYTES = 4 << 20
OUT_KEYS = ("name", "model_name", "groups", "method")
DEFAULT_OUT = "{model_name}-{method}-g{groups}"
# Fields that name files or models: relative paths are relative to the batch file's folder.
PATH_FIELDS = {"model", "calib", "data", "eval_data", "teacher", "reference"}


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Field:
    hint: Any
    default: Any


def _signature_fields(fn: Callable, exclude: set[str]) -> dict[str, Field]:
    hints = typing.get_type_hints(fn)
    return {
        name: Field(hints[name], p.default)
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in exclude and not name.startswith("on_")
    }


def _dataclass_fields(cls: type, exclude: set[str]) -> dict[str, Field]:
    hints = typing.get_type_hints(cls)
    return {
        f.name: Field(hints[f.name], f.default if f.default is not dataclasses.MISSING else None)
        for f in dataclasses.fields(cls)
        if f.name not in exclude
    }


# The job sections, derived from the library: a new option there is a new field here.
CONVERT_FIELDS = _signature_fields(convert, {"out", "dry_run", "command"})
VERIFY_FIELDS = _signature_fields(verify, set())
UPTRAIN_FIELDS = _dataclass_fields(UptrainOptions, set())
JOB_FIELDS = {
    "name": Field(str, None),
    "model": Field(str, None),
    "groups": Field(int | list[int], None),
    "out": Field(str, DEFAULT_OUT),
    **CONVERT_FIELDS,
    "verify": Field(dict, None),
    "uptrain": Field(dict, None),
}


def _coerce(hint: Any, value: Any) -> Any:
    """YAML gives lists where the library takes lists or tuples, and one value for a list of one."""
    for h in typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,):
        origin = typing.get_origin(h)
        if origin in (list, tuple) and _accepts(h, value):
            items = value if isinstance(value, list) else [value]
            return tuple(items) if origin is tuple else list(items)
    return value


class _LineLoader(yaml.SafeLoader):
    """Records each mapping's line so errors can point at it; refuses anchors and aliases
    (an alias bomb expands without bound when shown)."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"line {mark.line + 1}: anchors and aliases (& and *) are not supported here")
        return super().compose_node(parent, index)


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    for key, _ in node.value:
        if not isinstance(loader.construct_object(key), str):
            raise yaml.YAMLError(f"line {key.start_mark.line + 1}: field names must be text, not {_short(key.value)}")
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    mapping["__lines__"] = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _check_fields(where: str, path: Path, d: dict, fields: dict[str, Field]) -> None:
    lines = d.get("__lines__", {})
    for key, value in d.items():
        if key.startswith("__"):
            continue
        line = lines.get(key, d.get("__line__", "?"))
        if key not in fields:
            hint = difflib.get_close_matches(key, fields, n=1)
            raise ConversionError(
                f"{path}:{line}: {where}: unknown field {_short(key)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else f"; fields are {', '.join(sorted(fields))}")
            )
        f = fields[key]
        if any(isinstance(x, str) and "\x00" in x for x in (value if isinstance(value, list) else [value])):
            raise ConversionError(f"{path}:{line}: {where}: field {key!r} holds a NUL character")
        if not _accepts(f.hint, value):
            raise ConversionError(
                f"{path}:{line}: {where}: field {key!r} must be {_describe(f.hint)}, not {_short(value)}"
            )
        for item in value if isinstance(value, list) else [value]:
            why = problem(key, item)
            if why:
                raise ConversionError(f"{path}:{line}: {where}: field {key!r} {why}")


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
    def method(self) -> str:
        return self.settings.get("method", CONVERT_FIELDS["method"].default)

    @property
    def out(self) -> Path:
        pattern = self.settings.get("out", DEFAULT_OUT)
        model_name = self.model.rstrip("/").split("/")[-1]
        return Path(pattern.format(name=self.name, model_name=model_name, groups=self.groups, method=self.method))


def _check_pattern(pattern: str, where: str) -> None:
    """An output pattern: plain text and the known placeholders, nothing else (no format
    specs or conversions: `{groups:>999999999}` would build a gigabyte of path)."""
    if not pattern.strip():
        raise ConversionError(f"{where}: 'out' is empty; name the output directory")
    try:
        parts = list(string.Formatter().parse(pattern))
    except ValueError as e:
        raise ConversionError(f"{where}: 'out' is not a valid pattern ({e})") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in OUT_KEYS or spec or conversion:
            raise ConversionError(
                f"{where}: 'out' uses {{{_short(name, 30)}{'!' + conversion if conversion else ''}"
                f"{':' + _short(spec, 20) if spec else ''}}}; the placeholders are "
                + ", ".join("{" + k + "}" for k in OUT_KEYS)
                + ", without format specs"
            )


def _read_yaml(path: Path) -> Any:
    try:
        if not path.is_file():
            raise ConversionError(f"{path}: no such file (or not a regular file)")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConversionError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; is this a batch file?")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConversionError(f"{path}: not UTF-8 text") from None
    try:
        return yaml.load(text, Loader=_LineLoader)
    except RecursionError:
        raise ConversionError(f"{path}: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = getattr(e, "problem", None) or str(e)
        raise ConversionError(
            f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML ({_short(what, 160)})"
        ) from None


def load_config(path: Path) -> list[Job]:
    """Parse and check the whole file; every problem names its line and field."""
    raw = _read_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("jobs"), list) or not raw["jobs"]:
        raise ConversionError(f"{path}: expected a mapping with a non-empty 'jobs' list (see configs/ for examples)")
    for key in raw:
        if not key.startswith("__") and key not in ("jobs", "defaults"):
            raise ConversionError(
                f"{path}:{raw['__lines__'].get(key, '?')}: unknown top-level field {_short(key)} "
                "(use 'defaults' and 'jobs')"
            )
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConversionError(f"{path}: 'defaults' must be a mapping")
    _check_fields("defaults", path, defaults, JOB_FIELDS)
    base = path.resolve().parent
    jobs: list[Job] = []
    names: set[str] = set()
    for i, entry in enumerate(raw["jobs"], 1):
        if not isinstance(entry, dict):
            raise ConversionError(f"{path}: job {i} must be a mapping with at least 'model' and 'groups'")
        line = entry["__line__"]
        where = f"job {_short(entry.get('name', i), 40)}"
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
        from .methods import METHODS

        if merged.get("method", "mean") not in METHODS:
            raise ConversionError(
                f"{path}:{entry['__lines__'].get('method', line)}: {where}: unknown method "
                f"{_short(merged['method'])}; choose one of {', '.join(METHODS)}"
            )
        from .conversion.plan import GROUPINGS

        if merged.get("grouping", "contiguous") not in GROUPINGS:
            raise ConversionError(f"{path}:{line}: {where}: grouping must be one of {', '.join(GROUPINGS)}")
        if "verify" in merged and not merged["verify"].get("data"):
            raise ConversionError(f"{path}:{line}: {where}: verify needs 'data'")
        if "uptrain" in merged and not merged["uptrain"].get("data"):
            raise ConversionError(f"{path}:{line}: {where}: uptrain needs 'data'")
        _check_pattern(merged.get("out", DEFAULT_OUT), f"{path}:{entry['__lines__'].get('out', line)}: {where}")
        if "uptrain" in merged and "out" in merged["uptrain"]:
            _check_pattern(merged["uptrain"]["out"], f"{path}:{line}: {where} uptrain")
        name = merged.get("name") or f"job{i}"
        if name in names:
            raise ConversionError(f"{path}:{line}: job name {_short(name)} is used twice")
        names.add(name)
        for g in _as_list(merged["groups"]):
            if g < 1:
                raise ConversionError(f"{path}:{line}: {where}: groups must be at least 1")
            jobs.append(Job(name, merged["model"], g, merged, line))
    outs: dict[Path, Job] = {}
    here = path.resolve()
    for job in jobs:  # two jobs writing one place, however the paths are spelled
        for target in (job.out, *([_uptrain_out(job, Path())] if "uptrain" in job.settings else [])):
            real = (target if target.is_absolute() else base / target).resolve()
            if real == here.parent or real in here.parents:
                raise ConversionError(
                    f"{path}:{job.line}: job {job.name!r} would write {real}, which holds this batch file; "
                    "choose another 'out'"
                )
            if real in outs:
                raise ConversionError(
                    f"{path}: jobs {outs[real].name!r} and {job.name!r} (G={job.groups}) both write {real}; "
                    "put {groups} or {name} in 'out'"
                )
            outs[real] = job
    return jobs


def _uptrain_out(job: Job, base: Path) -> Path:
    u = job.settings["uptrain"]
    if "out" in u:
        model_name = job.model.rstrip("/").split("/")[-1]
        out = Path(u["out"].format(name=job.name, model_name=model_name, groups=job.groups, method=job.method))
    else:
        out = Path(str(job.out) + "-uptrained")
    return out if out.is_absolute() else base / out


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


def _matches(manifest: Manifest | None, job: Job, model: str) -> bool:
    """Same source, G, method and grouping: the output is what this job would write."""
    if manifest is None or manifest.source is None or manifest.conversion is None:
        return False
    src, conv = manifest.source, manifest.conversion
    if is_local(model):
        same_source = src.hub_id is None and src.path == str(Path(model).resolve())
    else:
        same_source = src.hub_id == model
    return same_source and (
        conv.kv_heads_after == job.groups
        and conv.method == job.method
        and conv.grouping_mode == job.settings.get("grouping", "contiguous")
    )


def _relative(base: Path, section: dict[str, Any], fields: dict[str, Field]) -> dict[str, Any]:
    """A section's values as the library takes them: paths relative to the batch file made
    absolute where they exist there, lists where the library takes lists."""

    def rel(v: str) -> str:
        return str(base / v) if (base / v).exists() else v

    out = {}
    for key, value in section.items():
        if key in PATH_FIELDS:
            value = [rel(x) for x in value] if isinstance(value, list) else rel(value)
        out[key] = _coerce(fields[key].hint, value)
    return out


def _run_job(job: Job, base: Path) -> JobResult:
    s = job.settings
    out = job.out if job.out.is_absolute() else base / job.out
    r = JobResult(job.name, job.groups, job.method, str(out), "done")
    model = _relative(base, {"model": s["model"]}, {"model": JOB_FIELDS["model"]})["model"]
    manifest = Manifest.read(out) if out.is_dir() else None
    if _matches(manifest, job, model):
        r.status, r.message = "skipped", "output exists with a matching manifest"
        r.kv_saving = (manifest.kv_cache or {}).get("saving")
        return r
    options = _relative(base, {k: v for k, v in s.items() if k in CONVERT_FIELDS}, CONVERT_FIELDS)
    report = convert(
        model, job.groups, out=out, command=f"gqa-convert batch (job {job.name}, G={job.groups})", **options
    )
    r.kv_saving = report.kv_cache["saving"]
    v = _relative(base, s["verify"], VERIFY_FIELDS) if s.get("verify") else None
    if v:
        check = verify(str(out), **v)
        r.ppl_ratio = check.ppl_ratio
        if not check.passed:
            r.status, r.message = "failed", f"perplexity ratio {check.ppl_ratio:.3f} > {v['max_ppl_ratio']}"
            return r
    if s.get("uptrain"):
        u = _relative(base, {k: val for k, val in s["uptrain"].items() if k != "out"}, UPTRAIN_FIELDS)
        opts = UptrainOptions(**{"force": True, **u, "out": _uptrain_out(job, base)})
        uptrain(str(out), opts)
        if v:
            after = {**v, "reference": v.get("reference") or model, "max_ppl_ratio": None}
            r.ppl_ratio_uptrained = verify(str(opts.out), **after).ppl_ratio
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
            r = JobResult(job.name, job.groups, job.method, str(job.out), "failed", message=str(e))
        r.seconds = time.perf_counter() - start
        report.results.append(r)
        on_result(r)
    return report
