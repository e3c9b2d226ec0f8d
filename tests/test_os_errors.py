"""OS errors a user can cause (issue 12): a missing, unreadable or unwritable path, a full disk,
a file where a directory should be. Each is one ``dpokit: error`` line naming the path and the
cause, exit status 2; no hidden ``.tmp`` is left behind and files written before are unchanged.

The tests may run as root, where ``chmod`` does not stop a write: a read-only directory is then
simulated by making ``open`` fail as the kernel would (``EACCES``), so every test always runs.
A full disk is simulated the same way, by the writer (``torch.save``, ``save_pretrained``)
writing half its bytes and then failing with ``ENOSPC`` as the library really reports it."""

import builtins
import errno
import io
import os
import pathlib

import pytest
import torch
from safetensors import SafetensorError

from dpokit.atomic import atomic_path, os_error_cause, write_jsonl, write_text
from dpokit.errors import DpokitError
from dpokit.train.checkpoint import checkpoint_problem
from tests.helpers import run_cli
from tests.train.test_rundir import cli_args, one_error, tree_digest

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


def leftovers(root):
    """Hidden temporaries (``.name.tmp``, ``.name.PID.tmp``) anywhere under ``root``."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*tmp"))


def no_space(path=None):
    return OSError(errno.ENOSPC, NO_SPACE, *([str(path)] if path else []))


def read_only(monkeypatch, directory):
    """Make ``directory`` refuse new files: ``chmod 555`` and, where that does not bind (root),
    ``open`` for writing inside it failing with EACCES the way the kernel does (``open`` and
    ``io.open``, which ``Path.open`` calls)."""
    directory.chmod(0o555)
    if not os.access(directory, os.W_OK):
        return
    real_open = io.open

    def refusing_open(file, mode="r", *args, **kwargs):
        if (isinstance(file, str | os.PathLike) and pathlib.Path(file).parent == directory
                and any(c in mode for c in "wax+")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    monkeypatch.setattr(io, "open", refusing_open)


@pytest.fixture()
def file_as_dir(tmp_path):
    """A regular file, to be named where a directory should be."""
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    return path


def eval_args(workdir, *extra):
    return ["eval", "--model", str(workdir / "llama"), "--data", str(workdir / "prefs.jsonl"),
            "--max-length", "64", *extra]


def generate_args(workdir, *extra):
    return ["generate", "--model", str(workdir / "llama"), "--data",
            str(workdir / "prefs.jsonl"), "--max-new-tokens", "2", *extra]


# ------------------------------------------------------------------ dpokit.atomic itself


def test_an_os_error_in_the_body_names_the_target_and_removes_the_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(DpokitError) as caught, atomic_path(target) as tmp:
        tmp.write_text("half")
        raise no_space(tmp)
    assert str(caught.value) == f"cannot write {target}: {NO_SPACE}"  # not the hidden name
    assert target.read_text() == "old" and leftovers(tmp_path) == []


@pytest.mark.parametrize("make", [
    lambda: SafetensorError("Error while serializing: I/O error: No space left on device "
                            "(os error 28)"),  # what safetensors.save_file raises
    lambda: Exception("No space left on device (os error 28)"),  # the tokenizers' save
], ids=["safetensors", "tokenizers"])
def test_library_write_errors_are_os_errors_too(tmp_path, make):
    with pytest.raises(DpokitError, match=f"cannot write .*final: {NO_SPACE}$"), \
            atomic_path(tmp_path / "final", directory=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise make()
    assert list(tmp_path.iterdir()) == []


def test_torch_save_to_a_full_disk_is_read_through_its_runtime_error():
    """``torch.save`` into a buffered handle whose large write fails raises a C++
    ``RuntimeError`` (the small writes after it land in the buffer, the position is off) while
    handling the ``OSError``; the cause is the OSError's."""

    class Full(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise no_space()

    with pytest.raises(RuntimeError) as caught:
        torch.save({"x": torch.zeros(100_000)}, io.BufferedWriter(Full()))
    assert os_error_cause(caught.value) == NO_SPACE


@pytest.mark.parametrize("error", [DpokitError("row 3: bad"), ValueError("a bug"),
                                   KeyError("k")])
def test_other_exceptions_pass_through_unchanged(tmp_path, error):
    with pytest.raises(type(error)) as caught, atomic_path(tmp_path / "f") as tmp:
        tmp.write_text("x")
        raise error
    assert caught.value is error and leftovers(tmp_path) == []


def test_a_failing_cleanup_does_not_hide_the_error(tmp_path, monkeypatch):
    import dpokit.atomic

    def broken_remove(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    target = tmp_path / "f.txt"
    with pytest.raises(DpokitError, match=f"cannot write {target}: {NO_SPACE}"), \
            atomic_path(target) as tmp:
        monkeypatch.setattr(dpokit.atomic, "_remove", broken_remove)
        raise no_space(tmp)


def test_a_file_where_the_parent_directory_should_be(file_as_dir):
    for target in (file_as_dir / "out.jsonl", file_as_dir / "deeper" / "out.jsonl"):
        with pytest.raises(DpokitError) as caught:
            write_jsonl(target, [{"a": 1}])
        assert str(caught.value) == (f"cannot write {target}: {file_as_dir} is a file, not a "
                                     f"directory")
    assert file_as_dir.read_text() == "mine" and leftovers(file_as_dir.parent) == []


def test_a_read_only_directory(tmp_path, monkeypatch):
    directory = tmp_path / "ro"
    directory.mkdir()
    (directory / "kept.txt").write_text("kept")
    read_only(monkeypatch, directory)
    try:
        with pytest.raises(DpokitError) as caught:
            write_text(directory / "new.txt", "x")
        assert str(caught.value).startswith(f"cannot write {directory / 'new.txt'}: "
                                            f"Permission denied")
    finally:
        directory.chmod(0o755)
    assert sorted(p.name for p in directory.iterdir()) == ["kept.txt"]


def test_an_unwritable_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    """``check_writable`` (what eval and generate call first) as an unprivileged user sees it."""
    from dpokit.atomic import check_writable

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: p != tmp_path and real_access(p, mode))
    with pytest.raises(DpokitError) as caught:
        check_writable(tmp_path / "sub" / "out.jsonl")
    assert str(caught.value) == (f"cannot write {tmp_path / 'sub' / 'out.jsonl'}: Permission "
                                 f"denied ({tmp_path} is not writable)")


# --------------------------------------------------------------------------- training


def test_disk_full_while_writing_final(workdir, tmp_path, capsys, monkeypatch):
    """save_pretrained fails half-way (safetensors' own error type): the run's earlier files —
    checkpoints, metrics, config — are as they were, and no ``.final.tmp`` is left."""
    from transformers import PreTrainedModel

    out = tmp_path / "run"
    seen = {}

    def full_disk(self, save_directory, *args, **kwargs):
        seen["before"] = {k: v for k, v in tree_digest(out).items() if not k.startswith(".")}
        (pathlib.Path(save_directory) / "model.safetensors").write_bytes(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "2",
                                             "--save-steps", "1"))
    line = one_error(code, err)
    assert line == f"dpokit: error: cannot write {out / 'final'}: {NO_SPACE}"
    assert leftovers(out) == [] and not (out / "final").exists()
    assert tree_digest(out) == seen["before"]
    assert checkpoint_problem(out / "checkpoint-2") is None


def test_disk_full_while_writing_a_checkpoint(workdir, tmp_path, capsys, monkeypatch):
    """torch.save writes half of checkpoint-2's optimizer state, then the disk is full:
    checkpoint-1 is intact (and named), no ``.checkpoint-2.tmp`` is left."""
    import dpokit.train.checkpoint

    out = tmp_path / "run"
    real_save = torch.save
    seen = {}

    def half_then_full(obj, f, *args, **kwargs):
        name = getattr(f, "name", str(f))
        if ".checkpoint-2.tmp" not in str(name):
            return real_save(obj, f, *args, **kwargs)
        seen.setdefault("before", tree_digest(out / "checkpoint-1"))
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        if hasattr(f, "write"):
            f.write(data[: len(data) // 2])
        raise no_space(name)

    monkeypatch.setattr(dpokit.train.checkpoint.torch, "save", half_then_full)
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "3",
                                             "--save-steps", "1", "--save-total-limit", "null"))
    line = one_error(code, err)
    assert line == (f"dpokit: error: cannot write checkpoint {out / 'checkpoint-2'}: "
                    f"{NO_SPACE}; the previous checkpoint checkpoint-1 is intact")
    assert leftovers(out) == []
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert tree_digest(out / "checkpoint-1") == seen["before"]
    assert checkpoint_problem(out / "checkpoint-1") is None


def test_a_read_only_output_dir(workdir, tmp_path, capsys, monkeypatch):
    """An existing run directory the user may not write to: one line, nothing written."""
    out = tmp_path / "ro"
    out.mkdir()
    (out / "README").write_text("someone else's")
    before = tree_digest(out)
    read_only(monkeypatch, out)
    try:
        code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "1"))
        line = one_error(code, err)
    finally:
        out.chmod(0o755)
    assert f"{out}: Permission denied" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["README"] and tree_digest(out) == before


def test_an_output_dir_below_a_file(workdir, file_as_dir, capsys):
    code, _, err = run_cli(capsys, *cli_args(workdir, file_as_dir / "run", "--max-steps", "1"))
    line = one_error(code, err)
    assert str(file_as_dir / "run") in line and "Not a directory" in line, line
    assert file_as_dir.read_text() == "mine"


# -------------------------------------------------------------------- eval and generate


def test_eval_per_example_into_a_read_only_directory(workdir, tmp_path, capsys, monkeypatch):
    directory = tmp_path / "ro"
    directory.mkdir()
    (directory / "old.jsonl").write_text("{}\n")
    before = tree_digest(directory)
    read_only(monkeypatch, directory)
    try:
        code, _, err = run_cli(capsys, *eval_args(workdir, "--per-example",
                                                  str(directory / "rows.jsonl")))
        line = one_error(code, err)
    finally:
        directory.chmod(0o755)
    assert line.startswith(f"dpokit: error: cannot write {directory / 'rows.jsonl'}: "
                           f"Permission denied"), line
    assert tree_digest(directory) == before and leftovers(tmp_path) == []


def test_eval_per_example_below_a_file(workdir, file_as_dir, capsys):
    target = file_as_dir / "rows.jsonl"
    code, _, err = run_cli(capsys, *eval_args(workdir, "--per-example", str(target)))
    assert one_error(code, err) == (f"dpokit: error: cannot write {target}: {file_as_dir} is "
                                    f"a file, not a directory")
    assert file_as_dir.read_text() == "mine" and leftovers(file_as_dir.parent) == []


def test_eval_per_example_that_is_a_directory(workdir, tmp_path, capsys):
    code, _, err = run_cli(capsys, *eval_args(workdir, "--per-example", str(tmp_path)))
    assert one_error(code, err) == (f"dpokit: error: per_example {tmp_path} is a directory; "
                                    f"name a file")


def test_generate_output_below_a_file(workdir, file_as_dir, capsys):
    target = file_as_dir / "out.jsonl"
    code, out, err = run_cli(capsys, *generate_args(workdir, "--output", str(target)))
    assert one_error(code, err) == (f"dpokit: error: cannot write {target}: {file_as_dir} is "
                                    f"a file, not a directory")
    assert out == "" and file_as_dir.read_text() == "mine"


def test_generate_output_on_a_full_disk(workdir, tmp_path, capsys, monkeypatch):
    """The output file is written half, then the disk is full: the earlier output is kept."""
    target = tmp_path / "samples.jsonl"
    target.write_text('{"earlier": true}\n')
    before = tree_digest(tmp_path)
    real_open = pathlib.Path.open

    def filling_open(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        if self.parent == tmp_path and "w" in mode:
            handle.write("{\"half")
            handle.close()
            raise no_space()
        return handle

    monkeypatch.setattr(pathlib.Path, "open", filling_open)
    code, _, err = run_cli(capsys, *generate_args(workdir, "--output", str(target),
                                                  "--overwrite"))
    assert one_error(code, err) == f"dpokit: error: cannot write {target}: {NO_SPACE}"
    assert tree_digest(tmp_path) == before and leftovers(tmp_path) == []


# ---------------------------------------------------------------------- inputs to read


def test_a_missing_model_directory(workdir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path / "nope"), "--data",
                           str(workdir / "prefs.jsonl"))
    line = one_error(code, err)
    assert str(tmp_path / "nope") in line and "not found" in line


def test_a_model_path_that_is_a_file(workdir, file_as_dir, capsys):
    code, _, err = run_cli(capsys, "eval", "--model", str(file_as_dir), "--data",
                           str(workdir / "prefs.jsonl"))
    assert one_error(code, err) == f"dpokit: error: model path is not a directory: {file_as_dir}"


def test_a_missing_data_file(workdir, tmp_path, capsys):
    missing = tmp_path / "none.jsonl"
    for argv in (eval_args(workdir), generate_args(workdir, "--output", str(tmp_path / "o"))):
        argv[argv.index("--data") + 1] = str(missing)
        code, _, err = run_cli(capsys, *argv)
        assert one_error(code, err) == f"dpokit: error: data not found: {missing}"


def test_a_data_path_that_is_an_empty_directory(workdir, tmp_path, capsys):
    argv = eval_args(workdir)
    argv[argv.index("--data") + 1] = str(tmp_path)
    code, _, err = run_cli(capsys, *argv)
    line = one_error(code, err)
    assert str(tmp_path) in line and "no data files" in line


def test_unreadable_data(workdir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "prefs.jsonl"
    data.write_bytes((workdir / "prefs.jsonl").read_bytes())
    data.chmod(0o000)
    if os.access(data, os.R_OK):  # root reads anyway: fail the read as the kernel would
        real_read, real_open = pathlib.Path.read_bytes, pathlib.Path.open

        def refusing_read(self):
            if self == data:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_read(self)

        def refusing_open(self, *args, **kwargs):  # JSON Lines are read as a stream
            if self == data:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "read_bytes", refusing_read)
        monkeypatch.setattr(pathlib.Path, "open", refusing_open)
    argv = eval_args(workdir)
    argv[argv.index("--data") + 1] = str(data)
    try:
        code, _, err = run_cli(capsys, *argv)
    finally:
        data.chmod(0o644)
    assert one_error(code, err) == f"dpokit: error: cannot read {data}: Permission denied"


# ------------------------------------------------------------------ the CLI's safety net


def test_an_os_error_no_command_caught_is_one_line(workdir, monkeypatch, capsys):
    import dpokit.evaluate

    def fails(config, **kwargs):
        raise OSError(errno.ENOSPC, NO_SPACE, "/somewhere/file.bin")

    monkeypatch.setattr(dpokit.evaluate, "run_eval", fails)
    code, _, err = run_cli(capsys, *eval_args(workdir))
    assert one_error(code, err) == f"dpokit: error: /somewhere/file.bin: {NO_SPACE}"


def test_a_programming_error_stays_a_traceback(workdir, monkeypatch):
    import dpokit.evaluate
    from dpokit.cli import main

    def fails(config, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(dpokit.evaluate, "run_eval", fails)
    with pytest.raises(RuntimeError, match="a bug"):
        main(eval_args(workdir))


@pytest.mark.parametrize("stderr", ["closed", "full"])
def test_the_error_report_itself_never_raises(workdir, tmp_path, monkeypatch, stderr):
    """stderr closed, or on a full disk: the error still exits 2, with nothing raised."""
    from dpokit.cli import main

    if stderr == "closed":
        stream = io.StringIO()
        stream.close()
    else:
        class Full(io.StringIO):
            def write(self, text):
                raise no_space()

        stream = Full()
    monkeypatch.setattr("sys.stderr", stream)
    with pytest.raises(SystemExit) as caught:
        main(["eval", "--model", str(tmp_path / "nope"), "--data",
              str(workdir / "prefs.jsonl")])
    assert caught.value.code == 2


class _Ranks:
    """Two ranks' agreement in one process: ``agree(ok)`` is False once either rank failed.
    Rank 1's answers are given (it fails at ``fails_at``, 1-based stage, or never)."""

    def __init__(self, fails_at=None):
        self.fails_at, self.calls = fails_at, 0

    def agree(self, ok):
        self.calls += 1
        return ok and self.calls != self.fails_at


def _save(tmp_path, rank, ranks):
    from dpokit.train.checkpoint import save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"global_step": 2}, rng={}, rank=rank,
                           agree=ranks.agree)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_checkpoint_failing_on_another_rank_stops_this_one(tmp_path, stage):
    """Rank 0 here, the other rank failing while the directory is made or while it writes its
    files (the last stage, checksums and rename, is rank 0's alone): rank 0 does not wait for
    it — it stops with one line, no temporary and no checkpoint left."""
    ranks = _Ranks(fails_at=stage)
    with pytest.raises(DpokitError, match="another rank failed"):
        _save(tmp_path, 0, ranks)
    assert ranks.calls == stage  # no stage after the failed one
    assert leftovers(tmp_path) == [] and not list(tmp_path.glob("checkpoint-*"))


def test_rank_0_failing_stops_the_others(tmp_path, monkeypatch):
    """A full disk on rank 0 while it writes the files: the agreement after that stage says so
    to every rank (here rank 0 itself raises its one line)."""
    import dpokit.train.checkpoint

    def full(*args, **kwargs):
        raise no_space()

    monkeypatch.setattr(dpokit.train.checkpoint, "save_file", full)
    ranks = _Ranks()
    with pytest.raises(DpokitError, match=f"cannot write checkpoint .*{NO_SPACE}"):
        _save(tmp_path, 0, ranks)
    assert ranks.calls == 2 and leftovers(tmp_path) == []


def test_metrics_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    from dpokit.train.records import MetricsLog

    log = MetricsLog(tmp_path, enabled=True, total_steps=1, step=0, progress=False)
    real_open = pathlib.Path.open

    def full(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and "a" in mode:
            raise no_space(self)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", full)
    with pytest.raises(DpokitError) as caught:
        log.write({"step": 1, "loss": 0.5})
    log.close()
    assert str(caught.value) == f"cannot write {tmp_path / 'metrics.jsonl'}: {NO_SPACE}"
