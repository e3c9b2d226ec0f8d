"""Preference-optimisation losses: summed log-probabilities in, per-pair losses and rewards out.

    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta=0.1, loss_type="sigmoid")          # all (B,); loss = losses.mean()

Pure tensor functions: no models, no I/O, no global state. Names and numbers follow Hugging Face
TRL 1.x's ``DPOTrainer`` (``loss_type``, ``loss_weights``, ``label_smoothing``,
``f_divergence_type``, ``f_alpha_divergence_coef``, ``discopop_tau``, WPO weighting), so a TRL user
gets the same values; ``simpo`` follows TRL's ``CPOTrainer``. Beyond TRL 1.x: cDPO label smoothing
on ``sigmoid`` (as TRL 0.x), the BCO reward shift ``bco_delta`` (TRL 0.x's running mean, kept by
the caller), the RPO term ``rpo_alpha`` (TRL 0.x) and ODPO (``odpo``), whose offset is the data's
per-pair margin scaled by ``odpo_alpha``. docs/theory.md §5 gives the notation.

Modules, along the data flow:

- :mod:`~dpokit.losses.scores`: :class:`LossInputs` and the f-divergence scores of log-ratios.
- :mod:`~dpokit.losses.variants`: one pure function per loss, with its formula and paper.
- :mod:`~dpokit.losses.registry`: :data:`LOSSES`, each :class:`LossSpec` declaring what it needs
  and its :class:`HyperParameter` s with their ranges; the trainer asks :func:`needs_reference`
  & co. instead of comparing names, builds its config fields from :func:`hyper_parameters` and
  validates them with :func:`check_loss_options`.
- :mod:`~dpokit.losses.dpo`: :func:`dpo_loss`, the one entry point; :func:`wpo_weights`,
  :func:`rpo_nll`.
- :mod:`~dpokit.losses.metrics`: rewards/logps metrics as sums and a count.

Length-desensitised DPO (LD-DPO, TRL's ``ld_alpha``) reweights per-token log-probabilities before
they are summed, so it lives in :mod:`dpokit.logps`; the summed log-probs it produces go through
these losses unchanged. Likewise the WPO statistics are computed from logits in
:mod:`dpokit.logps` and passed in here.
"""

from typing import TYPE_CHECKING

from dpokit._lazy import lazy_exports

if TYPE_CHECKING:  # the names, for readers and linters; imported on first use
    from dpokit.losses.dpo import dpo_loss, rpo_nll, wpo_weights
    from dpokit.losses.metrics import (
        METRIC_KEYS,
        METRIC_NAMES,
        add_metric_sums,
        metric_means,
        preference_metrics,
    )
    from dpokit.losses.registry import (
        F_DIVERGENCES,
        LOSSES,
        HyperParameter,
        LossSpec,
        check_loss_options,
        get_loss,
        hyper_parameters,
        is_batch_coupled,
        loss_names,
        needs_label_probs,
        needs_lengths,
        needs_margins,
        needs_reference,
        resolve_losses,
        sorting_losses,
        supports_f_divergence,
        uses_label_smoothing,
    )
    from dpokit.losses.scores import LossInputs, f_divergence_scores

_EXPORTS = {
    "dpo_loss": "dpo",
    "rpo_nll": "dpo",
    "wpo_weights": "dpo",
    "METRIC_KEYS": "metrics",
    "METRIC_NAMES": "metrics",
    "add_metric_sums": "metrics",
    "metric_means": "metrics",
    "preference_metrics": "metrics",
    "LOSSES": "registry",
    "HyperParameter": "registry",
    "LossSpec": "registry",
    "check_loss_options": "registry",
    "get_loss": "registry",
    "hyper_parameters": "registry",
    "is_batch_coupled": "registry",
    "loss_names": "registry",
    "needs_label_probs": "registry",
    "needs_lengths": "registry",
    "needs_margins": "registry",
    "needs_reference": "registry",
    "resolve_losses": "registry",
    "sorting_losses": "registry",
    "supports_f_divergence": "registry",
    "uses_label_smoothing": "registry",
    "F_DIVERGENCES": "registry",
    "LossInputs": "scores",
    "f_divergence_scores": "scores",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "F_DIVERGENCES",
    "LOSSES",
    "METRIC_KEYS",
    "METRIC_NAMES",
    "HyperParameter",
    "LossInputs",
    "LossSpec",
    "add_metric_sums",
    "check_loss_options",
    "dpo_loss",
    "f_divergence_scores",
    "get_loss",
    "hyper_parameters",
    "is_batch_coupled",
    "loss_names",
    "metric_means",
    "needs_label_probs",
    "needs_lengths",
    "needs_margins",
    "needs_reference",
    "preference_metrics",
    "resolve_losses",
    "rpo_nll",
    "sorting_losses",
    "supports_f_divergence",
    "uses_label_smoothing",
    "wpo_weights",
]
