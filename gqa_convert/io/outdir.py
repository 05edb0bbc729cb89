"""Atomic output directories: write into a temporary directory beside the target, under a
lock, and rename it into place only when complete. An interrupted run leaves nothing new at
the target path; a killed run's leftovers are found and removed by the next run.

- Names are literal: a target called `m*` or `m[1]` is matched character for character,
  never as a glob, and a temporary directory whose owner is alive is never removed.
- `--force` swaps the new directory and the old target in one atomic rename
  (renameat2 RENAME_EXCHANGE) where the filesystem allows it; otherwise two renames, and the
  old target is put back if the second one fails. SIGINT/SIGTERM wait for the swap to end.
- A run that fails removes the parent directories it created.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import EXIT_FAILURE, EXIT_USAGE, ConversionError

TMP_TAG = ".gqa-tmp-"
_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """SIGINT and SIGTERM are noted, not acted on, until the block is done; the list yielded
    holds those that arrived. (Python runs signal handlers in the main thread whichever
    thread the OS chose, so this holds with worker threads running, as an OS mask would not.)"""
    arrived: list[int] = []

    def note(signum: int, frame: object) -> None:
        arrived.append(signum)

    try:
        previous = {sig: signal.signal(sig, note) for sig in _SIGNALS}
    except ValueError:  # not the main thread: signals go to the main thread's handlers anyway
        yield arrived
        return
    try:
        yield arrived
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where it is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


class OutputDir:
    """Context manager: `with OutputDir(target, source) as tmp: ...write into tmp...; od.commit()`."""

    def __init__(self, target: Path, source_root: Path | None = None, force: bool = False) -> None:
        self.target = Path(os.path.abspath(target))
        self.source_root = source_root.resolve() if source_root else None
        self.force = force
        self.tmp: Path | None = None
        self.committed = False
        self.removed_stale: list[Path] = []
        self.restored: Path | None = None  # an old target a killed --force run had set aside
        self._lock_fd: int | None = None
        self._lock_path = self.target.parent / f".{self.target.name}.gqa-convert.lock"
        self._created: list[Path] = []  # parent directories this run made, deepest first

    def check(self) -> None:
        """Every refusal that needs no writing: run before any work."""
        cwd = Path.cwd().resolve()
        if _is_within(cwd, self.target.resolve()):
            raise ConversionError(
                f"output {self.target} is the current directory or holds it; replacing it would delete where you "
                "work. Choose another --out."
            )
        if self.target.is_symlink():
            raise ConversionError(
                f"output {self.target} is a symbolic link; gqa-convert does not write through links. "
                "Remove it or choose another --out."
            )
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
        parent = self.target.parent
        while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ConversionError(f"cannot create {self.target}: {parent} is not a directory; choose another --out.")

    def check_writable(self) -> None:
        """Refuse, before any work, an output whose nearest existing parent cannot be written."""
        parent = self.target.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ConversionError(f"cannot write in {parent}; choose another --out.")

    def _make_parents(self) -> None:
        missing = []
        parent = self.target.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                self._remove_created()
                raise ConversionError(f"cannot create the output's parent directory {folder} ({e.strerror})") from None
            self._created.insert(0, folder)

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()  # only if still empty: never someone else's files
            except OSError:
                break
        self._created = []

    def _lock(self) -> None:
        self._make_parents()
        parent = self.target.parent
        while True:
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                self._remove_created()
                raise ConversionError(f"cannot write in {parent} ({e.strerror}); choose another --out.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._remove_created()
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

    def _stale(self) -> list[Path]:
        """Temporary directories of this very target left by runs that are dead. The names are
        compared literally; the owner's pid is part of the name and must not be alive."""
        prefix = f".{self.target.name}{TMP_TAG}"
        found = []
        try:
            entries = list(os.scandir(self.target.parent))
        except OSError:
            return []
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            rest = entry.name[len(prefix) :].removeprefix("old-")
            if not rest.isdigit() or _alive(int(rest)) or not entry.is_dir(follow_symlinks=False):
                continue
            found.append(Path(entry.path))
        return sorted(found)

    def _remove_stale(self) -> None:
        # We hold the lock, and each owner is dead: nobody else can be writing these. A target
        # set aside by a --force run killed between its two renames is put back, not removed.
        prefix = f".{self.target.name}{TMP_TAG}old-"
        for stale in self._stale():
            if stale.name.startswith(prefix) and not (self.target.exists() or self.target.is_symlink()):
                os.rename(stale, self.target)
                self.restored = stale
                continue
            shutil.rmtree(stale, ignore_errors=True)
            self.removed_stale.append(stale)

    def acquire(self) -> None:
        """Take the target's lock now and hold it until the output is written or `release()`
        (uptrain holds it for the whole run, so a second run cannot take its state)."""
        self.check()
        if self._lock_fd is None:
            self._lock()

    def release(self) -> None:
        self._unlock()
        if not self.committed:
            self._remove_created()

    def __enter__(self) -> Path:
        self.check()
        if self._lock_fd is None:
            self._lock()
        try:
            self._remove_stale()
            if self.restored is not None:
                self.check()  # the target exists again: the usual rules apply to it
            self.tmp = self.target.parent / f".{self.target.name}{TMP_TAG}{os.getpid()}"
            self.tmp.mkdir()
        except OSError as e:
            self._unlock()
            self._remove_created()
            raise ConversionError(
                f"cannot write in {self.target.parent} ({e.strerror}); choose another --out."
            ) from None
        except ConversionError:
            self._unlock()
            raise
        return self.tmp

    def commit(self) -> None:
        """Move the finished temporary directory to the target (replacing it under --force).
        A SIGINT/SIGTERM that arrives during the swap waits for it: the output is then
        complete, and the KeyboardInterrupt raised afterwards says so."""
        assert self.tmp is not None
        old = None
        try:
            with signals_deferred() as arrived:
                old = self._swap()
                self.tmp = None
                self.committed = True
                self._created = []
                _fsync_dir(self.target.parent)
        finally:
            if old is not None and self.committed:
                shutil.rmtree(old, ignore_errors=True)
        if arrived:
            raise KeyboardInterrupt(f"the output {self.target} was already complete and is in place")

    def _swap(self) -> Path | None:
        """Put tmp at the target; returns where the replaced old target now is (to remove)."""
        assert self.tmp is not None
        if not (self.target.exists() or self.target.is_symlink()):
            os.rename(self.tmp, self.target)
            return None
        if not self.force:  # appeared while we worked
            raise ConversionError(f"output {self.target} appeared while converting; pass --force to replace it.")
        if self.target.is_symlink() or not self.target.is_dir():
            raise ConversionError(f"output {self.target} was replaced by a link or a file while converting.")
        if _exchange(self.tmp, self.target):
            return self.tmp  # one atomic step: the old target now has the temporary name
        old = self.target.parent / f".{self.target.name}{TMP_TAG}old-{os.getpid()}"
        try:
            os.rename(self.target, old)
            os.rename(self.tmp, self.target)
        except BaseException:
            if not self.target.exists() and old.exists():
                os.rename(old, self.target)  # put the old target back
            raise
        return old

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
        if not self.committed:
            self._remove_created()


_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)
_WHY = {
    errno.ENOSPC: "the disk is full",
    errno.EFBIG: "a file-size limit was hit",
    errno.EDQUOT: "the disk quota is exhausted",
}


def _os_error_of(e: BaseException) -> tuple[int | None, str, str | None] | None:
    """(errno, text, filename) of an OS-level write failure, also when a library (safetensors'
    Rust writer) reports it as its own exception type."""
    if isinstance(e, OSError):
        return e.errno, e.strerror or str(e), e.filename
    text = str(e)
    for code in _WHY:
        if f"os error {code})" in text or f"code: {code}," in text:
            return code, os.strerror(code), None
    return None


@contextmanager
def writing_errors(target: Path, what: str = "") -> Iterator[None]:
    """An OS error while writing (disk full, file-size limit, permissions) becomes one clear
    message; OutputDir has already removed the temporary output by the time it is shown."""
    try:
        yield
    except Exception as e:
        found = _os_error_of(e)
        if found is None:
            raise
        code, text, filename = found
        why = _WHY.get(code, text)
        exit_code = EXIT_USAGE if code in _NOT_ALLOWED else EXIT_FAILURE
        raise ConversionError(
            f"writing {target} failed{' while ' + what if what else ''}: {why} ({filename or 'output'}); the partial "
            "output was removed and nothing new was left at the output path. Free space or choose another --out, "
            "then run again.",
            exit_code=exit_code,
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
