"""Every registered loss against its float64 oracle; f-divergence scores; extreme log-ratios.

Tolerances: float64 against the oracles to rel 1e-10 / abs 1e-12 (both sides are float64; the
oracle's plain formulas lose a few ulps to cancellation). Extreme inputs: only finiteness.
"""

import math

import numpy as np
import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.losses import (
    F_DIVERGENCES,
    LOSSES,
    dpo_loss,
    f_divergence_scores,
    hyper_parameters,
    loss_names,
)
from tests.losses.batches import random_pairs, run
from tests.losses.oracles import ORACLES, Pairs, Params, score

SUPPORTS_F = [name for name, spec in LOSSES.items() if spec.supports_f_divergence]
F_SETTINGS = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
              ("alpha_divergence", 1.01),
              ("alpha_divergence", 0.2), ("alpha_divergence", 1.7), ("alpha_divergence", 1.0)]


def test_every_registered_loss_has_an_oracle():
    """A new loss without an oracle (or an oracle for a removed loss) fails here."""
    assert set(loss_names()) == set(ORACLES)


def test_every_hyper_parameter_has_an_oracle_setting():
    """``Params`` carries a value for each declared hyper-parameter, so the oracles can use it."""
    assert set(Params(beta=1.0).hyper_parameters()) == set(hyper_parameters())


def test_f_settings_cover_every_divergence():
    """The f-divergence tests below exercise every divergence dpokit knows."""
    assert {f for f, _ in F_SETTINGS} | {"reverse_kl"} == set(F_DIVERGENCES)


def _params(name: str, beta: float, **kw) -> Params:
    eps = 0.1 if LOSSES[name].uses_label_smoothing else 0.0
    return Params(beta=beta, eps=eps, tau=0.05, gamma=0.5, delta=0.3, odpo_alpha=0.7,
                  dpop_lambda=3.0, **kw)


@pytest.mark.parametrize("name", loss_names())
@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_matches_oracle(name, beta):
    """Random float64 batches, three seeds: per-pair losses equal the oracle."""
    for seed in range(3):
        pairs, params = random_pairs(seed), _params(name, beta)
        losses, *_ = run(pairs, params, name)
        np.testing.assert_allclose(losses.numpy(), ORACLES[name](pairs, params),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", SUPPORTS_F)
@pytest.mark.parametrize(("f", "alpha"), F_SETTINGS)
def test_f_divergence_matches_oracle(name, f, alpha):
    """Non-default f-divergences change the scores exactly as the oracle's f'(π_θ/π_ref)."""
    pairs, params = random_pairs(7, spread=2.0), _params(name, 0.3, f=f, alpha=alpha)
    losses, *_ = run(pairs, params, name)
    np.testing.assert_allclose(losses.numpy(), ORACLES[name](pairs, params),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("f", "alpha"), [("reverse_kl", 0.5), *F_SETTINGS])
def test_f_divergence_scores_match_oracle(f, alpha):
    """Scores equal f'(t) at t = exp(u) to 1e-12 for moderate u."""
    u = np.linspace(-8.0, 8.0, 33)
    got = f_divergence_scores(torch.tensor(u), f, alpha).numpy()
    np.testing.assert_allclose(got, [score(x, f, alpha) for x in u], rtol=1e-12, atol=1e-12)


def _extreme_pairs() -> Pairs:
    """Pairs whose log-ratios and margins reach ±1e4 in every sign combination, with soft
    labels at and near 0 and 1."""
    u_pairs = [(5e3, -5e3), (-5e3, 5e3), (1e4, 0.0), (0.0, -1e4), (-1e4, 0.0), (0.0, 1e4),
               (1e4, 1e4), (-1e4, -1e4), (0.0, 0.0), (3.0, -2.0)]
    pc, pr, rc, rr = [], [], [], []
    for u_w, u_l in u_pairs:  # log-probs stay ≤ 0: the larger of policy/ref sits at −1
        pc.append(-1.0 + min(u_w, 0.0))
        rc.append(-1.0 - max(u_w, 0.0))
        pr.append(-1.0 + min(u_l, 0.0))
        rr.append(-1.0 - max(u_l, 0.0))
    n = len(u_pairs)
    margins = [0.0, 1e4, 2.0, -3.0, 1e4, 0.5, 0.0, 1e4, -1e4, 1.0]  # ODPO's offset before α
    soft = [0.0, 1.0, 0.5, 1e-9, 1.0 - 1e-9, 0.3, 1.0, 0.0, 0.9, 0.1]  # sigmoid_soft's labels
    return Pairs(pc, pr, rc, rr, [1.0, 1000.0] * (n // 2), [1000.0, 1.0] * (n // 2), margins,
                 soft)


def _least_label_smoothing(name: str) -> float:
    """ε = 0 where the loss accepts it (or does not read ε), else EXO's recommended 1e-3."""
    for parameter in LOSSES[name].hyper_parameters:
        if parameter.name == "label_smoothing":
            try:
                parameter.check(0.0, name)
            except DpokitError:
                return 1e-3
    return 0.0


EXTREME_CASES = [(name, "reverse_kl", 0.5, 0.05) for name in loss_names()]
EXTREME_CASES += [(name, f, a, 0.05) for name in SUPPORTS_F for f, a in F_SETTINGS]
EXTREME_CASES += [("discopop", "reverse_kl", 0.5, 2.0)]  # τ > 1: the exp term needs its cap


@pytest.mark.parametrize(("name", "f", "alpha", "tau"), EXTREME_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_log_ratios_give_finite_loss_and_gradient(name, f, alpha, tau, dtype):
    """|h| up to 1e4, β ∈ {0.01, 10}: no NaN/inf in losses, rewards or d(Σ losses)/d(logps)."""
    pairs = _extreme_pairs()
    for beta in (0.01, 10.0):
        params = Params(beta=beta, eps=_least_label_smoothing(name), tau=tau, delta=0.3, f=f,
                        alpha=alpha)
        losses, chosen_r, rejected_r, (pc, pr) = run(pairs, params, name, dtype=dtype,
                                                     requires_grad=True, rpo_alpha=1.0)
        assert losses.dtype == dtype
        assert torch.isfinite(losses).all(), (beta, losses)
        assert torch.isfinite(chosen_r).all() and torch.isfinite(rejected_r).all()
        losses.sum().backward()
        assert pc.grad is not None and torch.isfinite(pc.grad).all(), (beta, pc.grad)
        # sft (and the RPO term) never read the rejected completion
        assert pr.grad is None or torch.isfinite(pr.grad).all(), (beta, pr.grad)


def test_extreme_scores_are_capped_but_monotone():
    """Capped exponentials stay finite in float32 and never decrease with the log-ratio."""
    u = torch.linspace(-1e4, 1e4, 2001, dtype=torch.float32)
    for f, alpha in F_SETTINGS:
        s = f_divergence_scores(u, f, alpha)
        assert torch.isfinite(s).all() and torch.isfinite(s * s).all(), f
        assert (s[1:] >= s[:-1]).all(), (f, alpha)


def test_sigmoid_hand_worked_value():
    """β = 0.1; log π_θ(y_w) = −10, log π_θ(y_l) = −12, log π_ref(y_w) = log π_ref(y_l) = −11.

    u_w = 1, u_l = −1, h = 2, βh = 0.2: L = −log σ(0.2) = log(1 + e^−0.2) = log 1.8187307531
    = 0.5981388694; rewards β·u = (0.1, −0.1).
    """
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    losses, chosen, rejected = dpo_loss(one(-10.0), one(-12.0), one(-11.0), one(-11.0), beta=0.1)
    assert float(losses) == pytest.approx(0.5981388693815918, abs=1e-12)
    assert (float(chosen), float(rejected)) == pytest.approx((0.1, -0.1), abs=1e-12)


def test_ipo_hand_worked_value():
    """β = 0.5 so 1/(2β) = 1. Chosen: log π_θ = −6, log π_ref = −10, 2 tokens → u_w/|y_w| = 2.

    Rejected: log π_θ = −9, log π_ref = −8, 4 tokens → u_l/|y_l| = −0.25. Per-token margin 2.25:
    L = (2.25 − 1)² = 1.5625. Rewards use the summed log-ratios, as TRL 1.x: (2.0, −0.5).
    """
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    losses, chosen, rejected = dpo_loss(one(-6.0), one(-9.0), one(-10.0), one(-8.0), beta=0.5,
                                        loss_type="ipo", chosen_lengths=one(2.0),
                                        rejected_lengths=one(4.0))
    assert float(losses) == pytest.approx(1.5625, abs=1e-12)
    assert (float(chosen), float(rejected)) == pytest.approx((2.0, -0.5), abs=1e-12)


def test_odpo_hand_worked_value():
    """β = 0.1, α = 0.4; log-probs as in the sigmoid example (h = 2, βh = 0.2); data margin m = 1.5.

    Offset α·m = 0.6, so z = βh − α·m = −0.4 and L = −log σ(−0.4) = log(1 + e^0.4)
    = log 2.4918246976 = 0.9130152524. Rewards are DPO's: β·u = (0.1, −0.1).
    """
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    losses, chosen, rejected = dpo_loss(one(-10.0), one(-12.0), one(-11.0), one(-11.0), beta=0.1,
                                        loss_type="odpo", margins=one(1.5), odpo_alpha=0.4)
    assert float(losses) == pytest.approx(0.9130152523999526, abs=1e-12)
    assert (float(chosen), float(rejected)) == pytest.approx((0.1, -0.1), abs=1e-12)


@pytest.mark.parametrize("f", F_DIVERGENCES)
def test_odpo_without_offset_is_sigmoid(f):
    """α = 0: −log σ(βΔ − 0·m) is DPO's −log σ(βΔ), bit for bit, under every f-divergence."""
    pairs = random_pairs(11)
    odpo, *_ = run(pairs, Params(beta=0.3, f=f, odpo_alpha=0.0), "odpo")
    sigmoid, *_ = run(pairs, Params(beta=0.3, f=f), "sigmoid")
    assert torch.equal(odpo, sigmoid)
    shifted, *_ = run(pairs, Params(beta=0.3, f=f, odpo_alpha=0.5), "odpo")
    assert (shifted > sigmoid).all()  # margins m > 0 raise the bar, so the loss


def test_odpo_needs_margins():
    """Without the data's margin column odpo refuses to run, naming the loss and the column."""
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    with pytest.raises(DpokitError, match=r"odpo needs a per-pair margin column.*margin_column"):
        dpo_loss(one(-10.0), one(-12.0), one(-11.0), one(-11.0), beta=0.1, loss_type="odpo")


def test_label_smoothing_zero_is_plain_dpo_and_robust_reduces_to_it():
    """ε = 0: sigmoid (cDPO) and robust are both exactly −log σ(βh)."""
    pairs = random_pairs(3)
    plain = [-math.log(1.0 / (1.0 + math.exp(-0.4 * h))) for h in
             (a - b - (c - d) for a, b, c, d in zip(pairs.pc, pairs.pr, pairs.rc, pairs.rr,
                                                       strict=True))]
    for name in ("sigmoid", "robust"):
        losses, *_ = run(pairs, Params(beta=0.4, eps=0.0), name)
        np.testing.assert_allclose(losses.numpy(), plain, rtol=1e-12)
    smoothed, *_ = run(pairs, Params(beta=0.4, eps=0.2), "sigmoid")
    assert not np.allclose(smoothed.numpy(), plain)


def test_zero_lengths_are_clamped_to_one_as_in_trl():
    """A completion with 0 tokens counts as 1 token (TRL's clamp(min=1))."""
    pairs = random_pairs(4, n=4)
    zero = Pairs(pairs.pc, pairs.pr, pairs.rc, pairs.rr, [0.0] * 4, [0.0] * 4)
    ones = Pairs(pairs.pc, pairs.pr, pairs.rc, pairs.rr, [1.0] * 4, [1.0] * 4)
    for name in ("ipo", "sigmoid_norm", "simpo"):
        a, *_ = run(zero, Params(beta=0.5), name)
        b, *_ = run(ones, Params(beta=0.5), name)
        assert torch.equal(a, b), name


def test_sigmoid_soft_hand_value_limits_and_fixed_point():
    """β = 0.5, h = 2 (βh = 1), p = 0.8: L = −0.8 log σ(1) − 0.2 log σ(−1)
    = 0.8·0.3132617 + 0.2·1.3132617 = 0.5132617. p = 1 is sigmoid, p = 1 − ε is cDPO, and the
    gradient in βh, σ(βh) − p, vanishes at βh = logit p (the Bradley–Terry fixed point)."""
    def loss(h, p, name="sigmoid_soft", **kw):
        one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
        return dpo_loss(one(h), one(0.0), one(0.0), one(0.0), beta=0.5, loss_type=name,
                        label_probs=one(p), **kw)[0]

    assert float(loss(2.0, 0.8)) == pytest.approx(0.8 * 0.31326168751822 + 0.2 * 1.31326168751822,
                                                  abs=1e-12)
    for h in (-3.0, 0.2, 4.0):
        assert float(loss(h, 1.0)) == pytest.approx(float(loss(h, 1.0, "sigmoid")), abs=1e-15)
        assert float(loss(h, 0.9)) == pytest.approx(
            float(loss(h, 1.0, "sigmoid", label_smoothing=0.1)), abs=1e-14)
    p = 0.7
    h = torch.tensor([2 * math.log(p / (1 - p))], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    dpo_loss(h, zero, zero, zero, beta=0.5, loss_type="sigmoid_soft",
             label_probs=torch.tensor([p], dtype=torch.float64))[0].sum().backward()
    assert float(h.grad) == pytest.approx(0.0, abs=1e-12)
