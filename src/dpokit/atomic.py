"""Writes that never leave a half-written file or directory behind: temp sibling, then rename.

    with atomic_path(run_dir / "final", directory=True) as tmp:   # fill tmp/ ...
        model.save_pretrained(tmp)                                # ... renamed to final/ at exit
    write_text(path, text)                                        # the one-liner for files

The temporary sibling is ``.<name>.<pid>.tmp`` (hidden, unique per process, so two processes
writing the same target never share one); ``shared=True`` drops the pid for a directory that
several ranks of one run fill together (``.<name>.tmp``). On an exception the temporary is
removed and the target is left as it was; on success ``os.replace`` puts it in place in one step
(an existing directory target is swapped with it in one step where the system can —
Linux's ``renameat2(RENAME_EXCHANGE)`` — else renamed aside first, since POSIX cannot rename over
a non-empty directory; the old one is removed once the new one is in place). What is renamed is
flushed to the disk first and the parent directory after (``fsync``), so a power loss leaves
the old target or the complete new one.

An OS error while writing — a full disk, a read-only directory, a file where a directory should
be — is a :class:`~dpokit.errors.DpokitError` ``cannot write PATH: CAUSE`` naming the target (not
the hidden temporary). Libraries that write into the temporary report the same errors in their
own types (safetensors and tokenizers as ``... (os error 28)``, ``torch.save`` to a file handle
as a ``RuntimeError`` raised while handling the ``OSError``); :func:`os_error_cause` reads them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from dpokit.errors import DpokitError

_RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")
"""How Rust's ``std::io::Error`` ends its message (safetensors, tokenizers)."""


def temporary_sibling(path: str | Path, *, shared: bool = False) -> Path:
    """The hidden temporary name beside ``path`` that :func:`atomic_path` writes first."""
    path = Path(path)
    suffix = "" if shared else f".{os.getpid()}"
    return path.with_name(f".{path.name}{suffix}.tmp")


def os_error_cause(error: BaseException) -> str | None:
    """The OS's reason (``"No space left on device"``) when ``error`` is a failed file operation,
    or None for anything else — a :class:`DpokitError`, a programming error — which the caller
    lets through unchanged.

    Recognised: an ``OSError``; a ``RuntimeError`` raised while handling one (``torch.save`` to a
    file handle); an exception whose message ends like Rust's I/O errors, ``(os error N)``
    (``safetensors.SafetensorError``, the tokenizers' plain ``Exception``)."""
    if isinstance(error, DpokitError) or not isinstance(error, Exception):
        return None
    if isinstance(error, OSError):
        return error.strerror or str(error) or type(error).__name__
    if isinstance(error, RuntimeError) and isinstance(error.__context__, OSError):
        return os_error_cause(error.__context__)
    match = _RUST_IO_ERROR.search(str(error))
    if match:
        return os.strerror(int(match.group(1)))
    return None


def _remove(path: Path) -> None:
    """Delete a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def discard(path: Path) -> None:
    """:func:`_remove` that never raises: cleaning up after a failure must not hide it."""
    with contextlib.suppress(OSError):
        _remove(path)


def _fsync(path: Path) -> None:
    """Flush one file's or directory's data and metadata to the disk (``os.fsync``). Where the
    system cannot sync a directory (Windows, some network file systems) that is let be."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) * path.is_dir()
    try:
        fd = os.open(path, flags)
    except (IsADirectoryError, PermissionError):
        return  # Windows opens no directory
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def sync_tree(path: Path) -> None:
    """``fsync`` every file under ``path`` (or ``path`` itself), then its directories, deepest
    first: what is renamed into place is on the disk before the rename is."""
    if not path.is_dir():
        _fsync(path)
        return
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                _fsync(file)
        _fsync(Path(root))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV)
"""What ``renameat2`` answers where the file system or kernel cannot exchange."""


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``, glibc ≥ 2.28). False where the system cannot (another OS, an old glibc
    or kernel, a file system without it): the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def replace(tmp: Path, path: Path) -> None:
    """Move a finished temporary into place, durably: its files are flushed to the disk first
    (:func:`sync_tree`) and the parent directory after, so a power loss leaves the old target or
    the complete new one — never a renamed, still empty one (a checkpoint that
    ``save_total_limit`` would then count in place of an intact older one). An existing
    directory target is swapped with the temporary in one step where the system can
    (:func:`_exchange`): ``path`` holds the old or the new directory at every moment, a crash
    included, and the old one, now at ``tmp``, is deleted after. Elsewhere the old directory
    is first renamed aside (``.<name>.<pid>.old``), and deleted only once the new one is in
    place; if the rename fails it is put back, so ``path`` is never lost (a crash between the
    two renames leaves it only aside)."""
    sync_tree(tmp)
    if not (tmp.is_dir() and path.is_dir()):
        os.replace(tmp, path)
        _fsync(path.parent)
        return
    if _exchange(tmp, path):
        _fsync(path.parent)
        discard(tmp)
        return
    aside = path.with_name(f".{path.name}.{os.getpid()}.old")
    _remove(aside)
    os.replace(path, aside)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(aside, path)
        raise
    _fsync(path.parent)
    discard(aside)


def _blocking_file(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is not a directory (a file stands
    where a directory should be), else None."""
    for parent in path.parents:
        with contextlib.suppress(OSError):
            if parent.exists():
                return None if parent.is_dir() else parent
    return None


def check_writable(path: str | Path, what: str = "output") -> None:
    """Refuse early, before any work, a ``path`` that :func:`atomic_path` could not write: it is
    a directory, a file stands where one of its directories should be, or the nearest existing
    directory is not writable (checked with ``os.access``, so a full disk is only found when
    writing)."""
    path = Path(path)
    if path.is_dir():
        raise DpokitError(f"{what} {path} is a directory; name a file")
    blocker = _blocking_file(path)
    if blocker is not None:
        raise DpokitError(f"cannot write {path}: {blocker} is a file, not a directory")
    parent = next((p for p in path.parents if p.is_dir()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise DpokitError(f"cannot write {path}: {os.strerror(errno.EACCES)} ({parent} is not "
                          f"writable)")


def _write_error(path: Path, tmp: Path, error: BaseException, cause: str) -> DpokitError:
    """``cannot write PATH: CAUSE``; a file the error names besides the temporary is added."""
    blocker = _blocking_file(path)
    if blocker is not None:
        return DpokitError(f"cannot write {path}: {blocker} is a file, not a directory")
    filename = getattr(error, "filename", None)
    if filename and not str(filename).startswith((str(tmp), str(path))):
        cause = f"{cause} ({filename})"
    return DpokitError(f"cannot write {path}: {cause}")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, directory: bool = False,
                shared: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it over ``path`` on success.

    ``directory`` creates the temporary as an empty directory (a stale one is cleared first).
    The parent directory of ``path`` is created if missing. An OS error creating, writing (in
    the body too) or renaming is ``DpokitError("cannot write PATH: CAUSE")``; any other
    exception propagates unchanged. Either way the temporary is removed.
    """
    path = Path(path)
    tmp = temporary_sibling(path, shared=shared)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        if directory:
            tmp.mkdir()
        yield tmp
        replace(tmp, path)
    except BaseException as error:
        discard(tmp)
        cause = os_error_cause(error)
        if cause is None:
            raise
        raise _write_error(path, tmp, error, cause) from None


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line to ``path`` atomically."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
