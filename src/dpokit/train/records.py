"""Where a run's numbers go: ``metrics.jsonl`` (one JSON record per line), TensorBoard (when
installed) and the progress bar. Only rank 0 writes; other ranks get a log that does nothing.

Training records carry ``step``, ``epoch``, ``loss``, ``learning_rate``, ``grad_norm``, the
objective's metric means and its throughput; evaluation records ``eval/…`` keys; probes
``probe/…`` keys. In TensorBoard a key without a ``/`` is filed under ``train/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dpokit.atomic import write_text
from dpokit.errors import DpokitError


class MetricsLog:
    """Append-only metric records of one run directory, mirrored to TensorBoard."""

    def __init__(self, output_dir: Path, *, enabled: bool, total_steps: int, step: int,
                 progress: bool):
        """Rank 0 (``enabled``) writes; the bar starts at ``step`` of ``total_steps``."""
        from tqdm.auto import tqdm

        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = _tensorboard(output_dir) if enabled else None
        self.bar = tqdm(total=total_steps, initial=step, unit="step", desc="training",
                        disable=not (enabled and progress))

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (it has a ``step``) to ``metrics.jsonl`` and TensorBoard."""
        if not self.enabled:
            return
        _append(self.path, [json.dumps(finite_json(record), allow_nan=False)])
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(key if "/" in key else f"train/{key}", value,
                                           record["step"])

    def write_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        """Append generated samples to ``samples.jsonl`` and TensorBoard (as a text table)."""
        if not self.enabled:
            return
        _append(self.path.parent / "samples.jsonl",
                [json.dumps({"step": step, **record}) for record in records])
        if self.writer is not None:
            scored = any("reward" in r for r in records)
            rows = "\n".join(f"| {json.dumps(r['prompt'])} | {json.dumps(r['completion'])} |"
                             + (f" {r['reward']:.4g} |" if scored else "") for r in records)
            header = ("| prompt | completion | reward |\n|---|---|---|" if scored
                      else "| prompt | completion |\n|---|---|")
            self.writer.add_text("eval/samples", f"{header}\n{rows}", step)

    def close(self) -> None:
        """Close the progress bar and flush TensorBoard."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


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
    """Keep the complete lines of ``path`` whose ``step`` is at most ``step``."""
    if not path.is_file():
        return

    def keep(line: str) -> bool:
        """A complete record of a step up to the checkpoint."""
        try:
            return json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a crash
            return False

    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if keep(line)]
    write_text(path, "".join(line + "\n" for line in lines))


def _tensorboard(output_dir: Path):
    """A TensorBoard writer, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(output_dir / "tensorboard"))
