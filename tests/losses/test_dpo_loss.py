"""``dpo_loss`` as a whole: the registry's declarations hold, errors, combinations, rewards,
RPO, WPO. Float64 throughout; equalities to 1e-12 unless stated."""

import contextlib
import dataclasses
import math

import numpy as np
import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.losses import (
    LOSSES,
    HyperParameter,
    dpo_loss,
    hyper_parameters,
    is_batch_coupled,
    loss_names,
    needs_lengths,
    needs_margins,
    needs_reference,
    supports_f_divergence,
    uses_label_smoothing,
    wpo_weights,
)
from tests.losses.batches import label_probs, margins, random_pairs, run, tensors
from tests.losses.oracles import Params

NAMES = loss_names()


def _params(name: str) -> Params:
    return Params(beta=0.3, eps=0.1 if LOSSES[name].uses_label_smoothing else 0.0, delta=0.2)


# --- the registry's declarations are true -------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_reference_declaration(name):
    """Reference-free losses run with ref=None; the others raise a DpokitError naming the loss."""
    pairs = random_pairs(0)
    pc, pr, _, _, lc, lr = tensors(pairs)
    eps = _params(name).eps
    call = lambda: dpo_loss(pc, pr, None, None, beta=0.3, loss_type=name,  # noqa: E731
                            label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr,
                            margins=margins(pairs), label_probs=label_probs(pairs))
    if LOSSES[name].needs_reference:
        with pytest.raises(DpokitError, match=name):
            call()
    else:
        losses, chosen, rejected = call()
        assert torch.isfinite(losses).all()
        # without a reference the rewards are β·log π_θ / |y| (CPOTrainer's SimPO rewards)
        torch.testing.assert_close(chosen, 0.3 * pc / lc, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rejected, 0.3 * pr / lr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_lengths_declaration(name):
    """Losses that declare lengths raise without them; the others run without them."""
    pairs = random_pairs(1)
    pc, pr, rc, rr, _, _ = tensors(pairs)
    call = lambda: dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=name,  # noqa: E731
                            label_smoothing=_params(name).eps, margins=margins(pairs),
                            label_probs=label_probs(pairs))
    if LOSSES[name].needs_lengths:
        with pytest.raises(DpokitError, match="lengths"):
            call()
    else:
        assert torch.isfinite(call()[0]).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("needs", "column", "message"), [
    ("needs_margins", "m", "margin_column"), ("needs_label_probs", "s", "label_prob_column")])
def test_per_pair_data_declaration(name, needs, column, message):
    """Losses that declare a per-pair data column (margins, soft labels) raise without it; the
    others ignore it."""
    pairs = random_pairs(1)
    without = dataclasses.replace(pairs, **{column: None})
    if getattr(LOSSES[name], needs):
        with pytest.raises(DpokitError, match=message):
            run(without, _params(name), name)
    else:
        with_column, *_ = run(pairs, _params(name), name)
        assert torch.equal(with_column, run(without, _params(name), name)[0])


@pytest.mark.parametrize("name", NAMES)
def test_label_smoothing_declaration(name):
    """ε changes the losses that declare it; the others refuse a non-zero ε."""
    pairs = random_pairs(2)
    if LOSSES[name].uses_label_smoothing:
        a, *_ = run(pairs, Params(beta=0.3, eps=0.05), name)
        b, *_ = run(pairs, Params(beta=0.3, eps=0.2), name)
        assert not torch.allclose(a, b)
    else:
        with pytest.raises(DpokitError, match="label_smoothing"):
            run(pairs, Params(beta=0.3), name, label_smoothing=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_batch_coupling_declaration(name):
    """Uncoupled losses give the same per-pair values on two halves as on the whole batch."""
    pairs, params = random_pairs(3, n=10), _params(name)
    whole, *_ = run(pairs, params, name)
    halves = [run(type(pairs)(*(v[s] for v in vars(pairs).values())), params, name)[0]
              for s in (slice(0, 4), slice(4, 10))]
    split_equal = torch.allclose(whole, torch.cat(halves), rtol=1e-12, atol=1e-12)
    assert split_equal is not LOSSES[name].batch_coupled


@pytest.mark.parametrize("name", NAMES)
def test_f_divergence_declaration(name):
    """A non-default f-divergence is accepted exactly by the losses that declare support."""
    pairs = random_pairs(4)
    if LOSSES[name].supports_f_divergence:
        losses, *_ = run(pairs, Params(beta=0.3, eps=_params(name).eps, f="js_divergence"), name)
        assert torch.isfinite(losses).all()
    else:
        with pytest.raises(DpokitError, match="f_divergence_type"):
            run(pairs, Params(beta=0.3, eps=_params(name).eps, f="js_divergence"), name)


DECLARED = [(spec.name, p.name) for spec in LOSSES.values() for p in spec.hyper_parameters]
UNDECLARED = [(spec.name, key) for spec in LOSSES.values() for key in hyper_parameters()
              if key not in spec.hyper_parameter_names]


def _declaration(name: str, key: str) -> HyperParameter:
    return next(p for p in LOSSES[name].hyper_parameters if p.name == key)


@pytest.mark.parametrize(("name", "key"), DECLARED)
def test_hyper_parameter_declaration(name, key):
    """A declared hyper-parameter changes the loss; values outside its declared range (or not
    finite) are refused with a message naming the key, the loss and the range."""
    pairs, parameter = random_pairs(2), _declaration(name, key)
    accepted = []
    for value in (0.05, 0.2, 0.7, 2.0):
        with contextlib.suppress(DpokitError):
            parameter.check(value, name)
            accepted.append(value)
    a, *_ = run(pairs, _params(name), name, **{key: accepted[0]})
    b, *_ = run(pairs, _params(name), name, **{key: accepted[1]})
    assert not torch.allclose(a, b)
    outside = [math.nan, math.inf]
    if parameter.low is not None:
        outside.append(parameter.low if parameter.low_open else parameter.low - 0.1)
    if parameter.high is not None:
        outside.append(parameter.high if parameter.high_open else parameter.high + 0.1)
    for value in outside:
        with pytest.raises(DpokitError) as info:
            run(pairs, _params(name), name, **{key: value})
        message = str(info.value)
        assert key in message and name in message, message
        if parameter.low is not None or parameter.high is not None:
            assert parameter.describe_range() in message, message


@pytest.mark.parametrize(("name", "key"), UNDECLARED)
def test_undeclared_hyper_parameter_is_refused_unless_default(name, key):
    """A hyper-parameter the loss does not read may only be given at its default."""
    pairs, default = random_pairs(2), hyper_parameters()[key].default
    at_default, *_ = run(pairs, _params(name), name, **{key: default})
    assert torch.equal(at_default, run(pairs, _params(name), name)[0])
    with pytest.raises(DpokitError, match=f"{key}=.* has no effect on loss_type {name}"):
        run(pairs, _params(name), name, **{key: default + 0.25})


def test_capability_helpers_read_the_registry():
    """Helpers answer for one name or a list (any/all), never by comparing names elsewhere."""
    assert needs_reference("sigmoid") and not needs_reference("simpo")
    assert needs_reference(["simpo", "hinge"]) and not needs_reference(["simpo", "sft"])
    assert needs_lengths("ipo") and needs_lengths(["sigmoid", "sft"]) and not needs_lengths("hinge")
    assert is_batch_coupled(["sigmoid", "aot"]) and not is_batch_coupled("sigmoid")
    assert uses_label_smoothing("robust") and not uses_label_smoothing("ipo")
    assert needs_margins(["sigmoid", "odpo"]) and not needs_margins(["sigmoid", "simpo"])
    assert supports_f_divergence(["sigmoid", "ipo"]) and not supports_f_divergence(["ipo", "aot"])
    assert {s.needs_reference for s in LOSSES.values()} == {True, False}


# --- user errors ---------------------------------------------------------------------------------

def test_unknown_loss_name_lists_the_known_ones():
    pc, pr, rc, rr, _, _ = tensors(random_pairs(0))
    with pytest.raises(DpokitError) as info:
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="kto_pair")
    message = str(info.value)
    assert "kto_pair" in message and all(name in message for name in NAMES)
    with pytest.raises(DpokitError, match="empty"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=[])


@pytest.mark.parametrize("beta", [0.0, -0.1, math.nan, math.inf])
def test_bad_beta_raises(beta):
    pc, pr, rc, rr, _, _ = tensors(random_pairs(0))
    with pytest.raises(DpokitError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=beta)


@pytest.mark.parametrize(("loss_type", "kwargs", "match"), [
    ("exo_pair", {"label_smoothing": 0.0}, "exo_pair"),
    ("robust", {"label_smoothing": 0.5}, r"\[0, 0.5\)"),
    ("sigmoid", {"label_smoothing": -0.1}, r"\[0, 0.5\)"),
    ("sigmoid", {"f_divergence_type": "tv"}, "unknown f_divergence_type"),
    ("sigmoid", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": math.nan},
     "finite"),
    ("discopop", {"discopop_tau": 0.0}, "discopop_tau"),
    (["sigmoid", "hinge"], {"loss_weights": [1.0]}, "loss_weights"),
    ("sigmoid", {"rpo_alpha": 1.0}, "chosen_lengths"),
    ("sigmoid", {"chosen_lengths": torch.ones(12)}, "both"),
    ("sigmoid", {"chosen_wpo_logweights": torch.zeros(12)}, "both"),
    ("sigmoid", {"chosen_lengths": torch.ones(3), "rejected_lengths": torch.ones(3)}, "shape"),
])
def test_bad_options_raise(loss_type, kwargs, match):
    pc, pr, rc, rr, _, _ = tensors(random_pairs(0))
    with pytest.raises(DpokitError, match=match):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, **kwargs)


def test_reference_must_be_both_or_neither():
    pc, pr, rc, _, lc, lr = tensors(random_pairs(0))
    with pytest.raises(DpokitError, match="both"):
        dpo_loss(pc, pr, rc, None, beta=0.1, loss_type="simpo", chosen_lengths=lc,
                 rejected_lengths=lr)


# --- combinations, rewards, RPO, WPO -------------------------------------------------------------

def test_combined_losses_are_the_weighted_sum_and_rewards_do_not_change():
    """TRL 1.x's MPO: Σ_k w_k L_k, rewards reported once as β·(log π_θ − log π_ref)."""
    pairs = random_pairs(5)
    params = Params(beta=0.2, eps=0.1, delta=0.2)
    names, weights = ["sigmoid", "bco_pair", "sft", "ipo"], [0.8, 0.2, 1.0, 0.5]
    combined, chosen, rejected, _ = run(pairs, params, names, loss_weights=weights)
    singles = [run(pairs, params, name) for name in names]
    expected = sum(w * single[0] for w, single in zip(weights, singles, strict=True))
    torch.testing.assert_close(combined, expected, rtol=1e-12, atol=1e-12)
    unweighted, *_ = run(pairs, params, names)  # default weights are 1.0
    torch.testing.assert_close(unweighted, sum(s[0] for s in singles), rtol=1e-12, atol=1e-12)
    pc, pr, rc, rr, _, _ = tensors(pairs)
    torch.testing.assert_close(chosen, 0.2 * (pc - rc), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rejected, 0.2 * (pr - rr), rtol=1e-12, atol=1e-12)
    for single in singles:
        assert torch.equal(single[1], chosen) and torch.equal(single[2], rejected)


def test_rewards_are_detached():
    losses, chosen, rejected, _ = run(random_pairs(6), Params(beta=0.5), "sigmoid",
                                      requires_grad=True)
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad


def test_rpo_adds_alpha_times_per_token_nll_of_chosen():
    """losses(rpo_alpha=α) − losses = α · (−log π_θ(y_w) / |y_w|), pair by pair."""
    pairs = random_pairs(7)
    base, *_ = run(pairs, Params(beta=0.1), "sigmoid")
    with_rpo, *_ = run(pairs, Params(beta=0.1), "sigmoid", rpo_alpha=0.7)
    nll = [-a / n for a, n in zip(pairs.pc, pairs.lc, strict=True)]
    np.testing.assert_allclose((with_rpo - base).numpy(), 0.7 * np.array(nll), rtol=1e-10)


def test_wpo_weights_scale_the_losses_without_gradient():
    """w = exp(a_w + a_l) (TRL 1.x, no clamp at 1) multiplies the whole per-pair loss (RPO term
    included); the exponent is capped at ½·log(float max) so that absurd inputs stay finite."""
    pairs = random_pairs(8, n=6)
    a_w = torch.tensor([-0.3, -2.0, 0.5, 1e4, -1e4, 3.0], dtype=torch.float64, requires_grad=True)
    a_l = torch.tensor([-0.1, -0.5, 0.2, 1e4, -1e4, 2.5], dtype=torch.float64)
    cap = 0.5 * math.log(torch.finfo(torch.float64).max)
    expected_w = [math.exp(min(x + y, cap)) for x, y in zip(a_w.tolist(), a_l.tolist(),
                                                             strict=True)]
    assert expected_w[5] == pytest.approx(math.exp(5.5))  # > 1: not clamped
    np.testing.assert_allclose(wpo_weights(a_w, a_l).numpy(), expected_w, rtol=1e-12)
    base, *_ = run(pairs, Params(beta=0.1), "sigmoid", rpo_alpha=0.5)
    weighted, *_ = run(pairs, Params(beta=0.1), "sigmoid", requires_grad=True, rpo_alpha=0.5,
                       chosen_wpo_logweights=a_w, rejected_wpo_logweights=a_l)
    np.testing.assert_allclose(weighted.detach().numpy(), base.numpy() * expected_w, rtol=1e-12)
    weighted.sum().backward()
    assert a_w.grad is None


def test_bco_delta_accepts_a_tensor_and_shifts_rewards():
    pairs = random_pairs(9)
    as_float, *_ = run(pairs, Params(beta=0.2, delta=0.4), "bco_pair")
    as_tensor, *_ = run(pairs, Params(beta=0.2), "bco_pair",
                        bco_delta=torch.tensor(0.4, dtype=torch.float64))
    unshifted, *_ = run(pairs, Params(beta=0.2), "bco_pair")
    torch.testing.assert_close(as_float, as_tensor, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(as_float, unshifted)


def test_float32_inputs_give_float32_outputs_close_to_float64():
    """float32 agrees with float64 to 1e-5 relative on ordinary inputs, for every loss."""
    pairs = random_pairs(10)
    for name in NAMES:
        params = _params(name)
        lo, *_ = run(pairs, params, name, dtype=torch.float32)
        hi, *_ = run(pairs, params, name)
        assert lo.dtype == torch.float32
        np.testing.assert_allclose(lo.double().numpy(), hi.numpy(), rtol=1e-5, atol=1e-5)
