"""Models and data named as on the Hub (``Org/Name``), found in a Hugging Face cache laid out on
disk the way ``huggingface_hub`` lays it out (checked with its own ``scan_cache_dir``), with the
network forbidden in every test: a connect raises."""

import hashlib
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch

from dpokit.data import load_rows
from dpokit.errors import DpokitError
from dpokit.hub import hub_cache
from dpokit.models import load_causal_lm, load_tokenizer
from dpokit.rewards import RewardModel, load_reward
from dpokit.train.fingerprint import directory_identity
from tests.helpers import PROMPTS, run_cli

COMMIT = "a" * 40
OLD_COMMIT = "b" * 40


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"dpokit touched the network: connect{args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache that ``HF_HUB_CACHE`` names."""
    path = tmp_path / "hub"
    path.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    return path


def cache_repo(cache, repo_id, source, *, commit=COMMIT, refs=("main",), repo_type="model"):
    """Move ``source``'s files into the cache as ``huggingface_hub`` stores them:
    ``{type}s--Org--Name/blobs/<sha256>``, ``snapshots/<commit>/<path>`` a relative symlink to
    its blob, ``refs/<ref>`` holding the commit hash (no newline). Returns the snapshot."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        if blob.exists():
            file.unlink()
        else:
            shutil.move(file, blob)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def model_copy(workdir, tmp_path, kind="llama", seed=None, tokenizer=None):
    """A fresh copy of ``workdir/kind`` (or a tiny model of another seed) to move into blobs."""
    from dpokit.fixtures import tiny_causal_lm

    target = tmp_path / f"src-{kind}-{seed}"
    if seed is None:
        shutil.copytree(workdir / kind, target)
    else:
        tiny_causal_lm(kind, vocab_size=len(tokenizer), seed=seed).save_pretrained(target)
        tokenizer.save_pretrained(target)
    return target


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_layout_is_the_one_huggingface_hub_reads(workdir, tmp_path, cache):
    from huggingface_hub import scan_cache_dir

    cache_repo(cache, "Org/Name", model_copy(workdir, tmp_path))
    info = scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type) == ("Org/Name", "model")
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT and revision.refs == {"main"}
    assert {f.file_name for f in revision.files} >= {"config.json", "model.safetensors"}


def test_a_cached_model_loads_as_its_directory(workdir, tmp_path, cache, caplog):
    """The same weights and tokenizer as the directory; the resolution logged once."""
    snapshot = cache_repo(cache, "Org/Name", model_copy(workdir, tmp_path))
    with caplog.at_level(logging.INFO, logger="dpokit.models"):
        model = load_causal_lm("Org/Name")
        tokenizer = load_tokenizer("Org/Name")
        load_causal_lm("Org/Name", what="reference model")
    assert same_weights(model, load_causal_lm(workdir / "llama"))
    assert tokenizer.get_vocab() == load_tokenizer(workdir / "llama").get_vocab()
    lines = [r.getMessage() for r in caplog.records if r.name == "dpokit.models"]
    assert lines == [f"model Org/Name → {snapshot.resolve()}"]
    assert directory_identity("Org/Name") == directory_identity(workdir / "llama")


def test_a_revision_pins_a_commit_or_a_ref(workdir, tmp_path, cache, tokenizer):
    """``main`` is the default; ``@<commit>`` and ``@<tag>`` pick an older snapshot."""
    cache_repo(cache, "Org/Name", model_copy(workdir, tmp_path, seed=8, tokenizer=tokenizer),
               commit=OLD_COMMIT, refs=("v1",))
    cache_repo(cache, "Org/Name", model_copy(workdir, tmp_path))
    latest, old = load_causal_lm(workdir / "llama"), load_causal_lm(f"Org/Name@{OLD_COMMIT}")
    assert same_weights(load_causal_lm("Org/Name"), latest)
    assert not same_weights(old, latest)
    assert same_weights(load_causal_lm("Org/Name@v1"), old)
    assert same_weights(load_causal_lm(f"Org/Name@{COMMIT}"), latest)


def test_an_absent_name_is_one_line_naming_the_cache_and_the_download(cache):
    with pytest.raises(DpokitError) as error:
        load_causal_lm("Org/Missing")
    assert str(error.value) == (
        f"model Org/Missing: not a local directory and not in the Hugging Face cache (looked "
        f"in {cache}); download it with `hf download Org/Missing` (or pass a local directory)")
    with pytest.raises(DpokitError, match=r"^model Org/Missing@v2: .* at revision v2 .*"
                                          r"`hf download Org/Missing --revision v2`"):
        load_tokenizer("Org/Missing@v2")


def test_an_absent_revision_of_a_cached_repo(workdir, tmp_path, cache):
    cache_repo(cache, "Org/Name", model_copy(workdir, tmp_path))
    with pytest.raises(DpokitError) as error:
        load_causal_lm("Org/Name@nope", what="ref_model")
    assert str(error.value) == (
        f"ref_model Org/Name@nope: not a local directory and not in the Hugging Face cache at "
        f"revision nope (looked in {cache}, which holds it at {COMMIT} (main)); download it "
        f"with `hf download Org/Name --revision nope` (or pass a local directory)")


@pytest.mark.parametrize("name", ["a/b/c", "Org/", "Org/Name@", "-Org/x", "Org/x--y", "one"])
def test_what_is_no_repo_id_keeps_the_directory_message(cache, name):
    shown = re.escape(str(Path(name)))
    with pytest.raises(DpokitError, match=f"^model directory not found: {shown} "):
        load_causal_lm(name)


def test_a_local_directory_named_like_a_repo_wins(workdir, tmp_path, cache, monkeypatch, caplog):
    cache_repo(cache, "Org/Name", model_copy(workdir, tmp_path))  # a llama in the cache
    shutil.copytree(workdir / "gpt2", tmp_path / "here" / "Org" / "Name")
    monkeypatch.chdir(tmp_path / "here")
    with caplog.at_level(logging.INFO, logger="dpokit.models"):
        model = load_causal_lm("Org/Name")
    assert model.config.model_type == "gpt2"
    assert not [r for r in caplog.records if r.name == "dpokit.models"]


def test_hf_home_is_read_when_called(workdir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache() == tmp_path / "home" / "hub"
    cache_repo(tmp_path / "home" / "hub", "Org/Name", model_copy(workdir, tmp_path))
    assert load_causal_lm("Org/Name").config.model_type == "llama"


def test_a_cached_reward_model_by_name(tmp_path, cache, tokenizer):
    from tests.test_rewards import _classifier

    source = tmp_path / "rm"
    _classifier(tokenizer).save_pretrained(source)
    tokenizer.save_pretrained(source)
    cache_repo(cache, "Org/RM", source)
    reward = load_reward("Org/RM")
    assert isinstance(reward, RewardModel)
    assert len(reward(["the cat"], [" sat"])) == 1
    with pytest.raises(DpokitError, match=r"^reward model Org/Gone: not a local directory"):
        load_reward("Org/Gone")


def preference_repo(tmp_path, train_rows=12, test_rows=4):
    """A dataset repository as the Hub holds one: Parquet shards per split under data/."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "prefs-src"
    (source / "data").mkdir(parents=True)
    for split, count in (("train", train_rows), ("test", test_rows)):
        rows = [{"prompt": PROMPTS[i % len(PROMPTS)], "chosen": " yes good answer",
                 "rejected": f" no bad {split} {i}"} for i in range(count)]
        pq.write_table(pa.Table.from_pylist(rows),
                       source / "data" / f"{split}-00000-of-00001.parquet")
    (source / "README.md").write_text("---\nlicense: mit\n---\n# prefs\n")
    (source / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    return source


def test_a_cached_dataset_reads_by_split(tmp_path, cache, caplog):
    snapshot = cache_repo(cache, "Org/prefs", preference_repo(tmp_path), repo_type="dataset")
    with caplog.at_level(logging.INFO, logger="dpokit.data"):
        train = load_rows("Org/prefs", split="train")
    assert len(train) == 12 and train[0].fields["rejected"] == " no bad train 0"
    assert train[0].source == str(snapshot.resolve() / "data" / "train-00000-of-00001.parquet")
    assert f"dataset Org/prefs → {snapshot.resolve()}" in caplog.messages
    assert [r.fields["rejected"] for r in load_rows("Org/prefs", split="test")][-1] == (
        " no bad test 3")
    with pytest.raises(DpokitError, match="shards of several splits \\(test, train\\)"):
        load_rows("Org/prefs")


def test_an_absent_dataset_names_the_repo_type(cache, tmp_path, monkeypatch):
    with pytest.raises(DpokitError) as error:
        load_rows("Org/prefs")
    assert str(error.value) == (
        f"data Org/prefs: not a local file or directory and not in the Hugging Face cache "
        f"(looked in {cache}); download it with `hf download Org/prefs --repo-type dataset` "
        f"(or pass a local file or directory)")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DpokitError, match=r"^data not found: data/prefs\.jsonl$"):
        load_rows("data/prefs.jsonl")  # a file name is never a repository


@pytest.mark.parametrize("flags", [
    pytest.param(["--no-precompute-ref-logps"], id="reference-each-step"),
    pytest.param([], id="reference-precomputed"),
])
def test_train_a_cached_model_on_a_cached_dataset(workdir, tmp_path, cache, capsys, flags):
    """``dpokit train --model Org/Name --data Org/prefs --split train`` end to end (DPO), with
    no network."""
    cache_repo(cache, "Org/Name", model_copy(workdir, tmp_path))
    cache_repo(cache, "Org/prefs", preference_repo(tmp_path), repo_type="dataset")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", "Org/Name", "--data", "Org/prefs",
                           "--split", "train", "--max-steps", "1", "--batch-size", "4",
                           "--max-length", "64", "--output-dir", str(out), *flags)
    assert code == 0, err
    assert (out / "final" / "model.safetensors").is_file()
    assert "model: Org/Name" in (out / "config.yaml").read_text()


def test_eval_takes_a_cached_dataset_by_name(workdir, tmp_path, cache, capsys):
    cache_repo(cache, "Org/Name", model_copy(workdir, tmp_path))
    cache_repo(cache, "Org/prefs", preference_repo(tmp_path), repo_type="dataset")
    code, out, err = run_cli(capsys, "eval", "--model", "Org/Name", "--data", "Org/prefs",
                             "--split", "train", "--max-length", "64", "--json")
    assert code == 0, err
    assert json.loads(out)["num_pairs"] > 0
