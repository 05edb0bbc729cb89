"""`--method refine`: fold's solution, then a few Adam steps per layer, in order, so that each
converted attention block reproduces the source block's output on the input the *converted*
model gives it (earlier layers' errors included).

The block is the family's own transformers module (real softmax, RoPE, causal mask), so what
is optimised is what transformers runs. Only the tensors a stock GQA checkpoint holds move:
each group's shared K/V projection, every head's Q rows and O columns, and their biases.
A held-out slice of the calibration tokens picks the best parameters seen (fold's start
included, so refined is never worse there) and stops the run early.
All optimisation is in float32; results are cast back to each tensor's dtype."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..architectures import context_length, module_path
from ..data import build_stream, iter_documents
from ..errors import ConversionError, shown
from ..io.hf import load_model, load_tokenizer, quiet_transformers
from .calibrate import Calibration, calibration_device
from .layer import method_roles, stored_outputs
from .plan import ConversionPlan

# Fitted roles: the tensors a GQA checkpoint of a separate-q/k/v/o family holds per block.
FIT_ROLES = ("q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias", "o.weight")
SEQ_LEN = 256  # calibration sequence length (at most the model's context)
BATCH_TOKENS = 2048  # tokens per Adam step
HOLDOUT = 1 / 8  # share of --refine-tokens held out (never fitted on)
EVAL_EVERY = 10  # steps between held-out evaluations
PATIENCE = 5  # evaluations without improvement before stopping
LOSSLESS = 1e-10  # held-out relative error below which a block is left as fold wrote it


@dataclass
class RefineResult:
    """Refined blocks by role (Linear layout), the grouping of each, and the manifest record."""

    roles: dict[int, dict[str, torch.Tensor]]
    groupings: dict[int, list[list[int]]]
    record: dict[str, Any] = field(default_factory=dict)

    def convert_block(self, plan: ConversionPlan, layer: int, tensors: dict[str, torch.Tensor]):
        """The stream's hook: the refined block in the output's stored layout."""
        return stored_outputs(plan, plan.layers[layer], self.roles[layer]), self.groupings[layer]


def check_refinable(plan: ConversionPlan) -> None:
    """Refuse, in one line, a family or option refine cannot handle."""
    family = plan.family
    if not family.refine:
        raise ConversionError(
            f"--method refine does not support {family.name} (it needs separate q/k/v/o projections, no per-head "
            "key norm and native GQA in transformers); use --method fold"
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
    """Raised by the capture hook: nothing after the block is needed."""


def _capture(model: torch.nn.Module, attn: torch.nn.Module, batches: list[torch.Tensor]) -> list[tuple]:
    """(args, kwargs) the block receives for each batch of ids, from a forward pass of `model`."""
    seen: list[tuple] = []

    def hook(module, args, kwargs):
        seen.append((args, kwargs))
        raise _Stop

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return seen


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


def _converted_model(plan: ConversionPlan, source_model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The output architecture (config_out), holding the source's weights outside attention."""
    import transformers

    config = type(source_model.config).from_dict(plan.config_out)
    model = getattr(transformers, plan.family.auto_class).from_config(config, dtype=torch.float32)
    state = model.state_dict()
    src = {k: v for k, v in source_model.state_dict().items() if k in state and state[k].shape == v.shape}
    model.load_state_dict(src, strict=False)  # the K/V projections are set from fold's start below
    return model.to(device).eval()


def refine(
    plan: ConversionPlan,
    calibration: Calibration,
    data: list[str],
    *,
    steps: int,
    lr: float,
    tokens: int,
    device: str | None = None,
    separator: str | None = None,
) -> RefineResult:
    """Fold each block (with the calibration's moments), then refine the blocks in order."""
    started = time.perf_counter()
    quiet_transformers()
    device = resolve_device(device)
    family, source = plan.family, plan.source
    train_seqs, held_seqs, disjoint = _sequences(plan, data, tokens, separator, calibration.tokens)
    seq_len = int(train_seqs.shape[1])
    per_batch = max(1, BATCH_TOKENS // seq_len)
    split = lambda s: [s[i : i + per_batch].to(device) for i in range(0, len(s), per_batch)]  # noqa: E731
    train_ids, held_ids = split(train_seqs), split(held_seqs)

    src_model = load_model(source.root, family, torch.float32, device)
    for p in src_model.parameters():
        p.requires_grad_(False)
    model = _converted_model(plan, src_model, device)
    for p in model.parameters():
        p.requires_grad_(False)

    # fold's start for every block, set into the converted model
    roles: dict[int, dict[str, torch.Tensor]] = {}
    groupings: dict[int, list[list[int]]] = {}
    for lp in plan.layers:
        tensors = {n: source.read(n) for n in lp.input_names}
        roles[lp.layer], groupings[lp.layer] = method_roles(plan, lp, tensors, calibration.moments.get(lp.layer))
        attn = model.get_submodule(module_path(family, lp.prefix))
        with torch.no_grad():
            for role in FIT_ROLES:
                if role in roles[lp.layer]:
                    attn.get_parameter(family.roles[role]).copy_(roles[lp.layer][role])

    layers = []
    for lp in plan.layers:
        t0 = time.perf_counter()
        path = module_path(family, lp.prefix)
        attn, src_attn = model.get_submodule(path), src_model.get_submodule(path)
        with torch.no_grad():
            train = [(x, src_attn(*x[0], **x[1])[0]) for x in _capture(model, attn, train_ids)]
            held = [(x, src_attn(*x[0], **x[1])[0]) for x in _capture(model, attn, held_ids)]
        scale = max(sum(float(t.square().mean()) for _, t in train) / len(train), 1e-30)
        params = {r: attn.get_parameter(family.roles[r]) for r in FIT_ROLES if r in roles[lp.layer]}
        for p in params.values():
            p.requires_grad_(True)
        generator = torch.Generator().manual_seed(plan.seed * 100003 + lp.layer)
        before, after, run = _fit(attn, params, train, held, scale, steps, lr, generator)
        for role, p in params.items():
            p.requires_grad_(False)
            roles[lp.layer][role] = p.detach().cpu().to(roles[lp.layer][role].dtype).clone()
        rec = {
            "layer": lp.layer,
            "heldout_before": before,
            "heldout_after": after,
            "steps": run,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        layers.append(rec)
    del model, src_model
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
    return RefineResult(roles, groupings, record)
