"""The conversion plan: every output tensor's name, dtype and shape, where its bytes come
from, and how they are sharded — all computed from headers before any weight is read.
A plan is immutable: what happens while converting is recorded elsewhere (stream.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..architectures import (
    GENERIC_KV_HEADS_KEY,
    KV_ROLES,
    Family,
    HeadShape,
    family_for,
    fused_layout,
    gqa_native,
    head_shape,
    key_role,
    normalises_keys,
    required_roles,
    rotary_dims,
    valid_groups,
)
from ..architectures.kvcache import kv_bytes_per_token
from ..architectures.layouts import fused_rows
from ..architectures.rope import Rope, rope_layout
from ..errors import ConversionError, shown
from ..io.safetensors_format import itemsize
from ..io.source import Source
from ..io.writer import OutTensor, plan_shards
from ..methods import Method, get_method
from ..options import parse_size

GROUPINGS = ("contiguous", "search")


@dataclass(frozen=True)
class LayerPlan:
    """One attention block: T5's decoder has two per layer, every other family one."""

    layer: int  # index into plan.layers
    prefix: str  # the block's tensor-name prefix, e.g. "model.layers.3.self_attn."
    inputs: dict[str, list[str]]  # role -> source tensor names (one per head for "{head}" roles)
    outputs: dict[str, list[OutTensor]]  # role -> output tensors, same order

    @property
    def input_names(self) -> list[str]:
        return [n for names in self.inputs.values() for n in names]


@dataclass(frozen=True)
class ConversionPlan:
    source: Source
    family: Family
    shape: HeadShape
    n_groups: int
    method: Method
    seed: int
    layers: tuple[LayerPlan, ...]
    order: tuple[OutTensor, ...]  # output tensors in write order
    emit_after: dict[str, int]  # source tensor name -> layer whose outputs are written after reading it
    dropped: tuple[str, ...]  # source tensors not written (a tied lm_head)
    shards: tuple[tuple[OutTensor, ...], ...]
    config_out: dict[str, Any]
    kv_dtype: str
    attn_prefix: str  # the first block's prefix template, as the checkpoint names it
    grouping: str = "contiguous"  # or "search"
    rope: Rope | None = None
    key_norm: bool = False
    emulate: bool = False  # K/V heads pooled, then repeated back to the source's count
    layout_in: str | None = None  # fused QKV layout of the source (None: separate projections)
    layout_out: str | None = None
    transposed_out: tuple[str, ...] = ()  # roles written as Conv1D (in, out)
    transpose_copies: frozenset[str] = frozenset()  # non-attention tensors written transposed
    notes: tuple[str, ...] = ()  # what changes beyond K/V, said in the summary, card and manifest
    init_range: float = 0.02  # std of fresh heads for --method random (the config's initializer_range)

    @property
    def bytes_in(self) -> int:
        return self.source.total_bytes

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.order)

    def kv_bytes_per_token(self, n_kv: int | None = None) -> int:
        """K and V cache bytes per token, all layers, in the checkpoint's dtype (an emulated
        conversion still caches every head)."""
        n_kv = self.shape.n_kv_heads if n_kv is None or self.emulate else n_kv
        return kv_bytes_per_token(self.shape.n_layers, n_kv, self.shape.head_dim, itemsize(self.kv_dtype))


def check_support(family: Family, config: dict[str, Any], n_groups: int, shape: HeadShape, emulate: bool) -> None:
    """Refuse, with the reason and the way out, a G this family cannot hold natively."""
    if emulate or gqa_native(family, config) or n_groups == shape.n_kv_heads:
        return
    if family.mqa_flag and n_groups == 1:
        return  # the family's own multi-query layout
    native = "only multi-query (--groups 1)" if family.mqa_flag else "no grouped-query attention"
    if family.sibling and n_groups == 1:
        native += f"; --sibling writes a real MQA {family.sibling['name']} checkpoint instead"
    raise ConversionError(
        f"{family.name} checkpoints support {native} in transformers, so GQA-{n_groups} cannot be written "
        "natively. --emulate writes the same architecture with each pooled K/V head repeated back "
        f"{shape.n_kv_heads // n_groups} times: it loads anywhere and shows GQA-{n_groups}'s quality, but saves no memory."
    )


def _check_sibling(family: Family, config: dict[str, Any], n_groups: int, emulate: bool) -> None:
    sib = family.sibling
    if sib is None:
        raise ConversionError(f"--sibling: {family.name} has no native-MQA sibling architecture")
    if n_groups != 1 or emulate:
        raise ConversionError(
            f"--sibling writes {sib['name']} with multi-query attention: use it with --groups 1, without --emulate"
        )
    for key in sib["refuse_if_set"]:
        if config.get(key):
            raise ConversionError(f"--sibling: this {family.name} sets {key}, which {sib['name']} does not implement")


def check_unquantized(config: dict[str, Any], where: object) -> None:
    """A quantized checkpoint's K/V are codes and scales, not values: pooling them is garbage."""
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        raise ConversionError(
            f"{where}: a quantized checkpoint ({str(method)[:40]}); its K/V weights cannot be pooled. Convert the "
            "unquantized checkpoint (and quantize the output afterwards), or dequantize this one first."
        )


def _init_range(config: dict[str, Any], method: str) -> float:
    value = config.get("initializer_range", 0.02)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e3 and value == value
    if ok:
        return float(value)
    if method == "random":
        raise ConversionError(
            f"config.json: initializer_range {shown(value, 40)} is not a positive number; --method random needs it"
        )
    return 0.02


def check_groups(n_groups: int, shape: HeadShape) -> None:
    choices = ", ".join(map(str, valid_groups(shape.n_heads, shape.n_kv_heads)))
    if isinstance(n_groups, bool) or not isinstance(n_groups, int):
        raise ConversionError(f"--groups must be a whole number (got {str(n_groups)[:40]}); choose one of {choices}.")
    if n_groups < 1:
        raise ConversionError(f"--groups must be at least 1 (got {n_groups}); choose one of {choices}.")
    if n_groups > shape.n_kv_heads:
        raise ConversionError(
            f"--groups {n_groups} asks for more KV heads than the checkpoint has ({shape.n_kv_heads}); "
            f"pooling can only merge heads: choose one of {choices}."
        )
    if shape.n_heads % n_groups:
        raise ConversionError(
            f"--groups {n_groups} does not divide the {shape.n_heads} query heads; choose one of {choices}."
        )
    if shape.n_kv_heads % n_groups:
        raise ConversionError(
            f"--groups {n_groups} does not divide the checkpoint's {shape.n_kv_heads} KV heads; choose one of {choices}."
        )


def block_templates(family: Family, source: Source) -> tuple[str, ...]:
    """The attention block prefixes as this checkpoint names them: with the base model's
    prefix (a *ForCausalLM checkpoint) or without it (a checkpoint saved from the base model)."""
    key = family.roles[key_role(family)]
    stripped = tuple(t.removeprefix(family.base_prefix) for t in family.attn)
    for templates in (family.attn, stripped):
        if templates[0].format(layer=0) + key in source.tensors:
            return templates
    raise ConversionError(
        f"{source.root}: no tensor {family.attn[0].format(layer=0) + key!r}; this checkpoint's attention layout "
        f"does not match the {family.name} family (fused or renamed projections are not supported yet)."
    )


def _check_layer_count(family: Family, template: str, shape: HeadShape, source: Source) -> None:
    """Compare config's layer count with the tensors before anything is allocated per layer
    (a config may claim a billion layers)."""
    key = family.roles[key_role(family)]
    pattern = re.compile(re.escape(template).replace(re.escape("{layer}"), r"(\d+)") + re.escape(key))
    present = len({m.group(1) for name in source.tensors if (m := pattern.fullmatch(name))})
    last = template.format(layer=shape.n_layers - 1) + key
    extra = template.format(layer=shape.n_layers) + key
    if shape.n_layers > present or last not in source.tensors:
        raise ConversionError(
            f"config.json says {shape.n_layers} layers, but the checkpoint holds attention tensors for {present}; "
            "the config does not belong to these weights (or shards are missing)."
        )
    if extra in source.tensors:
        raise ConversionError(
            f"{extra!r} exists but config.json says {shape.n_layers} layers; the config is inconsistent."
        )


def _layer_inputs(family: Family, prefix: str, shape: HeadShape, source: Source) -> dict[str, list[str]]:
    inputs: dict[str, list[str]] = {}
    for role, rel in family.roles.items():
        if "{head}" in rel:
            count = shape.n_kv_heads if role in KV_ROLES else shape.n_heads
            names = [prefix + rel.format(head=h) for h in range(count)]
        else:
            names = [prefix + rel]
        present = [n in source.tensors for n in names]
        if all(present):
            inputs[role] = names
        elif any(present):
            missing = names[present.index(False)]
            raise ConversionError(f"{source.root}: tensor {missing!r} is missing (other heads of it are there)")
        elif role in required_roles(family):
            raise ConversionError(f"{source.root}: tensor {names[0]!r} is missing; the checkpoint is incomplete.")
    return inputs


def _axis(family: Family, role: str, axis: int) -> int:
    """The axis of a Linear-layout (out, in) tensor as stored: Conv1D stores (in, out)."""
    return 1 - axis if role in family.transposed else axis


# dtypes whose values can be pooled: a quantized or integer tensor cannot be averaged.
_POOLABLE = ("F64", "F32", "F16", "BF16")


def _check_tensors(
    inputs: dict[str, list[str]], shape: HeadShape, source: Source, family: Family, layout: str | None
) -> None:
    for names in inputs.values():
        for name in names:
            info = source.tensors[name]
            if info.dtype not in _POOLABLE:
                raise ConversionError(
                    f"{name}: stored as {info.dtype}, a quantized or integer tensor that cannot be pooled; "
                    "convert the unquantized (float) checkpoint, or dequantize this one first."
                )
    kv_key = family.kv_heads_key
    q_rows, kv_rows = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    expect = {"q.weight": (0, q_rows), "q.bias": (0, q_rows), "k.weight": (0, kv_rows), "k.bias": (0, kv_rows)}
    expect |= {"v.weight": (0, kv_rows), "v.bias": (0, kv_rows), "o.weight": (1, q_rows)}
    if layout:
        fused = fused_rows(layout, shape.n_heads, shape.n_kv_heads, shape.head_dim)
        expect |= {"qkv.weight": (0, fused), "qkv.bias": (0, fused)}
    expect = {role: (_axis(family, role, axis), size) for role, (axis, size) in expect.items()}
    for role, (axis, size) in expect.items():
        if role not in inputs:
            continue
        info = source.tensors[inputs[role][0]]
        if len(info.shape) <= axis or info.shape[axis] != size:
            raise ConversionError(
                f"{info.name}: shape {list(info.shape)} disagrees with config.json "
                f"(heads={shape.n_heads}, {kv_key}={shape.n_kv_heads}, head_dim={shape.head_dim} "
                f"means {size} along axis {axis}); the config does not belong to these weights."
            )
    # every projection is a matrix reading (or, for o, writing) the hidden size; biases are vectors
    width_axis = {"q.weight": 1, "k.weight": 1, "v.weight": 1, "qkv.weight": 1, "o.weight": 0}
    for role, names in inputs.items():
        info = source.tensors[names[0]]
        if role.endswith(".bias") and len(info.shape) != 1:
            raise ConversionError(f"{info.name}: shape {list(info.shape)[:8]} is not a vector; a bias must be one.")
        if role in width_axis:
            axis = _axis(family, role, width_axis[role])
            if len(info.shape) != 2 or info.shape[axis] != shape.hidden:
                raise ConversionError(
                    f"{info.name}: shape {list(info.shape)[:8]} disagrees with config.json's hidden size {shape.hidden}; "
                    "the config does not belong to these weights."
                )


def _role_outputs(
    role: str,
    names: list[str],
    rel: str,
    prefix: str,
    source: Source,
    n_kv: int,
    g: int,
    family: Family,
    shape: HeadShape,
    layout_out: str | None,
    transposed_out: tuple[str, ...],
) -> list[OutTensor]:
    infos = [source.tensors[n] for n in names]
    flip = (role in family.transposed) != (role in transposed_out)  # Conv1D in, Linear out
    if role in ("qkv.weight", "qkv.bias"):
        info = infos[0]
        dims = list(info.shape[::-1] if flip else info.shape)
        dims[1 if role in transposed_out else 0] = fused_rows(layout_out, shape.n_heads, g, shape.head_dim)
        return [OutTensor(info.name, info.dtype, tuple(dims))]
    if role not in KV_ROLES:
        return [OutTensor(i.name, i.dtype, i.shape[::-1] if flip else i.shape) for i in infos]
    if "{head}" in rel:  # one tensor per head: keep the first G names, the shape is unchanged
        return [OutTensor(prefix + rel.format(head=h), infos[0].dtype, infos[0].shape) for h in range(g)]
    info = infos[0]
    return [OutTensor(info.name, info.dtype, (info.shape[0] * g // n_kv, *info.shape[1:]))]


def source_order(source: Source) -> list[str]:
    """Tensor names in the order their bytes lie on disk (sequential reads)."""
    file_rank = {p: i for i, p in enumerate(source.weight_files)}
    return sorted(source.tensors, key=lambda n: (file_rank[source.tensors[n].path], source.tensors[n].begin, n))


def _head_names(family: Family, source: Source) -> tuple[str | None, str | None]:
    """(embedding, output head) tensor names as this checkpoint stores them."""

    def find(name: str) -> str | None:
        for candidate in (name, name.removeprefix(family.base_prefix)):
            if candidate in source.tensors:
                return candidate
        return None

    return find(family.embed), find(family.lm_head)


def _tied_head(family: Family, source: Source) -> tuple[list[str], list[str], dict[str, Any]]:
    """(tensors to drop, notes, config changes) for the output head. A head stored beside a
    tied embedding is dropped only if it equals the embedding; otherwise it is kept and the
    output's config unties them, so the output computes what the source computes."""
    if source.config.get("tie_word_embeddings") is not True:
        return [], [], {}
    embed, head = _head_names(family, source)
    if head is None:
        return [], [], {}
    if embed is not None and source.same_values(embed, head):
        return [head], [], {}  # tied: transformers re-ties it on load
    note = (
        f"config.json ties the output head to the embedding, but {head} holds other values; "
        "the output keeps it and sets tie_word_embeddings: false, as transformers computes the source"
    )
    return [], [note], {"tie_word_embeddings": False}


def _blocks(
    family: Family,
    templates: tuple[str, ...],
    source: Source,
    shape: HeadShape,
    g_out: int,
    layout: tuple[str | None, str | None],
    transposed_out: tuple[str, ...],
) -> list[LayerPlan]:
    """Every attention block's inputs (checked) and planned outputs, in layer order."""
    layout_in, layout_out = layout
    layers: list[LayerPlan] = []
    for layer in range(shape.n_layers):
        for template in templates:
            prefix = template.format(layer=layer)
            inputs = _layer_inputs(family, prefix, shape, source)
            _check_tensors(inputs, shape, source, family, layout_in)
            outputs = {
                role: _role_outputs(
                    role,
                    names,
                    family.roles[role],
                    prefix,
                    source,
                    shape.n_kv_heads,
                    g_out,
                    family,
                    shape,
                    layout_out,
                    transposed_out,
                )
                for role, names in inputs.items()
            }
            layers.append(LayerPlan(len(layers), prefix, inputs, outputs))
    return layers


def _write_order(
    source: Source, layers: list[LayerPlan], dropped: list[str], transpose_copies: set[str]
) -> tuple[list[OutTensor], dict[str, int]]:
    """Output tensors in the order they are written (the source's order on disk; a block's
    outputs right after its last input), and which input completes each block."""
    member_of = {n: lp.layer for lp in layers for n in lp.input_names}
    remaining = {lp.layer: len(lp.input_names) for lp in layers}
    order: list[OutTensor] = []
    emit_after: dict[str, int] = {}
    for name in source_order(source):
        if name in dropped:
            continue
        if name in member_of:
            layer = member_of[name]
            remaining[layer] -= 1
            if remaining[layer] == 0:  # the layer's last input has been read: its outputs follow
                emit_after[name] = layer
                order.extend(t for ts in layers[layer].outputs.values() for t in ts)
        else:
            info = source.tensors[name]
            order.append(OutTensor(name, info.dtype, info.shape[::-1] if name in transpose_copies else info.shape))
    return order, emit_after


def _config_out(
    family: Family, config: dict[str, Any], shape: HeadShape, n_groups: int, emulate: bool, sibling: bool
) -> dict[str, Any]:
    """config.json of the output: only what the new head layout needs changes."""
    out = dict(config)
    if emulate or n_groups == shape.n_kv_heads:
        pass  # the architecture holds exactly what it held before
    elif sibling:
        sib = family.sibling
        out |= {"model_type": sib["model_type"], "architectures": sib["architectures"], **sib["config"]}
    elif gqa_native(family, config):
        out[family.kv_heads_key] = n_groups
    else:
        out[family.mqa_flag] = True
    if GENERIC_KV_HEADS_KEY in config and not (emulate or sibling or n_groups == shape.n_kv_heads):
        out[GENERIC_KV_HEADS_KEY] = n_groups  # the generic name beside a family's own one stays true
    return out


def build_plan(
    source: Source,
    n_groups: int,
    method: str = "mean",
    *,
    seed: int = 0,
    max_shard_size: int | str = "5GB",
    grouping: str = "contiguous",
    emulate: bool = False,
    sibling: bool = False,
) -> ConversionPlan:
    """Check everything that can be checked without reading weights, and plan the output."""
    family = family_for(source.config)
    check_unquantized(source.config, source.root)
    shape = head_shape(family, source.config, f"{source.root / 'config.json'}")
    templates = block_templates(family, source)
    _check_layer_count(family, templates[0], shape, source)
    first = _layer_inputs(family, templates[0].format(layer=0), shape, source)
    layout_in = fused_layout(family, source.config)
    _check_tensors(first, shape, source, family, layout_in)  # before any count drives a loop
    check_groups(n_groups, shape)
    if sibling:
        _check_sibling(family, source.config, n_groups, emulate)
    else:
        check_support(family, source.config, n_groups, shape, emulate)
    emulate = emulate and n_groups < shape.n_kv_heads
    layout_out = layout_in
    if layout_in and not emulate and not gqa_native(family, source.config) and n_groups == 1:
        layout_out = "concat"  # the family's multi-query layout
    transposed_out = family.transposed
    if sibling:
        layout_out, transposed_out = "concat", ()
    chosen = get_method(method)
    if grouping not in GROUPINGS:
        raise ConversionError(f"unknown grouping {shown(grouping)}; choose one of: {', '.join(GROUPINGS)}")
    if len(family.attn) > 1 and grouping != "contiguous":
        raise ConversionError(f"--grouping {grouping} is not supported for {family.name} (per-head position biases)")
    shard_bytes = parse_size(max_shard_size)
    g_out = shape.n_kv_heads if emulate else n_groups
    layers = _blocks(family, templates, source, shape, g_out, (layout_in, layout_out), transposed_out)
    dropped, notes, config_changes = _tied_head(family, source)
    transpose_copies: set[str] = set()
    if sibling:
        dropped += [n for n in source.tensors if n.endswith(tuple(family.sibling["drop_suffixes"]))]
        transpose_copies = {n for n in source.tensors if n.endswith(tuple(family.sibling["transpose_suffixes"]))}
    order, emit_after = _write_order(source, layers, dropped, transpose_copies)
    config_out = _config_out(family, source.config, shape, n_groups, emulate, sibling) | config_changes
    return ConversionPlan(
        source,
        family,
        shape,
        n_groups,
        chosen,
        seed,
        tuple(layers),
        tuple(order),
        emit_after,
        tuple(dropped),
        tuple(tuple(s) for s in plan_shards(order, shard_bytes)),
        config_out,
        source.tensors[layers[0].inputs[key_role(family)][0]].dtype,
        templates[0],
        grouping,
        rope_layout(shape.head_dim, rotary_dims(family, source.config, shape.head_dim), family.rope_layout),
        normalises_keys(family, source.config),
        emulate=emulate,
        layout_in=layout_in,
        layout_out=layout_out,
        transposed_out=transposed_out,
        transpose_copies=frozenset(transpose_copies),
        notes=tuple(notes),
        init_range=_init_range(source.config, method),
    )
