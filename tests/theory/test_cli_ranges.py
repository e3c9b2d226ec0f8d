"""Issue 12, "never silently wrong": `dpokit optimal` and `dpokit partition` at the extremes.

Inside the float64 range each value agrees with a 50-digit mpmath oracle to the tolerance stated
in ``solve_optimal``'s docstring (relative 1e-9; absolute 2.3e-308 below the smallest normal
float64); outside it the library raises ``DpokitError`` naming the range and the CLI prints one
line and exits 2. Sizes ``dpokit partition`` cannot do are refused before anything is allocated.
"""

import json
import math

import mpmath as mp
import pytest
import torch

from dpokit.errors import BudgetExceededError, DpokitError
from dpokit.lecture import partition
from dpokit.lecture.outcomes import WORKED_EXAMPLE, read_outcomes_csv, solve
from dpokit.theory import estimate_log_partition, markov_scorer, optimal_policy
from dpokit.theory.enumerate import check_enumeration_budget, log10_count_sequences
from dpokit.theory.kl import kl_divergence, kl_from_log_ratio
from dpokit.theory.optimal import optimal_beta_range, solve_optimal
from tests.helpers import run_cli as run

RTOL = 1e-9
"""The documented tolerance of ``solve_optimal``."""

TINY = 2.3e-308
"""Values below the smallest normal float64 (2.2e-308) are only good to this, absolutely."""

BETAS = [1e-300, 1e-8, 1e-3, 1.0, 1e3, 1e8, 1e15, 1e300]

TABLES = {
    # name: (π_ref, r, the β of BETAS that must be refused)
    "worked example": ([o.ref_prob for o in WORKED_EXAMPLE], [o.reward for o in WORKED_EXAMPLE],
                       {1e300}),
    "mixed signs": ([0.25, 0.35, 0.15, 0.25], [-3.5, 1.25, 2.0, -0.75], {1e300}),
    "tie at the max": ([0.5, 0.3, 0.2], [2.0, 2.0, -1.0], {1e300}),
    "tiny π_ref on the best": ([0.7, 0.3, 1e-300], [0.0, 1.0, 50.0], {1e300}),
    "π_ref-centred rewards": ([0.2, 0.3, 0.5], [1.0, 1.0, -1.0], {1e300}),
    "one outcome off the support": ([0.5, 0.0, 0.5], [1.0, 100.0, -2.0], {1e300}),
    # σ_ref(r) = 1e200: β = 1e300 is fine, but r_max/β overflows at β = 1e-300.
    "huge rewards": ([0.5, 0.5], [1e200, -1e200], {1e-300}),
}


def _textbook(probs, rewards, beta):
    """π*, log Z, KL, E_π*[r], J straight from the definitions (docs/theory.md §2), in mpmath."""
    p = [mp.mpf(x) for x in probs]
    total = mp.fsum(p)
    ref = [x / total for x in p]
    scaled = [mp.mpf(r) / mp.mpf(beta) for r in rewards]
    support = [i for i, x in enumerate(p) if x > 0]
    top = max(scaled[i] for i in support)
    log_z = top + mp.log(mp.fsum(ref[i] * mp.exp(scaled[i] - top) for i in support))
    optimal = [ref[i] * mp.exp(scaled[i] - log_z) if p[i] > 0 else mp.mpf(0)
               for i in range(len(p))]
    return {
        "log_z": log_z,
        "kl": mp.fsum(optimal[i] * (scaled[i] - log_z) for i in support),
        "expected": mp.fsum(optimal[i] * mp.mpf(rewards[i]) for i in support),
        "objective": mp.mpf(beta) * log_z,  # J(π*) = β log Z (§2), the direct J's oracle
        "optimal": optimal,
    }


def oracle(probs, rewards, beta, digits=50):
    """The textbook formulas at a working precision raised until two runs agree to ``digits``.

    The direct Σ π*(r/β − log Z) cancels ~2·log10(β/|r|) digits as β → ∞ and π_ref ~ 1e-300
    needs ~300 more, so 50 significant digits of the result need far more working digits.
    """
    def close(a, b):
        return abs(a - b) <= mp.mpf(10) ** -digits * max(abs(a), abs(b))

    logs = [abs(math.log10(beta))] + [abs(math.log10(abs(x))) for x in (*probs, *rewards) if x]
    work = digits + 30 + 3 * int(sum(sorted(logs)[-3:]))
    with mp.workdps(work):
        previous = _textbook(probs, rewards, beta)
    while True:
        work *= 2
        with mp.workdps(work):
            current = _textbook(probs, rewards, beta)
        keys = ("log_z", "kl", "expected", "objective")
        if all(close(previous[k], current[k]) for k in keys) and all(
                close(a, b) for a, b in zip(previous["optimal"], current["optimal"], strict=True)):
            return current
        assert work < 50_000, "the oracle does not converge"
        previous = current


def assert_within(got, exact, what):
    """|got − exact| ≤ RTOL·|exact| + TINY."""
    error = abs(mp.mpf(got) - exact)
    assert error <= RTOL * abs(exact) + TINY, (
        f"{what}: got {got!r}, exact {mp.nstr(exact, 17)}, relative error "
        f"{mp.nstr(error / abs(exact), 3) if exact else 'inf'}")


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("table", TABLES)
def test_solve_optimal_matches_mpmath_or_refuses_naming_the_range(table, beta):
    """Every value within relative 1e-9 of the 50-digit oracle, or a DpokitError with the range."""
    probs, rewards, refused = TABLES[table]
    ref = torch.tensor(probs, dtype=torch.float64)
    r = torch.tensor(rewards, dtype=torch.float64)
    low, high = optimal_beta_range(ref, r)
    if beta in refused:
        assert not low <= beta <= high
        with pytest.raises(DpokitError, match=r"beta = .* is outside \[") as error:
            solve_optimal(ref, r, beta)
        assert f"[{low:.6g}, {high:.6g}]" in str(error.value)
        return
    assert low <= beta <= high
    got = solve_optimal(ref, r, beta)
    exact = oracle(probs, rewards, beta)
    assert_within(float(got.log_partition), exact["log_z"], "log Z")
    assert_within(float(got.kl_optimal_ref), exact["kl"], "KL(π*‖π_ref)")
    assert_within(float(got.expected_reward), exact["expected"], "E_π*[r]")
    assert_within(float(got.objective), exact["objective"], "J(π*)")
    for i, (p, q) in enumerate(zip(got.optimal_logps.exp().tolist(), exact["optimal"],
                                   strict=True)):
        assert_within(p, q, f"π*(y{i})")


def test_the_reported_extremes_are_fixed():
    """β = 1e8: KL was 30% off, β = 1e15 and 1e308 gave a negative KL, β = 1e-320 log Z = inf."""
    probs = [o.ref_prob for o in WORKED_EXAMPLE]
    rewards = [o.reward for o in WORKED_EXAMPLE]
    for beta in (1e8, 1e15):
        got = solve(WORKED_EXAMPLE, beta)
        assert_within(got.kl_optimal_ref, oracle(probs, rewards, beta)["kl"], "KL")
        # π* → π_ref and KL ≈ Var_ref(r)/(2β²) (second order in 1/β).
        mean = math.fsum(p * r for p, r in zip(probs, rewards, strict=True))
        var = math.fsum(p * (r - mean) ** 2 for p, r in zip(probs, rewards, strict=True))
        assert got.kl_optimal_ref == pytest.approx(var / (2 * beta**2), rel=1e-6)
    for beta in (1e308, 1e-320):
        with pytest.raises(DpokitError, match="outside"):
            solve(WORKED_EXAMPLE, beta)


def test_range_edges_are_as_documented():
    """β_min = |r_max|·1e-308 and β_max = σ_ref(r)·1e150; both ends themselves are accepted."""
    ref = torch.tensor([0.25, 0.75], dtype=torch.float64)
    r = torch.tensor([-2.0, 2.0], dtype=torch.float64)  # r_max = 2, E r = 1, σ = √3
    low, high = optimal_beta_range(ref, r)
    assert low == pytest.approx(2e-308, rel=1e-12)
    assert high == pytest.approx(math.sqrt(3.0) * 1e150, rel=1e-12)
    for beta in (low, high):
        got = solve_optimal(ref, r, beta)
        assert torch.isfinite(got.log_partition) and float(got.kl_optimal_ref) > 0
        assert_within(float(got.kl_optimal_ref),
                      oracle(ref.tolist(), r.tolist(), beta)["kl"], "KL at the edge")
    for beta in (low / 2, high * 2):
        with pytest.raises(DpokitError, match="outside"):
            solve_optimal(ref, r, beta)
    # Constant rewards: π* = π_ref and KL = 0 for every β, so there is no upper end.
    flat = optimal_beta_range(ref, torch.tensor([3.0, 3.0], dtype=torch.float64))
    assert flat[1] == math.inf
    assert float(solve_optimal(ref, torch.tensor([3.0, 3.0]), 1e300).kl_optimal_ref) == 0.0


def test_a_mean_within_rounding_of_a_reward_does_not_fake_a_variance():
    """σ_ref(r) ≈ 5.6e-151 (a 3e-301 mass far away) must not read as the ulp of the mean."""
    ref = torch.tensor([0.532086674278035, 0.7062739372553241, 3.4707599310296734e-301],
                       dtype=torch.float64)
    r = torch.tensor([-1.1102230246251565e-16, -1.1102230246251565e-16, 1.0610478830702688],
                     dtype=torch.float64)
    _, high = optimal_beta_range(ref, r)
    assert high == pytest.approx(0.5617249389799208, rel=1e-6)
    exact = oracle(ref.tolist(), r.tolist(), 0.1)
    assert_within(float(solve_optimal(ref, r, 0.1).kl_optimal_ref), exact["kl"], "KL")


@pytest.mark.parametrize(("values", "message"), [
    (([0.5, 0.5], [1e305, 0.0]), r"rewards\[0\] = 1e\+305: must be finite with \|r\| ≤ 1e300"),
    (([0.5, 0.5], [math.nan, 0.0]), r"rewards\[0\] = nan"),
    (([0.5, math.inf], [0.0, 0.0]), r"ref_probs\[1\] = inf"),
    (([0.5, -0.5], [0.0, 0.0]), r"ref_probs\[1\] = -0.5"),
    (([0.0, 0.0], [0.0, 0.0]), "no outcome with π_ref"),
])
def test_solve_optimal_rejects_bad_inputs(values, message):
    probs, rewards = values
    with pytest.raises(DpokitError, match=message):
        solve_optimal(torch.tensor(probs, dtype=torch.float64),
                      torch.tensor(rewards, dtype=torch.float64), 1.0)


def test_kl_from_log_ratio_is_kl_and_keeps_precision_as_p_nears_q():
    generator = torch.Generator().manual_seed(0)
    log_q = torch.randn(5, 7, generator=generator, dtype=torch.float64).log_softmax(-1)
    log_p = torch.randn(5, 7, generator=generator, dtype=torch.float64).log_softmax(-1)
    torch.testing.assert_close(kl_from_log_ratio(log_q, log_p - log_q),
                               kl_divergence(log_p, log_q), rtol=1e-12, atol=1e-14)
    # p = q·e^t/Σ q e^t with t = ε·u: KL ≈ ε² Var_q(u)/2 = 5e-33, far below kl_divergence's noise.
    q = [0.5, 0.3, 0.2]
    u = [1.0, -1.0, 0.5]
    with mp.workdps(80):
        eps = mp.mpf("1e-16")
        log_norm = mp.log(mp.fsum(qi * mp.exp(eps * ui) for qi, ui in zip(q, u, strict=True)))
        t = [eps * ui - log_norm for ui in u]
        exact = mp.fsum(qi * mp.exp(ti) * ti for qi, ti in zip(q, t, strict=True))
    got = kl_from_log_ratio(torch.tensor(q, dtype=torch.float64).log(),
                            torch.tensor([float(x) for x in t], dtype=torch.float64))
    assert float(got) == pytest.approx(float(exact), rel=1e-12)


def test_optimal_policy_and_log_partition_at_subnormal_beta_give_no_nan():
    """(r − r_max)/β instead of r/β − max r/β: no inf − inf when r/β overflows."""
    ref = torch.tensor([0.8, 0.1, 0.06, 0.04], dtype=torch.float64).log()
    r = torch.tensor([1.0, 8.0, 0.5, 8.0], dtype=torch.float64)
    policy = optimal_policy(ref, r, 1e-320).exp()
    torch.testing.assert_close(policy, torch.tensor([0.0, 0.1 / 0.14, 0.0, 0.04 / 0.14],
                                                    dtype=torch.float64))


def test_estimate_log_partition_refuses_overflowing_beta_and_keeps_minus_inf_rewards():
    with pytest.raises(DpokitError, match=r"beta = .* is below 2e-308"):
        estimate_log_partition(torch.tensor([1.0, 2.0], dtype=torch.float64), 1e-320)
    tiny = estimate_log_partition(torch.tensor([1.0, 2.0], dtype=torch.float64), 1e-300)
    assert float(tiny.log_partition) == pytest.approx(2e300 - math.log(2), rel=1e-15)
    masked = estimate_log_partition(torch.tensor([-math.inf, 0.0], dtype=torch.float64), 1.0)
    assert float(masked.log_partition) == pytest.approx(math.log(0.5))


# ------------------------------------------------------------------------------ CLI: optimal


def assert_one_line_error(code, out, err, *needles):
    assert code == 2 and out == ""
    assert err.startswith("dpokit: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize(("argv", "needles"), [
    (["--beta", "1e-320"], ["beta = 9.99989e-321 is outside [8e-308, 2.13497e+150]",
                            "log Z ≈ r_max/β overflows"]),
    (["--beta", "1e300"], ["beta = 1e+300 is outside [8e-308, 2.13497e+150]",
                           "KL(π*‖π_ref) ≈ Var_ref(r)/(2β²) ≈ 10^-599.6 underflows"]),
    (["--beta", "1,1e308"], ["beta = 1e+308 is outside"]),
    (["-o", "a:0.5:1e200", "-o", "b:0.5:-1e200", "--beta", "1e-300"],
     ["beta = 1e-300 is outside [1e-108, inf]", "|r_max|/β ≈ 10^500.0 exceeds 1e+308"]),
    (["-o", "a:0.5:1e305", "-o", "b:0.5:0"], ["outcome 'a' has reward 1e+305",
                                              "|r| ≤ 1e+300"]),
    (["-o", "a:0.5:nan", "-o", "b:0.5:0"], ["field 'reward': 'nan' is not a finite number"]),
    (["-o", "a:inf:1", "-o", "b:0.5:0"], ["field 'ref_prob': 'inf' is not a finite number"]),
    (["--reward", "cats=-inf"], ["rewards 'cats=-inf', field 'value': '-inf' is not a finite"]),
])
def test_optimal_refusals_are_one_line_with_exit_2(capsys, argv, needles):
    assert_one_line_error(*run(capsys, "optimal", *argv), *needles)


def test_optimal_large_beta_through_the_cli_is_accurate(capsys):
    code, out, _ = run(capsys, "optimal", "--beta", "1e8,1e15,1e-300", "--json")
    assert code == 0
    probs = [o.ref_prob for o in WORKED_EXAMPLE]
    rewards = [o.reward for o in WORKED_EXAMPLE]
    for row in json.loads(out):
        exact = oracle(probs, rewards, row["beta"])
        assert_within(row["kl_optimal_ref"], exact["kl"], f"KL at β = {row['beta']}")
        assert_within(row["log_partition"], exact["log_z"], f"log Z at β = {row['beta']}")
        assert_within(row["objective"], exact["objective"], f"J at β = {row['beta']}")


@pytest.mark.parametrize("content", [
    "name,ref_prob,reward\na,0.5,1\nb,nan,0\n",
    "name,ref_prob,reward\na,0.5,1\nb,0.5,inf\n",
])
def test_csv_non_finite_values_name_the_row(tmp_path, capsys, content):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    code, out, err = run(capsys, "optimal", "--csv", str(path))
    assert_one_line_error(code, out, err, str(path), "row 2 (line 3)", "is not a finite number")


def test_csv_with_a_utf8_byte_order_mark(tmp_path, capsys):
    """Spreadsheets write a BOM; it must not stick to the first column's name."""
    path = tmp_path / "bom.csv"
    path.write_text("name,ref_prob,reward\ncats,0.8,1\ndogs,0.2,0\n", encoding="utf-8-sig")
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    table = read_outcomes_csv(path)
    assert [(o.name, o.ref_prob, o.reward) for o in table] == [("cats", 0.8, 1.0),
                                                               ("dogs", 0.2, 0.0)]
    code, out, _ = run(capsys, "optimal", "--csv", str(path), "--json")
    assert code == 0
    assert [o["name"] for o in json.loads(out)["outcomes"]] == ["cats", "dogs"]


# ---------------------------------------------------------------------------- CLI: partition

SMALL = ["--rate", "1e6", "--max-length", "2", "--space-vocab", "3", "--space-length", "2",
         "--beta", "1", "--repeats", "2", "--json"]
"""A partition run that takes well under a second with ``--samples`` (list flags add up, so
that one is given by each test; later scalar flags override these)."""


@pytest.mark.parametrize(("argv", "needles"), [
    (["--samples", "1000000000"], ["samples = 1,000,000,000 (--samples)", "repeats = 20",
                                   "3.87e+03 GiB", "the limit is 2 GiB",
                                   "samples × repeats ≤ 10,324,440"]),
    (["--repeats", "1000000000"], ["(--repeats)", "the limit is 2 GiB"]),
    (["--max-length", "10000"], ["max_length = 10,000 (--max-length)", "the limit is 1,000"]),
    (["--max-length", "64"], ["max_length = 64 (--max-length) needs Σ_(t≤T) V^t ≈ 7.53e+300",
                              "max_length ≤ 63 for vocab_size = 50,257"]),
    (["--rate", "1e-300"], ["rate = 1e-300 (--rate)", "past float64's range"]),
    (["--space-vocab", "100", "--space-length", "10"],
     ["(--space-vocab, --space-length): V^T ≈ 1e+20 sequences", "limit is 1.678e+07 (2^24)"]),
    (["--space-vocab", "20000", "--space-length", "1"],
     ["the space needs about 23.8 GiB of memory; the limit is 2 GiB"]),
    (["--beta", "1e-320"], ["beta = 9.99989e-321 (--beta) is outside [", "r/β overflows"]),
    (["--beta", "1e8"], ["beta = 1e+08 (--beta) is outside [", "rounding of π_ref"]),
])
def test_partition_refusals_are_one_line_with_exit_2(capsys, argv, needles):
    # The defaults, with the rate given so that nothing is measured first.
    assert_one_line_error(*run(capsys, "partition", "--rate", "1e6", *argv), *needles)


def test_partition_monte_carlo_just_inside_the_memory_limit_runs(capsys, monkeypatch):
    limit = partition.monte_carlo_bytes(3, 2, 50, 2)
    monkeypatch.setattr(partition, "MAX_STUDY_BYTES", limit)
    code, out, err = run(capsys, "partition", *SMALL, "--samples", "50")
    assert code == 0, err
    assert [r["num_samples"] for r in json.loads(out)["monte_carlo"]] == [50]
    assert_one_line_error(*run(capsys, "partition", *SMALL, "--samples", "51"),
                          "samples = 51 (--samples)", "samples × repeats ≤ 100")


def test_partition_space_just_inside_the_enumeration_limit(monkeypatch):
    """V^T = 2^24 exactly is allowed (checked on the exact count, not on rounded logs)."""
    partition.check_space(2, 24)
    partition.check_space(4096, 2)
    with pytest.raises(DpokitError, match=r"V\^T ≈ 3.36e\+07 .* limit is 1.678e\+07 \(2\^24\)"):
        partition.check_space(2, 25)
    monkeypatch.setattr(partition, "MAX_STUDY_BYTES", partition.space_bytes(6, 5))
    partition.check_space(6, 5)
    with pytest.raises(DpokitError, match="space needs about"):
        partition.check_space(7, 5)


def test_partition_growth_table_up_to_its_limit(capsys):
    rows = partition.growth_table(partition.GPT2_VOCAB_SIZE, 63, rate=1e6)
    assert rows[-1].exactly == 50257**63 and rows[-1].up_to == sum(50257**t for t in range(1, 64))
    assert rows[-1].seconds_up_to == pytest.approx(rows[-1].up_to / 1e6, rel=1e-15)
    assert math.log10(rows[-1].up_to) == pytest.approx(
        log10_count_sequences(50257, 63, all_lengths=True), rel=1e-14)
    code, out, err = run(capsys, "partition", *SMALL, "--max-length", "63", "--samples", "10")
    assert code == 0, err
    assert len(json.loads(out)["growth"]) == 63
    with pytest.raises(DpokitError, match="max_length ≤ 63"):
        partition.growth_table(partition.GPT2_VOCAB_SIZE, 64, rate=1e6)


def test_partition_beta_just_inside_its_range_is_accurate():
    """At β_max = 1e5·max|r| the exact log Z still agrees with mpmath to 1e-9."""
    space = partition.builtin_space()
    low, high = partition.space_beta_range(space)
    [exact] = partition.exact_partitions(space, [high])
    from dpokit.theory import iter_sequences, markov_logps, token_additive_reward

    sequences = torch.cat(list(iter_sequences(space.vocab_size, space.length)))
    with mp.workdps(60):
        log_z = mp.log(mp.fsum(
            mp.exp(mp.mpf(lp) + mp.mpf(r) / mp.mpf(high)) for lp, r in zip(
                markov_logps(sequences, space.log_init, space.log_trans).tolist(),
                token_additive_reward(sequences, space.token_rewards).tolist(), strict=True)))
    assert exact.enumerated == pytest.approx(float(log_z), rel=RTOL)
    assert exact.recursion == pytest.approx(float(log_z), rel=RTOL)
    partition.check_space_betas(space, [low, high])
    with pytest.raises(DpokitError, match=r"\(--beta\) is outside"):
        partition.check_space_betas(space, [high * 1.01])


def test_enumeration_past_int64_is_refused_from_its_log_size():
    """No probe, no huge integer: 2^63 sequences cannot be indexed, say so with the size."""
    scorer = markov_scorer(torch.zeros(2), torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(BudgetExceededError, match=r"2\^63 ≈ 9.22e\+18 sequences") as error:
        check_enumeration_budget(scorer, 2, 63)
    assert "int64" in str(error.value)
    with pytest.raises(BudgetExceededError, match=r"50257\^1000000 ≈ .*e\+4701\d\d"):
        check_enumeration_budget(scorer, 50257, 10**6)
    with pytest.raises(BudgetExceededError, match="over the budget"):
        check_enumeration_budget(scorer, 2, 62)  # fits int64: timed on a probe, over budget
