"""``report_to`` (issue 13): TensorBoard, Weights & Biases (offline) and trackio (local), each
run for real and read back from what it wrote — the same numbers at the same steps as
``metrics.jsonl``, the config, the run name, a failed run marked failed."""

import json
import os
import struct
import subprocess
import sys

import pytest

from dpokit.errors import DpokitError
from dpokit.train.loop import Probe, train
from dpokit.train.trackers import resolve_report_to
from tests.helpers import read_metrics, run_cli
from tests.train.test_trainer import config


def wandb_records(run_dir, wait_s=60.0):
    """The protobuf records of the offline run under ``run_dir/wandb``, once its ``exit``
    record is written (W&B's service process writes the log after ``finish`` returns — on a
    loaded machine a little later: wait up to ``wait_s``, then read what there is)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        records = _wandb_log(run_dir)
        done = any(r.WhichOneof("record_type") == "exit" for r in records)
        if done or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _wandb_log(run_dir):
    """The records of the offline log, read by hand from its LevelDB-style format (7-byte file
    header ``:W&B``, 32 KiB blocks of chunks with a 7-byte ``crc, length, type`` header; type
    1 whole, 2/3/4 first/middle/last), the format W&B's ``wandb sync`` reads."""
    from wandb.proto import wandb_internal_pb2 as pb

    paths = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    if not paths:
        return []
    (path,) = paths
    data, block = path.read_bytes(), 32768
    if len(data) < 7:
        return []
    assert data[:4] == b":W&B"
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # the rest of the block is padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            chunks.append(pending)
    records = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def wandb_history(records):
    """``[{key: value}]`` of the history records (``_step`` as int)."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


@pytest.fixture
def offline_wandb(monkeypatch):
    for key in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


def test_wandb_offline_gets_every_record_the_config_and_the_name(workdir, offline_wandb):
    run_dir = train(config(workdir, "t-wandb", max_steps=4, report_to=["wandb"],
                           run_name="exp-1", eval_data=str(workdir / "prefs.jsonl"),
                           eval_steps=2), progress=False).parent
    records = wandb_records(run_dir)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "exp-1" and run.project == "dpokit"
    settings = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert settings["beta"] == 0.5 and settings["max_steps"] == 4
    history = wandb_history(records)
    logged = {}
    for row in history:
        logged.setdefault(row["_step"], {}).update(row)
    for record in read_metrics(run_dir):
        for key, value in record.items():
            if key == "step" or not isinstance(value, int | float):
                continue
            name = key if "/" in key else f"train/{key}"
            assert logged[record["step"]][name] == pytest.approx(value, rel=1e-12), name
    assert "eval/loss" in logged[2] and "eval/loss" in logged[4]
    exits = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert [e.exit_code for e in exits] == [0]
    assert not (run_dir / "tensorboard").exists()  # only what report_to names


def test_a_failed_run_is_marked_failed_in_wandb(workdir, offline_wandb):
    def explode(model, step):
        raise RuntimeError("probe failed")

    with pytest.raises(RuntimeError, match="probe failed"):
        train(config(workdir, "t-wandb-fail", max_steps=3, report_to=["wandb"]),
              progress=False, probe=Probe(every=2, fn=explode))
    records = wandb_records(workdir / "t-wandb-fail")
    exits = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert [e.exit_code for e in exits] == [1]
    steps = {row["_step"] for row in wandb_history(records)}
    assert steps == {1, 2}  # what was logged before the failure


def test_trackio_locally_and_tensorboard_in_one_run(workdir, tmp_path):
    """A real ``dpokit train --report-to trackio,tensorboard`` (trackio reads TRACKIO_DIR when
    imported, so in a process of its own), read back with trackio's own storage API."""
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": os.getcwd()}
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "dpokit", "train", "--model", str(workdir / "llama"),
            "--data", str(workdir / "prefs.jsonl"), "--output-dir", str(out), "--batch-size",
            "4", "--max-steps", "3", "--logging-steps", "1", "--max-length", "64",
            "--save-strategy", "no", "--report-to", "trackio,tensorboard", "--project", "proj",
            "--run-name", "exp-2", "--device", "cpu"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    read = ("import json; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps([S.get_runs('proj'), S.get_logs('proj', 'exp-2'), "
            "S.get_run_config('proj', 'exp-2')]))")
    got = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True,
                         timeout=120)
    assert got.returncode == 0, got.stderr[-3000:]
    runs, logs, settings = json.loads(got.stdout.strip().splitlines()[-1])
    assert runs == ["exp-2"] and settings["max_steps"] == 3
    metrics = read_metrics(out)
    assert [row["step"] for row in logs] == [m["step"] for m in metrics] == [1, 2, 3]
    for row, record in zip(logs, metrics, strict=True):
        assert row["train/loss"] == pytest.approx(record["loss"], rel=1e-12)
        assert row["train/grad_norm"] == pytest.approx(record["grad_norm"], rel=1e-12)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_report_to_none_and_a_missing_tracker(workdir, capsys, monkeypatch):
    run_dir = train(config(workdir, "t-none", max_steps=1, report_to=["none"]),
                    progress=False).parent
    assert not (run_dir / "tensorboard").exists() and read_metrics(run_dir)
    with pytest.raises(DpokitError, match="none cannot be combined"):
        resolve_report_to(["none", "wandb"])
    import dpokit.train.trackers as trackers

    monkeypatch.setattr(trackers, "_installed", lambda name: name != "wandb")
    assert resolve_report_to(["all"]) == ["tensorboard", "trackio"]
    code, _, err = run_cli(capsys, "train", "--model", str(workdir / "llama"), "--data",
                           str(workdir / "prefs.jsonl"), "--report-to", "wandb",
                           "--output-dir", str(workdir / "t-missing"))
    lines = [x for x in err.splitlines() if "dpokit: error" in x]
    assert code == 2 and len(lines) == 1 and "pip install 'dpokit[wandb]'" in lines[0], err
    assert not (workdir / "t-missing").exists()


def test_a_tracker_that_cannot_start_is_one_line_and_closes_the_others(workdir, monkeypatch,
                                                                          capsys):
    import wandb

    import dpokit.train.trackers as trackers

    closed = []
    monkeypatch.setattr(trackers.TensorBoard, "close",
                        lambda self, failed: closed.append(failed))

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    monkeypatch.setenv("WANDB_MODE", "online")
    code, _, err = run_cli(capsys, "train", "--model", str(workdir / "llama"), "--data",
                           str(workdir / "prefs.jsonl"), "--report-to", "tensorboard,wandb",
                           "--max-steps", "1", "--max-length", "64",
                           "--output-dir", str(workdir / "t-refused"))
    lines = [x for x in err.splitlines() if "dpokit: error" in x]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "cannot start a W&B run: api_key not configured" in lines[0]
    assert "WANDB_MODE=offline" in lines[0]
    assert closed == [True]


def test_a_run_inside_an_except_block_is_not_marked_failed(workdir, offline_wandb):
    """A caller's exception being handled (a retry after an error, a notebook) is not the
    run's: a run that ends well finishes with exit code 0."""
    try:
        raise ValueError("the caller's")
    except ValueError:
        run_dir = train(config(workdir, "t-wandb-retry", max_steps=1, report_to=["wandb"]),
                        progress=False).parent
    exits = [r.exit for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "exit"]
    assert [e.exit_code for e in exits] == [0]
