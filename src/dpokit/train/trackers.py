"""The experiment trackers a run reports to (``report_to``): TensorBoard, Weights & Biases and
trackio — each an optional install (``pip install 'dpokit[wandb]'``, ``'dpokit[trackio]'``).

Every tracker gets what ``metrics.jsonl`` gets, at the same step: training keys (under
``train/`` where they have no ``/``), ``eval/…`` and ``probe/…``; W&B and trackio also the run's
config and, with ``eval_generate``, the samples as a table (TensorBoard: as text). Only rank 0
reports. ``report_to`` null is TensorBoard when it is installed (what dpokit always did);
``none`` is none, ``all`` every installed one, and a tracker named but not installed is refused
before anything runs.

W&B follows its environment as in transformers (``WANDB_MODE=offline`` logs locally,
``WANDB_PROJECT`` beats ``project``, ``WANDB_ENTITY``, ``WANDB_DIR`` — without it the files go
under the run directory); trackio logs locally under ``TRACKIO_DIR`` (default
``$HF_HOME/trackio``), project ``project``. A resumed run reports into a new tracker run of the
same name, from the checkpoint's step on; TensorBoard, which appends to ``tensorboard/``, marks
the steps past what ``metrics.jsonl`` keeps (a resume past its checkpoint, a run redone after it
died before its first one) as purged, so its reader shows each step once, as the file has it.

``metrics.jsonl`` is the run's record; a tracker mirrors it. A tracker that fails once the run
is going (its service gone, a full disk under ``tensorboard/``) is a warning naming it, the step
and the error; it gets nothing more, and the run, its records and the other trackers go on. A
tracker that cannot start is a ``DpokitError`` before the first step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from dpokit.errors import DpokitError

log = logging.getLogger("dpokit.train")

TRACKERS = ("tensorboard", "wandb", "trackio")


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def resolve_report_to(report_to: list[str] | None) -> list[str]:
    """The trackers ``report_to`` names, each installed (else a ``DpokitError`` saying how to
    install it): null → TensorBoard if installed, ``all`` → every installed, ``none`` → none."""
    if report_to is None:  # the default: TensorBoard when it imports, silently none else
        if not _installed("tensorboard"):
            return []
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as error:
            log.warning("tensorboard is installed but does not import (%s); no TensorBoard "
                        "events", error)
            return []
        return ["tensorboard"]
    names = list(dict.fromkeys(report_to))
    if "none" in names:
        if len(names) > 1:
            raise DpokitError(f"report_to: none cannot be combined with {', '.join(names)}")
        return []
    if "all" in names:
        return [name for name in TRACKERS if _installed(name)]
    for name in names:
        if not _installed(name):
            raise DpokitError(f"report_to {name}: {name} is not installed; pip install "
                              f"'dpokit[{name}]' (or leave {name} out of report_to)")
    return names


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record under their tracker names (no ``/``: ``train/``)."""
    return {(key if "/" in key else f"train/{key}"): value for key, value in record.items()
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)}


def _sample_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    scored = any("reward" in r for r in records)
    columns = ["prompt", "completion", *(["reward"] if scored else [])]
    return columns, [[str(r["prompt"]), r["completion"], *([r.get("reward")] if scored else [])]
                     for r in records]


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error).strip() else type(error).__name__


def last_logged_step(path: Path) -> int:
    """The largest ``step`` of the records in ``path`` (``metrics.jsonl``; 0: none)."""
    steps = [0]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return 0
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int | float) and not isinstance(step, bool):
            steps.append(int(step))
    return max(steps)


class TensorBoard:
    def __init__(self, output_dir: Path, **_: Any):
        from torch.utils.tensorboard import SummaryWriter

        events = output_dir / "tensorboard"
        # started after a resume truncated metrics.jsonl (or a fresh start removed it): the
        # events of earlier writers past its last step are purged from TensorBoard's view, as
        # they are from the file — else a resumed step shows twice, and a step never redone
        # shows the dead run's value
        earlier = events.is_dir() and any(events.glob("events.out.tfevents.*"))
        purge = last_logged_step(output_dir / "metrics.jsonl") + 1 if earlier else None
        self.writer = SummaryWriter(str(events), purge_step=purge)

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def samples(self, step: int, records: list[dict[str, Any]]) -> None:
        columns, rows = _sample_rows(records)
        text = "\n".join("| " + " | ".join(
            f"{v:.4g}" if isinstance(v, float) else json.dumps(v) for v in row) + " |"
            for row in rows)
        header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
        self.writer.add_text("eval/samples", f"{header}\n{text}", step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class _RunTracker:
    """What W&B and trackio share: a ``run`` with ``log(values, step=)`` and a ``table`` type
    (``wandb.Table`` / ``trackio.Table``) for the samples."""

    run: Any
    table: Any

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def samples(self, step: int, records: list[dict[str, Any]]) -> None:
        columns, rows = _sample_rows(records)
        self.run.log({"eval/samples": self.table(columns=columns, data=rows)}, step=step)


class Wandb(_RunTracker):
    def __init__(self, output_dir: Path, *, run_name: str, project: str, config: dict):
        import wandb

        self.table = wandb.Table
        directory = None if os.environ.get("WANDB_DIR") else str(output_dir)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", project),
                                  name=run_name, config=config, dir=directory,
                                  reinit="create_new")
        except Exception as error:  # wandb's own errors: not logged in, no network, …
            raise DpokitError(f"report_to wandb: cannot start a W&B run: {_first_line(error)} "
                              f"(WANDB_MODE=offline logs locally)") from None

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackio(_RunTracker):
    def __init__(self, output_dir: Path, *, run_name: str, project: str, config: dict):
        import trackio

        self.table = trackio.Table
        try:
            self.run = trackio.init(project=project, name=run_name, config=config, embed=False)
        except Exception as error:
            raise DpokitError(f"report_to trackio: cannot start a trackio run: "
                              f"{_first_line(error)}") from None

    def close(self, failed: bool) -> None:
        self.run.finish()


_CLASSES = {"tensorboard": TensorBoard, "wandb": Wandb, "trackio": Trackio}


def start_trackers(names: list[str], output_dir: Path, *, run_name: str, project: str,
                   config: dict) -> list[Any]:
    """One started tracker per name (rank 0 only); one that cannot start is a
    ``DpokitError``, after the ones started before it are closed."""
    started: list[Any] = []
    for name in names:
        try:
            started.append(_CLASSES[name](output_dir, run_name=run_name, project=project,
                                          config=config))
        except BaseException:
            for done, tracker in zip(names, started, strict=False):
                _close_quietly(done, tracker, failed=True)
            raise
    if started:
        log.info("reporting to %s as run %s", ", ".join(names), run_name)
    return [Reporting(name, tracker) for name, tracker in zip(names, started, strict=True)]


def _close_quietly(name: str, tracker: Any, *, failed: bool) -> None:
    try:
        tracker.close(failed)
    except Exception as error:
        log.warning("report_to %s: closing it failed: %s", name, _first_line(error))


class Reporting:
    """A started tracker as the run calls it: an error of the tracker's own is a warning (its
    name, the step, the error's first line) and the end of its reporting, never the run's end —
    the run goes on with ``metrics.jsonl`` and the other trackers (nor, in ``close``, does it
    mask the error that stopped the run, or keep the others from closing)."""

    def __init__(self, name: str, tracker: Any):
        self.name = name
        self.tracker: Any = tracker

    def log(self, record: dict[str, Any]) -> None:
        self._call("log", record.get("step"), record)

    def samples(self, step: int, records: list[dict[str, Any]]) -> None:
        self._call("samples", step, step, records)

    def _call(self, method: str, step: Any, *args: Any) -> None:
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as error:
            tracker, self.tracker = self.tracker, None
            log.warning("report_to %s failed at step %s (%s); it gets nothing more from this "
                        "run — metrics.jsonl has every record", self.name, step,
                        _first_line(error))
            _close_quietly(self.name, tracker, failed=True)

    def close(self, failed: bool) -> None:
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            _close_quietly(self.name, tracker, failed=failed)
