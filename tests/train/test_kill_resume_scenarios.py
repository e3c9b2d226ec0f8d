"""A run killed at any moment — SIGKILL, SIGTERM, Ctrl-C; in tokenisation, the reference pass, a
step, a checkpoint save, the final save — and resumed (``--resume auto``) or rerun.

Every run is a real ``python -m dpokit train`` process. To kill it at a chosen moment it is started
through a small launcher that wraps one dpokit function: at its N-th call the wrapper writes a
marker file and sleeps (before or after the call), and the test sends the signal when the marker
appears. One test kills an unpatched run when its checkpoint's temporary directory appears.

The oracle is the same run uninterrupted: a resumed run must log the same records (every key but
the throughput, exactly; no step missing or repeated) and end with bitwise the same weights and
the same checkpoints left by ``save_total_limit``.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from dpokit.train.checkpoint import checkpoint_problem, numbered_checkpoints

STEPS, SAVE_STEPS, LIMIT = 8, 2, 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

LAUNCHER = '''
import importlib, os, sys, time
from pathlib import Path
target, nth, when, marker, seconds = sys.argv[1:6]
module_name, name = target.split(":")
module = importlib.import_module(module_name)
original = getattr(module, name)
calls = [0]

def pause():
    Path(marker).write_text(str(os.getpid()))
    time.sleep(float(seconds))

def wrapped(*args, **kwargs):
    calls[0] += 1
    hit = calls[0] == int(nth)
    if hit and when == "before":
        pause()
    if hit and when == "cut":  # records._append(path, lines): half a line, as a kill leaves it
        path, lines = args
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(lines[0][:len(lines[0]) // 2])
        pause()
    result = original(*args, **kwargs)
    if hit and when == "after":
        pause()
    return result

setattr(module, name, wrapped)
from dpokit.cli import main
main(sys.argv[7:])
'''


def train_args(workdir, out, *extra, eval_data=None, save_steps=SAVE_STEPS):
    args = ["train", "--model", str(workdir / "llama"), "--data", str(workdir / "prefs.jsonl"),
            "--output-dir", str(out), "--device", "cpu", "--batch-size", "4",
            "--learning-rate", "1e-3", "--beta", "0.5", "--lr-scheduler", "constant",
            "--max-length", "64", "--logging-steps", "1", "--max-steps", str(STEPS),
            "--save-steps", str(save_steps), "--save-total-limit", str(LIMIT)]
    if eval_data is not None:
        args += ["--eval-data", str(eval_data), "--eval-steps", "2"]
    return [*args, *extra]


def dpokit(args):
    return subprocess.run([sys.executable, "-m", "dpokit", *args], capture_output=True,
                          text=True, env=ENV, timeout=300, check=False)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    path = tmp_path_factory.mktemp("launcher") / "launch.py"
    path.write_text(LAUNCHER)
    return path


def killed(launcher, args, target, nth, when, sig, *, seconds=60.0):
    """Run ``dpokit args`` with ``target`` (``module:function``) pausing at its ``nth`` call
    (``when``: before or after it; ``cut``: a half-written metrics line first); send ``sig``
    there. Returns the finished process's (returncode, stdout, stderr)."""
    out = args[args.index("--output-dir") + 1]
    marker = f"{out}.marker"
    process = subprocess.Popen([sys.executable, str(launcher), target, str(nth), when, marker,
                                str(seconds), "--", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not os.path.exists(marker) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    reached = os.path.exists(marker)
    if process.poll() is None:
        process.send_signal(sig if reached else signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=120)
    if reached:
        os.unlink(marker)
    assert reached, f"{target} call {nth} never came: {stderr[-2000:]}"
    return process.returncode, stdout, stderr


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_second")}
            for line in lines]


def assert_same_run(oracle, run_dir):
    """The records (exactly, each step once), the final weights (bitwise), the checkpoints."""
    got, want = records(run_dir), records(oracle)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert got == want
    a = load_file(str(oracle / "final" / "model.safetensors"))
    b = load_file(str(run_dir / "final" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (run_dir / "final" / "README.md").is_file()
    assert ([p.name for p in numbered_checkpoints(run_dir)]
            == [p.name for p in numbered_checkpoints(oracle)])


def assert_only_complete_checkpoints(run_dir):
    """Every ``checkpoint-N`` left is complete and verifies; nothing half-written is listed."""
    for path in numbered_checkpoints(run_dir):
        assert checkpoint_problem(path) is None, path
    assert not (run_dir / "final").exists() or (run_dir / "final" / "README.md").is_file()


def resumed(workdir, out, **kwargs):
    done = dpokit(train_args(workdir, out, "--resume", "auto", **kwargs))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done


@pytest.fixture(scope="module")
def oracle(workdir, tmp_path_factory):
    """The uninterrupted run (checkpoints 6 and 8 left by save_total_limit 2)."""
    out = tmp_path_factory.mktemp("oracle") / "run"
    done = dpokit(train_args(workdir, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in records(out)] == list(range(1, STEPS + 1))
    assert [p.name for p in numbered_checkpoints(out)] == ["checkpoint-6", "checkpoint-8"]
    return out


MOMENTS = {  # (function, its call, before/after it)
    "tokenisation": ("dpokit.data.prepare:_run", 1, "before"),
    "reference pass": ("dpokit.train.setup:compute_reference_table", 1, "before"),
    "reference table written": ("dpokit.train.setup:write_table", 1, "after"),
    "checkpoint files half written": ("dpokit.train.checkpoint:_torch_save", 3, "after"),
    "checkpoint before its checksums": ("dpokit.train.checkpoint:_seal", 2, "before"),
    "checkpoint before pruning": ("dpokit.train.checkpoint:_prune", 3, "before"),
    "a step": ("dpokit.train.loop:train_step", 5, "before"),
    "after a metrics line": ("dpokit.train.loop:log_window", 5, "after"),
    "final save": ("dpokit.train.loop:run_model_card", 1, "before"),
}


def _fast(values, *fast):
    """``values`` as parameters, all but ``fast`` marked slow (each case is a few real runs:
    ``make test`` keeps one or two of a family, ``make test-slow`` runs them all)."""
    return [value if value in fast else pytest.param(value, marks=pytest.mark.slow)
            for value in values]


@pytest.mark.parametrize("moment", _fast(MOMENTS, "checkpoint files half written", "a step"))
def test_sigkill_at_any_moment_resumes_exactly(workdir, tmp_path, launcher, oracle, moment):
    """SIGKILL anywhere (a fresh cache directory, so tokenisation and the reference pass run):
    what is left lists only complete checkpoints, and ``--resume auto`` ends as the
    uninterrupted run — records, weights, the checkpoints ``save_total_limit`` keeps."""
    out = tmp_path / "fresh" / "run"
    returncode, _, _ = killed(launcher, train_args(workdir, out), *MOMENTS[moment],
                              signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    assert_only_complete_checkpoints(out)
    resumed(workdir, out)
    assert_same_run(oracle, out)


@pytest.mark.parametrize("nth", _fast([1, 3], 1))
def test_sigkill_when_the_checkpoint_temporary_directory_appears(workdir, tmp_path, oracle,
                                                                 nth):
    """No patching: the run saves every step and is killed as soon as the ``nth`` checkpoint's
    temporary directory shows; that checkpoint is not listed, and the resume is exact (how
    often a run saves changes no number: the oracle saves every 2 steps)."""
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "dpokit",
                                *train_args(workdir, out, save_steps=1)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    seen = []
    while process.poll() is None and len(seen) < nth:
        try:
            names = os.listdir(out)
        except FileNotFoundError:
            continue
        seen += [n for n in names if n.startswith(".checkpoint-") and n.endswith(".tmp")
                 and n not in seen]
    process.kill()
    process.communicate(timeout=60)
    assert len(seen) >= nth, "the run ended before its checkpoints were seen"
    step = int(seen[nth - 1][len(".checkpoint-"):-len(".tmp")])
    listed = [p.name for p in numbered_checkpoints(out)]
    assert all(int(name.split("-")[1]) <= step for name in listed)
    assert_only_complete_checkpoints(out)
    resumed(workdir, out, save_steps=1)
    got, want = records(out), records(oracle)
    assert got == want
    a = load_file(str(oracle / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


STOP_MOMENTS = {
    "tokenisation": ("dpokit.data.prepare:_run", 1, "before"),
    "reference pass": ("dpokit.train.setup:compute_reference_table", 1, "before"),
    "a step": ("dpokit.train.loop:train_step", 3, "before"),
    "final save": ("dpokit.train.loop:run_model_card", 1, "before"),
}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
@pytest.mark.parametrize("moment", _fast(STOP_MOMENTS, "a step"))
def test_sigterm_and_ctrl_c_exit_in_one_line_and_resume_exactly(workdir, tmp_path, launcher,
                                                               oracle, moment, sig):
    """SIGTERM or Ctrl-C in setup, a step or the final save: status 128 + the signal, no
    traceback, one line saying so; a signal in a step saves that step's checkpoint. Then the
    resume is exact."""
    out = tmp_path / "fresh" / "run"
    returncode, stdout, stderr = killed(launcher, train_args(workdir, out),
                                        *STOP_MOMENTS[moment], sig, seconds=1.5)
    assert returncode == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr
    said = [line for line in re.split(r"[\r\n]", stdout + stderr)
            if line.startswith(("dpokit: error", "dpokit: aborted", "dpokit: terminated",
                                "stopped:"))]
    assert len(said) == 1, stdout + stderr
    if moment == "a step":  # the step ends, is checkpointed, and the run stops there
        assert said[0].startswith("stopped: checkpoint") and said[0].endswith(
            "(resume with --resume auto)")
        assert max(r["step"] for r in records(out)) == 3
        assert numbered_checkpoints(out)[-1].name == "checkpoint-3"
    assert not (out / "final").exists()
    assert not list(out.glob(".checkpoint-*.tmp")) and not list(out.glob(".final*.tmp"))
    assert_only_complete_checkpoints(out)
    resumed(workdir, out)
    assert_same_run(oracle, out)


def test_a_signal_during_a_save_stops_at_that_step(workdir, tmp_path, launcher, oracle):
    """SIGTERM while checkpoint-4 is being written: that checkpoint is the stopping point. The
    loop used to ask for the signal before the save, so it trained step 5 and wrote a second
    checkpoint (pruning checkpoint-2 under save_total_limit 2) before it stopped."""
    out = tmp_path / "run"
    returncode, stdout, _ = killed(launcher, train_args(workdir, out),
                                   "dpokit.train.checkpoint:_seal", 2, "before", signal.SIGTERM,
                                   seconds=1.5)
    assert returncode == 143
    assert "stopped: checkpoint" in stdout and "checkpoint-4" in stdout
    assert max(r["step"] for r in records(out)) == 4
    assert [p.name for p in numbered_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    resumed(workdir, out)
    assert_same_run(oracle, out)


def test_ctrl_c_during_an_evaluation_stops_at_that_step(workdir, tmp_path, launcher):
    """Ctrl-C during step 2's evaluation (no checkpoint due at step 2): the run saves step 2
    and stops — it used to train step 3 first. The resume equals the uninterrupted run."""
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text("".join((workdir / "prefs.jsonl").read_text().splitlines(True)[:4]))
    straight = tmp_path / "straight"
    done = dpokit(train_args(workdir, straight, eval_data=evaluation, save_steps=100))
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    returncode, _, stderr = killed(
        launcher, train_args(workdir, out, eval_data=evaluation, save_steps=100),
        "dpokit.train.loop:evaluate", 1, "before", signal.SIGINT, seconds=1.5)
    assert returncode == 130, stderr[-3000:]
    assert [p.name for p in numbered_checkpoints(out)] == ["checkpoint-2"]
    got = records(out)
    assert max(r["step"] for r in got) == 2 and "eval/loss" in got[-1]
    resumed(workdir, out, eval_data=evaluation, save_steps=100)
    assert records(out) == records(straight)
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_metrics_line_cut_short_by_the_kill_is_dropped_on_resume(workdir, tmp_path,
                                                                   launcher, oracle):
    """SIGKILL in the middle of writing step 5's record (half the line on disk): the resume
    drops it and the records after it, and logs each step once."""
    out = tmp_path / "run"
    killed(launcher, train_args(workdir, out), "dpokit.train.records:_append", 5, "cut",
           signal.SIGKILL)
    text = (out / "metrics.jsonl").read_text()
    assert not text.endswith("\n")  # the cut line is there
    resumed(workdir, out)
    assert_same_run(oracle, out)


@pytest.mark.slow
def test_killed_again_while_resuming_still_resumes_exactly(workdir, tmp_path, launcher,
                                                           oracle):
    """SIGKILL in step 3; the resumed run (from checkpoint-2) SIGTERMed in its second step,
    step 4 (it saves checkpoint-4 and stops); resumed again and Ctrl-C'd while writing
    checkpoint-6 (it stops there); resumed to the end: the same run as the uninterrupted one."""
    out = tmp_path / "run"
    killed(launcher, train_args(workdir, out), "dpokit.train.loop:train_step", 3, "before",
           signal.SIGKILL)
    assert [p.name for p in numbered_checkpoints(out)] == ["checkpoint-2"]
    args = train_args(workdir, out, "--resume", "auto")
    returncode, _, _ = killed(launcher, args, "dpokit.train.loop:train_step", 2, "before",
                              signal.SIGTERM, seconds=1.5)
    assert returncode == 143
    assert numbered_checkpoints(out)[-1].name == "checkpoint-4"
    returncode, _, _ = killed(launcher, args, "dpokit.train.checkpoint:_seal", 1, "before",
                              signal.SIGINT, seconds=1.5)
    assert returncode == 130
    assert numbered_checkpoints(out)[-1].name == "checkpoint-6"
    resumed(workdir, out)
    assert_same_run(oracle, out)


def _snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".dpokit.lock"}


@pytest.mark.parametrize("state", _fast(["finished", "stopped by SIGTERM",
                                          "killed in its first save"], "finished"))
def test_a_rerun_without_resume_is_refused_in_one_line(workdir, tmp_path, launcher, oracle,
                                                       state):
    """Rerunning into the directory without ``--resume``: exit 2, one error line, nothing in
    the directory changed."""
    out = tmp_path / "run"
    if state == "finished":
        shutil.copytree(oracle, out)
    elif state == "stopped by SIGTERM":
        killed(launcher, train_args(workdir, out), "dpokit.train.loop:train_step", 3, "before",
               signal.SIGTERM, seconds=1.5)
    else:
        killed(launcher, train_args(workdir, out), "dpokit.train.checkpoint:_seal", 1,
               "before", signal.SIGKILL)
        assert not numbered_checkpoints(out)
    before = _snapshot(out)
    done = dpokit(train_args(workdir, out))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("dpokit: error")]
    assert len(errors) == 1 and "holds an earlier run" in errors[0], done.stderr
    assert _snapshot(out) == before
