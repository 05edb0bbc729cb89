"""Finding a checkpoint (a local directory or a hub id) and indexing its tensors without
loading them: safetensors (single or sharded) or pytorch_model.bin (single or sharded,
read with weights_only=True — never unrestricted unpickling)."""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError, first_line, shown
from .paths import plain_name, require_regular
from .safetensors_format import NAMES, TensorInfo, read_header, read_tensor

ST_INDEX = "model.safetensors.index.json"
ST_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
HUB_PATTERNS = ["*.json", "*.model", "*.txt", "*.py", "*.jinja", "*.tiktoken", "tokenizer*", "*.safetensors"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Source:
    """A checkpoint on local disk, its config and an index of its tensors."""

    spec: str  # what the user named: a path or a hub id
    root: Path
    config: dict[str, Any]
    weight_files: list[Path]
    format: str  # "safetensors" or "bin"
    tensors: dict[str, TensorInfo]  # for .bin, begin/end are 0 and the data comes from _bin
    revision: str | None = None  # hub commit, when resolved through the hub
    hub_id: str | None = None  # the hub id the user named; None for a local directory
    _bin: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if self.format == "safetensors":
            return read_tensor(info)
        return self._bin_state(info.path)[name]

    def _bin_state(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._bin:
            self._bin[path] = load_bin(path)
        return self._bin[path]

    def same_values(self, a: str, b: str) -> bool:
        """Whether tensors `a` and `b` hold the same dtype, shape and bytes (read in chunks)."""
        ta, tb = self.tensors[a], self.tensors[b]
        if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
            return False
        if self.format != "safetensors":
            return bool(torch.equal(self.read(a), self.read(b)))
        chunk = 16 << 20
        with open(ta.path, "rb") as fa, open(tb.path, "rb") as fb:
            fa.seek(ta.begin)
            fb.seek(tb.begin)
            left = ta.nbytes
            while left:
                n = min(chunk, left)
                if fa.read(n) != fb.read(n):
                    return False
                left -= n
        return True

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """torch.load restricted to tensors and plain containers; code in the pickle is refused."""
    try:
        with warnings.catch_warnings():  # torch's own warnings about the pickle would precede our refusal
            warnings.simplefilter("ignore")
            state = _torch_load(path)
    except pickle.UnpicklingError as e:
        first = first_line(e, 160)
        raise ConversionError(
            f"{path}: refused to load: this pickle holds more than tensors and loading it could run code "
            f"({first[:160]}). Get a safetensors copy of the model, or re-save it from a source you trust."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({first_line(e, 160)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ConversionError(f"{path}: expected a dict of tensors named by strings (a state dict)")
    for name, v in state.items():
        if not isinstance(v, torch.Tensor) or v.layout != torch.strided or v.device.type != "cpu":
            what = type(v).__name__ if not isinstance(v, torch.Tensor) else f"a {v.layout} tensor on {v.device}"
            raise ConversionError(f"{path}: {shown(name)} is {what}; expected dense CPU tensors (a state dict)")
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a dict of tensors (a state dict)")
    return state


@dataclass(frozen=True)
class Location:
    """Where a model named by the user lives: a local directory, or a hub snapshot."""

    root: Path
    hub_id: str | None = None  # None: the user named a local directory
    revision: str | None = None  # the hub commit of the snapshot


def is_local(spec: str | os.PathLike[str]) -> bool:
    """A model spec names a local path when that path exists; otherwise it is a hub id.
    This is the one place that decides it."""
    return Path(spec).expanduser().exists()


def resolve(spec: str | os.PathLike[str], revision: str | None = None) -> Location:
    """A local directory for `spec`: the path itself, or a hub snapshot (honours
    HF_HUB_OFFLINE and the local cache)."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if is_local(spec):
        if not path.is_dir():
            raise ConversionError(f"{spec}: is a file; MODEL must be a checkpoint directory (with config.json)")
        return Location(path.resolve())
    if not _REPO_ID.match(spec) or spec.startswith((".", "~")):
        raise ConversionError(f"{spec}: no such directory (and not a hub model id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        local = Path(snapshot_download(spec, revision=revision, allow_patterns=HUB_PATTERNS))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(spec, revision=revision, allow_patterns=HUB_PATTERNS + ["*.bin"]))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise ConversionError(
            f"{spec}: no such directory, and the hub model is not in the local cache and cannot be "
            f"downloaded now ({type(e).__name__}). Check the path, or go online / unset HF_HUB_OFFLINE."
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ConversionError(f"{spec}: no such directory, and the hub lookup failed: {first_line(e)}") from None
    return Location(local, spec, local.name if re.fullmatch(r"[0-9a-f]{40}", local.name) else revision)


MAX_CONFIG_BYTES = 16 << 20


def read_json(path: Path, what: str) -> Any:
    """A small JSON file, parsed; every way it can be bad is a one-line ConversionError."""
    require_regular(path, what)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConversionError(f"{path}: {path.stat().st_size} bytes, too large for {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ConversionError(f"{path}: nested too deeply to be {what}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({str(e)[:160]})") from None


def read_config(root: Path) -> dict[str, Any]:
    path = root / "config.json"
    if not path.exists() and not path.is_symlink():
        raise ConversionError(f"{root}: not a Hugging Face model directory (no config.json)")
    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return config


def _read_index(path: Path) -> dict[str, str]:
    data = read_json(path, "an index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{path}: not a valid index (expected JSON with a 'weight_map' object)")
    for name, file in weight_map.items():
        plain_name(file, f"{path.name}: tensor {str(name)[:80]!r}")
    return weight_map


def _check_shards(index: Path, weight_map: dict[str, str], found: dict[str, TensorInfo]) -> None:
    for name, file in weight_map.items():
        if name not in found:
            raise ConversionError(
                f"{index.name}: lists tensor {shown(name)} in {shown(file)}, but {shown(file)} does not hold it"
            )
    for name, info in found.items():
        if name not in weight_map:
            raise ConversionError(f"{info.path.name}: holds tensor {shown(name)}, which {index.name} does not list")
        if weight_map[name] != info.path.name:
            raise ConversionError(
                f"{index.name}: tensor {shown(name)} is listed in {weight_map[name]} but found in {info.path.name}"
            )


def _index_safetensors(files: list[Path]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        found, _ = read_header(path)
        for name, info in found.items():
            if name in tensors:
                raise ConversionError(
                    f"tensor {shown(name)} appears in two shards ({tensors[name].path.name} and {path.name}); "
                    "the checkpoint is inconsistent."
                )
            tensors[name] = info
    return tensors


def _index_bin(files: list[Path], state: dict[Path, dict[str, torch.Tensor]]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        state[path] = load_bin(path)
        for name, t in state[path].items():
            if name in tensors:
                raise ConversionError(
                    f"tensor {shown(name)} appears in two shards ({tensors[name].path.name} and {path.name})"
                )
            if t.dtype not in NAMES:
                raise ConversionError(f"{path.name}: tensor {shown(name)} has unsupported dtype {t.dtype}")
            tensors[name] = TensorInfo(name, NAMES[t.dtype], tuple(t.shape), path, 0, t.numel() * t.element_size())
    return tensors


def _weight_files(root: Path) -> tuple[str, list[Path], Path | None]:
    """(format, files, index path or None) for the weights in `root`."""
    for index_name, fmt in ((ST_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index = root / index_name
        if index.exists() or index.is_symlink():
            weight_map = _read_index(index)
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (root / n).exists()]
            if missing:
                raise ConversionError(
                    f"{index}: names shard {missing[0]}, which is not there"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + "; the download is incomplete, fetch the missing files."
                )
            for n in names:
                require_regular(root / n, "a weight shard")
            return fmt, [root / n for n in names], index
    for single, fmt in ((ST_SINGLE, "safetensors"), (BIN_SINGLE, "bin")):
        if (root / single).exists():
            require_regular(root / single, "the weights")
            return fmt, [root / single], None
    shards = sorted(p for p in root.iterdir() if p.name.endswith(".safetensors") and not p.name.startswith("."))
    if len(shards) == 1:
        require_regular(shards[0], "the weights")
        return "safetensors", shards, None
    if len(shards) > 1:
        raise ConversionError(
            f"{root}: found {len(shards)} safetensors files and no {ST_INDEX}; without the index the "
            "shards cannot be told apart from stray files. Fetch the index file too."
        )
    raise ConversionError(f"{root}: no weights found (expected {ST_SINGLE}, {ST_INDEX}, {BIN_SINGLE} or {BIN_INDEX})")


def open_source(
    spec: str | os.PathLike[str], revision: str | None = None, check_config: Callable[[dict], object] | None = None
) -> Source:
    """Resolve and index a checkpoint; raises ConversionError for anything a user can fix.
    `check_config` runs on config.json before any weight file is looked at."""
    where = resolve(spec, revision)
    root = where.root
    config = read_config(root)
    if check_config is not None:
        check_config(config)
    fmt, files, index = _weight_files(root)
    bin_state: dict[Path, dict[str, torch.Tensor]] = {}
    tensors = _index_safetensors(files) if fmt == "safetensors" else _index_bin(files, bin_state)
    if index is not None:
        _check_shards(index, _read_index(index), tensors)
    return Source(str(spec), root, config, files, fmt, tensors, where.revision, where.hub_id, bin_state)
