"""SHA-256 of large files (model weights), remembered by each file's identity on its file system.

Hashing a 7 B model's weights (14 GB in bfloat16) costs ~10 s at every start, on every rank
of a ``torchrun`` job. :func:`file_sha256` keeps each digest in a small JSON file of a memo
directory (the run's cache directory, ``digests/``), next to the file's *identity*: its device,
inode, size, modification time and status-change time in nanoseconds (``os.stat``). The digest is
read back only while all five are unchanged — what ``git`` trusts for its index, and stricter:
``ctime`` cannot be set by a user (``touch`` and ``cp -p`` set ``mtime``, and ``cp``, ``rsync``
and a download make a new inode), so a file written in place in any way is hashed again. Two
guards against a file still being written: a digest is not remembered when the identity changed
while the file was read, or when the file was modified in the last :data:`RACY_S` seconds before
the read began (a write landing later in the same time-stamp tick would leave the identity
equal). A memo that cannot be read or written is ignored (the file is hashed; nothing fails).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("dpokit.train")

RACY_S = 2.0
"""A file modified this recently before its read is hashed but its digest not remembered."""
MEMO_MIN_BYTES = 1 << 20
"""Files smaller than this are hashed every time (faster than reading a memo)."""


def identity(stat: os.stat_result) -> list[int]:
    """``[device, inode, size, mtime_ns, ctime_ns]`` — what :func:`file_sha256` keys on."""
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def update_sampled(digest: Any, path: Path, size: int, *, whole_up_to: int,
                   block: int, blocks: int) -> None:
    """Feed ``digest`` the bytes of ``path`` (``size`` bytes long): all of them up to
    ``whole_up_to``, else ``blocks`` blocks of ``block`` bytes evenly spaced from its first byte
    to its last — a cheap check of a large file (a truncated, extended or replaced file, or one
    edited at its ends, changes it; one value edited deep inside may not)."""
    with path.open("rb") as handle:
        if size <= whole_up_to:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
            return
        for k in range(blocks):
            handle.seek((size - block) * k // (blocks - 1))
            digest.update(handle.read(block))


def _memo_file(memo_dir: Path, path: Path) -> Path:
    return memo_dir / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_sha256(path: str | Path, memo_dir: str | Path | None = None) -> str:
    """The hex SHA-256 of ``path``'s bytes — read from ``memo_dir`` when remembered there for the
    file's current :func:`identity`, else computed (and remembered, see the module doc)."""
    path = Path(path).resolve()  # a hub snapshot's symlink: the blob it names
    before = os.stat(path)
    if memo_dir is None or before.st_size < MEMO_MIN_BYTES:
        return _sha256(path)
    memo = _memo_file(Path(memo_dir), path)
    try:
        record = json.loads(memo.read_text(encoding="utf-8"))
        if (record.get("path") == str(path) and record.get("identity") == identity(before)
                and isinstance(record.get("sha256"), str)):
            return record["sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # no memo yet, or an unreadable one: hash
    started = time.time_ns()
    digest = _sha256(path)
    after = os.stat(path)
    newest = max(after.st_mtime_ns, after.st_ctime_ns)
    if identity(after) == identity(before) and started - newest >= RACY_S * 1e9:
        from dpokit.atomic import write_text
        from dpokit.errors import DpokitError

        record = {"path": str(path), "identity": identity(after), "sha256": digest}
        try:
            write_text(memo, json.dumps(record))
        except DpokitError as error:  # an unwritable cache: hashed again next time
            log.debug("could not remember the digest of %s: %s", path, error)
    return digest
