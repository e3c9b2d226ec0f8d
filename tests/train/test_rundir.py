"""Run directories and resume (issue 12): a finished run is never replaced silently, a
directory in use is locked, checkpoints carry checksums (``--resume auto`` falls back past a
corrupt one), and a resume must be the same run. Every refusal is checked for its exit status,
its one line naming the path/key, and for leaving everything written before unchanged."""

import hashlib
import json
import subprocess
import sys
import time

import pytest

from dpokit.errors import DpokitError
from dpokit.train.loop import train
from dpokit.train.rundir import LOCK_NAME, RunLock
from tests.helpers import run_cli, torchrun, write_jsonl
from tests.train.test_trainer import config


def tree_digest(root):
    """{relative path: sha256} of every file under ``root`` except the lock file."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def cli_args(workdir, out, *extra):
    return ["train", "--model", str(workdir / "llama"), "--data", str(workdir / "prefs.jsonl"),
            "--output-dir", str(out), "--batch-size", "4", "--max-length", "64",
            "--logging-steps", "1", "--lr-scheduler", "constant", "--learning-rate", "1e-3",
            "--beta", "0.5", *extra]


def one_error(code, err):
    """The single ``dpokit: error`` line of a refused run (exit 2, no traceback)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if "dpokit: error" in line]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished(workdir, tmp_path_factory):
    """A finished 2-step run without checkpoints (save_steps longer than the run)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(config(workdir, str(out), max_steps=2, save_steps=500), progress=False)
    return out


# ------------------------------------------------------------------------ finished runs


def test_a_fresh_run_never_replaces_a_finished_run(workdir, finished, capsys):
    before = tree_digest(finished)
    code, _, err = run_cli(capsys, *cli_args(workdir, finished, "--max-steps", "1"))
    line = one_error(code, err)
    assert str(finished) in line and "final" in line and "metrics.jsonl" in line
    assert "--overwrite" in line and "--output-dir" in line
    assert "--resume auto" not in line  # nothing to resume: not offered
    assert tree_digest(finished) == before  # config.yaml included


def test_resume_auto_without_a_checkpoint_does_not_replace_final(workdir, finished, capsys):
    before = tree_digest(finished)
    code, _, err = run_cli(capsys, *cli_args(workdir, finished, "--max-steps", "1",
                                             "--resume", "auto"))
    assert "holds an earlier run" in one_error(code, err)
    assert tree_digest(finished) == before


def test_overwrite_replaces_the_earlier_run(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(workdir, str(out), max_steps=2, save_steps=1, save_total_limit=None),
          progress=False)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "1", "--overwrite"))
    assert code == 0, err[-2000:]
    assert "overwrite: removed" in err
    assert [m["step"] for m in json.loads("[" + ",".join(
        (out / "metrics.jsonl").read_text().splitlines()) + "]")] == [1]
    assert not list(out.glob("checkpoint-*"))  # the earlier run's checkpoints are gone
    assert (out / "final" / "config.json").is_file()


def test_overwrite_with_resume_is_refused(workdir, tmp_path, capsys):
    code, _, err = run_cli(capsys, *cli_args(workdir, tmp_path / "r", "--overwrite",
                                             "--resume", "auto"))
    assert "overwrite" in one_error(code, err) and not (tmp_path / "r").exists()


def test_an_output_dir_that_is_a_file_is_one_line(workdir, tmp_path, capsys):
    target = tmp_path / "taken.txt"
    target.write_text("mine")
    code, _, err = run_cli(capsys, *cli_args(workdir, target, "--max-steps", "1"))
    assert str(target) in one_error(code, err) and "is a file" in err
    assert target.read_text() == "mine"


# ------------------------------------------------------------------------------- the lock


HOLD = """
import fcntl, json, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
handle.truncate(0); handle.write(json.dumps({"pid": os.getpid(), "host": "h", "started": "t"}))
handle.flush(); print("held", flush=True); time.sleep(60)
"""


def test_a_directory_in_use_by_another_process_is_refused(workdir, finished, tmp_path, capsys):
    """A second process holds the lock (as a running dpokit would): the run is refused, naming
    the holder's pid, and nothing in the directory changes; once the holder dies (kill -9) its
    lock is free and the stale file is taken over."""
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / LOCK_NAME)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "1"))
        line = one_error(code, err)
        assert "in use by another run" in line and f"pid {holder.pid}" in line
        assert tree_digest(out) == {}
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "1"))
    assert code == 0, err[-2000:]
    assert "stale lock" in err and f"pid {holder.pid}" in err
    assert (out / LOCK_NAME).read_text() == ""  # released (emptied) at the end


def test_the_lock_is_released_after_an_error(workdir, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(DpokitError):
        train(config(workdir, str(out), data=str(tmp_path / "missing.jsonl")), progress=False)
    with RunLock.acquire(out) as lock:  # free again: an in-process retry is not locked out
        assert lock.handle is not None


def test_two_runs_at_once_one_is_refused(workdir, tmp_path):
    """Two real `dpokit train` processes on one directory: while the first trains, the second
    exits 2 with the lock message and writes nothing; the first (then stopped by SIGTERM, 143)
    logged each of its steps once."""
    import signal

    out = tmp_path / "both"
    args = [sys.executable, "-m", "dpokit", *cli_args(workdir, out, "--max-steps", "100000",
                                                      "--save-steps", "100000")]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.1)
    before = len((out / "metrics.jsonl").read_text().splitlines())
    second = subprocess.run(args, capture_output=True, text=True, check=False)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert (first.returncode, second.returncode) == (143, 2), second.stderr[-2000:]
    assert "in use by another run" in second.stderr and f"pid {first.pid}" in second.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) > before and steps == list(range(1, len(steps) + 1))


# --------------------------------------------------------------------------- checksums


@pytest.fixture()
def three_checkpoints(workdir, tmp_path):
    """An interrupted-looking run: checkpoints 2, 4 and 6 of a 6-step run, final/ removed."""
    import shutil

    out = tmp_path / "ckpt"
    train(config(workdir, str(out), max_steps=6, save_steps=2, save_total_limit=None),
          progress=False)
    shutil.rmtree(out / "final")
    return out


def test_checkpoints_carry_checksums_of_every_file(three_checkpoints):
    path = three_checkpoints / "checkpoint-6"
    sums = json.loads((path / "checksums.json").read_text())
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert set(sums) == files - {"checksums.json"}
    for name, entry in sums.items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_auto_falls_back_past_a_corrupt_checkpoint(workdir, three_checkpoints, capsys):
    """checkpoint-6 truncated, checkpoint-4 with one byte flipped (same size): resume auto
    skips both with a warning naming them and why, and resumes from checkpoint-2."""
    out = three_checkpoints
    _truncate(out / "checkpoint-6" / "trainable.safetensors")
    optimizer = out / "checkpoint-4" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "6", "--save-steps",
                                             "2", "--save-total-limit", "null", "--resume",
                                             "auto"))
    assert code == 0, err[-2000:]
    skipped = next(line for line in err.splitlines() if "resume auto: skipped" in line)
    assert "checkpoint-6 (trainable.safetensors has" in skipped
    assert "checkpoint-4 (optimizer.pt does not match its checksum)" in skipped
    assert "resuming from checkpoint-2" in skipped
    assert "resumed from" in err and "at step 2" in err


def test_resume_of_a_corrupt_checkpoint_names_the_file(workdir, three_checkpoints, capsys):
    out = three_checkpoints
    _truncate(out / "checkpoint-6" / "trainer_state.json")
    before = tree_digest(out)
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "6", "--resume",
                                             str(out / "checkpoint-6")))
    line = one_error(code, err)
    assert "checkpoint-6" in line and "trainer_state.json" in line
    assert tree_digest(out) == before


def test_resume_auto_with_no_valid_checkpoint_lists_each(workdir, three_checkpoints, capsys):
    out = three_checkpoints
    for step in (2, 4, 6):
        (out / f"checkpoint-{step}" / "scheduler.pt").unlink()
    before = tree_digest(out)
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "6", "--resume",
                                             "auto"))
    line = one_error(code, err)
    assert all(f"checkpoint-{s} (scheduler.pt is missing)" in line for s in (2, 4, 6))
    assert tree_digest(out) == before


def test_an_unverified_old_checkpoint_with_a_bad_file_names_it(workdir, three_checkpoints,
                                                                capsys):
    """A checkpoint without checksums.json (an older dpokit) is read unverified; a truncated
    optimizer.pt is then one line naming the file, not a traceback."""
    out = three_checkpoints
    (out / "checkpoint-6" / "checksums.json").unlink()
    state_file = out / "checkpoint-6" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state.pop("checksums", None)  # as an older dpokit wrote it: no checksums recorded at all
    state_file.write_text(json.dumps(state))
    _truncate(out / "checkpoint-6" / "optimizer.pt")
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "6", "--resume",
                                             "auto"))
    line = one_error(code, err)
    assert "not verified" in err
    assert "cannot read" in line and str(out / "checkpoint-6" / "optimizer.pt") in line


# ----------------------------------------------------------------------- the same run


@pytest.mark.parametrize(("flags", "expected"), [
    (["--learning-rate", "2e-3"], "learning_rate 0.001 → 0.002"),
    (["--beta", "0.3"], "beta 0.5 → 0.3"),
    (["--max-length", "48"], "max_length 64 → 48"),
    (["--seed", "1"], "seed 42 → 1"),
])
def test_resume_with_a_different_setting_lists_the_key(workdir, three_checkpoints, capsys,
                                                       flags, expected):
    out = three_checkpoints
    before = tree_digest(out)
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "6", "--resume",
                                             "auto", *flags))
    line = one_error(code, err)
    assert "not the run that wrote" in line and expected in line, line
    assert tree_digest(out) == before  # config.yaml too: written only once a run is accepted


def test_resume_with_other_data_or_another_model_is_refused(workdir, three_checkpoints,
                                                           tmp_path, capsys):
    """The same shape is not enough: one changed row, or a model of the same config with other
    weights, is named; a copy of the data under another name resumes."""
    from dpokit.fixtures import tiny_causal_lm

    out = three_checkpoints
    rows = [json.loads(line) for line in (workdir / "prefs.jsonl").read_text().splitlines()]
    copy = write_jsonl(tmp_path / "copy.jsonl", rows)
    rows[5]["chosen"] = " yes good answers"
    changed = write_jsonl(tmp_path / "changed.jsonl", rows)
    other = tmp_path / "other-llama"
    tiny_causal_lm("llama", vocab_size=len(__import__("transformers").AutoTokenizer
                                           .from_pretrained(workdir / "llama")),
                   seed=8).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (workdir / "llama" / name).is_file():
            (other / name).write_bytes((workdir / "llama" / name).read_bytes())
    before = tree_digest(out)
    base = cli_args(workdir, out, "--max-steps", "6", "--resume", "auto")
    code, _, err = run_cli(capsys, *base, "--data", str(changed))
    assert "data (content differs)" in one_error(code, err)
    code, _, err = run_cli(capsys, *base, "--model", str(other))
    assert "model (content differs)" in one_error(code, err)
    assert tree_digest(out) == before
    code, _, err = run_cli(capsys, *base, "--data", str(copy), "--logging-steps", "2")
    assert code == 0, err[-2000:]  # same rows elsewhere; logging_steps may change


def test_a_longer_run_is_refused_where_the_schedule_would_jump(workdir, three_checkpoints,
                                                               capsys):
    out = three_checkpoints
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "8", "--resume",
                                             "auto"))
    assert code == 0, err[-2000:]  # constant schedule: extending is well defined
    lrs = [m["learning_rate"] for m in map(json.loads,
                                           (out / "metrics.jsonl").read_text().splitlines())]
    assert len(lrs) == 8 and len(set(lrs)) == 1


def test_a_linear_schedule_may_not_change_length(workdir, tmp_path, capsys):
    out = tmp_path / "linear"
    train(config(workdir, str(out), max_steps=4, save_steps=2, lr_scheduler="linear"),
          progress=False)
    before = tree_digest(out)
    flags = ["--lr-scheduler", "linear", "--resume", str(out / "checkpoint-2")]
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "8", *flags))
    line = one_error(code, err)
    assert "4 steps" in line and "8" in line and "would jump" in line
    assert tree_digest(out) == before


def test_refusals_under_torchrun_stop_every_rank(workdir, tmp_path):
    """Two gloo processes: the directory and resume checks run on rank 0 and stop both ranks
    (no rank left waiting in a collective): a fresh run into a run directory, and a resume
    with another learning rate, each exit non-zero with rank 0's line, nothing changed."""

    out = tmp_path / "ddp"
    base = cli_args(workdir, out, "--batch-size", "2", "--device", "cpu", "--max-steps", "2",
                    "--save-steps", "2")
    first = torchrun("-m", "dpokit", *base)
    assert first.returncode == 0, first.stderr[-3000:]
    before = tree_digest(out)
    for extra, expected, other_rank in (
            ([], "holds an earlier run", "rank 0 refused the run"),  # decided on rank 0
            (["--resume", "auto", "--learning-rate", "2e-3"], "learning_rate 0.001 → 0.002",
             "learning_rate 0.001 → 0.002")):  # checked on every rank alike
        refused = torchrun("-m", "dpokit", *base, *extra)
        assert refused.returncode != 0 and expected in refused.stderr, refused.stderr[-3000:]
        assert refused.stderr.count(other_rank) >= (1 if other_rank != expected else 2)
        assert tree_digest(out) == before


# ------------------------------------------------------------- review follow-ups


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(workdir, three_checkpoints,
                                                                   capsys):
    """checkpoint-6 corrupt, resume auto from checkpoint-4 with save_total_limit 1: the saves
    of the resumed run are what is kept (not the corrupt later one), checkpoint-6 is set aside
    as checkpoint-6.discarded, and a second resume auto continues from the new checkpoint."""
    out = three_checkpoints
    _truncate(out / "checkpoint-6" / "optimizer.pt")
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "6", "--save-steps",
                                             "1", "--save-total-limit", "1", "--resume",
                                             "auto"))
    assert code == 0, err[-2000:]
    assert "set aside the later checkpoint-6.discarded" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6",
                                                                 "checkpoint-6.discarded"]
    assert (out / "checkpoint-6" / "config.yaml").is_file()  # the resumed run's own save
    from dpokit.train.checkpoint import checkpoint_problem

    assert checkpoint_problem(out / "checkpoint-6") is None


def test_checkpoints_hold_the_runs_config(three_checkpoints):
    assert ((three_checkpoints / "checkpoint-2" / "config.yaml").read_text()
            == (three_checkpoints / "config.yaml").read_text())


def test_resume_auto_after_a_death_before_the_first_checkpoint_starts_afresh(workdir, tmp_path,
                                                                            capsys):
    """A requeued job (resume auto) whose first attempt died before save_steps: only
    metrics.jsonl is there — redone from step 1, with a warning (no way out would exist:
    overwrite and resume exclude each other)."""
    out = tmp_path / "died"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "2", "--resume",
                                             "auto"))
    assert code == 0, err[-2000:]
    assert "starting afresh" in err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resuming_into_another_directory_holding_a_run_is_refused(workdir, three_checkpoints,
                                                                  finished, capsys):
    before = tree_digest(finished)
    code, _, err = run_cli(capsys, *cli_args(workdir, finished, "--max-steps", "6", "--resume",
                                             str(three_checkpoints / "checkpoint-4")))
    assert "holds an earlier run" in one_error(code, err)
    assert tree_digest(finished) == before


@pytest.mark.parametrize("flags", [["--gradient-checkpointing"], ["--temperature", "0.5"],
                                   ["--precompute-ref-logps"], ["--chunk-size", "7"],
                                   ["--no-shared-prompt"]])
def test_settings_that_keep_the_numbers_may_change_on_resume(workdir, three_checkpoints, capsys,
                                                            flags):
    code, _, err = run_cli(capsys, *cli_args(workdir, three_checkpoints, "--max-steps", "6",
                                             "--resume", str(three_checkpoints / "checkpoint-4"),
                                             *flags))
    assert code == 0, err[-2000:]


def test_malformed_checksums_are_a_problem_not_a_traceback(three_checkpoints):
    from dpokit.train.checkpoint import checkpoint_problem

    path = three_checkpoints / "checkpoint-2"
    for content in ("[]", '{"optimizer.pt": 3}', '{"optimizer.pt": {"bytes": "x"}}'):
        (path / "checksums.json").write_text(content)
        assert checkpoint_problem(path) == "checksums.json is malformed"


def test_verification_is_shared_between_ranks(three_checkpoints):
    """Each of 3 ranks checks every third file; together they cover every file once, and the
    one holding the altered file reports it."""
    from dpokit.train.checkpoint import checkpoint_problem

    path = three_checkpoints / "checkpoint-2"
    names = sorted(json.loads((path / "checksums.json").read_text()))
    altered = names[4]
    data = bytearray((path / altered).read_bytes())
    data[0] ^= 0xFF
    (path / altered).write_bytes(bytes(data))
    problems = [checkpoint_problem(path, rank, 3) for rank in range(3)]
    assert problems[4 % 3] == f"{altered} does not match its checksum"
    assert [p for i, p in enumerate(problems) if i != 4 % 3] == [None, None]


def test_overwrite_removes_only_what_the_refusal_names(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(workdir, str(out), max_steps=1, save_steps=1), progress=False)
    (out / "checkpoint-best").mkdir()
    (out / "checkpoint-best" / "mine.txt").write_text("keep")
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "1", "--overwrite"))
    assert code == 0, err[-2000:]
    assert (out / "checkpoint-best" / "mine.txt").read_text() == "keep"


def test_a_filesystem_without_locks_runs_with_a_warning(workdir, tmp_path, capsys, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    code, _, err = run_cli(capsys, *cli_args(workdir, tmp_path / "run", "--max-steps", "1"))
    assert code == 0, err[-2000:]
    assert "does not support file locks" in err and "No locks available" in err


def test_ddp_resume_mid_window_logs_the_uninterrupted_numbers(workdir, tmp_path):
    """2 gloo ranks, one log line at step 40 (a window over the whole run): stopped by SIGTERM
    after a few steps (checkpoint mid-window) and resumed, the step-40 record equals the
    uninterrupted run's — the checkpoint holds the window summed over both ranks, restored on
    one (it held rank 0's sums, restored on every rank)."""
    import os
    import signal
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone",
                "--nproc-per-node", "2", "-m", "dpokit"]

    def args(out, *extra):
        return [*torchrun, *cli_args(workdir, out, "--batch-size", "2", "--device", "cpu",
                                     "--max-steps", "40", "--logging-steps", "100",
                                     "--save-steps", "1"), *extra]

    whole = subprocess.run(args(tmp_path / "whole"), capture_output=True, text=True, env=env,
                           check=False, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "cut"
    first = subprocess.Popen(args(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint-3").is_dir():
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    stopped = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if
                  p.name.split("-")[1].isdigit())
    assert 3 <= stopped < 40, err[-2000:]
    resumed = subprocess.run(args(out, "--resume", "auto"), capture_output=True, text=True,
                             env=env, check=False, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (a,), (b,) = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
                  for d in (tmp_path / "whole", out))
    assert a["step"] == b["step"] == 40
    for key in ("loss", "rewards/accuracies", "num_tokens"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key


def test_a_checkpoint_that_fails_to_load_leaves_the_later_ones(workdir, three_checkpoints,
                                                               capsys):
    """Resuming from checkpoint-4 set checkpoint-6 aside (``.discarded``) before loading it;
    when the load then failed (here: non-finite weights, verified files) the good later
    checkpoint was gone for a later ``--resume auto``. Now it is set aside only once the
    resume has loaded."""
    import math

    from safetensors.torch import load_file, save_file

    from dpokit.digests import file_sha256

    out = three_checkpoints
    checkpoint = out / "checkpoint-4"
    weights_file = checkpoint / "trainable.safetensors"
    weights = load_file(str(weights_file))
    first = next(iter(weights))
    weights[first] = weights[first].clone().fill_(math.nan)
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    sums = json.loads((checkpoint / "checksums.json").read_text())
    sums["trainable.safetensors"] = {"bytes": weights_file.stat().st_size,
                                     "sha256": file_sha256(weights_file, None)}
    (checkpoint / "checksums.json").write_text(json.dumps(sums))
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "6", "--resume",
                                             str(checkpoint)))
    assert "non-finite" in one_error(code, err)
    assert (out / "checkpoint-6" / "trainer_state.json").is_file()
    assert not list(out.glob("checkpoint-6.*"))
