"""A run directory belongs to one run at a time, and a finished run is never replaced silently.

    with RunLock.acquire(output_dir):       # a second run on the same directory is refused
        check_fresh(output_dir, overwrite)  # a fresh run refuses final/, metrics, checkpoints

The lock is an OS file lock (``fcntl.flock``) on ``output_dir/.dpokit.lock``: the kernel
releases it when the process exits, however it exits (``kill -9`` included), so a lock is never
left held by a dead run. The file itself stays; while held it says who holds it (pid, host,
start time), and a non-empty file whose lock is free is the trace of a run that died holding it
(a *stale* lock): it is taken over with a note. Under torchrun only rank 0 takes the lock.

Only a directory that a dpokit run wrote (:func:`is_run_directory`: its ``config.yaml`` is a
run's resolved config, or it holds a dpokit checkpoint) has anything deleted — by
``overwrite``, or by ``resume: auto`` redoing a run that died before its first checkpoint; any
other directory holding such names (a home directory given by mistake) is refused, and so is one
whose ``config.yaml`` is not a run's (the run would replace it).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpokit.errors import DpokitError

log = logging.getLogger("dpokit.train")

LOCK_NAME = ".dpokit.lock"
RUN_FILES = ("final", "metrics.jsonl", "samples.jsonl")
"""What a run leaves that a fresh run must not replace (besides ``checkpoint-N``)."""
CLEARED_BY_OVERWRITE = (*RUN_FILES, "tensorboard", "config.yaml")


def _os_error(path: Path, action: str, error: OSError) -> DpokitError:
    """One line naming the path and the cause of an OS error."""
    return DpokitError(f"cannot {action} {path}: {error.strerror or error}")


@dataclass
class RunLock:
    """An exclusive lock on a run directory, held until :meth:`release` or process exit."""

    path: Path
    handle: object | None

    @classmethod
    def acquire(cls, output_dir: str | Path, *, enabled: bool = True) -> RunLock:
        """Lock ``output_dir`` (created if missing) or refuse with who holds it.

        ``enabled=False`` (ranks other than 0) returns a lock that holds nothing."""
        output_dir = Path(output_dir)
        path = output_dir / LOCK_NAME
        if not enabled:
            return cls(path, None)
        if output_dir.exists() and not output_dir.is_dir():
            raise DpokitError(f"output_dir {output_dir} is a file, not a directory; choose "
                              f"another --output-dir")
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+", encoding="utf-8",  # noqa: SIM115 (held until release)
                          errors="replace")
        except OSError as error:
            raise _os_error(output_dir, "use the run directory", error) from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe(handle.read())
            handle.close()
            raise DpokitError(f"{output_dir} is in use by another run ({holder}); wait for it "
                              f"to end or choose another --output-dir") from None
        except OSError as error:  # a filesystem without locks (some Lustre/FUSE mounts)
            log.warning("%s: this filesystem does not support file locks (%s); running "
                        "without the run-directory lock — make sure no other run uses %s",
                        path, error.strerror or error, output_dir)
            handle.close()
            return cls(path, None)
        handle.seek(0)
        previous = handle.read().strip()
        if previous:
            log.warning("%s: taking over the stale lock of a run that ended without releasing "
                        "it (%s)", output_dir, _describe(previous))
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": datetime.datetime.now().isoformat(
                                         timespec="seconds")}))
            handle.flush()
        except OSError as error:
            handle.close()
            raise _os_error(path, "write", error) from None
        return cls(path, handle)

    def release(self) -> None:
        """Empty the lock file (a clean exit leaves no trace) and unlock it."""
        if self.handle is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.flush()
        with contextlib.suppress(OSError, ValueError):
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(content: str) -> str:
    """``pid N on HOST since TIME`` from a lock file's content."""
    try:
        info = json.loads(content)
        return f"pid {info['pid']} on {info['host']} since {info['started']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "holder unknown"


def existing_run(output_dir: Path) -> list[str]:
    """The names in ``output_dir`` that a finished or interrupted run left."""
    from dpokit.train.checkpoint import numbered_checkpoints

    if not output_dir.is_dir():
        return []
    found = [name for name in RUN_FILES if (output_dir / name).exists()]
    found += sorted(p.name for p in numbered_checkpoints(output_dir))
    return found


RUN_CONFIG_KEYS = frozenset({"model", "data", "output_dir", "seed", "save_total_limit"})
"""Keys that every ``config.yaml`` a run writes holds (its whole resolved config), and that a
hand-written config or another tool's file rarely holds all of."""


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is the ``config.yaml`` a dpokit run writes (its resolved config)."""
    import yaml

    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(content, dict) and content.keys() >= RUN_CONFIG_KEYS


def _is_dpokit_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a dpokit ``trainer_state.json`` (``transformers``' Trainer writes
    one too, without ``steps_per_epoch``)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(state, dict) and {"global_step", "steps_per_epoch"} <= state.keys()


def _holds_run_records(output_dir: Path) -> bool:
    """Whether ``output_dir/metrics.jsonl`` reads as a run's records: every complete line a JSON
    object with an integer ``step`` (the last line may be cut short by a crash)."""
    try:
        lines = (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            return False
        if not (isinstance(record, dict) and type(record.get("step")) is int):
            return False
    return bool(lines)


def is_run_directory(output_dir: Path) -> bool:
    """Whether ``output_dir`` was written by a dpokit run: its ``config.yaml`` is a run's, or
    one of its ``checkpoint-N`` is a dpokit checkpoint. What ``overwrite`` may delete."""
    from dpokit.train.checkpoint import numbered_checkpoints

    if _is_run_config(output_dir / "config.yaml"):
        return True
    return any(_is_dpokit_checkpoint(p) for p in numbered_checkpoints(output_dir))


def check_fresh(output_dir: str | Path, *, overwrite: bool, resumable: bool,
                redoable: bool = False) -> None:
    """Before a fresh run: refuse a directory holding another run's results, or with
    ``overwrite`` delete them (logged). ``resumable``: whether it holds a checkpoint (the way
    out named in the message). ``redoable`` (``resume: auto`` found no checkpoint): the
    records of a run that died before its first checkpoint are redone, with a warning.

    Nothing is deleted in a directory that is not a run's (:func:`is_run_directory`): such a
    directory holding a run's names is refused, ``overwrite`` or not, and so is any directory
    whose ``config.yaml`` is not a run's (the run writes its own there)."""
    output_dir = Path(output_dir)
    config_file = output_dir / "config.yaml"
    if config_file.exists() and not _is_run_config(config_file):
        raise DpokitError(f"{config_file} is not the config of a dpokit run, and the run would "
                          f"replace it; choose another --output-dir (or move the file)")
    found = existing_run(output_dir)
    if not found:
        return
    records_only = set(found) <= set(RUN_FILES) - {"final"}
    if not (is_run_directory(output_dir)
            or (redoable and records_only and _holds_run_records(output_dir))):
        shown = ", ".join(found[:4]) + (", …" if len(found) > 4 else "")
        raise DpokitError(f"{output_dir} holds {shown} but is not a dpokit run directory (no "
                          f"run's config.yaml, no dpokit checkpoint), so nothing in it is "
                          f"replaced or deleted, --overwrite or not; choose another "
                          f"--output-dir")
    if redoable and not resumable and "final" not in found:
        log.warning("resume auto: %s holds no checkpoint, only the records (%s) of a run that "
                    "stopped before its first one; starting afresh", output_dir,
                    ", ".join(found))
        return
    if not overwrite:
        shown = ", ".join(found[:4]) + (", …" if len(found) > 4 else "")
        way_out = "resume it with --resume auto, " if resumable else ""
        raise DpokitError(f"{output_dir} holds an earlier run ({shown}); {way_out}choose another "
                          f"--output-dir, or pass --overwrite to replace it")
    from dpokit.train.checkpoint import numbered_checkpoints

    removed = [output_dir / name for name in CLEARED_BY_OVERWRITE if (output_dir / name).exists()]
    removed += numbered_checkpoints(output_dir)  # what the refusal names, nothing else
    for path in removed:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as error:
            raise _os_error(path, "remove (overwrite)", error) from None
    log.warning("overwrite: removed the earlier run's %s from %s",
                ", ".join(sorted(p.name for p in removed)), output_dir)


def on_main(runtime: Any, decide: Callable[[], Any]) -> Any:
    """``decide()`` on rank 0 only (None elsewhere); an error there stops every rank — rank 0
    with its own error, the others with a line pointing at it."""
    result, error = None, None
    if runtime.is_main:
        try:
            result = decide()
        except Exception as caught:  # any error: the other ranks must not wait for rank 0
            error = caught
    if runtime.distributed:
        failed = runtime.all_reduce_sum(torch.tensor(float(error is not None),
                                                     dtype=torch.float64)).item() > 0
        if failed and error is None:
            raise DpokitError("rank 0 refused the run (its message is above)")
    if error is not None:
        raise error
    return result


def claim(output_dir: str | Path, runtime: Any) -> RunLock:
    """The run directory's lock, taken by rank 0 (every rank stops if it is refused)."""
    lock = on_main(runtime, lambda: RunLock.acquire(output_dir))
    return lock or RunLock(Path(output_dir) / LOCK_NAME, None)
