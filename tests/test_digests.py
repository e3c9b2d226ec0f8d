"""dpokit.digests: a remembered weight digest is the file's SHA-256 while the file is the same,
and never once it changed (in place, replaced, touched back to its old time stamp)."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from dpokit import digests
from dpokit.digests import file_sha256
from dpokit.objectives.reference import hash_directory

MiB = 1 << 20


def _oracle(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def counted(monkeypatch):
    """Count the files actually read; no racy window (the tests write files just before)."""
    reads = []
    real = digests._sha256

    def sha(path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(digests, "_sha256", sha)
    monkeypatch.setattr(digests, "RACY_S", 0.0)
    return reads


def _write(path, seed: int, size: int = 2 * MiB) -> None:
    path.write_bytes(bytes([seed % 251]) * size)


def test_digest_is_sha256_and_remembered(tmp_path, counted):
    weights = tmp_path / "model.safetensors"
    _write(weights, 1)
    time.sleep(0.02)  # past the time-stamp tick of the write
    memo = tmp_path / "memo"
    assert file_sha256(weights, memo) == _oracle(weights)
    assert file_sha256(weights, memo) == _oracle(weights)
    assert len(counted) == 1  # the second call read the memo, not the 2 MiB
    assert file_sha256(weights) == _oracle(weights)  # no memo directory: always read
    assert len(counted) == 2


def test_rewritten_in_place_with_old_mtime_is_hashed_again(tmp_path, counted):
    """Same size, same inode, mtime set back (as cp -p or a careful tool would): ctime moved."""
    weights = tmp_path / "model.safetensors"
    _write(weights, 1)
    old = os.stat(weights)
    time.sleep(0.02)
    memo = tmp_path / "memo"
    first = file_sha256(weights, memo)
    time.sleep(0.02)
    with weights.open("r+b") as handle:  # in place: the inode stays
        handle.write(b"\x07" * 10)
    os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert os.stat(weights).st_ino == old.st_ino and os.stat(weights).st_size == old.st_size
    time.sleep(0.02)
    second = file_sha256(weights, memo)
    assert second == _oracle(weights) != first


def test_replaced_file_is_hashed_again(tmp_path, counted):
    weights = tmp_path / "model.safetensors"
    _write(weights, 1)
    time.sleep(0.02)
    memo = tmp_path / "memo"
    first = file_sha256(weights, memo)
    new = tmp_path / "new.safetensors"
    _write(new, 2)
    os.replace(new, weights)  # a download or cp: another inode at the same path
    time.sleep(0.02)
    assert file_sha256(weights, memo) == _oracle(weights) != first


def test_recently_modified_file_is_not_remembered(tmp_path, monkeypatch):
    """Inside the racy window a write later in the same tick would leave the identity equal:
    hash, but do not remember."""
    reads = []
    real = digests._sha256
    monkeypatch.setattr(digests, "_sha256", lambda p: reads.append(p) or real(p))
    weights = tmp_path / "model.safetensors"
    _write(weights, 3)
    memo = tmp_path / "memo"
    assert file_sha256(weights, memo) == _oracle(weights)
    assert not memo.exists() or not any(memo.iterdir())
    assert file_sha256(weights, memo) == _oracle(weights)
    assert len(reads) == 2


def test_changed_while_read_is_not_remembered(tmp_path, counted, monkeypatch):
    weights = tmp_path / "model.safetensors"
    _write(weights, 4)
    time.sleep(0.02)
    memo = tmp_path / "memo"
    real = digests._sha256

    def read_then_append(path):
        digest = real(path)
        time.sleep(0.02)
        with open(path, "ab") as handle:  # a writer still at work
            handle.write(b"more")
        return digest

    monkeypatch.setattr(digests, "_sha256", read_then_append)
    file_sha256(weights, memo)
    assert not memo.exists() or not any(memo.iterdir())


@pytest.mark.parametrize("memo_text", ["{not json", "[1, 2]", '{"path": 3}'])
def test_broken_memo_is_ignored(tmp_path, counted, memo_text):
    weights = tmp_path / "model.safetensors"
    _write(weights, 5)
    time.sleep(0.02)
    memo = tmp_path / "memo"
    file_sha256(weights, memo)
    for record in memo.iterdir():
        record.write_text(memo_text)
    assert file_sha256(weights, memo) == _oracle(weights)
    assert len(counted) == 2


def test_unwritable_memo_directory_still_hashes(tmp_path, counted):
    weights = tmp_path / "model.safetensors"
    _write(weights, 6)
    time.sleep(0.02)
    blocked = tmp_path / "file"
    blocked.write_text("a file where the memo directory would be")
    assert file_sha256(weights, blocked / "memo") == _oracle(weights)


def test_hash_directory_memo_equals_plain_and_sees_changes(tmp_path, counted):
    model = tmp_path / "model"
    model.mkdir()
    _write(model / "model-00001-of-00002.safetensors", 7)
    _write(model / "model-00002-of-00002.safetensors", 8)
    (model / "config.json").write_text('{"a": 1}')
    (model / "notes.md").write_text("not part of the weights")
    time.sleep(0.02)
    memo = tmp_path / "memo"
    plain = hash_directory(model)
    assert hash_directory(model, memo) == plain
    before = len(counted)
    assert hash_directory(model, memo) == plain
    assert len(counted) - before == 1  # config.json (small) only: the shards were remembered
    (model / "notes.md").write_text("changed")
    assert hash_directory(model, memo) == plain
    time.sleep(0.02)
    with (model / "model-00002-of-00002.safetensors").open("r+b") as handle:
        handle.seek(MiB)
        handle.write(b"\x01")
    time.sleep(0.02)
    changed = hash_directory(model, memo)
    assert changed != plain and changed == hash_directory(model)
    (model / "model-00002-of-00002.safetensors").rename(model / "model-2.safetensors")
    assert hash_directory(model, memo) != changed  # names count too


def test_reference_table_follows_weights_rewritten_in_place(workdir, tmp_path, counted,
                                                            monkeypatch):
    """End to end: a second run reuses the cached reference table without reading the weights
    again; weights rewritten in place (same size, the old mtime put back) compute a new table."""
    monkeypatch.setattr(digests, "MEMO_MIN_BYTES", 0)  # the tiny model's 184 kB are remembered
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from dpokit.config import load_config
    from dpokit.train.config import DPOConfig
    from dpokit.train.loop import train

    model = tmp_path / "llama"
    shutil.copytree(workdir / "llama", model)
    weights = model / "model.safetensors"
    time.sleep(0.02)

    def run(out):
        values = {"model": str(model), "data": str(workdir / "prefs.jsonl"),
                  "output_dir": str(tmp_path / out), "batch_size": 4, "max_steps": 1,
                  "save_steps": None, "max_length": 64, "precompute_ref_logps": True}
        train(load_config(DPOConfig, None, {k: v if isinstance(v, str) else json.dumps(v)
                                            for k, v in values.items()}), progress=False)
        return set((tmp_path / ".dpokit_cache").glob("*.safetensors"))

    first = run("one")
    assert len(first) == 1
    read = {p.name for p in counted}
    assert weights.name in read
    counted.clear()
    assert run("two") == first  # the table reused ...
    assert weights.name not in {p.name for p in counted}  # ... and the weights not hashed
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.5
    stat = os.stat(weights)
    save_file(tensors, tmp_path / "edited.safetensors", metadata={"format": "pt"})
    edited = (tmp_path / "edited.safetensors").read_bytes()
    assert len(edited) == stat.st_size
    time.sleep(0.02)
    with weights.open("r+b") as handle:
        handle.write(edited)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    time.sleep(0.02)
    third = run("three")
    assert len(third - first) == 1  # new weights, a new table


def test_tokenised_data_cache_follows_data_rewritten_in_place(workdir, tmp_path, counted,
                                                              monkeypatch):
    """The data's digest is remembered too: a second load reads the entry without reading the
    data file; the same file rewritten in place (same size, old mtime put back) is a new key,
    its new rows tokenised — never the old entry's."""
    import json

    from dpokit.data import load_preference_pairs
    from dpokit.models import load_tokenizer

    monkeypatch.setattr(digests, "MEMO_MIN_BYTES", 0)
    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "the cat", "chosen": " sat on the mat", "rejected": " no"},
            {"prompt": "a bird", "chosen": " flew", "rejected": " sat on a tree"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    time.sleep(0.02)
    cache = tmp_path / "cache"
    tokenizer = load_tokenizer(workdir / "llama")

    def chosen():
        pairs = load_preference_pairs(data, tokenizer, cache_dir=cache, progress=False)
        return [tokenizer.decode(list(p.chosen_ids)) for p in pairs]

    first = chosen()
    assert any(p.name == data.name for p in counted)
    counted.clear()
    assert chosen() == first
    assert not any(p.name == data.name for p in counted)  # remembered
    stat = os.stat(data)
    text = data.read_text().replace(" sat on the mat", " ran to the sea")
    assert len(text.encode()) == stat.st_size
    time.sleep(0.02)
    with data.open("r+", encoding="utf-8") as handle:
        handle.write(text)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    time.sleep(0.02)
    again = chosen()
    assert again != first and "ran to the sea" in again[0]
