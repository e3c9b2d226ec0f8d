"""The registry of loss variants: each entry declares what it needs, so callers never compare names.

CLI choices (:func:`loss_names`), config validation (:func:`resolve_losses`,
:func:`check_loss_options`), the config's hyper-parameter fields and flags
(:func:`hyper_parameters`), the trainer's questions (:func:`needs_reference`,
:func:`needs_lengths`, :func:`needs_margins`, :func:`is_batch_coupled`, ...) and the test
parametrisation all read :data:`LOSSES`. Adding a loss, with or without a hyper-parameter, is one
function in :mod:`dpokit.losses.variants`, one entry here and one oracle in the tests.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING

from dpokit.errors import DpokitError

if TYPE_CHECKING:
    from torch import Tensor

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
"""TRL 1.x's ``f_divergence_type`` values (the scores are :mod:`dpokit.losses.scores`')."""
DEFAULT_ALPHA_COEF = 0.5
"""TRL 1.x's default ``f_alpha_divergence_coef``, the only value accepted without
``alpha_divergence`` (any other would silently do nothing)."""


def check_f_divergence(f_divergence_type: str, alpha_coef: float) -> None:
    """Raise :class:`DpokitError` for an unknown f-divergence or a non-finite α."""
    if f_divergence_type not in F_DIVERGENCES:
        raise DpokitError(f"unknown f_divergence_type {f_divergence_type!r}; "
                          f"known: {', '.join(F_DIVERGENCES)}")
    if not math.isfinite(alpha_coef):
        raise DpokitError(f"f_alpha_divergence_coef must be finite, got {alpha_coef!r}")
    if f_divergence_type != "alpha_divergence" and alpha_coef != DEFAULT_ALPHA_COEF:
        raise DpokitError(f"f_alpha_divergence_coef={alpha_coef!r} has no effect with "
                          f"f_divergence_type={f_divergence_type!r}; set it to "
                          f"{DEFAULT_ALPHA_COEF:g} or use alpha_divergence")


def _is_tensor(value: object) -> bool:
    """Whether ``value`` is a torch Tensor (none can be while torch is not imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


class _Variant:
    """``dpokit.losses.variants.<name>``, imported on the first call: the registry's metadata
    (names, needs, hyper-parameters) is read by configs and ``--help`` without torch."""

    def __init__(self, name: str):
        self.name = name

    @property
    def function(self) -> Callable[..., Tensor]:
        """The variant itself (importing torch)."""
        return getattr(importlib.import_module("dpokit.losses.variants"), self.name)

    @property
    def __wrapped__(self) -> Callable[..., Tensor]:  # inspect.signature reads the variant's
        return self.function

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"variants.{self.name}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Variant) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("_Variant", self.name))


@dataclass(frozen=True)
class HyperParameter:
    """A float a loss reads besides β: its config key, default, help line and valid range.

    Each :class:`LossSpec` declares the range it accepts; several losses may declare the same
    name with different ranges (ε is in [0, 0.5) for cDPO but (0, 1) for EXO), but they share
    the default and the help line, since the config has one field per name.
    """

    name: str
    """Config key and :func:`~dpokit.losses.dpo_loss` keyword, e.g. ``label_smoothing``."""
    default: float
    """Value used when the caller gives none (TRL's default where TRL has the parameter)."""
    help: str
    """One line for ``--help``."""
    low: float | None = None
    """Lower bound, or None for none."""
    low_open: bool = False
    """Whether ``low`` itself is excluded."""
    high: float | None = None
    """Upper bound, or None for none."""
    high_open: bool = False
    """Whether ``high`` itself is excluded."""
    hint: str = ""
    """Appended in parentheses to the error for a value out of this declaration's range."""

    def describe_range(self) -> str:
        """The valid values: ``[0, 0.5)``, ``(0, 1)``, ``> 0``, ``≥ 0``, ... or ``any finite``."""
        low, high = self.low, self.high
        if low is not None and high is not None:
            return (f"{'(' if self.low_open else '['}{low:g}, "
                    f"{high:g}{')' if self.high_open else ']'}")
        if low is not None:
            return f"{'>' if self.low_open else '≥'} {low:g}"
        if high is not None:
            return f"{'<' if self.high_open else '≤'} {high:g}"
        return "any finite"

    def check(self, value: float, loss: str) -> None:
        """Raise :class:`DpokitError` unless ``value`` is finite and in range for ``loss``.

        The message names the key, the loss and the range, e.g. ``label_smoothing must be in
        [0, 0.5) for sigmoid, got 0.5``.
        """
        try:
            number = float(value)
            shown = repr(number)
        except (TypeError, ValueError):
            number, shown = math.nan, repr(value)
        if math.isfinite(number) and self._contains(number):
            return
        bounded = self.low is not None and self.high is not None
        if self.low is None and self.high is None:
            requirement = "finite"
        else:
            requirement = f"{'in ' if bounded else ''}{self.describe_range()}"
            if not math.isfinite(number):
                requirement = f"finite and {requirement}"
        hint = f" ({self.hint})" if self.hint else ""
        raise DpokitError(f"{self.name} must be {requirement} for {loss}, got {shown}{hint}")

    def _contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


@dataclass(frozen=True)
class LossSpec:
    """One loss variant and what it needs from the caller."""

    name: str
    """The ``loss_type`` string, spelled as in TRL 1.x where TRL has the loss."""
    fn: Callable[..., Tensor]
    """Pure function ``fn(inputs: LossInputs, **hyper_parameters) -> (B,)`` per-pair losses,
    called with exactly the keywords of :attr:`hyper_parameters`."""
    needs_reference: bool
    """Reads π_ref log-probs (``ref_*`` must not be None)."""
    needs_lengths: bool
    """Reads completion token counts (``chosen_lengths`` and ``rejected_lengths``)."""
    needs_margins: bool
    """Reads the ``(B,)`` per-pair margins m from the data (``margins``; ``margin_column``)."""
    needs_label_probs: bool
    """Reads the ``(B,)`` per-pair soft labels p = P(y_w ≻ y_l) (``label_probs``;
    ``label_prob_column``)."""
    batch_coupled: bool
    """A pair's loss depends on other pairs in the batch (sorting, batch token means): results
    change if the batch is split into micro-batches."""
    supports_f_divergence: bool
    """Built on the scores s_w − s_l, so a non-default ``f_divergence_type`` is meaningful (TRL
    1.x rejects it for the other losses, and so do we)."""
    hyper_parameters: tuple[HyperParameter, ...]
    """The hyper-parameters ``fn`` takes as keywords, each with the range this loss accepts."""
    doc: str
    """One line for CLI help."""
    source: str
    """Where the formula is taken from (paper and trainer)."""
    sorts_batch: bool = False
    """Its terms are sorted over the batch (AOT), so term i belongs to no pair: per-pair weights
    (WPO) cannot apply to it."""

    @property
    def hyper_parameter_names(self) -> tuple[str, ...]:
        """Names of :attr:`hyper_parameters`, in declaration order."""
        return tuple(h.name for h in self.hyper_parameters)

    @property
    def uses_label_smoothing(self) -> bool:
        """Reads ``label_smoothing`` (ε)."""
        return "label_smoothing" in self.hyper_parameter_names


# One declaration per hyper-parameter; a loss that narrows the range replaces only the bounds.
_LABEL_SMOOTHING = HyperParameter(
    "label_smoothing", 0.0, "ε: probability that a preference label is flipped (cDPO, robust "
    "DPO, AOT, SimPO; EXO's target); valid range depends on the loss", low=0.0, high=0.5,
    high_open=True)
_EXO_LABEL_SMOOTHING = replace(_LABEL_SMOOTHING, low_open=True, high=1.0,
                               hint="the EXO paper recommends 1e-3")
_BCO_DELTA = HyperParameter(
    "bco_delta", 0.0, "δ: constant reward shift of bco_pair, not updated during training "
    "(TRL 0.x used a running mean of the rewards; 0: TRL 1.x)")
_DISCOPOP_TAU = HyperParameter(
    "discopop_tau", 0.05, "τ > 0: temperature of the discopop modulation (TRL default 0.05)",
    low=0.0, low_open=True)
_SIMPO_GAMMA = HyperParameter(
    "simpo_gamma", 0.5, "γ: target reward margin of simpo (TRL CPOConfig default 0.5)")
_ODPO_ALPHA = HyperParameter(
    "odpo_alpha", 1.0, "α ≥ 0: scale of the data's per-pair margin in odpo's offset α·m",
    low=0.0)
_DPOP_LAMBDA = HyperParameter(
    "dpop_lambda", 50.0, "λ ≥ 0: weight of dpop's penalty on log π_ref(y_w) − log π_θ(y_w) > 0 "
    "(the paper uses 5–500)", low=0.0)


def _spec(name: str, fn: Callable[..., Tensor], doc: str, source: str, *,
          reference: bool = True, lengths: bool = False, margins: bool = False,
          label_probs: bool = False, coupled: bool = False, f_divergence: bool = False,
          sorts: bool = False, hyper: tuple[HyperParameter, ...] = ()) -> LossSpec:
    return LossSpec(name, fn, reference, lengths, margins, label_probs, coupled, f_divergence,
                    hyper, doc, source, sorts)


_TRL = "TRL 1.x DPOTrainer"
_SPECS = (
    _spec("sigmoid", _Variant("sigmoid"), "DPO logistic loss; label_smoothing gives cDPO",
          f"arXiv:2305.18290; {_TRL} (ε as TRL 0.x)", f_divergence=True,
          hyper=(_LABEL_SMOOTHING,)),
    _spec("hinge", _Variant("hinge"), "SLiC hinge loss max(0, 1 − βΔ)",
          f"arXiv:2305.10425; {_TRL}", f_divergence=True),
    _spec("ipo", _Variant("ipo"), "IPO squared loss on per-token averaged log-ratios",
          f"arXiv:2310.12036; {_TRL}", lengths=True, f_divergence=True),
    _spec("exo_pair", _Variant("exo_pair"), "EXO reverse-KL to the ε-smoothed label",
          f"arXiv:2402.00856; {_TRL}", f_divergence=True, hyper=(_EXO_LABEL_SMOOTHING,)),
    _spec("nca_pair", _Variant("nca_pair"), "NCA: absolute likelihoods of both completions",
          f"arXiv:2402.05369; {_TRL}"),
    _spec("robust", _Variant("robust"), "Robust DPO, unbiased under label flips w.p. ε",
          f"arXiv:2403.00409; {_TRL}", f_divergence=True, hyper=(_LABEL_SMOOTHING,)),
    _spec("bco_pair", _Variant("bco_pair"), "BCO binary classifier on pairs, shift bco_delta",
          f"arXiv:2404.04656; {_TRL} (δ as TRL 0.x)", hyper=(_BCO_DELTA,)),
    _spec("sppo_hard", _Variant("sppo_hard"), "SPPO with hard win probabilities",
          f"arXiv:2405.00675; {_TRL}"),
    _spec("aot", _Variant("aot"), "AOT for paired data (sorted over the batch)",
          f"arXiv:2406.05882; {_TRL}", coupled=True, sorts=True,
          hyper=(_LABEL_SMOOTHING,)),
    _spec("aot_unpaired", _Variant("aot_unpaired"), "AOT for unpaired data (sorted over the batch)",
          f"arXiv:2406.05882; {_TRL}", coupled=True, sorts=True,
          hyper=(_LABEL_SMOOTHING,)),
    _spec("apo_zero", _Variant("apo_zero"), "APO-zero: raise chosen, lower rejected",
          f"arXiv:2408.06266; {_TRL}"),
    _spec("apo_down", _Variant("apo_down"), "APO-down: lower both, rejected more",
          f"arXiv:2408.06266; {_TRL}"),
    _spec("discopop", _Variant("discopop"), "DiscoPOP log-ratio modulated loss (discopop_tau)",
          f"arXiv:2406.08414; {_TRL}", f_divergence=True, hyper=(_DISCOPOP_TAU,)),
    _spec("sft", _Variant("sft"), "NLL of the chosen completions (batch token mean)",
          _TRL, reference=False, lengths=True, coupled=True, f_divergence=True),
    _spec("sigmoid_norm", _Variant("sigmoid_norm"), "DPO on per-token averaged log-ratios",
          f"arXiv:2405.14734 (normalisation); {_TRL}", lengths=True, f_divergence=True),
    _spec("simpo", _Variant("simpo"),
          "SimPO: reference-free, length-normalised, margin simpo_gamma",
          "arXiv:2405.14734; TRL CPOTrainer loss_type='simpo'", reference=False, lengths=True,
          hyper=(_SIMPO_GAMMA, _LABEL_SMOOTHING)),
    _spec("odpo", _Variant("odpo"), "DPO with an offset α·m, m the data's margin (odpo_alpha)",
          "arXiv:2402.10571 (offset taken from the data's margin column)", margins=True,
          f_divergence=True, hyper=(_ODPO_ALPHA,)),
    _spec("sigmoid_soft", _Variant("sigmoid_soft"),
          "DPO on soft Bradley–Terry labels p (label_prob column); fixed point βh = logit p",
          "docs/theory.md §6 (cross-entropy to the data's preference probability)",
          label_probs=True, f_divergence=True),
    _spec("dpop", _Variant("dpop"), "DPO-Positive: DPO plus λ·max(0, −u_w) inside the sigmoid",
          "arXiv:2402.13228 (Smaug); keeps the chosen likelihood at or above π_ref's",
          hyper=(_DPOP_LAMBDA,)),
)

LOSSES: MappingProxyType[str, LossSpec] = MappingProxyType({s.name: s for s in _SPECS})
"""Every loss variant by name, read-only."""


def loss_names() -> tuple[str, ...]:
    """The registered ``loss_type`` names, in registry order (for CLI choices and validation)."""
    return tuple(LOSSES)


def get_loss(name: str) -> LossSpec:
    """The :class:`LossSpec` called ``name``; :class:`DpokitError` listing the names otherwise."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise DpokitError(
            f"unknown loss_type {name!r}; known: {', '.join(loss_names())}") from None


def resolve_losses(loss_type: str | Sequence[str]) -> tuple[LossSpec, ...]:
    """One name or a list of names (TRL's multi-loss ``loss_type``) to their specs."""
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not names:
        raise DpokitError(f"loss_type is empty; choose from: {', '.join(loss_names())}")
    return tuple(get_loss(name) for name in names)


def hyper_parameters() -> dict[str, HyperParameter]:
    """Every declared hyper-parameter by name, one per name, in registry order.

    The value is the first declaration; its default and help are those of every declaration
    (the tests assert it), its range only that loss's: check values with
    :func:`check_loss_options`. The trainer config builds one float field per entry.
    """
    found: dict[str, HyperParameter] = {}
    for spec in LOSSES.values():
        for parameter in spec.hyper_parameters:
            found.setdefault(parameter.name, parameter)
    return found


def check_loss_options(loss_type: str | Sequence[str],
                       options: Mapping[str, float | Tensor]) -> None:
    """Check hyper-parameter values against what the requested losses declare.

    Each requested loss's declared hyper-parameters are range-checked, taking the value in
    ``options`` or else the default. A key that no requested loss reads must equal its
    default (a non-default value would silently do nothing); an unknown key is an error.
    A 0-dim Tensor (``bco_delta``'s running mean, kept on the device) is accepted and its
    value not read, so the training step never waits on the device, but only for a
    hyper-parameter without a declared range (a Tensor would skip the range check); for a key
    no requested loss reads, a Tensor counts as a non-default value.

    Raises:
        DpokitError: unknown loss name or key, a value out of a loss's range, a Tensor for a
            range-checked hyper-parameter, or a non-default value that none of the losses
            reads.
    """
    specs = resolve_losses(loss_type)
    known = hyper_parameters()
    if unknown := [key for key in options if key not in known]:
        raise DpokitError(f"unknown hyper-parameter {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(known)}")
    read = {name for spec in specs for name in spec.hyper_parameter_names}
    for key, value in options.items():
        if key not in read and (_is_tensor(value) or value != known[key].default):
            names = ", ".join(sorted({spec.name for spec in specs}))
            shown = "a Tensor" if _is_tensor(value) else repr(value)
            raise DpokitError(f"{key}={shown} has no effect on loss_type {names}; "
                              f"set it to {known[key].default:g}")
    for spec in specs:
        for parameter in spec.hyper_parameters:
            value = options.get(parameter.name, parameter.default)
            if not _is_tensor(value):
                parameter.check(value, spec.name)
            elif value.ndim != 0:
                raise DpokitError(f"{parameter.name} must be a number or a 0-dim Tensor for "
                                  f"{spec.name}, got shape {tuple(value.shape)}")
            elif parameter.low is not None or parameter.high is not None:
                # A Tensor's value is not read (no host sync), so it cannot be range-checked:
                # robust's ε = 0.5 would divide by 0, discopop's τ = 0 silently change the loss.
                raise DpokitError(f"{parameter.name} must be a number for {spec.name} (its range "
                                  f"{parameter.describe_range()} is checked), got a Tensor")


def needs_reference(loss_type: str | Sequence[str]) -> bool:
    """Whether any of the losses reads π_ref log-probs (else no reference model is needed)."""
    return any(spec.needs_reference for spec in resolve_losses(loss_type))


def needs_lengths(loss_type: str | Sequence[str]) -> bool:
    """Whether any of the losses reads completion lengths (``rpo_alpha`` needs them too)."""
    return any(spec.needs_lengths for spec in resolve_losses(loss_type))


def needs_label_probs(loss_type: str | Sequence[str]) -> bool:
    """Whether any of the losses reads per-pair soft labels (``label_prob_column``)."""
    return any(spec.needs_label_probs for spec in resolve_losses(loss_type))


def needs_margins(loss_type: str | Sequence[str]) -> bool:
    """Whether any of the losses reads the per-pair margins of the data (``margin_column``)."""
    return any(spec.needs_margins for spec in resolve_losses(loss_type))


def is_batch_coupled(loss_type: str | Sequence[str]) -> bool:
    """Whether any loss couples pairs, so splitting a batch into micro-batches changes it."""
    return any(spec.batch_coupled for spec in resolve_losses(loss_type))


def sorting_losses(loss_type: str | Sequence[str]) -> list[str]:
    """The names of the losses that sort their terms over the batch (per-pair weights cannot
    apply to them)."""
    return [spec.name for spec in resolve_losses(loss_type) if spec.sorts_batch]


def uses_label_smoothing(loss_type: str | Sequence[str]) -> bool:
    """Whether any of the losses reads ``label_smoothing``."""
    return any(spec.uses_label_smoothing for spec in resolve_losses(loss_type))


def supports_f_divergence(loss_type: str | Sequence[str]) -> bool:
    """Whether every one of the losses accepts a non-default ``f_divergence_type``."""
    return all(spec.supports_f_divergence for spec in resolve_losses(loss_type))
