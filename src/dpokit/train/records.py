"""Where a run's numbers go: ``metrics.jsonl`` (one JSON record per line), the trackers of
``report_to`` (:mod:`dpokit.train.trackers`) and the progress bar. Only rank 0 writes; other
ranks get a log that does nothing.

Training records carry ``step``, ``epoch``, ``loss``, ``learning_rate`` (the rate the logged
step used, as transformers' Trainer logs it), ``grad_norm`` (the logged step's, before clipping),
the objective's metric means over the logging window and its throughput; evaluation records
``eval/…`` keys; probes ``probe/…`` keys. In a tracker a key without a ``/`` is filed under
``train/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dpokit.atomic import write_text
from dpokit.errors import DpokitError


class MetricsLog:
    """Append-only metric records of one run directory, mirrored to the trackers."""

    def __init__(self, output_dir: Path, *, enabled: bool, total_steps: int, step: int,
                 progress: bool, trackers: list | None = None):
        """Rank 0 (``enabled``) writes, and reports to ``trackers``
        (:func:`dpokit.train.trackers.start_trackers`); the bar starts at ``step`` of
        ``total_steps``."""
        from tqdm.auto import tqdm

        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.trackers = trackers or []
        self.bar = tqdm(total=total_steps, initial=step, unit="step", desc="training",
                        disable=not (enabled and progress))

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (it has a ``step``) to ``metrics.jsonl`` and the trackers."""
        if not self.enabled:
            return
        _append(self.path, [json.dumps(finite_json(record), allow_nan=False)])
        for tracker in self.trackers:
            tracker.log(record)

    def write_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        """Append generated samples to ``samples.jsonl`` and TensorBoard (as a text table)."""
        if not self.enabled:
            return
        _append(self.path.parent / "samples.jsonl",
                [json.dumps(finite_json({"step": step, **record})) for record in records])
        for tracker in self.trackers:
            tracker.samples(step, records)

    def close(self, failed: bool = False) -> None:
        """Close the progress bar and the trackers (``failed``: the run stopped on an error)."""
        self.bar.close()
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed)


def _append(path: Path, lines: list[str]) -> None:
    """Append JSON lines to ``path``; an OS error (a full disk) is one line naming the file (a
    line cut short is dropped when the run resumes, see :func:`truncate_metrics`)."""
    try:
        with path.open("a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
    except OSError as error:
        raise DpokitError(f"cannot write {path}: {error.strerror or error}") from None


def finite_json(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with NaN and ±inf numbers as null, so every line stays valid JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


RECORD_FILES = ("metrics.jsonl", "samples.jsonl")
"""The per-step record files of a run directory."""


def start_fresh(output_dir: Path) -> None:
    """A fresh run starts fresh record files."""
    for name in RECORD_FILES:
        (output_dir / name).unlink(missing_ok=True)


def truncate_metrics(output_dir: Path, step: int) -> None:
    """After a resume, drop records logged past the checkpoint (they will be redone)."""
    for name in RECORD_FILES:
        _truncate(output_dir / name, step)


def _truncate(path: Path, step: int) -> None:
    """Keep the records of ``path`` whose ``step`` is at most ``step``, in order.

    Only the last line may be cut short (a crash or a full disk stops the run in the middle of
    an append; the run never writes after that): it is dropped. Any earlier line that is not a
    record — a JSON object with a numeric ``step`` — is one line naming the file and the line
    number: dropping it would lose a record of a step before the checkpoint."""
    if not path.is_file():
        return
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as error:
        raise DpokitError(f"resume: cannot read {path}: {error.strerror or error}") from None
    while lines and not lines[-1].strip(b"\0 \t\r"):
        lines.pop()  # the empty piece after the last newline (or a tail of NUL bytes)
    kept = []
    for number, raw in enumerate(lines, 1):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if number == len(lines):  # cut short by a crash
                break
            raise DpokitError(f"resume: {path} line {number} is not a JSON record (the file "
                              f"was altered); fix or remove that line") from None
        value = record.get("step") if isinstance(record, dict) else None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise DpokitError(f"resume: {path} line {number} is not a record of a step (no "
                              f"numeric \"step\"); fix or remove that line")
        if value <= step:
            kept.append(raw.decode("utf-8"))
    write_text(path, "".join(line + "\n" for line in kept))
