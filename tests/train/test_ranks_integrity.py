"""From a review: what two torchrun processes (gloo on CPU) do before and around the first
step — the reference pass and its cache, the tokenised-data cache's coordination, the memory plan —
against one process, and when one rank's view (a cache entry, the data, memory) is not the
other's. A rank that cannot go on must stop every rank with a line, never leave another
waiting in a collective (a hang until ddp_timeout) or dying in one (a gloo traceback)."""

import json
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import k_completion_rows, read_metrics, torchrun, write_jsonl

DPOKIT = [sys.executable, "-m", "dpokit"]
RANK_TRACEBACK = re.compile(r"\[rank\d+\]: Traceback")
"""A worker's uncaught exception (torchrun prefixes each worker's lines; its own
ChildFailedError traceback at the end of every failed job is not one)."""


def train_args(workdir, data, out, *extra):
    return ["train", "--model", str(workdir / "llama"), "--data", str(data), "--output-dir",
            str(out), "--max-length", "64", "--device", "cpu", "--beta", "0.5",
            "--logging-steps", "1", "--lr-scheduler", "constant", "--learning-rate", "1e-3",
            *extra]


def one_process(*argv):
    done = subprocess.run([*DPOKIT, *map(str, argv)], capture_output=True, text=True,
                          check=False, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _env():
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


def wrapper(tmp_path, body):
    """A script that runs ``body`` (with ``rank`` set) and then the dpokit CLI on its argv."""
    script = tmp_path / "wrapped.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        rank = int(os.environ["RANK"])
    """) + textwrap.dedent(body) + textwrap.dedent("""
        from dpokit.cli import main
        main(sys.argv[1:])
    """))
    return script


# ------------------------------------------------------------------ the reference pass


@pytest.mark.slow  # a combination that held (make test-slow)
def test_two_process_reference_tables_equal_one_process_with_groups_max_steps_and_eval(
        workdir, tmp_path):
    """Oracle: k-completion groups (all pairs), a max_steps that uses a subset of the rows, and
    evaluation rows. The two-process tables (each rank's share, all-reduced) are the
    one-process tables bit for bit — the same rows computed, the others NaN, in data order —
    under the same cache names (so either run's file serves the other), and so are the
    losses (a micro-batch reads its own rows)."""
    rows = k_completion_rows()
    data = write_jsonl(tmp_path / "k.jsonl", rows)
    evaluation = write_jsonl(tmp_path / "k-eval.jsonl", rows[:5])
    common = ["--eval-data", evaluation, "--pairs-from-scores", "all", "--max-steps", "2",
              "--save-steps", "1000"]
    one_process(*train_args(workdir, data, tmp_path / "one" / "run", "--batch-size", "4",
                            *common))
    done = torchrun("-m", "dpokit", *train_args(workdir, data, tmp_path / "two" / "run",
                                                "--batch-size", "2", *common))
    assert done.returncode == 0, done.stderr[-3000:]
    one = {p.name: load_file(str(p))["ref_logps"]
           for p in (tmp_path / "one" / ".dpokit_cache").glob("*.safetensors")}
    two = {p.name: load_file(str(p))["ref_logps"]
           for p in (tmp_path / "two" / ".dpokit_cache").glob("*.safetensors")}
    assert sorted(one) == sorted(two) and len(one) == 2  # training rows, evaluation rows
    partial = 0
    for name, table in one.items():
        assert torch.equal(table.isnan(), two[name].isnan())
        assert torch.equal(table.nan_to_num(0.0), two[name].nan_to_num(0.0))
        partial += int(table.isnan().any())
    assert partial == 1  # max_steps 2 uses some of the training rows only
    for a, b in zip(read_metrics(tmp_path / "one" / "run"), read_metrics(tmp_path / "two" / "run"),
                    strict=True):
        key = "loss" if "loss" in a else "eval/loss"
        assert a[key] == pytest.approx(b[key], abs=1e-5)


def test_a_reference_table_another_job_writes_between_the_ranks_reads_does_not_hang(
        workdir, tmp_path):
    """A sweep: two jobs (same model, data and settings, say two betas) share the cache beside
    their run directories. The other job's table lands just after this job's rank 0 found no
    entry and just before rank 1 looks: rank 0 computes its share and all-reduces, rank 1
    reads the file and goes to the barrier — mismatched collectives. Every rank must take
    the same decision (read, or compute); before, the job hung until ddp_timeout (20 s here,
    1800 s by default) and died with gloo tracebacks."""
    data = workdir / "prefs.jsonl"
    common = ["--max-steps", "2", "--save-steps", "1000"]
    other = tmp_path / "other"
    other_cache = str(other / ".dpokit_cache")
    one_process(*train_args(workdir, data, other / "run", "--batch-size", "4", *common))
    script = wrapper(tmp_path, f"""
        import shutil, time
        from pathlib import Path
        import dpokit.train.setup as setup

        if rank == 1:  # not a change to dpokit: the other job's write, at this moment
            original = setup.read_table

            def read_table(cache_file, *args, **kwargs):
                time.sleep(2)  # rank 0 has looked, found nothing, and is computing
                for table in Path({other_cache!r}).glob("*.safetensors"):
                    target = cache_file.parent / table.name
                    if not target.exists():
                        shutil.copy(table, target)
                return original(cache_file, *args, **kwargs)

            setup.read_table = read_table
    """)
    done = torchrun(script, *train_args(workdir, data, tmp_path / "sweep" / "run",
                                        "--batch-size", "2", "--ddp-timeout", "20", *common),
                    timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not RANK_TRACEBACK.search(done.stderr), done.stderr[-3000:]


def test_a_reference_pass_failure_on_one_rank_stops_every_rank_with_a_line(workdir, tmp_path):
    """Rank 1 runs out of memory at one pair a batch while rank 0 is already in the table's
    all-reduce. Rank 1 says its one line (exit 2); rank 0 must stop with a line too, as
    on_main's refusals do ('rank 0 refused the run'), not with gloo's 'Connection closed by
    peer' traceback."""
    out = tmp_path / "runs" / "run"
    script = wrapper(tmp_path, """
        import dpokit.objectives.reference as reference

        if rank == 1:
            def logps(self, batch):
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried "
                                   "to allocate 8589934592 bytes. Error code 12 (Cannot "
                                   "allocate memory)")
            reference.Reference.logps = logps
    """)
    done = torchrun(script, *train_args(workdir, workdir / "prefs.jsonl", out, "--batch-size",
                                        "2", "--max-steps", "2", "--ddp-timeout", "60"),
                    timeout=150)
    assert done.returncode != 0
    assert "reference pass over the training examples: out of memory" in done.stderr
    # rank 0 says so — unless torchrun SIGTERMs it first, once rank 1 has exited (no hang,
    # no traceback either way)
    assert ("the reference pass failed on rank 1 (its message is above)" in done.stderr
            or "exitcode  : -15" in done.stderr), done.stderr[-3000:]
    assert "Connection closed by peer" not in done.stderr, done.stderr[-3000:]
    assert not RANK_TRACEBACK.search(done.stderr), done.stderr[-3000:]


def test_a_reference_cache_rank_0_cannot_write_only_warns(workdir, tmp_path):
    """A file stands where the cache directory should be: rank 0 cannot write the table while
    rank 1 is past the pass. As the tokenised-data cache, it warns and the run trains on the
    table it has — every rank, no traceback, the same steps as a run with a cache."""
    out = tmp_path / "runs" / "run"
    out.parent.mkdir()
    (out.parent / ".dpokit_cache").write_text("not a directory\n")
    args = ["--batch-size", "2", "--max-steps", "2", "--ddp-timeout", "60"]
    done = torchrun(wrapper(tmp_path, ""),
                    *train_args(workdir, workdir / "prefs.jsonl", out, *args), timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "could not cache the reference log-probs" in done.stderr
    assert "is a file, not a directory" in done.stderr
    assert not RANK_TRACEBACK.search(done.stderr), done.stderr[-3000:]
    cached = tmp_path / "cached" / "run"
    done = torchrun(wrapper(tmp_path, ""),
                    *train_args(workdir, workdir / "prefs.jsonl", cached, *args), timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(read_metrics(out), read_metrics(cached), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


# ------------------------------------------------------------------------ the memory plan


@pytest.mark.slow  # a combination that held (make test-slow)
def test_the_memory_plan_is_one_decision_when_the_ranks_memory_differs(workdir, tmp_path):
    """Rank 0 has memory to spare, rank 1 none: both plan from the all-reduced minimum, so
    both halve the micro-batch to one pair (and recompute whole layers) — the same forwards on
    every rank — and the run's losses are one process's at batch 1 × 4 accumulation."""
    script = wrapper(tmp_path, """
        import atexit, json
        import dpokit.memory
        from dpokit.objectives.dpo import DPOObjective

        dpokit.memory.available_bytes = lambda device, **_: 2**40 if rank == 0 else 0
        sizes, forward = [], DPOObjective.forward

        def counted(self, policy, batch):
            sizes.append(batch.num_pairs)
            return forward(self, policy, batch)

        DPOObjective.forward = counted
        atexit.register(lambda: print("SIZES " + json.dumps([rank, sizes]), flush=True))
    """)
    out = tmp_path / "two" / "run"
    done = torchrun(script, *train_args(workdir, workdir / "prefs.jsonl", out, "--batch-size",
                                        "4", "--max-steps", "2", "--save-steps", "1000"))
    assert done.returncode == 0, done.stderr[-3000:]
    sizes = dict(json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines()
                 if line.startswith("SIZES "))
    assert sizes == {0: [1] * 8, 1: [1] * 8}
    one_process(*train_args(workdir, workdir / "prefs.jsonl", tmp_path / "one" / "run",
                            "--batch-size", "1", "--gradient-accumulation-steps", "8",
                            "--max-steps", "2", "--save-steps", "1000",
                            "--gradient-checkpointing", "true"))
    for a, b in zip(read_metrics(tmp_path / "one" / "run"), read_metrics(out), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


# ------------------------------------------------------------- the tokenised-data cache


CACHE_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    from pathlib import Path

    import torch.distributed as dist

    import dpokit.data.cache as data_cache
    from dpokit.data import load_preference_pairs
    from dpokit.errors import DpokitError
    from dpokit.models import load_tokenizer
    from dpokit.runtime import setup_runtime, shutdown_runtime

    data, model, cache = sys.argv[1:4]
    runtime = setup_runtime("cpu", timeout_s=20)
    logging.basicConfig(level=logging.INFO, format=f"rank {runtime.rank}: %(message)s")
    data_cache.NodePeers.WAIT_LOG_S = 1.0
    tokenizer = load_tokenizer(model)
    if runtime.rank == 1:
        dist.barrier()  # rank 0 has read the data (and the data has changed since)
    try:
        pairs = load_preference_pairs(data, tokenizer, cache_dir=Path(cache))
        out = {"pairs": len(pairs)}
    except DpokitError as error:
        out = {"error": str(error)}
    if runtime.rank == 0:
        # the data is replaced (a sync job finishing) just after rank 0 has read it
        with open(data, "a") as handle:
            handle.write(json.dumps({"prompt": "new", "chosen": " a", "rejected": " b"}) + "\\n")
        dist.barrier()
    print("RESULT " + json.dumps({"rank": runtime.rank, **out}), flush=True)
    dist.barrier()  # the run's next collective (training's write_config, say)
    shutdown_runtime(runtime)
""")


def test_data_replaced_between_the_ranks_reads_does_not_leave_a_rank_waiting(workdir,
                                                                            tmp_path):
    """Rank 0 keys and tokenises the data; the file is then replaced before rank 1 keys it.
    Rank 1's key is not rank 0's, so it waits for a signal rank 0 never gives (rank 0 built and
    signalled another key) — before, with no deadline, while rank 0 waited for it in the next
    collective: a hang until ddp_timeout (20 s here). Now each rank comes out of the load:
    rank 0 with its pairs, rank 1 with a one-line refusal of data that changed (training on
    other rows than rank 0 would be silently wrong)."""
    data = shutil.copy(workdir / "prefs.jsonl", tmp_path / "prefs.jsonl")
    model = tmp_path / "model"
    shutil.copytree(workdir / "llama", model)
    script = tmp_path / "load.py"
    script.write_text(CACHE_SCRIPT)
    done = torchrun(script, data, model, tmp_path / "cache", timeout=150)
    results = {json.loads(line.split(" ", 1)[1])["rank"] for line in done.stdout.splitlines()
               if line.startswith("RESULT ")}
    assert results == {0, 1}, done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    by_rank = {r["rank"]: r for r in map(lambda line: json.loads(line.split(" ", 1)[1]), (
        line for line in done.stdout.splitlines() if line.startswith("RESULT ")))}
    assert by_rank[0]["pairs"] == 48  # rank 0's read, before the change
    assert "changed between this rank's read and local rank 0's" in by_rank[1]["error"]
