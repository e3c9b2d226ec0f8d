"""Review of ``dpokit.hub``, ``dpokit.train.trackers`` and ``dpokit.train.modelcard``.

Oracles: ``huggingface_hub``'s own reading of the environment (its ``constants``, imported in
a fresh process) and of a cache (``write_tree_cache``, ``validate_repo_id``); TensorBoard's
own event reader (``EventAccumulator``); the run's ``metrics.jsonl`` and config. The network
is forbidden in every test (a connect raises)."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from dpokit.errors import DpokitError
from dpokit.train.config import SFTConfig
from tests.helpers import PROMPTS, read_metrics
from tests.test_hub import COMMIT, cache_repo, model_copy
from tests.train.test_trainer import config


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"dpokit touched the network: connect{args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "hub"
    path.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    return path


# --------------------------------------------------------------------------- hub cache


@pytest.mark.parametrize("env", [
    {}, {"HF_HOME": "/h"}, {"HF_HOME": "~/h"}, {"HF_HOME": "$HOME/h"},
    {"XDG_CACHE_HOME": "/x"}, {"HUGGINGFACE_HUB_CACHE": "~/legacy", "HF_HOME": "/h"},
    {"HF_HUB_CACHE": "/new", "HUGGINGFACE_HUB_CACHE": "/legacy"},
    # set but empty: huggingface_hub's os.getenv(key, default) takes "" (a relative path);
    # dpokit read the next variable instead and looked elsewhere than `hf download` wrote
    {"HF_HOME": ""}, {"XDG_CACHE_HOME": ""}, {"HF_HUB_CACHE": "", "HUGGINGFACE_HUB_CACHE": "/l"},
    {"HUGGINGFACE_HUB_CACHE": ""},
], ids=lambda env: ",".join(f"{k}={v}" for k, v in env.items()) or "unset")
def test_the_cache_is_where_huggingface_hub_reads_it(env, tmp_path):
    """Oracle: ``huggingface_hub.constants.HF_HUB_CACHE`` in a process started with ``env``
    (the empty values failed before the fix)."""
    keys = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME")
    base = {k: v for k, v in os.environ.items() if k not in keys}
    code = ("import json, huggingface_hub.constants as c; from dpokit.hub import hub_cache; "
            "print(json.dumps([c.HF_HUB_CACHE, str(hub_cache())]))")
    done = subprocess.run([sys.executable, "-c", code], env={**base, **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs, ours = json.loads(done.stdout.strip().splitlines()[-1])
    assert os.path.abspath(os.path.join(tmp_path, ours)) == os.path.abspath(
        os.path.join(tmp_path, theirs))


def parquet_repo(tmp_path, shards=3, rows=4):
    """A dataset repository with its train split in ``shards`` Parquet shards, numbered from 0
    as the Hub numbers them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "prefs-src"
    (source / "data").mkdir(parents=True)
    for shard in range(shards):
        table = [{"prompt": PROMPTS[i % len(PROMPTS)], "chosen": " yes good answer",
                  "rejected": f" no bad {shard} {i}"} for i in range(rows)]
        pq.write_table(pa.Table.from_pylist(table),
                       source / "data" / f"train-{shard:05d}-of-{shards:05d}.parquet")
    return source


def test_a_dataset_missing_a_shard_is_refused_not_read_short(tmp_path, cache):
    """An interrupted ``load_dataset``/``hf_hub_download`` leaves a snapshot with the shards it
    got: before the fix 8 of the 12 rows were read, exit 0."""
    from dpokit.data import load_rows

    snapshot = cache_repo(cache, "Org/prefs", parquet_repo(tmp_path), repo_type="dataset")
    assert len(load_rows("Org/prefs", split="train")) == 12
    (snapshot / "data" / "train-00001-of-00003.parquet").unlink()
    with pytest.raises(DpokitError) as error:
        load_rows("Org/prefs", split="train")
    message = str(error.value)
    assert "\n" not in message and "incomplete: 1 shard missing" in message
    assert "data/train-00001-of-00003.parquet" in message
    assert "hf download Org/prefs --repo-type dataset" in message


def test_a_weights_shard_missing_is_named(workdir, tmp_path, cache, tokenizer):
    """A sharded model (transformers numbers its shards from 1) without its last shard: one
    line naming it (before the fix transformers' own error named it too: no regression)."""
    from dpokit.fixtures import tiny_causal_lm
    from dpokit.models import load_causal_lm

    source = tmp_path / "sharded"
    tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=7).save_pretrained(
        source, max_shard_size="20KB")
    tokenizer.save_pretrained(source)
    shards = sorted(source.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    snapshot = cache_repo(cache, "Org/Sharded", source)
    assert load_causal_lm("Org/Sharded") is not None
    (snapshot / shards[-1].name).unlink()
    with pytest.raises(DpokitError, match=rf"incomplete: 1 shard missing \({shards[-1].name}\)"):
        load_causal_lm("Org/Sharded")


def test_an_unfinished_blob_is_refused_unless_the_listing_shows_the_snapshot_whole(
        workdir, tmp_path, cache):
    """A download killed mid-file leaves ``blobs/<etag>.<id>.incomplete`` and no link: the
    snapshot lacks a file nobody can name. Without ``hf download``'s tree listing that is a
    one-line error (before the fix: the snapshot loaded); with a listing, huggingface_hub's
    own completeness check decides (oracle: its ``write_tree_cache``)."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    from dpokit.models import load_causal_lm

    snapshot = cache_repo(cache, "Org/Name", model_copy(workdir, tmp_path))
    repo = snapshot.parent.parent
    (repo / "blobs" / "0123abcd.1a2b3c4d.incomplete").write_bytes(b"\0" * 100)
    with pytest.raises(DpokitError) as error:
        load_causal_lm("Org/Name")
    message = str(error.value)
    assert "\n" not in message and "0123abcd.1a2b3c4d.incomplete" in message
    assert "did not finish" in message and "`hf download Org/Name`" in message

    files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*"))
    entry = TreeCacheEntry(size=1, blob_id="0" * 40, lfs_sha256=None, lfs_size=None,
                           xet_hash=None)
    write_tree_cache(str(repo), COMMIT, {name: entry for name in files})
    assert load_causal_lm("Org/Name").config.model_type == "llama"  # the listing: all there
    write_tree_cache(str(repo), COMMIT, {**{n: entry for n in files}, "extra.bin": entry})
    with pytest.raises(DpokitError, match=r"^model Org/Name: its snapshot .* is incomplete "
                                          r"\(.*extra\.bin.*\); download it again with "
                                          r"`hf download Org/Name`$"):
        load_causal_lm("Org/Name")


def test_a_cache_path_that_is_a_file_is_the_not_found_line(tmp_path, monkeypatch):
    """``scan_cache_dir`` raises ValueError for a file: it was a traceback."""
    from dpokit.models import load_causal_lm

    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "file"))
    with pytest.raises(DpokitError, match=r"^model Org/Name: not a local directory"):
        load_causal_lm("Org/Name")


# --------------------------------------------------------------------------- trackers


def test_a_tracker_failing_mid_run_is_a_warning_and_the_run_completes(workdir, monkeypatch,
                                                                      caplog):
    """TensorBoard raises at step 2 (a full disk, a dead service): before the fix the run died
    with that traceback. Now: one warning naming it and the step, every record in
    metrics.jsonl, final/ written, the tracker closed as failed and fed nothing more."""
    import dpokit.train.trackers as trackers
    from dpokit.train.loop import train

    seen, closed = [], []
    real_log = trackers.TensorBoard.log

    def flaky(self, record):
        seen.append(record["step"])
        if record["step"] == 2:
            raise OSError(28, "No space left on device")
        real_log(self, record)

    monkeypatch.setattr(trackers.TensorBoard, "log", flaky)
    monkeypatch.setattr(trackers.TensorBoard, "close",
                        lambda self, failed: closed.append(failed))
    with caplog.at_level(logging.WARNING, logger="dpokit.train"):
        final = train(config(workdir, "review-flaky", max_steps=4, report_to=["tensorboard"]),
                      progress=False)
    assert (final / "model.safetensors").is_file()
    assert [m["step"] for m in read_metrics(final.parent) if "loss" in m] == [1, 2, 3, 4]
    assert seen == [1, 2] and closed == [True]
    warnings = [r.getMessage() for r in caplog.records if "report_to tensorboard" in
                r.getMessage()]
    assert len(warnings) == 1 and "step 2" in warnings[0] and "No space left" in warnings[0]


def test_a_tracker_that_fails_to_close_neither_fails_the_run_nor_the_others(workdir,
                                                                             monkeypatch):
    import dpokit.train.trackers as trackers

    calls = []

    class Broken:
        def __init__(self, *args, **kwargs):
            pass

        def log(self, record):
            calls.append(("broken", record["step"]))

        def close(self, failed):
            raise RuntimeError("service gone")

    class Fine(Broken):
        def log(self, record):
            calls.append(("fine", record["step"]))

        def close(self, failed):
            calls.append(("closed", failed))

    monkeypatch.setattr(trackers, "_CLASSES", {"tensorboard": Broken, "wandb": Fine})
    started = trackers.start_trackers(["tensorboard", "wandb"], workdir, run_name="r",
                                      project="p", config={})
    for tracker in started:
        tracker.log({"step": 1, "loss": 0.5})
    for tracker in started:
        tracker.close(False)  # before the fix: RuntimeError, Fine never closed
    assert calls == [("broken", 1), ("fine", 1), ("closed", False)]


def _events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(directory))
    reader.Reload()
    return [(e.step, e.value) for e in reader.Scalars("train/loss")]


def test_tensorboard_after_a_resume_shows_what_metrics_jsonl_keeps(tmp_path):
    """A run died at step 5 after its checkpoint at step 2: the resume truncates metrics.jsonl
    to steps 1-2 and redoes 3-4. TensorBoard's reader (the oracle) showed 1,2,3,4,5,3,4 with
    the dead run's values; now it shows each step once, as metrics.jsonl."""
    from dpokit.train.trackers import TensorBoard

    dead = TensorBoard(tmp_path)
    for step in range(1, 6):
        dead.log({"step": step, "loss": float(step)})
    dead.close(failed=True)
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2)))
    time.sleep(1.1)  # a new events file: TensorBoard names them by the second
    resumed = TensorBoard(tmp_path)
    for step in (3, 4):
        resumed.log({"step": step, "loss": 10.0 + step})
    resumed.close(failed=False)
    assert _events(tmp_path / "tensorboard") == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


# --------------------------------------------------------------------------- model card


def _front_matter(card):
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_card_front_matter_names_only_hub_ids(workdir, tmp_path, cache):
    """``base_model`` and ``datasets`` take Hub repository ids (TRL leaves a local base out):
    before the fix a local directory's path — or ``Org/Name@v1`` — was the base_model, which
    the Hub refuses; a hub-named dataset was not named. Oracle: ``validate_repo_id``."""
    from huggingface_hub.utils import validate_repo_id

    from dpokit.train.modelcard import model_card

    local = _front_matter(model_card(config(workdir, "review-card"), [], 3, version="9.9"))
    assert "base_model" not in local and "datasets" not in local
    assert set(local["tags"]) == {"dpokit", "dpo"}

    cache_repo(cache, "Org/Name", model_copy(workdir, tmp_path), refs=("main", "v1"))
    card = model_card(config(workdir, "review-card", model="Org/Name@v1", data="Org/prefs"),
                      [], 3, version="9.9")
    front = _front_matter(card)
    assert front["base_model"] == "Org/Name" and front["datasets"] == ["Org/prefs"]
    validate_repo_id(front["base_model"])
    assert "| Base model | `Org/Name@v1` |" in card  # the revision, in the table


def test_an_adapter_on_a_hub_base_names_the_base_id_not_the_cache(workdir, tmp_path, cache):
    """An adapter whose ``base_model_name_or_path`` is ``Org/Name``: before the fix the
    front matter's base_model was the snapshot's path inside the cache."""
    from dpokit.train.modelcard import model_card

    snapshot = cache_repo(cache, "Org/Name", model_copy(workdir, tmp_path))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "Org/Name", "peft_type": "LORA", "r": 4}))
    cfg = config(workdir, "review-card-adapter")
    cfg.model = str(adapter)  # as given; the card reads the adapter's config
    card = model_card(cfg, [], 1, version="9.9")
    assert _front_matter(card)["base_model"] == "Org/Name"
    assert f"`{snapshot}`" in card or f"`{snapshot.resolve()}`" in card  # the table: on disk


@pytest.mark.parametrize(("settings", "shown"), [
    ({}, "SFT: negative log-likelihood of the completion (prompt masked; of a text row, "
         "every token); each example's per-token mean, averaged over examples"),
    ({"completion_only_loss": False, "loss_normalization": "token"},
     "SFT: negative log-likelihood of every token, prompt included (completion_only_loss "
     "false); summed over the batch's trained tokens / their number"),
    ({"completion_only_loss": None}, "TRL's rule: the completion of prompt-completion rows, "
                                     "every token of messages and text rows"),
    ({"assistant_only_loss": True}, "of the conversation's assistant message;"),
])
def test_the_sft_card_states_which_tokens_were_trained(workdir, settings, shown):
    """Before the fix every SFT card said "the completion tokens", also of a run trained on
    every token (completion_only_loss false)."""
    from dpokit.train.modelcard import model_card

    cfg = config(workdir, "review-card-sft", cls=SFTConfig, **settings)
    (objective,) = [line for line in model_card(cfg, [], 1, version="9.9").splitlines()
                    if line.startswith("| Objective |")]
    assert shown in objective


def test_the_card_metrics_are_those_of_metrics_jsonl(workdir):
    """A real run with evaluation: the card's training table is the last training record, its
    evaluation table the last evaluation record (6 significant digits), its steps the run's."""
    from dpokit.train.loop import train
    from dpokit.train.modelcard import format_number

    final = train(config(workdir, "review-card-run", max_steps=3, report_to=["none"],
                         eval_data=str(workdir / "prefs.jsonl"), eval_steps=2),
                  progress=False)
    card = (final / "README.md").read_text(encoding="utf-8")
    records = read_metrics(final.parent)
    train_record = [r for r in records if "loss" in r][-1]
    eval_record = [r for r in records if "eval/loss" in r][-1]
    assert train_record["step"] == eval_record["step"] == 3
    assert f"Training, the last logged step ({train_record['step']})" in card
    assert f"| loss | {format_number(train_record['loss'])} |" in card
    assert f"| eval/loss | {format_number(eval_record['eval/loss'])} |" in card
    assert "| Steps | 3 |" in card and "β = 0.5" in card
    shutil.rmtree(final.parent)
