"""dpokit.atomic: a target is replaced whole or not at all, and no temporary is left behind."""

import os

import pytest

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
