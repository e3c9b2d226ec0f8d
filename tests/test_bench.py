"""A smoke run of the benchmark's code path (dpokit only, tiny model, a few steps)."""

import json

from tests.helpers import run_cli


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code, stdout, err = run_cli(capsys, "bench", "--workdir", str(tmp_path / "bench"),
                                "--models", "tiny", "--settings", "default", "--steps", "5",
                                "--repeats", "1", "--frameworks", "dpokit", "--json", str(out))
    assert code == 0, err
    help_row, row = json.loads(out.read_text())
    assert help_row["setting"] == "cli_help" and 0 < help_row["wall_seconds"] < 60
    assert "dpokit --help:" in stdout
    assert row["framework"] == "dpokit" and row["model"] == "tiny"
    assert row["seconds_per_step"] > 0 and row["pairs_per_second"] > 0
    # a ratio of two timings taken at different moments: on a loaded machine the matmul peak
    # can be measured low (1.57 seen under make test's two workers); < 10 still catches a FLOP
    # count off by an order of magnitude
    assert 0 < row["peak_fraction"] < 10 and row["peak_rss_mb"] > 50
    assert 100 < row["tokens_per_pair"] < 250  # prompts ~41 + two completions ~54
    assert row["end_to_end_seconds"] > 0 and row["end_to_end_runs"] == [row["end_to_end_seconds"]]
    assert "dpokit  tiny" in stdout


def test_bench_rejects_unknown_names(tmp_path, capsys):
    code, _, err = run_cli(capsys, "bench", "--models", "huge")
    assert code == 2 and "models: unknown huge" in err


def test_bench_cuda_needs_a_device(tmp_path, capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, _, err = run_cli(capsys, "bench", "--workdir", str(tmp_path), "--models", "tiny",
                           "--frameworks", "dpokit", "--device", "cuda")
    assert code == 2 and "no CUDA device" in err


def test_bench_online_smoke(tmp_path, capsys):
    """The on-policy setting runs dpokit train --online with the benchmark's reward callable."""
    from dpokit.bench_online import length_reward

    assert length_reward(["p"] * 2, [" a b", " " + "w " * 12]) == [-10.0, 0.0]
    out = tmp_path / "rows.json"
    code, stdout, err = run_cli(capsys, "bench", "--workdir", str(tmp_path / "bench"),
                                "--models", "tiny", "--settings", "online", "--steps", "4",
                                "--repeats", "1", "--frameworks", "dpokit", "--no-end-to-end",
                                "--json", str(out))
    assert code == 0, err
    _, row = json.loads(out.read_text())
    assert row["setting"] == "online" and row["seconds_per_step"] > 0
    assert row["pairs_per_second"] > 0 and "online" in stdout


def test_a_run_past_its_memory_limit_is_named_out_of_memory():
    """The bench's address-space cap turns an allocation past it into a one-line row error
    (not the kernel's OOM killer taking the machine): a child asking for 2 GB under 1.5 GB."""
    import subprocess
    import sys

    from dpokit.bench import _limit_memory, _run_error

    code = "import torch; torch.ones(2**20); torch.empty(2**31, dtype=torch.uint8)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          preexec_fn=_limit_memory(1.5), check=False)
    assert done.returncode != 0
    assert _run_error(done.stderr, done.returncode, 1.5) == (
        "out of memory past the 1.5 GB limit of a run; it asked for 2.0 GB more")
    dpokit_line = ("dpokit: error: step 3: out of memory on cpu (it asked for 2.00 GiB more) in "
                   "a micro-batch of 2 pairs, …")  # the trainer's own line (no allocator text)
    assert _run_error(dpokit_line, 2, 1.5) == (
        "out of memory past the 1.5 GB limit of a run; it asked for 2.0 GB more")
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          preexec_fn=_limit_memory(None), check=False)
    assert free.returncode == 0, free.stderr  # no cap: the same 2 GB is fine


def test_json_rows_are_written_as_they_come(tmp_path, monkeypatch):
    """``--json`` was written once, at the end: a benchmark interrupted after an hour of rows
    (Ctrl-C, a TRL crash in a later setting) left no file. Now each row is kept as it is
    measured (atomically), so the file holds every row finished before the interruption."""
    import pytest

    from dpokit import bench
    from dpokit.cli.training import _bench

    monkeypatch.setattr(bench, "build_fixtures", lambda workdir, models: bench.Fixture(tmp_path))
    monkeypatch.setattr(bench, "help_seconds", lambda: 0.05)
    monkeypatch.setattr(bench, "matmul_peak_gflops", lambda **kw: 100.0)
    monkeypatch.setattr(bench, "_param_counts", lambda fixture, model: (1000, 1000))
    monkeypatch.setattr(bench, "_tokens_per_pair", lambda fixture, model: 10.0)

    def runs(frameworks, repeats, args, memory_limit_gb=None):
        if args[2] == "no_ckpt_precompute":
            raise KeyboardInterrupt
        return {f: [{"seconds_per_step": 0.5, "peak_rss_mb": 100.0, "start_rss_mb": 50.0}]
                for f in frameworks}

    monkeypatch.setattr(bench, "_alternating_runs", runs)
    out = tmp_path / "rows.json"
    config = bench.BenchConfig(workdir=str(tmp_path), models=["tiny"],
                               settings=["default", "no_ckpt_precompute"], frameworks=["dpokit"],
                               end_to_end=False, json=str(out))
    with pytest.raises(KeyboardInterrupt):
        _bench(config)
    help_row, row = json.loads(out.read_text())
    assert help_row["setting"] == "cli_help" and row["setting"] == "default"
    assert row["seconds_per_step"] == 0.5 and row["pairs_per_second"] == bench.BATCH / 0.5
