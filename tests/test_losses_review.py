"""The loss family against an independent oracle, written again from TRL 1.16's source.

The oracle is ``mpmath`` at 50 significant digits, one pair at a time, in the textbook form of
``trl/trainer/dpo_trainer.py::_compute_loss`` (σ, log σ and exp taken literally: at 50 digits
nothing overflows, so the extreme cases need no log-space tricks of their own), plus the three
documented departures: cDPO label smoothing on ``sigmoid`` (TRL 0.x), the ``bco_delta`` shift
(TRL 0.x) and SimPO as TRL's ``CPOTrainer``. Tolerances: float64 rtol 1e-10 (moderate inputs),
float32 rtol 2e-5 (float32 rounding of the inputs' differences and of the result).

Also: label smoothing and β at their edges, multi-loss weights and RPO, the reference-free mode,
the logged metrics, the registry's error messages, and the bugs this review fixed (each test
says what the old code did).
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.losses import (
    LOSSES,
    check_loss_options,
    dpo_loss,
    metric_means,
    preference_metrics,
)

mp.mp.dps = 50

TRL_NAMES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
             "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
             "sigmoid_norm")
TRL_F_DIVERGENCE = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                    "discopop", "sft"}  # dpo_trainer.py:810


# ---------------------------------------------------------------- the oracle (mpmath)

def _sig(z):
    return 1 / (1 + mp.exp(-z))


def _logsig(z):
    return mp.log(_sig(z))


def _score(u, f, alpha):
    t = mp.exp(u)
    if f == "reverse_kl":
        return u
    if f == "forward_kl":
        return 1 - 1 / t
    if f == "js_divergence":
        return mp.log(2 * t / (1 + t))
    return (t ** (alpha - 1) - 1) / (alpha - 1)


def oracle(name, pc, pr, rc, rr, lc, lr, *, beta, eps=0.0, tau=0.05, delta=0.0, gamma=0.5,
           f="reverse_kl", alpha=0.5):
    """Per-pair losses of ``name`` (lists of floats in, mpf out), TRL 1.16's formulas."""
    b = mp.mpf(beta)
    pc, pr, rc, rr, lc, lr = ([mp.mpf(v) for v in xs] for xs in (pc, pr, rc, rr, lc, lr))
    lc = [max(v, 1) for v in lc]
    lr = [max(v, 1) for v in lr]
    uw = [a - c for a, c in zip(pc, rc, strict=True)]
    ul = [a - c for a, c in zip(pr, rr, strict=True)]
    sw = [_score(u, f, alpha) for u in uw]
    sl = [_score(u, f, alpha) for u in ul]
    d = [a - c for a, c in zip(sw, sl, strict=True)]
    n = len(pc)
    out = []
    for i in range(n):
        z = b * d[i]
        if name == "sigmoid":  # TRL 1.16: −log σ(βΔ); ε as TRL 0.x's cDPO
            out.append(-(1 - eps) * _logsig(z) - eps * _logsig(-z))
        elif name == "hinge":
            out.append(max(mp.mpf(0), 1 - z))
        elif name == "ipo":
            out.append((sw[i] / lc[i] - sl[i] / lr[i] - 1 / (2 * b)) ** 2)
        elif name == "exo_pair":
            qw, ql = _sig(z), _sig(-z)
            out.append(qw * (mp.log(qw) - mp.log(1 - eps)) + ql * (mp.log(ql) - mp.log(eps)))
        elif name == "nca_pair":
            a, c = b * uw[i], b * ul[i]
            out.append(-_logsig(a) - _logsig(-a) / 2 - _logsig(-c) / 2)
        elif name == "robust":
            clean = -(1 - eps) * _logsig(z)
            flipped = -eps * _logsig(-z)
            out.append((clean - flipped) / (1 - 2 * eps))
        elif name == "bco_pair":
            out.append(-_logsig(b * uw[i] - delta) - _logsig(-(b * ul[i] - delta)))
        elif name == "sppo_hard":
            out.append((uw[i] - 1 / (2 * b)) ** 2 + (ul[i] + 1 / (2 * b)) ** 2)
        elif name == "apo_zero":
            out.append(1 - _sig(b * uw[i]) + _sig(b * ul[i]))
        elif name == "apo_down":
            out.append(_sig(b * uw[i]) + 1 - _sig(b * (uw[i] - ul[i])))
        elif name == "discopop":
            m = _sig(z / tau)
            out.append(-_logsig(z) * (1 - m) + mp.exp(-z) * m)
        elif name == "sft":
            out.append(-mp.fsum(pc) / mp.fsum(lc))
        elif name == "sigmoid_norm":
            out.append(-_logsig(b * (sw[i] / lc[i] - sl[i] / lr[i])))
        elif name == "simpo":  # CPOTrainer: logits = avg_w − avg_l − γ/β
            logits = pc[i] / lc[i] - pr[i] / lr[i] - gamma / b
            out.append(-(1 - eps) * _logsig(b * logits) - eps * _logsig(-b * logits))
        elif name in ("aot", "aot_unpaired"):
            break
        else:
            raise KeyError(name)
    if name == "aot":
        pol = sorted(a - c for a, c in zip(pc, pr, strict=True))
        ref = sorted(a - c for a, c in zip(rc, rr, strict=True))
        out = [-(1 - eps) * _logsig(b * (x - y)) - eps * _logsig(-b * (x - y))
               for x, y in zip(pol, ref, strict=True)]
    elif name == "aot_unpaired":
        cw, cl = sorted(uw), sorted(ul)
        out = [-(1 - eps) * _logsig(b * (x - y)) - eps * _logsig(-b * (x - y))
               for x, y in zip(cw, cl, strict=True)]
    return [float(v) for v in out]


def _batch(seed, n=8, spread=3.0):
    rng = np.random.default_rng(seed)
    pc, pr = -rng.uniform(2.0, 80.0, n), -rng.uniform(2.0, 80.0, n)
    rc, rr = pc - rng.normal(0, spread, n), pr - rng.normal(0, spread, n)
    lc, lr = rng.integers(1, 30, n).astype(float), rng.integers(1, 30, n).astype(float)
    return [list(map(float, a)) for a in (pc, pr, rc, rr, lc, lr)]


def _options(name, eps, tau=0.05, delta=0.0, gamma=0.5):
    """The values above for the hyper-parameters ``name`` (one or a list) declares."""
    names = [name] if isinstance(name, str) else name
    declared = {p for n in names if n in LOSSES for p in LOSSES[n].hyper_parameter_names}
    values = {"label_smoothing": eps, "discopop_tau": tau, "bco_delta": delta,
              "simpo_gamma": gamma}
    return {k: v for k, v in values.items() if k in declared}


def _dpokit(name, batch, dtype=torch.float64, *, beta, eps=0.0, f="reverse_kl", alpha=0.5,
            requires_grad=False, **kw):
    pc, pr, rc, rr, lc, lr = (torch.tensor(v, dtype=dtype) for v in batch)
    if requires_grad:
        pc.requires_grad_(True)
        pr.requires_grad_(True)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=name, chosen_lengths=lc,
                              rejected_lengths=lr, f_divergence_type=f,
                              f_alpha_divergence_coef=alpha, **{**_options(name, eps), **kw})
    return losses, cr, rj, (pc, pr)


def _eps_for(name):
    return {"exo_pair": 1e-3, "robust": 0.2, "sigmoid": 0.1, "aot": 0.15,
            "aot_unpaired": 0.05}.get(name, 0.0)


# ---------------------------------------------------------------- the TRL losses

@pytest.mark.parametrize("name", TRL_NAMES)
@pytest.mark.parametrize("beta", [1e-3, 0.1, 1.0, 10.0])
def test_trl_losses_match_the_mpmath_oracle(name, beta):
    """Every TRL 1.16 loss, float64, moderate inputs: rtol 1e-10 against 50-digit mpmath."""
    batch = _batch(11)
    eps = _eps_for(name)
    got, *_ = _dpokit(name, batch, beta=beta, eps=eps)
    want = oracle(name, *batch, beta=beta, eps=eps)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(TRL_F_DIVERGENCE))
@pytest.mark.parametrize(("f", "alpha"), [("forward_kl", 0.5), ("js_divergence", 0.5),
                                          ("alpha_divergence", 0.3),
                                          ("alpha_divergence", 1.7)])
def test_f_divergences_match_the_mpmath_oracle(name, f, alpha):
    """The f-divergence scores of TRL 1.16 (dpo_trainer.py:1353-1380), moderate log-ratios
    (|u| ≤ ~10, far below any cap): rtol 1e-10."""
    batch = _batch(12, spread=2.0)
    eps = _eps_for(name)
    got, *_ = _dpokit(name, batch, beta=0.2, eps=eps, f=f, alpha=alpha)
    want = oracle(name, *batch, beta=0.2, eps=eps, f=f, alpha=alpha)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def _extreme_batch(h):
    """Six pairs whose log-ratios reach ±h (summed log-probs as large as 2h in magnitude)."""
    pc = [-1.0, -h, -2.0, -h / 2, -3.0, -h]
    pr = [-h, -1.0, -h / 2, -2.0, -h, -3.0]
    rc = [-h, -1.0, -h / 2, -2.0, -5.0, -2.0]
    rr = [-1.0, -h, -2.0, -h / 2, -6.0, -4.0]
    return [pc, pr, rc, rr, [3.0, 7.0, 1.0, 12.0, 5.0, 2.0], [4.0, 2.0, 9.0, 1.0, 6.0, 3.0]]


@pytest.mark.parametrize("name", TRL_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [0.1, 5.0])
def test_extreme_log_ratios_are_finite_and_exact(name, dtype, beta):
    """|log π_θ/π_ref| up to 1e4 (β·Δ up to 1e5): every loss and its gradient stay finite
    (log space, no exp overflow) and equal the 50-digit oracle, reverse KL and JS (whose
    scores have no cap). float32 rtol 2e-5, float64 rtol 1e-9; atol 1e-6·(1 + |oracle|max)
    for the terms that are 0 up to exp(−1e4)."""
    batch = _extreme_batch(1e4)
    eps = _eps_for(name)
    rtol = 2e-5 if dtype == torch.float32 else 1e-9
    for f in ("reverse_kl", "js_divergence") if name in TRL_F_DIVERGENCE else ("reverse_kl",):
        got, cr, rj, (pc, pr) = _dpokit(name, batch, dtype, beta=beta, eps=eps, f=f,
                                        requires_grad=True)
        got.sum().backward()
        assert torch.isfinite(got).all(), (f, got)
        for grad in (pc.grad, pr.grad):  # None: not read (sft ignores y_l)
            assert grad is None or torch.isfinite(grad).all(), f
        assert torch.isfinite(cr).all() and torch.isfinite(rj).all()
        want = oracle(name, *batch, beta=beta, eps=eps, f=f)
        scale = 1e-6 * (1.0 + max(abs(w) for w in want))
        np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=rtol, atol=scale,
                                   err_msg=f"{name} {f}")


def test_extreme_sigmoid_gradient_is_the_closed_form():
    """∂/∂log π_θ(y_w) of −log σ(βh) is −β·σ(−βh): at βh = −1e3 it is −β (not NaN, not 0),
    at βh = +1e3 it is −β·exp(−1e3) = 0 in float32 and 0 up to 1e-300 in float64."""
    for dtype in (torch.float32, torch.float64):
        pc = torch.tensor([-1e4, 0.0], dtype=dtype, requires_grad=True)
        zero = torch.zeros(2, dtype=dtype)
        losses, *_ = dpo_loss(pc, zero, torch.tensor([0.0, -1e4], dtype=dtype), zero,
                              beta=0.1, loss_type="sigmoid")
        losses.sum().backward()
        assert losses[0].item() == pytest.approx(1e3, rel=1e-6)
        assert pc.grad[0].item() == pytest.approx(-0.1, rel=1e-6)
        assert abs(pc.grad[1].item()) < 1e-300 or pc.grad[1].item() == 0.0


# ---------------------------------------------------------------- label smoothing, β

@pytest.mark.parametrize("name", ["sigmoid", "robust", "aot", "aot_unpaired", "simpo"])
def test_label_smoothing_half_and_outside_are_refused(name):
    """ε ∈ [0, 0.5): 0.5 makes cDPO a constant and robust divide by 0; the message names the
    key, the loss and the range."""
    batch = _batch(3, n=4)
    for eps in (0.5, -0.1, 0.7, math.nan):
        with pytest.raises(DpokitError, match=rf"^label_smoothing must be .*\[0, 0\.5\) for "
                                              rf"{name}, got "):
            _dpokit(name, batch, beta=0.1, eps=eps)


def test_label_smoothing_zero_and_near_half():
    """ε = 0: sigmoid, robust, aot are TRL's unsmoothed losses exactly; ε = 0.4999 (robust's
    1/(1 − 2ε) = 5000) still matches the oracle."""
    batch = _batch(4)
    for name in ("sigmoid", "robust", "aot", "aot_unpaired"):
        got, *_ = _dpokit(name, batch, beta=0.3, eps=0.0)
        np.testing.assert_allclose(got.numpy(), oracle(name, *batch, beta=0.3), rtol=1e-12)
    got, *_ = _dpokit("robust", batch, beta=0.3, eps=0.4999)
    np.testing.assert_allclose(got.numpy(), oracle("robust", *batch, beta=0.3, eps=0.4999),
                               rtol=1e-9)


def test_exo_pair_label_smoothing_edges():
    """EXO needs ε ∈ (0, 1) (TRL refuses 0: log ε); at ε = 0.5 it is KL(q ‖ uniform)."""
    batch = _batch(5)
    for eps in (0.0, 1.0, -0.2):
        with pytest.raises(DpokitError, match=r"^label_smoothing must be in \(0, 1\) for exo_pair"):
            _dpokit("exo_pair", batch, beta=0.2, eps=eps)
    got, *_ = _dpokit("exo_pair", batch, beta=0.2, eps=0.5)
    want = oracle("exo_pair", *batch, beta=0.2, eps=0.5)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    assert (got >= -1e-15).all()  # a KL divergence


@pytest.mark.parametrize("beta", [0.0, -1e-3, math.inf, math.nan])
def test_bad_beta_is_refused(beta):
    with pytest.raises(DpokitError, match=r"^beta must be a finite number > 0"):
        _dpokit("sigmoid", _batch(1, n=2), beta=beta)


def test_tiny_and_large_beta_match_the_oracle():
    """β = 1e-6 (IPO's target 1/(2β) = 5e5) and β = 1e3 (βΔ ~ 1e4): float64 rtol 1e-9."""
    batch = _batch(6)
    for beta in (1e-6, 1e3):
        for name in ("sigmoid", "ipo", "sppo_hard", "hinge", "discopop", "exo_pair"):
            eps = _eps_for(name)
            got, *_ = _dpokit(name, batch, beta=beta, eps=eps)
            np.testing.assert_allclose(got.numpy(), oracle(name, *batch, beta=beta, eps=eps),
                                       rtol=1e-9, atol=1e-12, err_msg=f"{name} β={beta}")


# ---------------------------------------------------------------- weights, RPO, ref-free

def test_multi_loss_weights_are_trls_weighted_sum():
    """TRL: loss = Σ_k w_k·mean(L_k); per pair Σ_k w_k·L_k, whose mean is the same."""
    batch = _batch(7)
    names, weights = ["sigmoid", "sft", "ipo", "apo_zero"], [1.0, 0.3, 2.0, -0.5]
    got, cr, rj, _ = _dpokit(names, batch, beta=0.2, loss_weights=weights)
    want = sum(w * np.array(oracle(n, *batch, beta=0.2)) for n, w in zip(names, weights,
                                                                         strict=True))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    # the rewards are β·u whatever the losses (TRL logs the same for every combination)
    pc, pr, rc, rr, *_ = batch
    np.testing.assert_allclose(cr.numpy(), [0.2 * (a - c) for a, c in zip(pc, rc, strict=True)],
                               rtol=1e-12)
    np.testing.assert_allclose(rj.numpy(), [0.2 * (a - c) for a, c in zip(pr, rr, strict=True)],
                               rtol=1e-12)
    with pytest.raises(DpokitError, match="loss_weights has 3 entries but loss_type has 4"):
        _dpokit(names, batch, beta=0.2, loss_weights=weights[:3])


def test_rpo_alpha_adds_the_per_pair_token_mean_nll():
    """RPO: L = L_DPO + α·(−log π_θ(y_w)/|y_w|), lengths unequal, the length clamped at 1."""
    batch = _batch(8)
    batch[4][0] = 0.0  # a zero length counts as one token
    got, *_ = _dpokit("sigmoid", batch, beta=0.1, rpo_alpha=0.7)
    want = [dpo + 0.7 * (-pc / max(lc, 1.0)) for dpo, pc, lc in
            zip(oracle("sigmoid", *batch, beta=0.1), batch[0], batch[4], strict=True)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_reference_free_simpo_is_cpo_and_reports_cpo_rewards():
    """SimPO without π_ref: CPOTrainer's loss (γ = 0.5 → logits − γ/β, ε = 0.1) and its
    rewards β·log π_θ(y)/|y|; sft alone needs no reference either."""
    pc, pr, _, _, lc, lr = _batch(9)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    losses, cr, rj = dpo_loss(t(pc), t(pr), None, None, beta=2.0, loss_type="simpo",
                              chosen_lengths=t(lc), rejected_lengths=t(lr), simpo_gamma=0.5,
                              label_smoothing=0.1)
    want = oracle("simpo", pc, pr, pc, pr, lc, lr, beta=2.0, eps=0.1, gamma=0.5)
    np.testing.assert_allclose(losses.numpy(), want, rtol=1e-10)
    np.testing.assert_allclose(cr.numpy(), [2.0 * a / b for a, b in zip(pc, lc, strict=True)],
                               rtol=1e-12)
    np.testing.assert_allclose(rj.numpy(), [2.0 * a / b for a, b in zip(pr, lr, strict=True)],
                               rtol=1e-12)
    sft, *_ = dpo_loss(t(pc), t(pr), None, None, beta=2.0, loss_type="sft",
                       chosen_lengths=t(lc), rejected_lengths=t(lr))
    assert torch.allclose(sft, torch.full_like(sft, -math.fsum(pc) / math.fsum(lc)),
                          rtol=1e-12)
    with pytest.raises(DpokitError, match="sigmoid needs reference log-probs"):
        dpo_loss(t(pc), t(pr), None, None, beta=2.0, loss_type=["simpo", "sigmoid"],
                 chosen_lengths=t(lc), rejected_lengths=t(lr))


def test_bco_delta_shift_matches_the_oracle():
    batch = _batch(10)
    got, *_ = dpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in batch[:4]), beta=0.4,
                       loss_type="bco_pair", bco_delta=0.3)
    np.testing.assert_allclose(got.numpy(), oracle("bco_pair", *batch, beta=0.4, delta=0.3),
                               rtol=1e-12)


# ---------------------------------------------------------------- metrics

def test_metrics_are_trls_over_micro_batches():
    """rewards/* and logps/* as TRL 1.16 logs them (dpo_trainer.py:1582-1603), from dpo_loss's
    rewards, for one batch of 9 split 4 + 5 and reduced as sums: float64, rtol 1e-12. A tie
    (equal rewards) counts as a miss."""
    batch = _batch(13, n=9)
    batch[0][2], batch[2][2], batch[1][2], batch[3][2] = -5.0, -6.0, -7.0, -8.0  # u_w = u_l = 1
    sums = None
    for lo, hi in ((0, 4), (4, 9)):
        part = [v[lo:hi] for v in batch]
        _, cr, rj, (pc, pr) = _dpokit("sigmoid", part, beta=0.25)
        s = preference_metrics(cr, rj, pc, pr)
        sums = s if sums is None else {k: sums[k] + s[k] for k in s}
    means = metric_means(sums)
    pc, pr, rc, rr, *_ = (np.array(v) for v in batch)
    chosen, rejected = 0.25 * (pc - rc), 0.25 * (pr - rr)
    want = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
    assert set(means) == set(want)
    for key, value in want.items():
        assert means[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert chosen[2] == rejected[2]  # the tie is there, and not counted


# ---------------------------------------------------------------- registry messages

def test_registry_error_messages():
    batch = _batch(2, n=2)
    known = ", ".join(LOSSES)
    with pytest.raises(DpokitError) as info:
        _dpokit("kto", batch, beta=0.1)
    assert str(info.value) == f"unknown loss_type 'kto'; known: {known}"
    with pytest.raises(DpokitError, match=r"^loss_type is empty; choose from: sigmoid, "):
        _dpokit([], batch, beta=0.1)
    with pytest.raises(DpokitError, match=r"^unknown hyper-parameter 'label_smooth'"):
        _dpokit("sigmoid", batch, beta=0.1, label_smooth=0.1)
    with pytest.raises(DpokitError, match=r"^discopop_tau=0.1 has no effect on loss_type "
                                          r"sigmoid; set it to 0.05"):
        _dpokit("sigmoid", batch, beta=0.1, discopop_tau=0.1)
    with pytest.raises(DpokitError, match=r"^discopop_tau must be > 0 for discopop, got 0.0"):
        check_loss_options("discopop", {"discopop_tau": 0.0})
    with pytest.raises(DpokitError, match=r"f_divergence_type='forward_kl' is not defined for "
                                          r"loss_type nca_pair"):
        _dpokit("nca_pair", batch, beta=0.1, f="forward_kl")


# ---------------------------------------------------------------- the bugs fixed here

@pytest.mark.parametrize(("name", "key", "value"), [
    ("robust", "label_smoothing", 0.5),   # old: losses ±inf (division by 1 − 2ε = 0)
    ("sigmoid", "label_smoothing", 0.7),  # old: silently anti-DPO
    ("discopop", "discopop_tau", 0.0),    # old: silently a different loss (z/τ = ±inf)
    ("dpop", "dpop_lambda", -5.0),        # old: a negative penalty, silently
])
def test_a_tensor_for_a_range_checked_hyper_parameter_is_refused(name, key, value):
    """A 0-dim Tensor's value is not read (no host sync), so it skipped the range check: the
    old code accepted ``label_smoothing=torch.tensor(0.5)`` for robust and returned ±inf.
    Now a Tensor is refused where a range is declared; bco_delta (no range) still takes one."""
    batch = _batch(14, n=3)
    with pytest.raises(DpokitError) as info:
        _dpokit(name, batch, beta=0.1, **{key: torch.tensor(value, dtype=torch.float64)})
    assert str(info.value).startswith(f"{key} must be a number for {name} (its range ")
    assert str(info.value).endswith("is checked), got a Tensor")
    got, *_ = dpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in batch[:4]), beta=0.4,
                       loss_type="bco_pair", bco_delta=torch.tensor(0.3, dtype=torch.float64))
    np.testing.assert_allclose(got.numpy(), oracle("bco_pair", *batch, beta=0.4, delta=0.3),
                               rtol=1e-12)
    check_loss_options("simpo", {"simpo_gamma": torch.tensor(1.0)})  # unbounded: accepted


def test_chosen_nll_logps_shape_is_checked():
    """``chosen_nll_logps`` (the unweighted log-probs under LD-DPO) was not shape-checked: the
    old code took a (2B,) tensor (chosen and rejected together) and returned sft's NLL over both
    halves, silently; with B = 1 and RPO it broadcast the losses to shape (2,)."""
    batch = _batch(15, n=2)
    t = [torch.tensor(v, dtype=torch.float64) for v in batch]
    both = torch.cat([t[0], t[1]])
    for kwargs in ({"loss_type": "sft"}, {"loss_type": "sigmoid", "rpo_alpha": 1.0}):
        with pytest.raises(DpokitError, match=r"^chosen_nll_logps has shape \(4,\), expected "
                                              r"\(2,\)"):
            dpo_loss(*t[:4], beta=0.1, chosen_lengths=t[4], rejected_lengths=t[5],
                     chosen_nll_logps=both, **kwargs)
    one = [v[:1] for v in t]
    with pytest.raises(DpokitError, match=r"^chosen_nll_logps has shape \(2,\)"):
        dpo_loss(*one[:4], beta=0.1, chosen_lengths=one[4], rejected_lengths=one[5],
                 rpo_alpha=1.0, chosen_nll_logps=both[:2])
    # the right shape is used: sft reads it instead of policy_chosen_logps
    plain = t[0] - 1.0
    sft, *_ = dpo_loss(*t[:4], beta=0.1, loss_type="sft", chosen_lengths=t[4],
                       rejected_lengths=t[5], chosen_nll_logps=plain)
    assert sft[0].item() == pytest.approx(-(plain.sum() / t[4].sum()).item(), rel=1e-12)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"loss_weights": 0.5}, r"^loss_weights must be a list of numbers, one per loss_type, got "
                            r"0.5"),
    ({"loss_weights": "1"}, r"^loss_weights must be a list of numbers"),
    ({"loss_weights": ["x"]}, r"^loss_weights must be finite numbers, got \['x'\]"),
    ({"rpo_alpha": "x"}, r"^rpo_alpha must be a finite number ≥ 0 or None, got 'x'"),
    ({"rpo_alpha": [1.0]}, r"^rpo_alpha must be a finite number ≥ 0 or None"),
])
def test_non_numeric_weights_are_one_line_errors(kwargs, message):
    """The old code raised TypeError/ValueError tracebacks (not DpokitError) for these."""
    batch = _batch(16, n=2)
    with pytest.raises(DpokitError, match=message):
        _dpokit("sigmoid", batch, beta=0.1, **kwargs)
