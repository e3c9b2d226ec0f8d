"""The registry's hyper-parameter declarations: ranges, messages, one config field per name, and
:func:`check_loss_options`, the validation ``dpo_loss`` and the trainer config share."""

import inspect
import math

import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.losses import LOSSES, HyperParameter, check_loss_options, hyper_parameters


def test_declarations_of_one_name_share_default_and_help():
    """The config has one field per name, so every loss declaring it must agree on both."""
    for name, first in hyper_parameters().items():
        for spec in LOSSES.values():
            for parameter in spec.hyper_parameters:
                if parameter.name == name:
                    assert (parameter.default, parameter.help) == (first.default, first.help), (
                        spec.name, name)
                    assert math.isfinite(parameter.default)


def test_hyper_parameters_is_the_union_in_registry_order():
    """One entry per declared name, first declaration first; today's config keys among them."""
    union: list[str] = []
    for spec in LOSSES.values():
        union += [name for name in spec.hyper_parameter_names if name not in union]
    assert list(hyper_parameters()) == union
    assert {"label_smoothing", "discopop_tau", "simpo_gamma", "bco_delta"} <= set(union)
    defaults = {name: p.default for name, p in hyper_parameters().items()}
    assert defaults == {"label_smoothing": 0.0, "bco_delta": 0.0, "discopop_tau": 0.05,
                        "simpo_gamma": 0.5, "odpo_alpha": 1.0, "dpop_lambda": 50.0}


def test_each_variant_takes_exactly_its_declared_keywords():
    """``dpo_loss`` passes a variant the names its spec declares: the signatures must match."""
    for spec in LOSSES.values():
        keywords = [p.name for p in inspect.signature(spec.fn).parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert sorted(keywords) == sorted(spec.hyper_parameter_names), spec.name


def test_label_smoothing_is_declared_by_the_same_losses_as_before():
    """``uses_label_smoothing`` is now derived from the declarations; the set is unchanged."""
    users = {name for name, spec in LOSSES.items() if spec.uses_label_smoothing}
    assert users == {"sigmoid", "exo_pair", "robust", "aot", "aot_unpaired", "simpo"}


@pytest.mark.parametrize(("parameter", "described"), [
    (HyperParameter("x", 0.0, "", low=0.0, high=0.5, high_open=True), "[0, 0.5)"),
    (HyperParameter("x", 0.0, "", low=0.0, low_open=True, high=1.0, high_open=True), "(0, 1)"),
    (HyperParameter("x", 0.0, "", low=-1.0, high=2.5), "[-1, 2.5]"),
    (HyperParameter("x", 1.0, "", low=0.0, low_open=True), "> 0"),
    (HyperParameter("x", 1.0, "", low=0.0), "≥ 0"),
    (HyperParameter("x", 0.0, "", high=1.0, high_open=True), "< 1"),
    (HyperParameter("x", 0.0, "", high=1.0), "≤ 1"),
    (HyperParameter("x", 0.0, ""), "any finite"),
])
def test_describe_range(parameter, described):
    assert parameter.describe_range() == described


def test_check_bounds_are_open_or_closed_as_declared():
    half_open = HyperParameter("x", 0.0, "", low=0.0, high=0.5, high_open=True)
    half_open.check(0.0, "loss")
    half_open.check(0.4999, "loss")
    for value in (-1e-9, 0.5, math.nan, math.inf, -math.inf):
        with pytest.raises(DpokitError):
            half_open.check(value, "loss")
    unbounded = HyperParameter("x", 0.0, "")
    unbounded.check(-1e30, "loss")
    for value in (math.nan, math.inf, "fast"):
        with pytest.raises(DpokitError, match="x must be finite for loss"):
            unbounded.check(value, "loss")


@pytest.mark.parametrize(("loss", "options", "message"), [
    ("sigmoid", {"label_smoothing": 0.5},
     "label_smoothing must be in [0, 0.5) for sigmoid, got 0.5"),
    ("robust", {"label_smoothing": math.nan},
     "label_smoothing must be finite and in [0, 0.5) for robust, got nan"),
    ("exo_pair", {},
     "label_smoothing must be in (0, 1) for exo_pair, got 0.0 (the EXO paper recommends 1e-3)"),
    ("discopop", {"discopop_tau": 0.0}, "discopop_tau must be > 0 for discopop, got 0.0"),
    ("discopop", {"discopop_tau": math.inf},
     "discopop_tau must be finite and > 0 for discopop, got inf"),
    ("simpo", {"simpo_gamma": math.nan}, "simpo_gamma must be finite for simpo, got nan"),
    ("bco_pair", {"bco_delta": -math.inf}, "bco_delta must be finite for bco_pair, got -inf"),
    ("odpo", {"odpo_alpha": -0.5}, "odpo_alpha must be ≥ 0 for odpo, got -0.5"),
    ("dpop", {"dpop_lambda": -1.0}, "dpop_lambda must be ≥ 0 for dpop, got -1.0"),
    (["hinge", "sigmoid"], {"simpo_gamma": 1.0},
     "simpo_gamma=1.0 has no effect on loss_type hinge, sigmoid; set it to 0.5"),
    ("sigmoid", {"label_smooth": 0.1},
     "unknown hyper-parameter 'label_smooth'; known: label_smoothing, bco_delta, discopop_tau, "
     "simpo_gamma, odpo_alpha, dpop_lambda"),
])
def test_check_loss_options_messages(loss, options, message):
    with pytest.raises(DpokitError) as info:
        check_loss_options(loss, options)
    assert str(info.value) == message


def _accepts(parameter: HyperParameter, value: float, loss: str) -> bool:
    try:
        parameter.check(value, loss)
    except DpokitError:
        return False
    return True


def test_check_loss_options_accepts_defaults_and_per_loss_ranges():
    """Every key at its default is fine for any loss with a valid default; missing keys take the
    default; each loss of a combination checks its own range."""
    defaults = {name: p.default for name, p in hyper_parameters().items()}
    for name, spec in LOSSES.items():
        if all(_accepts(p, p.default, name) for p in spec.hyper_parameters):
            check_loss_options(name, defaults)
            check_loss_options(name, {})
        else:  # exo_pair: its default ε = 0 lies outside (0, 1), so ε must be set
            with pytest.raises(DpokitError, match=name):
                check_loss_options(name, {})
    check_loss_options(["sigmoid", "exo_pair"], {"label_smoothing": 0.3})
    with pytest.raises(DpokitError, match="for sigmoid"):
        check_loss_options(["sigmoid", "exo_pair"], {"label_smoothing": 0.7})
    with pytest.raises(DpokitError, match="unknown loss_type"):
        check_loss_options("kto_pair", {})


def test_check_loss_options_tensor_values():
    """A 0-dim Tensor (bco_delta's running mean) passes unread; other shapes, or a Tensor for a
    key none of the losses reads, are refused."""
    check_loss_options("bco_pair", {"bco_delta": torch.tensor(0.4)})
    with pytest.raises(DpokitError, match="0-dim"):
        check_loss_options("bco_pair", {"bco_delta": torch.zeros(3)})
    with pytest.raises(DpokitError, match="bco_delta=a Tensor has no effect"):
        check_loss_options("sigmoid", {"bco_delta": torch.tensor(0.0)})


def test_a_spec_survives_pickling_equal():
    """The registry's lazily imported loss functions compare by name: a spec sent to another
    process (pickled) equals the original, and calls the same function."""
    import pickle

    for spec in LOSSES.values():
        assert pickle.loads(pickle.dumps(spec)) == spec
