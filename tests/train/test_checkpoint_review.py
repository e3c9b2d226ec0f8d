"""From a review of checkpoints, the run directory and the records: a resumed run equals the
uninterrupted one bit for bit; nothing is deleted in a directory that is not a dpokit run's;
a checkpoint that lost a file (its checksums.json, its trainer_state.json, its moving reference)
is never read as if whole; pruning never leaves a half-deleted checkpoint that reads as
complete; resume keeps every record before the checkpoint or names the line it cannot read.

Oracles: the uninterrupted run itself (``torch.equal`` on every weight and optimizer tensor,
equality of every record but the timings), the directory's files hashed before and after, and
hand-written record files."""

import hashlib
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dpokit.errors import DpokitError
from dpokit.train import loop
from dpokit.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    set_aside_later,
)
from dpokit.train.loop import train
from dpokit.train.records import truncate_metrics
from dpokit.train.rundir import LOCK_NAME, RunLock, check_fresh
from tests.helpers import read_metrics, run_cli
from tests.train.test_trainer import config


def tree_digest(root):
    """{relative path: sha256} of every file under ``root`` except the lock file."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def timeless(records):
    """The records without their throughput (wall-clock) fields."""
    return [{k: v for k, v in r.items() if not k.endswith("_per_second")} for r in records]


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def optimizer_tensors(checkpoint):
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    return {f"{i}/{k}": v for i, s in state.items() for k, v in s.items()}


RUN = {"max_steps": 6, "save_steps": 3, "save_total_limit": None,
       "gradient_accumulation_steps": 2, "lr_scheduler": "linear", "warmup_steps": 2}


@pytest.fixture(scope="module")
def straight(workdir, tmp_path_factory):
    """The uninterrupted 6-step run (checkpoints 3 and 6), the oracle of the resumes."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return train(config(workdir, out, **RUN), progress=False).parent


# ------------------------------------------------------------- resume = uninterrupted


def test_a_crashed_run_resumed_equals_the_uninterrupted_one_bit_for_bit(workdir, straight,
                                                                       tmp_path, monkeypatch):
    """The run crashes after step 5 (checkpoint-3 saved, records of steps 4 and 5 written past
    it, a half-written line at the end); ``--resume auto`` redoes steps 4-6. Every weight, every
    optimizer tensor of checkpoint-6 and every record (but the timings) equal the uninterrupted
    run's exactly (CPU: the same operations in the same order)."""
    out = tmp_path / "crashed"
    real_step = loop.train_step

    def crash_after_step_5(run):
        if run.step == 5:
            with (out / "metrics.jsonl").open("a") as handle:
                handle.write('{"step": 6, "loss": 0.69')  # the crash cut this append short
            raise KeyboardInterrupt
        real_step(run)

    monkeypatch.setattr(loop, "train_step", crash_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(config(workdir, out, **RUN), progress=False)
    monkeypatch.setattr(loop, "train_step", real_step)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    *complete, cut = (out / "metrics.jsonl").read_text().split("\n")
    assert [json.loads(x)["step"] for x in complete] == [1, 2, 3, 4, 5] and cut.endswith("0.69")
    final = train(config(workdir, out, **RUN, resume="auto"), progress=False)
    assert_same_tensors(load_file(str(straight / "final" / "model.safetensors")),
                        load_file(str(final / "model.safetensors")))
    assert_same_tensors(optimizer_tensors(straight / "checkpoint-6"),
                        optimizer_tensors(out / "checkpoint-6"))
    assert timeless(read_metrics(out)) == timeless(read_metrics(straight))
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


# -------------------------------------------------- only a run directory loses files


def _foreign_home(root):
    """A home directory given as output_dir by mistake: files that share a run's names."""
    root.mkdir()
    (root / "final").mkdir()
    (root / "final" / "thesis.tex").write_text("years of work")
    (root / "tensorboard").mkdir()
    (root / "tensorboard" / "events").write_text("another project's")
    (root / "metrics.jsonl").write_text('{"epoch": 1, "accuracy": 0.9}\n')
    (root / "checkpoint-500").mkdir()  # transformers' Trainer: no steps_per_epoch
    (root / "checkpoint-500" / "trainer_state.json").write_text('{"global_step": 500}')
    return root


@pytest.mark.parametrize("flags", [["--overwrite"], ["--resume", "auto"], []])
def test_a_directory_that_is_not_a_run_loses_nothing(workdir, tmp_path, capsys, flags):
    """Old code: --overwrite deleted final/thesis.tex, tensorboard/, metrics.jsonl and the
    Trainer's checkpoint-500 (and wrote config.yaml); now every flag is refused in one line
    and every file is as it was."""
    home = _foreign_home(tmp_path / "home")
    before = tree_digest(home)
    code, _, err = run_cli(capsys, "train", "--model", str(workdir / "llama"), "--data",
                           str(workdir / "prefs.jsonl"), "--output-dir", str(home),
                           "--max-steps", "1", "--max-length", "64", *flags)
    lines = [line for line in err.splitlines() if "dpokit: error" in line]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert "not a dpokit" in lines[0] and str(home) in lines[0]
    assert tree_digest(home) == before


def test_resume_auto_keeps_anothers_records(tmp_path):
    """Old code: resume auto in a directory holding only someone else's metrics.jsonl deleted
    it ("starting afresh"); dpokit records of a run that died early are still redone."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "metrics.jsonl").write_text('{"epoch": 1, "accuracy": 0.9}\n')
    with pytest.raises(DpokitError, match="not a dpokit run directory"):
        check_fresh(home, overwrite=False, resumable=False, redoable=True)
    assert (home / "metrics.jsonl").read_text() == '{"epoch": 1, "accuracy": 0.9}\n'
    (home / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "lo')
    check_fresh(home, overwrite=False, resumable=False, redoable=True)  # accepted


def test_a_config_yaml_that_is_not_a_runs_is_never_replaced(workdir, tmp_path, capsys):
    """Old code: a run into a directory with the user's own config.yaml replaced it silently
    (no --overwrite needed)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text("editor: vim\n")
    code, _, err = run_cli(capsys, "train", "--model", str(workdir / "llama"), "--data",
                           str(workdir / "prefs.jsonl"), "--output-dir", str(home),
                           "--max-steps", "1", "--max-length", "64")
    assert code == 2 and "Traceback" not in err and "is not the config of a dpokit run" in err
    assert (home / "config.yaml").read_text() == "editor: vim\n"
    assert not (home / "metrics.jsonl").exists()


def test_overwrite_of_a_run_directory_by_its_own_config(workdir, straight, tmp_path, capsys):
    """The model card's way to rerun (``--config RUN/config.yaml``) with --overwrite still
    replaces the run: a run directory is recognised by its config.yaml."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace(
        str(straight), str(out)))
    code, _, err = run_cli(capsys, "train", "--config", str(out / "config.yaml"),
                           "--max-steps", "1", "--overwrite")
    assert code == 0, err[-2000:]
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert not list(out.glob("checkpoint-*"))


# ------------------------------------------------------ a checkpoint missing one file


def test_a_checkpoint_that_lost_its_checksums_is_not_read_unverified(workdir, straight,
                                                                      tmp_path, caplog):
    """checkpoint-6 lost checksums.json and one weight changed by one bit (still loadable,
    still finite). Old code took it for an older dpokit's, read it unverified and resumed from
    the altered weights; now resume auto skips it, naming the missing file, and resumes from
    checkpoint-3 — ending on the uninterrupted run's weights exactly."""
    out = tmp_path / "lost"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "final")
    damaged = out / "checkpoint-6"
    (damaged / "checksums.json").unlink()
    data = bytearray((damaged / "trainable.safetensors").read_bytes())
    data[-4] ^= 0x01  # the lowest mantissa bit of the last float32
    (damaged / "trainable.safetensors").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="dpokit.train"):
        final = train(config(workdir, out, **RUN, resume="auto"), progress=False)
    assert "checkpoint-6 (checksums.json is missing)" in caplog.text
    assert "resumed from" in caplog.text and "at step 3" in caplog.text
    assert_same_tensors(load_file(str(straight / "final" / "model.safetensors")),
                        load_file(str(final / "model.safetensors")))


def _tiny(out_features=2, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, out_features)
    optimizer = torch.optim.AdamW(model.parameters())
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _save(out, step, **kwargs):
    model, optimizer, scheduler = _tiny()
    return save_checkpoint(out, step, model=model, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"global_step": step}, rng={}, **kwargs)


def test_resume_auto_names_a_newer_checkpoint_without_its_state_and_sets_it_aside(tmp_path,
                                                                                 caplog):
    """checkpoint-4 lost trainer_state.json. Old code passed over it without a word and left
    it in place (no listing saw it); now it is skipped by name and set aside."""
    for step in (2, 4):
        _save(tmp_path, step)
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING, logger="dpokit.train"):
        chosen = resolve_resume("auto", tmp_path)
    assert chosen == tmp_path / "checkpoint-2"
    assert "checkpoint-4 (trainer_state.json is missing)" in caplog.text
    assert set_aside_later(tmp_path, 2) == [tmp_path / "checkpoint-4.discarded"]
    assert not (tmp_path / "checkpoint-4").exists()


def test_set_aside_over_a_file_is_one_line(tmp_path):
    """Old code: rmtree of a *file* named checkpoint-4.discarded was a NotADirectoryError."""
    for step in (2, 4):
        _save(tmp_path, step)
    (tmp_path / "checkpoint-4.discarded").write_text("x")
    assert set_aside_later(tmp_path, 2) == [tmp_path / "checkpoint-4.discarded"]
    assert (tmp_path / "checkpoint-4.discarded" / "trainer_state.json").is_file()


def test_a_moving_reference_is_restored_whole_or_refused(tmp_path):
    """TR-DPO's moving reference: old code kept the initial reference silently when the
    checkpoint had no reference.safetensors, and copied only the names it found."""
    path = _save(tmp_path, 1)  # written without a reference
    model, optimizer, scheduler = _tiny()
    reference = torch.nn.Linear(3, 2)
    with pytest.raises(DpokitError, match=r"no reference\.safetensors"):
        load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler,
                        ref_model=reference)
    moving = torch.nn.Sequential(torch.nn.Linear(3, 2))  # "0.weight", "0.bias"
    path = _save(tmp_path, 2, ref_model=moving)
    other = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    with pytest.raises(DpokitError, match=r"missing \['1.weight', '1.bias'\]"):
        load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler,
                        ref_model=other)
    restored = torch.nn.Sequential(torch.nn.Linear(3, 2))
    load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler,
                    ref_model=restored)
    assert_same_tensors(dict(moving.named_parameters()), dict(restored.named_parameters()))


def test_weights_of_another_shape_are_refused_not_broadcast(tmp_path):
    """A (1, 3) weight loaded into a (2, 3) parameter: old code's copy_ broadcast it into
    both rows without a word."""
    small, optimizer, scheduler = _tiny(out_features=1)
    path = save_checkpoint(tmp_path, 1, model=small, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"global_step": 1}, rng={})
    model, optimizer, scheduler = _tiny(out_features=2, seed=1)
    before = model.weight.detach().clone()
    shape = r"other shapes .*'weight \(1, 3\) \(model \(2, 3\)\)'"
    with pytest.raises(DpokitError, match=shape):
        load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert torch.equal(model.weight, before)


def test_a_directory_named_like_a_checkpoint_with_other_digits(tmp_path):
    """``checkpoint-²`` passes str.isdigit but not int(): old code's listing raised."""
    _save(tmp_path, 2)
    (tmp_path / "checkpoint-²").mkdir()
    (tmp_path / "checkpoint-²" / "trainer_state.json").write_text('{"global_step": 2}')
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]


# ------------------------------------------------------------------------- pruning


def test_a_crash_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """The process dies while save_total_limit deletes checkpoint-1 (half its files gone,
    checksums.json among them). Old code deleted in place: checkpoint-1 stayed, listed as
    complete and — without checksums — read unverified. Now it is renamed out of the listing
    first: only intact checkpoints are listed, and each verifies."""
    from dpokit.train.checkpoint import checkpoint_problem

    _save(tmp_path, 1)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        for name in ("checksums.json", "optimizer.pt"):
            (path / name).unlink(missing_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, save_total_limit=1)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoint-2"


def test_pruning_keeps_the_newest_and_deletes_only_complete_older_ones(tmp_path):
    """Limit 2 over saves 1..4, with an incomplete checkpoint-0 (no trainer_state.json): the
    complete ones kept are 3 and 4, the incomplete one is not touched, nothing hidden stays."""
    (tmp_path / "checkpoint-0").mkdir()
    (tmp_path / "checkpoint-0" / "notes.txt").write_text("not a checkpoint")
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert (tmp_path / "checkpoint-0" / "notes.txt").read_text() == "not a checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0", "checkpoint-3",
                                                          "checkpoint-4"]


# ------------------------------------------------------------------------- records


def _records(path, steps, tail=""):
    lines = [json.dumps({"step": s, "loss": s / 10}) for s in steps]
    path.write_text("".join(line + "\n" for line in lines) + tail)
    return lines


def test_resume_keeps_every_record_up_to_the_checkpoint_and_drops_the_rest(tmp_path):
    lines = _records(tmp_path / "metrics.jsonl", [1, 2, 3, 3, 4, 5], tail='{"step": 6, "lo')
    truncate_metrics(tmp_path, 3)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(x + "\n" for x in lines[:4])


def test_a_record_altered_before_the_checkpoint_is_named_not_dropped(tmp_path):
    """Old code dropped any line it could not read, wherever it was: a record of step 2 was
    lost without a word. Now the line is named and the file left as it was."""
    _records(tmp_path / "metrics.jsonl", [1, 2, 3, 4])
    text = (tmp_path / "metrics.jsonl").read_text()
    altered = text.replace('{"step": 2,', '{"step": 2;', 1)
    (tmp_path / "metrics.jsonl").write_text(altered)
    with pytest.raises(DpokitError, match=r"metrics.jsonl line 2 is not a JSON record"):
        truncate_metrics(tmp_path, 3)
    assert (tmp_path / "metrics.jsonl").read_text() == altered


def test_a_stale_lock_with_garbage_bytes_is_taken_over(tmp_path, caplog):
    """Old code: the stale lock's content was decoded strictly (UnicodeDecodeError)."""
    (tmp_path / LOCK_NAME).write_bytes(b"\xff\xfe garbage")
    with caplog.at_level(logging.WARNING, logger="dpokit.train"), \
            RunLock.acquire(tmp_path) as lock:
        assert lock.handle is not None
    assert "stale lock" in caplog.text and "holder unknown" in caplog.text


def test_an_older_dpokits_checkpoint_is_still_read_unverified(workdir, straight, tmp_path,
                                                              caplog):
    """An older dpokit wrote neither checksums.json nor the trainer state's ``checksums`` key:
    such a checkpoint is read with a warning (as before), and resuming it ends on the
    uninterrupted run's weights. (The same checkpoint with the key names the missing file:
    test_a_checkpoint_that_lost_its_checksums_is_not_read_unverified.)"""
    out = tmp_path / "older"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoint-6")
    older = out / "checkpoint-3"
    (older / "checksums.json").unlink()
    state = json.loads((older / "trainer_state.json").read_text())
    assert state.pop("checksums") == "checksums.json"
    (older / "trainer_state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="dpokit.train"):
        final = train(config(workdir, out, **RUN, resume="auto"), progress=False)
    assert "has no checksums.json (written by an older dpokit)" in caplog.text
    assert_same_tensors(load_file(str(straight / "final" / "model.safetensors")),
                        load_file(str(final / "model.safetensors")))


def test_samples_records_stay_valid_json(tmp_path):
    """samples.jsonl lines went out through json.dumps alone: a non-finite number in a sample
    record (a reward model's NaN, were it ever let through) became the bare token NaN, which no
    strict JSON reader parses. They now go through finite_json, as metrics.jsonl's do."""
    from dpokit.train.records import MetricsLog

    log = MetricsLog(tmp_path, enabled=True, total_steps=1, step=0, progress=False,
                     trackers=[])
    log.write_samples(1, [{"prompt": "p", "completion": "c", "reward": float("nan")},
                          {"prompt": "q", "completion": "d", "reward": 1.5}])
    log.close()
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda name: pytest.fail(name)) for line in lines]
    assert records == [{"step": 1, "prompt": "p", "completion": "c", "reward": None},
                       {"step": 1, "prompt": "q", "completion": "d", "reward": 1.5}]
