"""dpokit.atomic: a target is replaced whole or not at all, and no temporary is left behind."""

import os
from pathlib import Path

import pytest

from dpokit import atomic
from dpokit.atomic import atomic_path, temporary_sibling, write_jsonl, write_text


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out" / "a.txt"  # the parent is created
    write_text(target, "one")
    write_text(target, "two")
    assert target.read_text() == "two" and _siblings(target) == ["a.txt"]
    write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}, {"b": [2]}])
    assert (tmp_path / "rows.jsonl").read_text() == '{"a": 1}\n{"b": [2]}\n'


def test_a_failed_write_keeps_the_old_target(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and _siblings(target) == ["a.txt"]


def test_a_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "final"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "model.bin").write_text("v1")
        (tmp / "extra").write_text("only in v1")
    with atomic_path(target, directory=True) as tmp:
        assert (target / "model.bin").read_text() == "v1"  # the old one is intact meanwhile
        (tmp / "model.bin").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["model.bin"]
    assert (target / "model.bin").read_text() == "v2" and _siblings(target) == ["final"]
    with pytest.raises(KeyboardInterrupt), atomic_path(target, directory=True) as tmp:
        (tmp / "model.bin").write_text("v3")
        raise KeyboardInterrupt
    assert (target / "model.bin").read_text() == "v2" and _siblings(target) == ["final"]


def test_temporary_names(tmp_path):
    """Unique per process by default; one name for every rank of a run with ``shared``."""
    path = tmp_path / "checkpoint-5"
    assert temporary_sibling(path).name == f".checkpoint-5.{os.getpid()}.tmp"
    assert temporary_sibling(path, shared=True).name == ".checkpoint-5.tmp"


def test_a_stale_temporary_is_cleared(tmp_path):
    target = tmp_path / "final"
    stale = temporary_sibling(target, shared=True)
    stale.mkdir()
    (stale / "junk").write_text("from a crashed run")
    with atomic_path(target, directory=True, shared=True) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "ok").write_text("1")
    assert _siblings(target) == ["final"] and (target / "ok").is_file()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fds' paths from /proc")
def test_what_is_renamed_into_place_is_on_the_disk_first(tmp_path, monkeypatch):
    """Every file and directory of a new target is fsync'ed before the rename that puts it in
    place, and the parent directory after it (so a power loss cannot leave a renamed, empty
    checkpoint): the order of os.fsync and os.replace calls, read back from /proc."""
    events = []
    fsync, rename = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", str(dst)))
        rename(src, dst)

    exchange = atomic._exchange

    def recording_exchange(a, b):
        swapped = exchange(a, b)
        if swapped:
            events.append(("replace", str(b)))
        return swapped

    target = tmp_path / "checkpoint-2"
    target.mkdir()
    (target / "old.txt").write_text("old")
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(atomic, "_exchange", recording_exchange)
    with atomic_path(target, directory=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "state.json").write_text("{}")
    monkeypatch.undo()
    first_rename = next(i for i, (kind, _) in enumerate(events) if kind == "replace")
    synced = {path for kind, path in events[:first_rename] if kind == "fsync"}
    tmp_name = str(tmp)
    assert {f"{tmp_name}/model.safetensors", f"{tmp_name}/sub/state.json", f"{tmp_name}/sub",
            tmp_name} <= synced
    renames = [path for kind, path in events if kind == "replace"]
    assert renames[-1] == str(target)  # swapped, or the old one aside and the new one in place
    assert events[-1] == ("fsync", str(tmp_path))  # the parent, after the rename
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert not (target / "old.txt").exists()


def _exchanges_here(tmp_path) -> bool:
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.mkdir()
    (a / "in-a").touch()
    swapped = atomic._exchange(a, b)
    if swapped:
        assert (b / "in-a").exists() and not any(a.iterdir())
    atomic.discard(a)
    atomic.discard(b)
    return swapped


def test_a_directory_target_is_never_missing_while_it_is_replaced(tmp_path, monkeypatch):
    """Where the system swaps two directories in one step (Linux ``renameat2``), the target
    holds the old or the new directory at every moment: no rename leaves it missing (a crash
    between the two renames of the fallback left it only as ``.<name>.<pid>.old``), and the
    old one is deleted from the temporary's place only once the new one is in."""
    if not _exchanges_here(tmp_path):
        pytest.skip("this file system or kernel cannot exchange two paths")
    target = tmp_path / "checkpoint-4"
    target.mkdir()
    (target / "weights").write_text("old")
    renames, seen = [], []
    rename, discard = os.replace, atomic.discard
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append(b), rename(a, b)))

    def checking_discard(path):
        seen.append(((target / "weights").read_text(), (Path(path) / "weights").read_text()))
        discard(path)

    monkeypatch.setattr(atomic, "discard", checking_discard)
    with atomic_path(target, directory=True) as tmp:
        (tmp / "weights").write_text("new")
    monkeypatch.undo()
    assert renames == []  # no rename: the target was never moved away
    assert seen == [("new", "old")]  # the old one, deleted after the swap, from tmp's place
    assert (target / "weights").read_text() == "new" and _siblings(target) == ["checkpoint-4"]


def test_the_two_rename_fallback_still_replaces_a_directory(tmp_path, monkeypatch):
    """Where no exchange is possible (another OS, an old kernel), the old directory is moved
    aside, the new one put in place, and the old one deleted: the same result."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "final"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_path(target, directory=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert _siblings(target) == ["final"]


def test_exchange_of_a_missing_path_is_an_os_error(tmp_path):
    if not _exchanges_here(tmp_path):
        pytest.skip("this file system or kernel cannot exchange two paths")
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError):
        atomic._exchange(tmp_path / "a", tmp_path / "missing")
    assert (tmp_path / "a").is_dir()
