"""`inspect_model(...) -> InspectReport`: what a checkpoint is and what each G would give,
from config.json and the tensor headers alone (no weights are read)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..architectures import family_for, gqa_native, head_shape, valid_groups
from ..architectures.kvcache import CONTEXTS
from ..conversion.plan import build_plan
from ..errors import ConversionError
from ..io.source import open_source, read_config, resolve


@dataclass
class GroupOption:
    groups: int
    kv_bytes_per_token: int
    kv_bytes_at: dict[str, int]
    kv_saving: float
    params_removed: int
    bytes_removed: int
    emulated: bool = False  # this G needs --emulate: K/V heads repeated back, no memory saved


@dataclass
class InspectReport:
    model: str
    path: str
    model_type: str | None
    family: str | None
    layout: str | None
    conversion: str  # what transformers can hold for this family, or why it cannot be converted
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


def support(family, config: dict[str, Any], n_kv: int) -> str:
    """What transformers can hold for this family, in words."""
    if gqa_native(family, config):
        return "native GQA: every G below is a real GQA checkpoint"
    if family.mqa_flag:
        return f"MQA only ({family.mqa_flag}): G = 1 is real; other G with --emulate (no memory saved)"
    if family.sibling:
        return f"no GQA in transformers: --emulate, or --sibling --mqa for a real MQA {family.sibling['name']}"
    return "no GQA in transformers: --emulate only (shows GQA quality, saves no memory)"


def inspect_model(model: str, revision: str | None = None) -> InspectReport:
    """Family, layout, shape and size of a checkpoint and, for every valid G, its KV cache."""
    root = resolve(model, revision).root
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
        config.get("model_type") if isinstance(config.get("model_type"), str) else None,
        family.name if family else None,
        family.layout if family else None,
        why if family is None else "",
        params=params,
        bytes=source.total_bytes,
        dtype=dtypes[0] if dtypes else None,
    )
    if family is None:
        return report
    shape = head_shape(family, config)
    report.n_layers, report.hidden, report.n_heads = shape.n_layers, shape.hidden, shape.n_heads
    report.n_kv_heads, report.head_dim = shape.n_kv_heads, shape.head_dim
    report.conversion = support(family, config, shape.n_kv_heads)
    try:
        build_plan(source, shape.n_kv_heads)  # the config against the tensors, before counts drive a loop
        for g in valid_groups(shape.n_heads, shape.n_kv_heads):
            try:
                plan = build_plan(source, g)
            except ConversionError as e:
                if "--emulate" not in str(e):
                    raise
                plan = build_plan(source, g, emulate=True)
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
                    plan.emulate,
                )
            )
    except ConversionError as e:
        report.conversion = f"cannot be converted: {e}"
        report.options = []
    return report
