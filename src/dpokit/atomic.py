"""Writes that never leave a half-written file or directory behind: temp sibling, then rename.

    with atomic_path(run_dir / "final", directory=True) as tmp:   # fill tmp/ ...
        model.save_pretrained(tmp)                                # ... renamed to final/ at exit
    write_text(path, text)                                        # the one-liner for files

The temporary sibling is ``.<name>.<pid>.tmp`` (hidden, unique per process, so two processes
writing the same target never share one); ``shared=True`` drops the pid for a directory that
several ranks of one run fill together (``.<name>.tmp``). On an exception the temporary is
removed and the target is left as it was; on success ``os.replace`` puts it in place in one step
(an existing directory target is renamed aside first — POSIX cannot rename over a non-empty
directory — and removed once the new one is in place).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def temporary_sibling(path: str | Path, *, shared: bool = False) -> Path:
    """The hidden temporary name beside ``path`` that :func:`atomic_path` writes first."""
    path = Path(path)
    suffix = "" if shared else f".{os.getpid()}"
    return path.with_name(f".{path.name}{suffix}.tmp")


def _remove(path: Path) -> None:
    """Delete a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def replace(tmp: Path, path: Path) -> None:
    """Move a finished temporary into place. An existing directory target is first renamed
    aside (``.<name>.<pid>.old``), and deleted only once the new one is in place; if the rename
    fails it is put back, so ``path`` is never lost."""
    if not (tmp.is_dir() and path.is_dir()):
        os.replace(tmp, path)
        return
    aside = path.with_name(f".{path.name}.{os.getpid()}.old")
    _remove(aside)
    os.replace(path, aside)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(aside, path)
        raise
    _remove(aside)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, directory: bool = False,
                shared: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it over ``path`` on success.

    ``directory`` creates the temporary as an empty directory (a stale one is cleared first).
    The parent directory of ``path`` is created if missing.
    """
    path = Path(path)
    tmp = temporary_sibling(path, shared=shared)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        replace(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line to ``path`` atomically."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
