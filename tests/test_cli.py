"""The command line: outputs agree with the library, errors are one line with exit status 2."""

import json
import math
import subprocess
import sys

import pytest

from dpokit.lecture.outcomes import WORKED_EXAMPLE
from dpokit.theory import markov_log_partition
from tests.helpers import run_cli as run


def brute_force(ref_probs, rewards, beta):
    weights = [p * math.exp(r / beta) for p, r in zip(ref_probs, rewards, strict=True)]
    z = math.fsum(weights)
    return [w / z for w in weights], z


def test_optimal_default_is_the_worked_example(capsys):
    code, out, err = run(capsys, "optimal")
    assert code == 0 and err == ""
    probs, z = brute_force([o.ref_prob for o in WORKED_EXAMPLE],
                           [o.reward for o in WORKED_EXAMPLE], 1.0)
    assert "this is a" in out and "reward function" in out and "cats" in out
    assert f"{probs[1]:.6g}" in out and f"{probs[0]:.6g}" in out
    assert f"log Z = {math.log(z):.6g}" in out
    assert probs[1] > 0.99  # the lecture: almost all mass moves onto "reward function"


def test_optimal_json_single_beta(capsys):
    code, out, _ = run(capsys, "optimal", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) >= {"beta", "log_partition", "kl_optimal_ref", "outcomes"}
    assert data["beta"] == 1.0
    names = [o["name"] for o in data["outcomes"]]
    assert names == [o.name for o in WORKED_EXAMPLE]
    ref = [o["ref_prob"] for o in data["outcomes"]]
    rewards = [o["reward"] for o in data["outcomes"]]
    probs, z = brute_force(ref, rewards, 1.0)
    assert [o["optimal_prob"] for o in data["outcomes"]] == pytest.approx(probs, rel=1e-12)
    assert data["log_partition"] == pytest.approx(math.log(z), rel=1e-12)
    kl = math.fsum(p * math.log(p / q) for p, q in zip(probs, ref, strict=True))
    assert data["kl_optimal_ref"] == pytest.approx(kl, rel=1e-10)
    # J(π*) computed directly equals its maximum β log Z.
    assert data["objective"] == pytest.approx(data["beta"] * data["log_partition"], rel=1e-12)


def test_optimal_sweep_json_and_table(capsys):
    code, out, _ = run(capsys, "optimal", "--beta", "0.5,2", "-b", "10", "--json")
    assert code == 0
    data = json.loads(out)
    assert [d["beta"] for d in data] == [0.5, 2.0, 10.0]
    # Larger β keeps π* closer to π_ref.
    kls = [d["kl_optimal_ref"] for d in data]
    assert kls[0] > kls[1] > kls[2]
    code, out, _ = run(capsys, "optimal", "--beta", "0.5,2,10")
    assert code == 0 and "β sweep" in out and "π* β=10" in out


def test_optimal_outcomes_from_flags_and_overrides(capsys):
    code, out, _ = run(capsys, "optimal", "-o", "a:0.5:0", "-o", "b:0.5:1", "--reward", "a=1",
                       "--json")
    assert code == 0
    data = json.loads(out)
    # Equal rewards after the override: π* = π_ref.
    assert [o["optimal_prob"] for o in data["outcomes"]] == pytest.approx([0.5, 0.5])
    assert data["log_partition"] == pytest.approx(1.0)


def test_optimal_from_csv(tmp_path, capsys):
    path = tmp_path / "outcomes.csv"
    path.write_text("name,ref_prob,reward\nx,0.25,2\ny,0.75,-1\n", encoding="utf-8")
    code, out, _ = run(capsys, "optimal", "--csv", str(path), "--beta", "0.5", "--json")
    assert code == 0
    data = json.loads(out)
    probs, _ = brute_force([0.25, 0.75], [2.0, -1.0], 0.5)
    assert [o["optimal_prob"] for o in data["outcomes"]] == pytest.approx(probs, rel=1e-12)


@pytest.mark.parametrize(("argv", "message"), [
    (["optimal", "--beta", "0"], "error: beta must be a finite number > 0, got 0.0"),
    (["optimal", "--beta", "-1"], "error: beta must be a finite number > 0"),
    (["optimal", "--beta", "abc"], "betas: expected float, got 'abc'"),
    (["optimal", "-o", "a:0.5:0", "-o", "b:0.6:1"], "sum to 1.1"),
    (["optimal", "-o", "a:-0.5:0", "-o", "b:1.5:1"], "must be finite and ≥ 0"),
    (["optimal", "-o", "a:0.5"], "expected NAME:REF_PROB:REWARD"),
    (["optimal", "-o", "a:x:0"], "field 'ref_prob': 'x' is not a number"),
    (["optimal", "-o", "a:0.5:0", "-o", "a:0.5:1"], "listed twice"),
    (["optimal", "--reward", "unicorns=3"], "unknown outcome 'unicorns'"),
    (["optimal", "--ref-prob", "cats"], "expected NAME=VALUE"),
    (["optimal", "--csv", "/nonexistent/outcomes.csv"], "cannot read /nonexistent/outcomes.csv"),
    (["optimal", "--no-such-flag"], "No such option"),
    (["partition", "--samples", "1"], "error: samples must all be ≥ 2"),
    (["partition", "--repeats", "0"], "error: repeats must be ≥ 1"),
    (["figures", "--rate", "0"], "error: rate must be a finite number > 0"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("dpokit: error: ") and err.count("\n") == 1
    assert message in err
    assert "Traceback" not in err


def test_normalize_rescales_instead_of_refusing(capsys):
    code, out, _ = run(capsys, "optimal", "-o", "a:1:0", "-o", "b:3:0", "--normalize", "--json")
    assert code == 0
    assert [o["ref_prob"] for o in json.loads(out)["outcomes"]] == [0.25, 0.75]


@pytest.mark.parametrize(("content", "message"), [
    ("name,ref_prob\na,1\n", "missing column 'reward'"),
    ("name,ref_prob,reward\na,0.5,1\nb,0.5,oops\n", "row 2 (line 3), field 'reward': 'oops'"),
    ("name,ref_prob,reward\n,1,1\n", "row 1 (line 2), field 'name': empty outcome name"),
    ("name,ref_prob,reward\n", "no data rows"),
])
def test_csv_errors_name_file_row_and_field(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    code, _, err = run(capsys, "optimal", "--csv", str(path))
    assert code == 2 and err.count("\n") == 1
    assert str(path) in err and message in err


def test_csv_that_is_not_text(tmp_path, capsys):
    path = tmp_path / "binary.csv"
    path.write_bytes(b"\xff\xfe\x00\x81name")
    code, _, err = run(capsys, "optimal", "--csv", str(path))
    assert code == 2 and "not a readable UTF-8 CSV" in err and err.count("\n") == 1


def test_partition_json_agrees_with_theory(capsys):
    code, out, _ = run(capsys, "partition", "--json", "--max-length", "3", "--rate", "1e6",
                       "--space-vocab", "3", "--space-length", "3", "--beta", "2,0.2",
                       "--samples", "50,500", "--repeats", "30")
    assert code == 0
    data = json.loads(out)
    assert [row["exactly"] for row in data["growth"]] == [50257, 50257**2, 50257**3]
    assert data["growth"][1]["seconds_exactly"] == pytest.approx(50257**2 / 1e6)
    assert data["rate_measured"] is False
    for exact in data["exact"]:
        assert exact["enumerated"] == pytest.approx(exact["recursion"], rel=1e-12)
    rows = {(r["beta"], r["num_samples"]): r for r in data["monte_carlo"]}
    assert len(rows) == 4
    # The Monte-Carlo error is larger at the smaller β, for each sample size.
    assert rows[(0.2, 50)]["rmse_log"] > rows[(2.0, 50)]["rmse_log"]
    assert rows[(0.2, 500)]["rmse_log"] > rows[(2.0, 500)]["rmse_log"]


def test_partition_exact_matches_recursion_for_the_builtin_space(capsys):
    from dpokit.lecture.partition import builtin_space

    code, out, _ = run(capsys, "partition", "--json", "--max-length", "2", "--rate", "10",
                       "--beta", "1", "--samples", "10", "--repeats", "2")
    assert code == 0
    space = builtin_space()
    expected = float(markov_log_partition(space.log_init, space.log_trans, space.token_rewards,
                                          1.0, space.length))
    assert json.loads(out)["exact"][0]["enumerated"] == pytest.approx(expected, rel=1e-12)


def test_figures_write_every_png(tmp_path, capsys):
    from dpokit.lecture.figures import FIGURES

    out_dir = tmp_path / "figs"
    code, out, _ = run(capsys, "figures", "--out", str(out_dir), "--rate", "1e7")
    assert code == 0
    for name in FIGURES:
        data = (out_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
        assert name in out
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(FIGURES)  # no temp files left


def test_figures_into_a_file_path_is_a_user_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "figures", "--out", str(blocker / "sub"))
    assert code == 2 and "cannot create output directory" in err


@pytest.mark.parametrize("launcher", [
    [sys.executable, "-m", "dpokit"],
    [str(__import__("pathlib").Path(sys.executable).with_name("dpokit"))],
])
def test_entry_points_behave_the_same(launcher):
    ok = subprocess.run([*launcher, "optimal", "--json"], capture_output=True, text=True,
                        check=False)
    assert ok.returncode == 0 and json.loads(ok.stdout)["beta"] == 1.0
    bad = subprocess.run([*launcher, "optimal", "--beta", "0"], capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 2
    assert bad.stderr == "dpokit: error: beta must be a finite number > 0, got 0.0\n"
