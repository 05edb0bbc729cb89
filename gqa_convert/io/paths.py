"""The one path policy for files read from a checkpoint directory.

- Every file read must be a regular file (after following links): a FIFO would block, a
  device would never end. Names taken from an index are plain file names in the directory.
- Non-weight files copied into an output (tokenizer, generation config, chat template, code)
  must be regular files whose real path stays inside the model directory, or, for a hub
  snapshot, inside that repository's blob store. A link elsewhere could carry a secret into
  an output that is then uploaded; it is refused before any work, with the fix.
- Directory walks do not follow links, stop at a depth and a file count, and skip hidden
  entries. Paths are always literal: nothing here builds a glob from a user's name.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from ..errors import ConversionError

MAX_DEPTH = 16
MAX_FILES = 10000

# Files never copied from the source: weights (ours replace them) and what gqa-convert writes itself.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def require_regular(path: Path, what: str = "") -> None:
    """Raise ConversionError unless `path` is (or links to) a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConversionError(f"{path}: {what or 'file'} is missing (or is a dangling link)") from None
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConversionError(f"{path}: is {_kind(st.st_mode)}, not a regular file; gqa-convert reads only files.")


def refuse_special_files(root: Path) -> None:
    """Before a library (transformers) opens files of `root` by name: none of them may be a
    FIFO, device or socket, which would block or never end."""
    try:
        entries = list(os.scandir(root))
    except OSError as e:
        raise ConversionError(f"{root}: cannot list ({e.strerror})") from None
    for entry in entries:
        try:
            mode = os.stat(entry.path).st_mode  # follows links
        except OSError:
            continue  # dangling links are never opened by name
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ConversionError(f"{entry.path}: is {_kind(mode)}, not a regular file; gqa-convert reads only files.")


def plain_name(name: object, where: str) -> str:
    """A file name from an index: one path component, no '..', not absolute."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        shown = repr(name)[:80]
        raise ConversionError(
            f"{where}: names the file {shown}, which is not a plain file name in the model directory; "
            "the index is damaged or hostile."
        )
    return name


def allowed_roots(root: Path, hub: bool) -> list[Path]:
    """Where the real path of a copied file may lie: the model directory, and for a hub
    snapshot (.../models--org--name/snapshots/REV, named by hub id or by its path) the
    repository's blob store."""
    roots = [root.resolve()]
    in_cache = root.parent.name == "snapshots" and root.parent.parent.name.startswith(("models--", "datasets--"))
    if (hub or in_cache) and root.parent.name == "snapshots":
        roots.append((root.parent.parent / "blobs").resolve())
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def other_files(root: Path, own: set[str], hub: bool = False) -> list[str]:
    """Relative paths of the non-weight files to copy from `root`, checked by the policy above.
    `own` names the files the output writes itself. Raises ConversionError for a file that
    must not be copied, naming it and the fix."""
    roots = allowed_roots(root, hub)
    found: list[str] = []
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise ConversionError(f"{folder}: cannot list ({e.strerror})") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            rel = path.relative_to(root)
            if entry.is_dir(follow_symlinks=False):
                if depth + 1 >= MAX_DEPTH:
                    raise ConversionError(f"{path}: folders nested more than {MAX_DEPTH} deep in the model directory")
                stack.append((path, depth + 1))
                continue
            if str(rel) in own or entry.name.endswith(WEIGHT_SUFFIXES) or entry.name.endswith(".index.json"):
                continue
            if entry.is_symlink():
                real = Path(os.path.realpath(path))
                if not real.exists():
                    raise ConversionError(f"{path}: is a dangling link; remove it, then run again.")
                if real.is_dir():
                    if _inside(real, roots):
                        continue  # its files are reached through their own folder
                    raise ConversionError(
                        f"{path}: links to a folder outside the model directory ({real}); gqa-convert does not "
                        "copy files from outside it. Copy the folder in, or remove the link."
                    )
                if not _inside(real, roots):
                    raise ConversionError(
                        f"{path}: links to {real}, outside the model directory; gqa-convert does not copy files "
                        "from outside it into an output. Copy the file in, or remove the link."
                    )
            require_regular(path)
            found.append(str(rel))
            if len(found) > MAX_FILES:
                raise ConversionError(f"{root}: more than {MAX_FILES} non-weight files; is this a model directory?")
    return sorted(found, key=lambda r: Path(r).parts)  # as pathlib sorts paths


def copy_files(root: Path, rels: list[str], dest: Path) -> None:
    """Copy the files `other_files` chose. Each is opened without following a link that
    appeared since it was checked, and must still be a regular file."""
    for rel in rels:
        src = Path(os.path.realpath(root / rel))
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fin:
            if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
                raise ConversionError(
                    f"{root / rel}: changed into {_kind(os.fstat(fin.fileno()).st_mode)} while copying"
                )
            if (dest / rel).exists():  # a file the output already wrote: the source's copy wins
                (dest / rel).unlink()
            with open(dest / rel, "xb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
