"""The registry of loss variants: each entry declares what it needs, so callers never compare names.

CLI choices (:func:`loss_names`), config validation (:func:`resolve_losses`), the trainer's
questions (:func:`needs_reference`, :func:`needs_lengths`, :func:`is_batch_coupled`, ...) and the
test parametrisation all read :data:`LOSSES`. Adding a loss is one function in
:mod:`dpokit.losses.variants`, one entry here and one oracle in the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from torch import Tensor

from dpokit.errors import DpokitError
from dpokit.losses import variants
from dpokit.losses.scores import LossInputs


@dataclass(frozen=True)
class LossSpec:
    """One loss variant and what it needs from the caller."""

    name: str
    """The ``loss_type`` string, spelled as in TRL 1.x where TRL has the loss."""
    fn: Callable[[LossInputs], Tensor]
    """Pure function from :class:`LossInputs` to ``(B,)`` per-pair losses."""
    needs_reference: bool
    """Reads π_ref log-probs (``ref_*`` must not be None)."""
    needs_lengths: bool
    """Reads completion token counts (``chosen_lengths`` and ``rejected_lengths``)."""
    batch_coupled: bool
    """A pair's loss depends on other pairs in the batch (sorting, batch token means): results
    change if the batch is split into micro-batches."""
    uses_label_smoothing: bool
    """Reads ``label_smoothing`` (ε)."""
    supports_f_divergence: bool
    """Built on the scores s_w − s_l, so a non-default ``f_divergence_type`` is meaningful (TRL
    1.x rejects it for the other losses, and so do we)."""
    doc: str
    """One line for CLI help."""
    source: str
    """Where the formula is taken from (paper and trainer)."""


def _spec(name: str, fn: Callable[[LossInputs], Tensor], doc: str, source: str, *,
          reference: bool = True, lengths: bool = False, coupled: bool = False,
          smoothing: bool = False, f_divergence: bool = False) -> LossSpec:
    return LossSpec(name, fn, reference, lengths, coupled, smoothing, f_divergence, doc, source)


_TRL = "TRL 1.x DPOTrainer"
_SPECS = (
    _spec("sigmoid", variants.sigmoid, "DPO logistic loss; label_smoothing gives cDPO",
          f"arXiv:2305.18290; {_TRL} (ε as TRL 0.x)", smoothing=True, f_divergence=True),
    _spec("hinge", variants.hinge, "SLiC hinge loss max(0, 1 − βΔ)",
          f"arXiv:2305.10425; {_TRL}", f_divergence=True),
    _spec("ipo", variants.ipo, "IPO squared loss on per-token averaged log-ratios",
          f"arXiv:2310.12036; {_TRL}", lengths=True, f_divergence=True),
    _spec("exo_pair", variants.exo_pair, "EXO reverse-KL to the ε-smoothed label",
          f"arXiv:2402.00856; {_TRL}", smoothing=True, f_divergence=True),
    _spec("nca_pair", variants.nca_pair, "NCA: absolute likelihoods of both completions",
          f"arXiv:2402.05369; {_TRL}"),
    _spec("robust", variants.robust, "Robust DPO, unbiased under label flips w.p. ε",
          f"arXiv:2403.00409; {_TRL}", smoothing=True, f_divergence=True),
    _spec("bco_pair", variants.bco_pair, "BCO binary classifier on pairs, shift bco_delta",
          f"arXiv:2404.04656; {_TRL} (δ as TRL 0.x)"),
    _spec("sppo_hard", variants.sppo_hard, "SPPO with hard win probabilities",
          f"arXiv:2405.00675; {_TRL}"),
    _spec("aot", variants.aot, "AOT for paired data (sorted over the batch)",
          f"arXiv:2406.05882; {_TRL}", coupled=True, smoothing=True),
    _spec("aot_unpaired", variants.aot_unpaired, "AOT for unpaired data (sorted over the batch)",
          f"arXiv:2406.05882; {_TRL}", coupled=True, smoothing=True),
    _spec("apo_zero", variants.apo_zero, "APO-zero: raise chosen, lower rejected",
          f"arXiv:2408.06266; {_TRL}"),
    _spec("apo_down", variants.apo_down, "APO-down: lower both, rejected more",
          f"arXiv:2408.06266; {_TRL}"),
    _spec("discopop", variants.discopop, "DiscoPOP log-ratio modulated loss (discopop_tau)",
          f"arXiv:2406.08414; {_TRL}", f_divergence=True),
    _spec("sft", variants.sft, "NLL of the chosen completions (batch token mean)",
          _TRL, reference=False, lengths=True, coupled=True, f_divergence=True),
    _spec("sigmoid_norm", variants.sigmoid_norm, "DPO on per-token averaged log-ratios",
          f"arXiv:2405.14734 (normalisation); {_TRL}", lengths=True, f_divergence=True),
    _spec("simpo", variants.simpo, "SimPO: reference-free, length-normalised, margin simpo_gamma",
          "arXiv:2405.14734; TRL CPOTrainer loss_type='simpo'", reference=False, lengths=True,
          smoothing=True),
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


def needs_reference(loss_type: str | Sequence[str]) -> bool:
    """Whether any of the losses reads π_ref log-probs (else no reference model is needed)."""
    return any(spec.needs_reference for spec in resolve_losses(loss_type))


def needs_lengths(loss_type: str | Sequence[str]) -> bool:
    """Whether any of the losses reads completion lengths (``rpo_alpha`` needs them too)."""
    return any(spec.needs_lengths for spec in resolve_losses(loss_type))


def is_batch_coupled(loss_type: str | Sequence[str]) -> bool:
    """Whether any loss couples pairs, so splitting a batch into micro-batches changes it."""
    return any(spec.batch_coupled for spec in resolve_losses(loss_type))


def uses_label_smoothing(loss_type: str | Sequence[str]) -> bool:
    """Whether any of the losses reads ``label_smoothing``."""
    return any(spec.uses_label_smoothing for spec in resolve_losses(loss_type))


def supports_f_divergence(loss_type: str | Sequence[str]) -> bool:
    """Whether every one of the losses accepts a non-default ``f_divergence_type``."""
    return all(spec.supports_f_divergence for spec in resolve_losses(loss_type))
