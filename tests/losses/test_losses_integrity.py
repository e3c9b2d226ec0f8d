"""Integrity of ``dpo_loss`` against TRL 1.16's DPOTrainer: settings that would do nothing or the
wrong thing are refused with one line, and values at the edges match float64 closed forms.

Oracles are written here in plain Python floats (``math``), independent of dpokit's code; each
tolerance is stated where it is used.
"""

import math

import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.losses import LOSSES, dpo_loss, f_divergence_scores
from dpokit.losses.registry import check_f_divergence

F64 = torch.float64


def _pairs(n: int = 4, dtype: torch.dtype = F64):
    """Fixed summed log-probs (policy chosen/rejected, reference chosen/rejected) and lengths."""
    pc = torch.tensor([-12.0, -30.5, -7.25, -41.0][:n], dtype=dtype)
    pr = torch.tensor([-15.0, -28.0, -9.5, -40.0][:n], dtype=dtype)
    rc = torch.tensor([-13.0, -29.0, -8.0, -44.0][:n], dtype=dtype)
    rr = torch.tensor([-14.0, -29.5, -9.0, -39.0][:n], dtype=dtype)
    lc = torch.tensor([5, 11, 3, 17][:n])
    lr = torch.tensor([6, 10, 4, 15][:n])
    return pc, pr, rc, rr, lc, lr


# --- rpo_alpha: a NaN, infinite or negative weight is refused, not trained on ------------------

@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf, -0.5])
def test_rpo_alpha_must_be_finite_and_non_negative(alpha):
    """Before: rpo_alpha=NaN made every loss NaN (and ∞ made them ∞; a negative weight rewarded a
    low chosen likelihood without bound) with no error; the config's own check (``< 0``) lets
    NaN and ∞ through. Now dpo_loss stops with a one-line DpokitError naming rpo_alpha."""
    pc, pr, rc, rr, lc, lr = _pairs()
    with pytest.raises(DpokitError, match="rpo_alpha"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, chosen_lengths=lc, rejected_lengths=lr,
                 rpo_alpha=alpha)


@pytest.mark.parametrize("alpha", [None, 0.0, 0.7])
def test_rpo_alpha_valid_values_still_work(alpha):
    """None and 0 add nothing; α > 0 adds α·(−log π_θ(y_w)/|y_w|) per pair (float64, 1e-12)."""
    pc, pr, rc, rr, lc, lr = _pairs()
    base, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    got, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, chosen_lengths=lc, rejected_lengths=lr,
                         rpo_alpha=alpha)
    extra = [(alpha or 0.0) * (-c / n) for c, n in zip(pc.tolist(), lc.tolist(), strict=True)]
    torch.testing.assert_close(got - base, torch.tensor(extra, dtype=F64), rtol=1e-12,
                               atol=1e-12)


# --- f_alpha_divergence_coef is read by alpha_divergence only ----------------------------------

@pytest.mark.parametrize("f", ["reverse_kl", "forward_kl", "js_divergence"])
def test_alpha_coef_without_alpha_divergence_is_refused(f):
    """Before: f_alpha_divergence_coef=0.3 with any other f_divergence_type was silently ignored
    (the loss was exactly the α = 0.5 one), unlike every other hyper-parameter no loss reads.
    Now the check shared by dpo_loss and the config (check_f_divergence) refuses it."""
    pc, pr, rc, rr, _, _ = _pairs()
    with pytest.raises(DpokitError, match="f_alpha_divergence_coef"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, f_divergence_type=f, f_alpha_divergence_coef=0.3)
    with pytest.raises(DpokitError, match="f_alpha_divergence_coef"):
        check_f_divergence(f, 0.3)
    with pytest.raises(DpokitError, match="f_alpha_divergence_coef"):
        f_divergence_scores(pc - rc, f, 0.3)


def test_alpha_coef_with_alpha_divergence_or_at_default_is_accepted():
    """The default 0.5 passes with every divergence; α-divergence takes any finite α and gives
    the closed form (exp((α−1)u) − 1)/(α−1) (float64, 1e-12)."""
    pc, pr, rc, rr, _, _ = _pairs()
    for f in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"):
        check_f_divergence(f, 0.5)
        dpo_loss(pc, pr, rc, rr, beta=0.1, f_divergence_type=f, f_alpha_divergence_coef=0.5)
    u = (pc - rc).tolist()
    got = f_divergence_scores(pc - rc, "alpha_divergence", 0.3)
    expected = [(math.exp(-0.7 * x) - 1.0) / -0.7 for x in u]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)


# --- WPO weights are per pair; the sorting losses have no per-pair terms -----------------------

@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired", ["sigmoid", "aot"]])
def test_wpo_weights_with_sorting_losses_are_refused(loss_type):
    """Before: dpo_loss multiplied AOT's sorted terms (term i is no pair's) by pair i's WPO
    weight, a silent misalignment; TRL 1.16 raises for use_weighting with aot/aot_unpaired. The
    config refused it, the public function did not."""
    pc, pr, rc, rr, _, _ = _pairs()
    a = torch.tensor([-0.5, -1.0, -0.2, -2.0], dtype=F64)
    with pytest.raises(DpokitError, match="aot"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type,
                 chosen_wpo_logweights=a, rejected_wpo_logweights=a.flip(0))


def test_wpo_weights_with_sft_match_trl():
    """TRL applies the WPO weight to every loss term, sft's batch token mean included:
    L_i = w_i · (−log σ(βh_i) − Σ_j log π(y_w,j) / Σ_j |y_w,j|), w_i = exp(a_w,i + a_l,i)
    (float64 oracle, 1e-12)."""
    pc, pr, rc, rr, lc, lr = _pairs()
    aw = [-0.5, -1.0, -0.2, -2.0]
    al = [-0.3, -0.1, -0.9, -0.4]
    got, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=["sigmoid", "sft"],
                         chosen_lengths=lc, rejected_lengths=lr,
                         chosen_wpo_logweights=torch.tensor(aw, dtype=F64),
                         rejected_wpo_logweights=torch.tensor(al, dtype=F64))
    sft = -sum(pc.tolist()) / sum(lc.tolist())
    expected = []
    for c, r, c0, r0, x, y in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), aw, al,
                                  strict=True):
        z = 0.2 * ((c - c0) - (r - r0))
        expected.append(math.exp(x + y) * (math.log1p(math.exp(-z)) + sft))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)


# --- extreme logit differences: values (not only finiteness) match the closed-form limits -------

def _at(delta: float, beta: float, loss_type: str, dtype: torch.dtype = torch.float32,
        **options):
    """One pair with u_w = delta/2, u_l = −delta/2 (so h = Δ = delta) and |y_w| = |y_l| = 1."""
    pc = torch.tensor([-50.0 + delta / 2], dtype=dtype)
    pr = torch.tensor([-50.0 - delta / 2], dtype=dtype)
    ref = torch.tensor([-50.0], dtype=dtype)
    ones = torch.ones(1)
    spec = LOSSES[loss_type]
    losses, _, _ = dpo_loss(pc, pr, ref if spec.needs_reference else None,
                            ref if spec.needs_reference else None, beta=beta, loss_type=loss_type,
                            chosen_lengths=ones, rejected_lengths=ones, **options)
    return losses.double().item()


def _softplus(x: float) -> float:
    """log(1 + e^x) without overflow (float64)."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@pytest.mark.parametrize("delta", [1e4, -1e4, 300.0, -300.0])
@pytest.mark.parametrize("beta", [1e-3, 0.1, 10.0])
def test_extreme_margins_match_float64_closed_forms(delta, beta):
    """At |Δ| up to 1e4 in float32 the losses equal float64 closed forms in log space:
    sigmoid/cDPO softplus, robust, exo_pair's KL, hinge, apo_zero, discopop. Relative 1e-5
    (float32 rounding of z = βΔ), absolute 1e-6."""
    z = beta * delta
    eps = 0.1
    sig = lambda t: math.exp(-_softplus(-t))  # noqa: E731
    cases = {
        ("sigmoid", 0.0): _softplus(-z),
        ("sigmoid", eps): (1 - eps) * _softplus(-z) + eps * _softplus(z),
        ("robust", eps): ((1 - eps) * _softplus(-z) - eps * _softplus(z)) / (1 - 2 * eps),
        ("hinge", None): max(0.0, 1.0 - z),
        ("apo_zero", None): sig(-beta * delta / 2) + sig(-beta * delta / 2),
    }
    e = 1e-3  # EXO: σ(z)(log σ(z) − log(1−ε)) + σ(−z)(log σ(−z) − log ε)
    cases[("exo_pair", e)] = (sig(z) * (-_softplus(-z) - math.log1p(-e))
                              + sig(-z) * (-_softplus(z) - math.log(e)))
    tau = 0.05  # DiscoPOP: softplus(−z)·σ(−z/τ) + exp(−z)·σ(z/τ), the product taken in log space
    cases[("discopop", None)] = (_softplus(-z) * sig(-z / tau)
                                 + math.exp(-z - _softplus(-z / tau)))
    for (name, ls), expected in cases.items():
        options = {} if ls is None else {"label_smoothing": ls}
        if name == "discopop":
            options["discopop_tau"] = tau
        got = _at(delta, beta, name, **options)
        assert math.isfinite(got), (name, ls)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), (name, ls, got, expected)


# --- batch of one, sorting, and what couples a batch ------------------------------------------

def test_aot_on_one_pair_is_cdpo_and_sorting_matches_brute_force():
    """With B = 1 sorting is the identity: aot = cDPO on h and aot_unpaired = cDPO on u_w − u_l,
    the same value. For B = 4 the sorted differences are recomputed with sorted() (float64,
    1e-12)."""
    pc, pr, rc, rr, _, _ = _pairs()
    eps, beta = 0.1, 0.3
    cdpo = lambda d: (1 - eps) * _softplus(-beta * d) + eps * _softplus(beta * d)  # noqa: E731
    for name in ("aot", "aot_unpaired"):
        one, _, _ = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=beta, loss_type=name,
                             label_smoothing=eps)
        h = (pc[0] - rc[0] - pr[0] + rr[0]).item()
        assert one.item() == pytest.approx(cdpo(h), rel=1e-12)
    c, r, c0, r0 = (t.tolist() for t in (pc, pr, rc, rr))
    d_aot = [a - b for a, b in zip(sorted(x - y for x, y in zip(c, r, strict=True)),
                                   sorted(x - y for x, y in zip(c0, r0, strict=True)),
                                   strict=True)]
    d_unp = [a - b for a, b in zip(sorted(x - y for x, y in zip(c, c0, strict=True)),
                                   sorted(x - y for x, y in zip(r, r0, strict=True)),
                                   strict=True)]
    for name, d in (("aot", d_aot), ("aot_unpaired", d_unp)):
        got, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=name, label_smoothing=eps)
        torch.testing.assert_close(got, torch.tensor([cdpo(x) for x in d], dtype=F64),
                                   rtol=1e-12, atol=1e-12)


def test_bco_pair_delta_is_a_constant_shift_and_zero_is_trl_1x():
    """bco_pair with δ = 0 is TRL 1.16's −log σ(βu_w) − log σ(−βu_l); δ shifts both rewards by
    the given constant (dpo_loss keeps no running mean: it is pure). Float64, 1e-12."""
    pc, pr, rc, rr, _, _ = _pairs()
    beta = 0.4
    for delta in (0.0, 0.35):
        got, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="bco_pair", bco_delta=delta)
        expected = [_softplus(-(beta * (c - c0) - delta)) + _softplus(beta * (r - r0) - delta)
                    for c, r, c0, r0 in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(),
                                            strict=True)]
        torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-12,
                                   atol=1e-12)
        # calling twice gives the same value: no state carried between calls
        again, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="bco_pair", bco_delta=delta)
        assert torch.equal(got, again)
