"""`--method refine`: fold's solution, then a few Adam steps per layer, in order, so that each
converted attention block reproduces the source block's output on the input the *converted*
model gives it (earlier layers' errors included).

The block is the family's own transformers module (real softmax, RoPE, causal mask), so what
is optimised is what transformers runs. Only the tensors a stock GQA checkpoint holds move:
each group's shared K/V projection, every head's Q rows and O columns, and their biases.
A held-out slice of the calibration tokens picks the best parameters seen (fold's start
included, so refined is never worse there) and stops the run early.

The model is streamed: only the hidden states entering the current layer are kept, and one
layer's weights (the source attention and the converted layer) are read from the checkpoint,
fitted and released before the next; refined blocks wait on disk for the writer.
All optimisation is in float32; results are cast back to each tensor's dtype."""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..architectures import Family, context_length, module_path, refine_refusal
from ..data import build_stream, iter_documents
from ..errors import ConversionError, shown
from ..io.hf import load_tokenizer, quiet_transformers
from ..options import DEFAULT_REFINE_BATCH_TOKENS
from .calibrate import Calibration, calibration_device
from .layer import method_roles, stored_outputs
from .plan import ConversionPlan, LayerPlan

# Fitted roles: the tensors a GQA checkpoint of a separate-q/k/v/o family holds per block.
FIT_ROLES = ("q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias", "o.weight")
SEQ_LEN = 256  # calibration sequence length (at most the model's context)
HOLDOUT = 1 / 8  # share of --refine-tokens held out (never fitted on)
EVAL_EVERY = 10  # steps between held-out evaluations
PATIENCE = 5  # evaluations without improvement before stopping
LOSSLESS = 1e-10  # held-out relative error below which a block is left as fold wrote it


class Spill:
    """Refined blocks by role (Linear layout) kept on disk, one safetensors file a layer, until
    the writer asks for them: refining holds one layer's tensors in memory, not every layer's."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="gqa-refine-")  # removed with this object

    def _path(self, layer: int) -> Path:
        return Path(self._dir.name) / f"{layer}.safetensors"

    def put(self, layer: int, roles: dict[str, torch.Tensor]) -> None:
        save_file({r: t.contiguous() for r, t in roles.items()}, self._path(layer))

    def get(self, layer: int) -> dict[str, torch.Tensor]:
        return load_file(self._path(layer))


@dataclass
class RefineResult:
    """Refined blocks (on disk until written), the grouping of each, and the manifest record."""

    roles: Spill
    groupings: dict[int, list[list[int]]]
    record: dict[str, Any] = field(default_factory=dict)

    def convert_block(self, plan: ConversionPlan, layer: int, tensors: dict[str, torch.Tensor]):
        """The stream's hook: the refined block in the output's stored layout."""
        return stored_outputs(plan, plan.layers[layer], self.roles.get(layer)), self.groupings[layer]


def check_refinable(plan: ConversionPlan) -> None:
    """Refuse, in one line, a family or option refine cannot handle."""
    family = plan.family
    if not family.refine:
        raise ConversionError(
            f"--method refine does not support {family.name} ({refine_refusal(family) or 'not declared'}: it "
            "needs separate q/k/v/o projections, no per-head key norm and native GQA in transformers); use --method fold"
        )
    if plan.emulate:
        raise ConversionError("--method refine writes native GQA only; drop --emulate or use --method fold")


def resolve_device(device: str | None) -> str:
    """The device to refine on: the one named, checked, or CUDA when present."""
    if device is None:
        return calibration_device()
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConversionError(f"--refine-device {shown(device)}: choose cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConversionError(f"--refine-device {device}: no CUDA device is available here; use cpu")
    return device


def _sequences(
    plan: ConversionPlan, data: list[str], tokens: int, separator: str | None, skip: int
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(train, held-out) windows of token ids, (n, seq_len) each. The first `tokens` minus 1/8
    are fitted on; the held-out 1/8 comes after the first `skip` tokens (fold's calibration)
    where the text is long enough, so neither fold nor the fit has seen it (the bool says so)."""
    source = plan.source
    tokenizer = load_tokenizer(source.root, why="to tokenize the --calib text")
    n_held = max(2, round(tokens * HOLDOUT))
    n_train = tokens - n_held
    docs = iter_documents(data, separator=separator)
    ids = build_stream(tokenizer, docs, max(n_train, skip) + n_held, bos=tokenizer.bos_token_id is not None).ids
    disjoint = len(ids) >= max(n_train, skip) + n_held
    if not disjoint:  # a short text: hold out its last 1/8
        n_held = max(1, len(ids) // 8)
        n_train = min(n_train, len(ids) - n_held)
    train, held = ids[:n_train], ids[-n_held:]
    seq_len = min(SEQ_LEN, context_length(plan.family, source.config), len(held), len(train))
    if seq_len < 2:
        raise ConversionError(
            f"--refine-tokens: the calibration text gives {len(ids)} tokens, too few to fit on and hold some out"
        )
    windows = lambda t: t[: len(t) // seq_len * seq_len].reshape(-1, seq_len)  # noqa: E731
    return windows(train), windows(held), disjoint


class _Stop(Exception):
    """Raised by a capture hook: nothing after the call it caught is needed."""


Call = tuple[tuple, dict[str, Any]]  # one module call's (args, kwargs)


def _set(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `name` of `model` (a registered name keeps its kind)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    setattr(module, leaf, torch.nn.Parameter(value, requires_grad=False) if leaf in module._parameters else value)


def _skeleton(config: dict[str, Any], family: Family, device: str) -> torch.nn.Module:
    """The family's model for `config` with every parameter on the meta device (no memory) and
    its buffers (RoPE's frequencies, an embedding scale) real, on `device`; in eval mode."""
    import transformers
    from accelerate import init_empty_weights

    cfg = type(transformers.AutoConfig.for_model(config["model_type"])).from_dict(config)
    with init_empty_weights():  # parameters on meta, buffers computed as usual
        model = getattr(transformers, family.auto_class).from_config(cfg, dtype=torch.float32)
    for name, buf in list(model.named_buffers()):
        _set(model, name, buf.to(device))
    return model.eval()


def _checkpoint_tensors(plan: ConversionPlan, module: str) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor under `module` (a module path in the model), read now and named
    as the model's loader expects (with the base model's prefix, if the checkpoint lacks it)."""
    source, base = plan.source, plan.family.base_prefix
    out = {}
    for name in source.tensors:
        full = name if name.startswith(base) else base + name
        if full.startswith(module + "."):
            out[full] = source.read(name)
    return out


def _materialise(
    model: torch.nn.Module, module: str, tensors: dict[str, torch.Tensor], device: str, start: dict[str, torch.Tensor]
) -> None:
    """Fill submodule `module` with checkpoint `tensors` through transformers' own loader (which
    renames and fuses as from_pretrained does: Mixtral's experts, for one), in float32 on
    `device`, no gradients; a parameter named in `start` takes that value instead."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    config = LoadStateDictConfig(dtype=torch.float32, weight_mapping=get_model_conversion_mapping(model))
    tensors = {k: t for k, t in tensors.items() if k not in start}  # (fold's K/V have the output's shape)
    convert_and_load_state_dict_in_model(model, tensors, config)
    for name, p in list(model.get_submodule(module).named_parameters()):
        full = f"{module}.{name}"
        t = start[full] if full in start else p
        if t.device.type == "meta" or tuple(t.shape) != tuple(p.shape):
            raise ConversionError(f"refine: {full} was not found in the checkpoint with shape {tuple(p.shape)}")
        _set(model, full, t.detach().to(device=device, dtype=torch.float32, copy=True))


def _release(model: torch.nn.Module, module: str) -> None:
    """Move submodule `module`'s parameters back to the meta device, freeing their memory."""
    for name, p in list(model.get_submodule(module).named_parameters()):
        _set(model, f"{module}.{name}", p.detach().to("meta"))


def _layer_calls(model: torch.nn.Module, layers: list[str], ids: torch.Tensor) -> tuple[torch.Tensor, list[Call]]:
    """One pass of `model` over `ids` (b, t) with every decoder layer replaced by a recorder:
    (the hidden states entering the first layer, (b, t, hidden); each layer's other arguments
    exactly as the model passes them: its mask, position embeddings, ...). Only the input
    embedding needs to be materialised."""
    hidden: list[torch.Tensor] = []
    calls: list[Call] = []

    def record(hidden_states, *args, **kwargs):
        hidden.append(hidden_states)
        calls.append((args, kwargs))
        if len(calls) == len(layers):
            raise _Stop  # the final norm and head are not needed (nor materialised)
        return hidden_states

    modules = [model.get_submodule(p) for p in layers]
    for m in modules:
        m.forward = record  # an instance attribute shadows the class's forward
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for m in modules:
            del m.forward
    if len(calls) != len(layers):
        raise RuntimeError(f"refine: the model called {len(calls)} of its {len(layers)} decoder layers")
    return hidden[0], calls


@dataclass
class _Stream:
    """Calibration windows as the current layer sees them: per batch, the hidden states entering
    it (b, t, hidden), and, per layer, the other arguments of that layer's call."""

    hidden: list[torch.Tensor]
    calls: list[list[Call]]  # [layer][batch]

    @classmethod
    def start(cls, model: torch.nn.Module, layers: list[str], batches: list[torch.Tensor]) -> _Stream:
        per_batch = [_layer_calls(model, layers, ids) for ids in batches]
        return cls([h for h, _ in per_batch], [list(c) for c in zip(*(c for _, c in per_batch), strict=True)])

    def attention_inputs(self, index: int, layer: torch.nn.Module, attn: torch.nn.Module) -> list[Call]:
        """(args, kwargs) the attention block `attn` receives, per batch, when `layer` runs."""
        seen: list[Call] = []

        def hook(module, args, kwargs):
            seen.append((args, kwargs))
            raise _Stop

        handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                for h, (args, kwargs) in zip(self.hidden, self.calls[index], strict=True):
                    try:
                        layer(h, *args, **kwargs)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        return seen

    def advance(self, index: int, layer: torch.nn.Module) -> None:
        """Run `layer` (layer `index`, converted) on every batch: the next layer's input."""
        with torch.no_grad():
            for b, (args, kwargs) in enumerate(self.calls[index]):
                out = layer(self.hidden[b], *args, **kwargs)
                self.hidden[b] = out[0] if isinstance(out, tuple) else out


def _loss(attn: torch.nn.Module, inputs: tuple, target: torch.Tensor, scale: float) -> torch.Tensor:
    args, kwargs = inputs
    return (attn(*args, **kwargs)[0] - target).square().mean() / scale


def _fit(
    attn: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    train: list[tuple[tuple, torch.Tensor]],
    held: list[tuple[tuple, torch.Tensor]],
    scale: float,
    steps: int,
    lr: float,
    generator: torch.Generator,
) -> tuple[float, float, int]:
    """Adam on `params`; leaves them at the best held-out point. (before, after, steps run)."""

    def held_loss() -> float:
        with torch.no_grad():
            return sum(float(_loss(attn, x, t, scale)) for x, t in held) / len(held)

    best = before = held_loss()
    if before < LOSSLESS:  # already exact (G = H, or identical heads): nothing to gain, never move it
        return before, before, 0
    best_state = {k: p.detach().clone() for k, p in params.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    order: list[int] = []
    stale = run = 0
    for step in range(1, steps + 1):
        if not order:
            order = torch.randperm(len(train), generator=generator).tolist()
        x, t = train[order.pop()]
        opt.zero_grad(set_to_none=True)
        _loss(attn, x, t, scale).backward()
        opt.step()
        run = step
        if step % EVAL_EVERY == 0 or step == steps:
            now = held_loss()
            if now < best:
                best, stale = now, 0
                best_state = {k: p.detach().clone() for k, p in params.items()}
            else:
                stale += 1
                if stale >= PATIENCE:
                    break
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(best_state[k])
    return before, best, run


def _targets(attn: torch.nn.Module, inputs: list[Call]) -> list[tuple[Call, torch.Tensor]]:
    """Each attention input with the source block's output on it, the fit's target (b, t, hidden)."""
    with torch.no_grad():
        return [(x, attn(*x[0], **x[1])[0]) for x in inputs]


def _paths(plan: ConversionPlan, lp: LayerPlan) -> tuple[str, str]:
    """(attention block, its decoder layer) as module paths in the model."""
    path = module_path(plan.family, lp.prefix)
    return path, path.rpartition(".")[0]


def _refine_layer(
    plan: ConversionPlan,
    i: int,
    calibration: Calibration,
    models: tuple[torch.nn.Module, torch.nn.Module],
    streams: list[_Stream],
    *,
    device: str,
    steps: int,
    lr: float,
) -> tuple[dict[str, torch.Tensor], list[list[int]], dict[str, Any]]:
    """Fold block i, materialise its layer (source attention and converted layer), fit it, move
    the streams past it, release its weights. (refined roles, grouping, the layer's record)"""
    family, lp = plan.family, plan.layers[i]
    src_model, model = models
    tensors = {n: plan.source.read(n) for n in lp.input_names}
    roles, groups = method_roles(plan, lp, tensors, calibration.moments.get(lp.layer))
    del tensors
    t0 = time.perf_counter()
    path, layer_path = _paths(plan, lp)
    start = {f"{path}.{family.roles[r]}": roles[r] for r in FIT_ROLES if r in roles}  # fold's block
    _materialise(src_model, path, _checkpoint_tensors(plan, path), device, {})
    _materialise(model, layer_path, _checkpoint_tensors(plan, layer_path), device, start)
    layer, attn = model.get_submodule(layer_path), model.get_submodule(path)
    train, held = (_targets(src_model.get_submodule(path), s.attention_inputs(i, layer, attn)) for s in streams)
    _release(src_model, path)
    scale = max(sum(float(t.square().mean()) for _, t in train) / len(train), 1e-30)
    params = {r: attn.get_parameter(family.roles[r]) for r in FIT_ROLES if r in roles}
    for p in params.values():
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(plan.seed * 100003 + lp.layer)
    before, after, run = _fit(attn, params, train, held, scale, steps, lr, generator)
    del train, held
    for role, p in params.items():
        p.requires_grad_(False)
        roles[role] = p.detach().cpu().to(roles[role].dtype).clone()
    if i + 1 < len(plan.layers):
        for s in streams:
            s.advance(i, layer)  # through the refined attention: the next layer sees its errors
    _release(model, layer_path)
    rec = {"layer": lp.layer, "heldout_before": before, "heldout_after": after, "steps": run}
    return roles, groups, rec | {"seconds": round(time.perf_counter() - t0, 3)}


def refine(
    plan: ConversionPlan,
    calibration: Calibration,
    data: list[str],
    *,
    steps: int,
    lr: float,
    tokens: int,
    batch_tokens: int = DEFAULT_REFINE_BATCH_TOKENS,
    device: str | None = None,
    separator: str | None = None,
) -> RefineResult:
    """Fold each block (with the calibration's moments), then refine the blocks in order,
    one decoder layer in memory at a time."""
    started = time.perf_counter()
    quiet_transformers()
    device = resolve_device(device)
    family, source = plan.family, plan.source
    train_seqs, held_seqs, disjoint = _sequences(plan, data, tokens, separator, calibration.tokens)
    seq_len = int(train_seqs.shape[1])
    per_batch = max(1, batch_tokens // seq_len)  # whole windows per Adam step
    split = lambda s: [s[i : i + per_batch].to(device) for i in range(0, len(s), per_batch)]  # noqa: E731

    # Two skeletons, no weights: the source's attention and the converted layer are filled in
    # one layer at a time. The converted model's embedding starts the stream of hidden states.
    src_model = _skeleton(source.config, family, device)
    model = _skeleton(plan.config_out, family, device)
    layer_paths = [_paths(plan, lp)[1] for lp in plan.layers]
    embed = family.embed.removesuffix(".weight")
    _materialise(model, embed, _checkpoint_tensors(plan, embed), device, {})
    streams = [_Stream.start(model, layer_paths, split(s)) for s in (train_seqs, held_seqs)]
    _release(model, embed)

    spill = Spill()
    groupings: dict[int, list[list[int]]] = {}
    layers = []
    for i, lp in enumerate(plan.layers):
        roles, groupings[lp.layer], rec = _refine_layer(
            plan, i, calibration, (src_model, model), streams, device=device, steps=steps, lr=lr
        )
        spill.put(lp.layer, roles)
        layers.append(rec)
    del model, src_model, streams
    record = {
        "method": "refine",
        "steps": steps,
        "lr": lr,
        "tokens": int(train_seqs.numel() + held_seqs.numel()),
        "heldout_tokens": int(held_seqs.numel()),
        "heldout_unseen_by_fold": disjoint,  # held-out tokens come after fold's calibration tokens
        "seq_len": seq_len,
        "batch_tokens": per_batch * seq_len,
        "device": device,
        "seed": plan.seed,
        "calibration": {"files": calibration.files, "fold_tokens": calibration.tokens},
        "loss": "mean squared error of the block's output over the source block's, on the held-out tokens",
        "layers": layers,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return RefineResult(spill, groupings, record)
