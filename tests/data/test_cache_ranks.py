"""The tokenised-data cache under torchrun (issue 14, data at scale): a node's local rank 0
tokenises a missing entry while its other ranks wait and then read it — once a node, not once
a rank — and a rank 0 that cannot cache (a full disk) or refuses the data never leaves the
others waiting: they do what it did."""

import json
import shutil
import textwrap

import pytest

from tests.helpers import torchrun

SCRIPT = textwrap.dedent("""
    import json, logging, sys, time
    from pathlib import Path

    import dpokit.atomic as atomic
    import dpokit.data.cache as data_cache
    import dpokit.data.prepare as prepare
    from dpokit.data import load_preference_pairs
    from dpokit.errors import DpokitError
    from dpokit.models import load_tokenizer
    from dpokit.runtime import setup_runtime, shutdown_runtime

    data, model, cache, mode = sys.argv[1:5]
    runtime = setup_runtime("cpu")
    logging.basicConfig(level=logging.INFO, format=f"rank {runtime.rank}: %(message)s")
    data_cache.NodePeers.WAIT_LOG_S = 1.0  # a wait past it is said, and waited on
    data_cache.NodePeers.START_GRACE_S = 4.0
    built = []
    prepare_items = prepare.prepare_items

    def counted(*args, **kwargs):
        built.append(1)
        if runtime.rank == 0:
            time.sleep(3)  # rank 1 has long reached the cache by now
        return prepare_items(*args, **kwargs)

    prepare.prepare_items = counted
    if mode == "full-disk" and runtime.rank == 0:
        def no_space(*args, **kwargs):
            raise OSError(28, "No space left on device")
        atomic.replace = no_space
    if mode == "elsewhere" and runtime.rank == 0:
        data = data + ".other.jsonl"  # rank 0 never loads the file rank 1 waits for
    try:
        pairs = load_preference_pairs(data, load_tokenizer(model), cache_dir=Path(cache))
        out = {"pairs": [[list(p.chosen_ids), list(p.rejected_ids)] for p in pairs]}
    except DpokitError as error:
        out = {"error": str(error)}
    print("RESULT " + json.dumps({"rank": runtime.rank, "built": len(built), **out}), flush=True)
    shutdown_runtime(runtime)
""")


@pytest.fixture
def run(workdir, tmp_path):
    script = tmp_path / "load.py"
    script.write_text(SCRIPT)
    model = tmp_path / "model"
    shutil.copytree(workdir / "llama", model)

    def go(data, mode="plain"):
        cache = tmp_path / "cache"
        done = torchrun(script, data, model, cache, mode, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        results = [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines()
                   if line.startswith("RESULT ")]
        entries = [p for p in cache.glob("*") if (p / "meta.json").is_file()] \
            if cache.exists() else []
        return {r["rank"]: r for r in results}, entries, done.stderr
    return go


def test_local_rank_0_tokenises_and_the_other_rank_reads_its_entry(run, workdir):
    ranks, entries, log = run(workdir / "prefs.jsonl")
    assert "rank 1: waiting for local rank 0 to tokenise" in log
    assert "rank 1: " + str(workdir / "prefs.jsonl") + ": 48 tokenised examples read" in log
    assert sorted(ranks) == [0, 1]
    # rank 1 waited for rank 0's entry instead of tokenising the same rows again
    assert ranks[0]["built"] == 1 and ranks[1]["built"] == 0
    assert ranks[0]["pairs"] == ranks[1]["pairs"] and len(ranks[0]["pairs"]) == 48
    assert len(entries) == 1


def test_a_rank_0_that_cannot_cache_lets_the_other_rank_tokenise(run, workdir):
    ranks, entries, _ = run(workdir / "prefs.jsonl", mode="full-disk")
    # rank 0 built and could not cache (it trains on what it built); rank 1, woken and
    # finding no entry, built its own (which it could cache)
    assert ranks[0]["built"] == 1 and ranks[1]["built"] == 1
    assert ranks[0]["pairs"] == ranks[1]["pairs"] and len(ranks[0]["pairs"]) == 48
    assert len(entries) == 1  # rank 1's


def test_data_rank_0_refuses_is_refused_by_every_rank_without_waiting(run, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": " b"}) + "\n")
    ranks, entries, _ = run(data)
    assert ranks[0]["built"] == 1 and ranks[1]["built"] == 1
    assert "row 2" in ranks[0]["error"] and ranks[1]["error"] == ranks[0]["error"]
    assert not entries


def test_a_rank_whose_local_rank_0_never_reaches_its_data_tokenises_it(run, workdir, tmp_path):
    """Rank 0 loads another file (a launcher that numbers ranks otherwise, say): rank 1 waits
    START_GRACE_S for word of rank 0 on its data, then tokenises it itself — no hang."""
    data = tmp_path / "prefs.jsonl"
    shutil.copy(workdir / "prefs.jsonl", data)
    shutil.copy(workdir / "prefs.jsonl", tmp_path / "prefs.jsonl.other.jsonl")
    ranks, entries, log = run(data, mode="elsewhere")
    assert ranks[0]["built"] == 1 and ranks[1]["built"] == 1
    assert "rank 1: local rank 0 has not reached" in log
    assert ranks[0]["pairs"] == ranks[1]["pairs"] and len(entries) == 2  # one file each
