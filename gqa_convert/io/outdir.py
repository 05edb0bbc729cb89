"""Atomic output directories: write into a temporary directory beside the target, under
a lock, and rename into place only when complete. An interrupted run leaves nothing at
the target path; a killed run's leftovers are found and removed by the next run."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import EXIT_FAILURE, EXIT_USAGE, ConversionError

TMP_TAG = ".gqa-tmp-"


def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


class OutputDir:
    """Context manager: `with OutputDir(target, source) as tmp: ...write into tmp...; od.commit()`."""

    def __init__(self, target: Path, source_root: Path | None = None, force: bool = False) -> None:
        self.target = Path(os.path.abspath(target))
        self.source_root = source_root.resolve() if source_root else None
        self.force = force
        self.tmp: Path | None = None
        self.removed_stale: list[Path] = []
        self._lock_fd: int | None = None
        self._lock_path = self.target.parent / f".{self.target.name}.gqa-convert.lock"

    def check(self) -> None:
        target = self.target.resolve()
        if self.source_root is not None:
            if _is_within(target, self.source_root):
                raise ConversionError(
                    f"output {self.target} is the source checkpoint or inside it; choose another --out "
                    "(the source is never modified)."
                )
            if _is_within(self.source_root, target):
                raise ConversionError(f"output {self.target} contains the source checkpoint; choose another --out.")
        if self.target.exists() and not self.force:
            raise ConversionError(
                f"output {self.target} already exists; pass --force to replace it, or choose another --out."
            )
        if self.target.exists() and not self.target.is_dir():
            raise ConversionError(
                f"output {self.target} exists and is not a directory; remove it or choose another --out."
            )

    def check_writable(self) -> None:
        """Refuse, before any work, an output whose nearest existing parent cannot be written."""
        parent = self.target.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ConversionError(f"cannot write in {parent}; choose another --out.")

    def _lock(self) -> None:
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConversionError(f"cannot create the output's parent directory {parent} ({e.strerror})") from None
        while True:
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConversionError(f"cannot write in {parent} ({e.strerror}); choose another --out.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConversionError(
                    f"another gqa-convert is writing {self.target} right now (lock {self._lock_path.name}); "
                    "wait for it to finish or choose another --out."
                ) from None
            # The previous holder may have unlinked the lock file before we got it: retry on the new one.
            try:
                if os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino:
                    self._lock_fd = fd
                    return
            except FileNotFoundError:
                pass
            os.close(fd)

    def _remove_stale(self) -> None:
        # We hold the lock, so any temporary directory for this target belongs to a dead run.
        for stale in self.target.parent.glob(f".{self.target.name}{TMP_TAG}*"):
            shutil.rmtree(stale, ignore_errors=True)
            self.removed_stale.append(stale)

    def __enter__(self) -> Path:
        self.check()
        self._lock()
        try:
            self._remove_stale()
            self.tmp = self.target.parent / f".{self.target.name}{TMP_TAG}{os.getpid()}"
            self.tmp.mkdir()
        except OSError as e:
            self._unlock()
            raise ConversionError(
                f"cannot write in {self.target.parent} ({e.strerror}); choose another --out."
            ) from None
        return self.tmp

    def commit(self) -> None:
        """Move the finished temporary directory to the target (replacing it under --force)."""
        assert self.tmp is not None
        old = None
        if self.target.exists():
            if not self.force:  # appeared while we worked
                raise ConversionError(f"output {self.target} appeared while converting; pass --force to replace it.")
            old = self.target.parent / f".{self.target.name}{TMP_TAG}old-{os.getpid()}"
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        self.tmp = None
        _fsync_dir(self.target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.unlink(self._lock_path)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        self._unlock()


_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextmanager
def writing_errors(target: Path, what: str = "") -> Iterator[None]:
    """An OSError while writing (disk full, file-size limit, permissions) becomes one clear
    message; OutputDir has already removed the temporary output by the time it is shown."""
    try:
        yield
    except OSError as e:
        why = {
            errno.ENOSPC: "the disk is full",
            errno.EFBIG: "a file-size limit was hit",
            errno.EDQUOT: "the disk quota is exhausted",
        }.get(e.errno, e.strerror or str(e))
        code = EXIT_USAGE if e.errno in _NOT_ALLOWED else EXIT_FAILURE
        raise ConversionError(
            f"writing {target} failed{' while ' + what if what else ''}: {why} ({e.filename or 'output'}); the partial output was removed "
            "and nothing was left at the output path. Free space or choose another --out, then run again.",
            exit_code=code,
        ) from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)
