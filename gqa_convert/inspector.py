"""`inspect_model(...) -> InspectReport`: what a checkpoint is and what each G would give,
from config.json and the tensor headers alone (no weights are read)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .architectures import family_for, head_shape
from .errors import ConversionError
from .io.source import open_source, read_config, resolve
from .kvcache import CONTEXTS
from .plan import build_plan, valid_groups


@dataclass
class GroupOption:
    groups: int
    kv_bytes_per_token: int
    kv_bytes_at: dict[str, int]
    kv_saving: float
    params_removed: int
    bytes_removed: int


@dataclass
class InspectReport:
    model: str
    path: str
    model_type: str | None
    family: str | None
    layout: str | None
    conversion: str  # "native", or why not
    n_layers: int | None = None
    hidden: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    params: int = 0
    bytes: int = 0
    dtype: str | None = None
    options: list[GroupOption] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_model(model: str, revision: str | None = None) -> InspectReport:
    root, _ = resolve(model, revision)
    config = read_config(root)
    try:
        family = family_for(config)
    except ConversionError as e:
        family, why = None, str(e)
    source = open_source(root)
    params = sum(math.prod(t.shape) for t in source.tensors.values())
    dtypes = sorted(
        {t.dtype for t in source.tensors.values()},
        key=lambda d: -sum(t.nbytes for t in source.tensors.values() if t.dtype == d),
    )
    report = InspectReport(
        model,
        str(root),
        config.get("model_type"),
        family.name if family else None,
        family.layout if family else None,
        "native" if family else why,
        params=params,
        bytes=source.total_bytes,
        dtype=dtypes[0] if dtypes else None,
    )
    if family is None:
        return report
    shape = head_shape(family, config)
    report.n_layers, report.hidden, report.n_heads = shape.n_layers, shape.hidden, shape.n_heads
    report.n_kv_heads, report.head_dim = shape.n_kv_heads, shape.head_dim
    for g in valid_groups(shape.n_heads, shape.n_kv_heads):
        plan = build_plan(source, g)
        per_token = plan.kv_bytes_per_token(g)
        removed = sum(
            math.prod(source.tensors[n].shape) for lp in plan.layers for ns in lp.inputs.values() for n in ns
        ) - sum(math.prod(t.shape) for lp in plan.layers for ts in lp.outputs.values() for t in ts)
        report.options.append(
            GroupOption(
                g,
                per_token,
                {str(c): per_token * c for c in CONTEXTS},
                1 - per_token / plan.kv_bytes_per_token(),
                removed,
                plan.bytes_in - plan.bytes_out - sum(source.tensors[n].nbytes for n in plan.dropped),
            )
        )
    return report
