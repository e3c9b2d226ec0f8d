"""``dpo_loss``: summed log-probabilities of preference pairs → per-pair losses and rewards.

One call checks the arguments against what the requested variants declare in the registry,
forms the f-divergence scores, takes the weighted sum of the variants (TRL's multi-loss
``loss_type``), adds the RPO term, applies WPO weights, and returns the implicit rewards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dpokit.errors import DpokitError, check_beta
from dpokit.losses.registry import LossSpec, check_loss_options, resolve_losses, sorting_losses
from dpokit.losses.scores import LossInputs, check_f_divergence, f_divergence_scores


def wpo_weights(chosen_wpo_logweights: Tensor, rejected_wpo_logweights: Tensor) -> Tensor:
    """WPO pair weights (arXiv:2406.11827, Eq. 2) as TRL 1.x computes them, without grad.

        w = exp(a_w) · exp(a_l) = exp(a_w + a_l)

    where a = (1/|y|) Σ_t [log π_θ(y_t|·) − log Σ_v π_θ(v|·)²] is the per-sequence statistic
    (``logsumexp(2·log_softmax)`` per token, averaged over completion tokens; computed by
    :mod:`dpokit.logps`). Since Σ_v π(v)² ≥ 1/V, every a ≤ log V, so w ≤ V² is finite for any
    real model; the exponent is still capped at half the dtype's largest exponent so that
    arbitrary inputs stay finite. (TRL 0.x clamped w at 1; TRL 1.x does not, nor do we.)

    Args:
        chosen_wpo_logweights: ``(B,)`` a for the chosen completions.
        rejected_wpo_logweights: ``(B,)`` a for the rejected completions.

    Returns:
        ``(B,)`` positive weights, detached.
    """
    total = (chosen_wpo_logweights + rejected_wpo_logweights).detach()
    cap = 0.5 * math.log(torch.finfo(total.dtype).max)
    return torch.exp(torch.clamp(total, max=cap))


def rpo_nll(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-pair length-normalised NLL of the chosen completion, RPO's term (arXiv:2404.19733).

        NLL_i = −log π_θ(y_w,i | x_i) / |y_w,i|

    TRL 0.x's ``rpo_alpha`` adds one batch token mean, Σ_i −log π_θ(y_w,i) / Σ_i |y_w,i|,
    to every pair; the batch mean of NLL_i equals it when all chosen lengths are equal, and
    otherwise weighs each pair equally instead of each token. TRL 1.x has no ``rpo_alpha``; it
    expresses RPO as ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, α]`` (the token mean).
    """
    return -policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1.0)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    margins: Tensor | None = None,
    label_probs: Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    rpo_alpha: float | None = None,
    chosen_wpo_logweights: Tensor | None = None,
    rejected_wpo_logweights: Tensor | None = None,
    chosen_nll_logps: Tensor | None = None,
    **hyper_parameters: float | Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses and implicit rewards.

        losses = wpo · (Σ_k w_k · L_k + rpo_alpha · NLL)

    Args:
        policy_chosen_logps: ``(B,)`` log π_θ(y_w|x), summed over completion tokens.
        policy_rejected_logps: ``(B,)`` log π_θ(y_l|x), summed.
        ref_chosen_logps: ``(B,)`` log π_ref(y_w|x), summed; None only for reference-free losses.
        ref_rejected_logps: ``(B,)`` log π_ref(y_l|x), summed; None together with the above.
        beta: β > 0 (for ``ipo`` the τ of the paper).
        loss_type: a registered name (:func:`~dpokit.losses.registry.loss_names`) or a list.
        loss_weights: one weight per entry of ``loss_type``; default 1.0 each (as TRL).
        chosen_lengths: ``(B,)`` completion token counts |y_w|, for losses that need lengths
            and for ``rpo_alpha``; clamped to ≥ 1 as TRL does.
        rejected_lengths: ``(B,)`` |y_l|.
        margins: ``(B,)`` per-pair margins m from the data (``margin_column``), for losses
            that declare ``needs_margins``; ignored by the others.
        f_divergence_type: ``reverse_kl`` (standard), ``forward_kl``, ``js_divergence`` or
            ``alpha_divergence`` (see :mod:`dpokit.losses.scores`).
        f_alpha_divergence_coef: α of ``alpha_divergence`` (TRL 1.x default 0.5).
        rpo_alpha: weight ≥ 0 of the RPO term (see :func:`rpo_nll`); None or 0 for none.
        chosen_wpo_logweights: ``(B,)`` WPO statistic of y_w (see :func:`wpo_weights`).
        rejected_wpo_logweights: ``(B,)`` WPO statistic of y_l; give both or neither.
        chosen_nll_logps: ``(B,)`` Σ_t log π_θ(y_w,t) without LD-DPO's weights, for the NLL
            terms (``sft``, RPO), which read the plain log-probs as TRL's ``sft`` does; None:
            ``policy_chosen_logps`` (no ``ld_alpha``).
        **hyper_parameters: the values of the hyper-parameters the losses declare
            (:func:`~dpokit.losses.registry.hyper_parameters`: name, default, range; e.g.
            ``label_smoothing=0.1``), each a float (``bco_delta`` may be a 0-dim Tensor).
            A missing one takes its default; each loss gets exactly those it declares, checked
            against its range by :func:`~dpokit.losses.registry.check_loss_options`.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``. The rewards are detached:
        β·(log π_θ − log π_ref) with a reference, as TRL 1.x reports for every loss and every
        combination of losses; without one, β·log π_θ(y)/|y|, as TRL's CPOTrainer reports for
        SimPO. Reduce ``losses`` with a mean over pairs to get TRL's scalar loss.

    Raises:
        DpokitError: unknown loss name or hyper-parameter, β ≤ 0, a hyper-parameter out of a
            loss's range, ``rpo_alpha`` negative or not finite, or an argument the chosen
            losses need but lack (reference, lengths, margins) or cannot use (a non-default
            hyper-parameter none of them reads, a non-default f-divergence, a non-default
            ``f_alpha_divergence_coef`` without ``alpha_divergence``, WPO weights with a loss
            that sorts the batch).
    """
    beta = check_beta(beta)
    specs = resolve_losses(loss_type)
    weights = _loss_weights(specs, loss_weights)
    dtype = policy_chosen_logps.dtype
    _check_shapes(policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                  ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                  chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                  margins=margins, label_probs=label_probs,
                  chosen_wpo_logweights=chosen_wpo_logweights,
                  rejected_wpo_logweights=rejected_wpo_logweights,
                  chosen_nll_logps=chosen_nll_logps)
    has_reference = _pair_present(ref_chosen_logps, ref_rejected_logps, "ref")
    has_lengths = _pair_present(chosen_lengths, rejected_lengths, "lengths")
    has_wpo = _pair_present(chosen_wpo_logweights, rejected_wpo_logweights, "wpo_logweights")
    _check_needs(specs, has_reference, has_lengths, margins is not None,
                 label_probs is not None)
    check_loss_options(loss_type, hyper_parameters)
    _check_f_divergence(specs, f_divergence_type, f_alpha_divergence_coef)
    if rpo_alpha is not None and not (math.isfinite(alpha := _as_float(rpo_alpha)) and alpha >= 0):
        raise DpokitError(f"rpo_alpha must be a finite number ≥ 0 or None, got {rpo_alpha!r}")
    if rpo_alpha and chosen_lengths is None:
        raise DpokitError("rpo_alpha needs chosen_lengths: the RPO term is the NLL per token")
    if has_wpo and (sorting := sorting_losses(loss_type)):
        raise DpokitError(f"WPO weights are per pair, but loss_type {', '.join(sorting)} sorts "
                          f"the batch (its terms are no pair's); drop one (as TRL)")

    def scores(policy: Tensor, ref: Tensor | None) -> Tensor | None:
        if ref is None:
            return None
        return f_divergence_scores(policy - ref, f_divergence_type, f_alpha_divergence_coef)

    def as_lengths(lengths: Tensor | None) -> Tensor | None:
        return None if lengths is None else lengths.to(dtype).clamp(min=1.0)

    inputs = LossInputs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        as_lengths(chosen_lengths), as_lengths(rejected_lengths),
        scores(policy_chosen_logps, ref_chosen_logps),
        scores(policy_rejected_logps, ref_rejected_logps),
        beta=beta, margins=None if margins is None else margins.to(dtype),
        label_probs=None if label_probs is None else label_probs.to(dtype),
        chosen_nll_logps=chosen_nll_logps)

    def options(spec: LossSpec) -> dict[str, float | Tensor]:
        # exactly what the spec declares; defaults for what the caller left out
        values = {p.name: hyper_parameters.get(p.name, p.default) for p in spec.hyper_parameters}
        return {k: v if isinstance(v, Tensor) else float(v) for k, v in values.items()}

    losses = sum(weight * spec.fn(inputs, **options(spec))
                 for spec, weight in zip(specs, weights, strict=True))
    if rpo_alpha:
        losses = losses + float(rpo_alpha) * rpo_nll(inputs.chosen_plain_logps, chosen_lengths)
    if has_wpo:
        losses = losses * wpo_weights(chosen_wpo_logweights, rejected_wpo_logweights)

    if has_reference:
        chosen_rewards = beta * inputs.chosen_logratios
        rejected_rewards = beta * inputs.rejected_logratios
    else:  # only reference-free losses, which all need lengths
        chosen_len, rejected_len = inputs.lengths
        chosen_rewards = beta * policy_chosen_logps / chosen_len
        rejected_rewards = beta * policy_rejected_logps / rejected_len
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def _loss_weights(specs: tuple[LossSpec, ...], loss_weights: Sequence[float] | None
                  ) -> tuple[float, ...]:
    if loss_weights is None:
        return (1.0,) * len(specs)
    try:
        if isinstance(loss_weights, str):
            raise TypeError
        weights = tuple(_as_float(w) for w in loss_weights)
    except TypeError:  # a bare number or a string: not one weight per loss
        raise DpokitError(f"loss_weights must be a list of numbers, one per loss_type, got "
                          f"{loss_weights!r}") from None
    if len(weights) != len(specs):
        raise DpokitError(f"loss_weights has {len(weights)} entries but loss_type has "
                          f"{len(specs)} ({', '.join(s.name for s in specs)})")
    if not all(math.isfinite(w) for w in weights):
        raise DpokitError(f"loss_weights must be finite numbers, got {list(loss_weights)!r}")
    return weights


def _as_float(value: object) -> float:
    """``float(value)``, or NaN for what is not a number (the callers' checks then refuse it)."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _check_shapes(reference: Tensor, **others: Tensor | None) -> None:
    if reference.ndim != 1:
        raise DpokitError(f"log-probabilities must be (B,) tensors, got shape "
                          f"{tuple(reference.shape)} for policy_chosen_logps")
    for name, tensor in others.items():
        if tensor is not None and tensor.shape != reference.shape:
            raise DpokitError(f"{name} has shape {tuple(tensor.shape)}, expected "
                              f"{tuple(reference.shape)} like policy_chosen_logps")


def _pair_present(chosen: Tensor | None, rejected: Tensor | None, what: str) -> bool:
    if (chosen is None) != (rejected is None):
        raise DpokitError(f"give both chosen and rejected {what}, or neither")
    return chosen is not None


def _check_needs(specs: tuple[LossSpec, ...], has_reference: bool, has_lengths: bool,
                 has_margins: bool, has_label_probs: bool) -> None:
    if not has_reference and (missing := [s.name for s in specs if s.needs_reference]):
        raise DpokitError(f"loss_type {', '.join(missing)} needs reference log-probs "
                          "(ref_chosen_logps, ref_rejected_logps); only reference-free losses "
                          "accept None")
    if not has_lengths and (missing := [s.name for s in specs if s.needs_lengths]):
        raise DpokitError(f"loss_type {', '.join(missing)} needs completion lengths "
                          "(chosen_lengths, rejected_lengths: token counts per completion)")
    if not has_margins and (missing := [s.name for s in specs if s.needs_margins]):
        raise DpokitError(f"loss_type {', '.join(missing)} needs a per-pair margin column in the "
                          "data (margin_column), passed as margins: one number m per pair")
    if not has_label_probs and (missing := [s.name for s in specs if s.needs_label_probs]):
        raise DpokitError(f"loss_type {', '.join(missing)} needs a per-pair soft label in the "
                          "data (label_prob_column), passed as label_probs: p ∈ [0, 1] per pair")


def _check_f_divergence(specs: tuple[LossSpec, ...], f_divergence_type: str,
                        alpha_coef: float) -> None:
    check_f_divergence(f_divergence_type, float(alpha_coef))
    if f_divergence_type != "reverse_kl" and (
            unsupported := [s.name for s in specs if not s.supports_f_divergence]):
        raise DpokitError(f"f_divergence_type={f_divergence_type!r} is not defined for loss_type "
                          f"{', '.join(unsupported)}; use reverse_kl")
