"""What every loss variant reads (:class:`LossInputs`) and the f-divergence scores of log-ratios.

With the per-completion log-ratio u(y) = log π_θ(y|x) − log π_ref(y|x), f-DPO (Wang et al. 2023,
arXiv:2309.16240) replaces DPO's implicit reward β·u by β·f'(π_θ/π_ref).
The *score* of a completion is f'(exp u) as TRL 1.x's DPOTrainer forms it:

    reverse_kl        u                                   (standard DPO)
    forward_kl        1 − exp(−u)                         f'(t) = 1 − 1/t
    js_divergence     log 2 + log σ(u)                    f'(t) = log(2t / (1 + t))
    alpha_divergence  (exp((α−1)·u) − 1) / (α−1)          f'(t) = (t^(α−1) − 1)/(α−1); u when α = 1

The exponentials are capped: the exponent is clamped so that |score| ≤ exp(0.45·log(max float))
(≈ 2·10¹⁷ in float32), which keeps even squared scores (IPO) finite. TRL clamps the α-divergence
exponent at 80 in float32/bfloat16 and 11 in float16 and does not cap forward_kl; the two agree
whenever |score| is below the cap, i.e. unless π_θ/π_ref is astronomically far from 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.registry import F_DIVERGENCES, check_f_divergence  # noqa: F401 (re-export)


@dataclass(frozen=True)
class LossInputs:
    """Everything a loss variant may read. Tensors are ``(B,)``, one entry per preference pair.

    ``dpo_loss`` builds this after checking that the fields a variant declares it needs (in its
    :class:`~dpokit.losses.registry.LossSpec`) are present; lengths arrive as floats ≥ 1.
    Hyper-parameters (ε, τ, γ, ...) are not here: each variant takes the ones its spec declares
    as keyword arguments.
    """

    policy_chosen_logps: Tensor  # Σ_t log π_θ(y_w,t | x, y_w,<t)
    policy_rejected_logps: Tensor  # Σ_t log π_θ(y_l,t | x, y_l,<t)
    ref_chosen_logps: Tensor | None  # same under π_ref; None for reference-free losses
    ref_rejected_logps: Tensor | None
    chosen_lengths: Tensor | None  # |y_w| in tokens, clamped to ≥ 1 (as TRL does)
    rejected_lengths: Tensor | None
    chosen_scores: Tensor | None  # f-divergence score of u(y_w); None without a reference
    rejected_scores: Tensor | None
    beta: float
    margins: Tensor | None = None  # m, the per-pair margin from the data; None without one
    label_probs: Tensor | None = None  # p = P(y_w ≻ y_l), soft labels from the data
    chosen_nll_logps: Tensor | None = None  # Σ_t log π_θ(y_w,t) unweighted (LD-DPO); None: the
    # same as policy_chosen_logps

    @property
    def chosen_plain_logps(self) -> Tensor:
        """Σ_t log π_θ(y_w,t | x, y_w,<t) without LD-DPO's weights: what the NLL terms read."""
        return (self.policy_chosen_logps if self.chosen_nll_logps is None
                else self.chosen_nll_logps)

    @property
    def chosen_logratios(self) -> Tensor:
        """u_w = log π_θ(y_w|x) − log π_ref(y_w|x)."""
        return self.policy_chosen_logps - _present(self.ref_chosen_logps, "ref_chosen_logps")

    @property
    def rejected_logratios(self) -> Tensor:
        """u_l = log π_θ(y_l|x) − log π_ref(y_l|x)."""
        return self.policy_rejected_logps - _present(self.ref_rejected_logps, "ref_rejected_logps")

    @property
    def delta_score(self) -> Tensor:
        """score(y_w) − score(y_l); with reverse_kl this is the margin h of docs/theory.md §5."""
        return _present(self.chosen_scores, "chosen_scores") - _present(
            self.rejected_scores, "rejected_scores")

    @property
    def lengths(self) -> tuple[Tensor, Tensor]:
        """(|y_w|, |y_l|) as floats ≥ 1."""
        return (_present(self.chosen_lengths, "chosen_lengths"),
                _present(self.rejected_lengths, "rejected_lengths"))


def _present(value: Tensor | None, name: str) -> Tensor:
    # dpo_loss checks the registry's declarations first, so a None here is a programming error.
    if value is None:
        raise AssertionError(f"{name} is required by this loss but was not supplied")
    return value


def exp_cap(dtype: torch.dtype) -> float:
    """Largest exponent allowed in a score: exp(cap)² stays finite in ``dtype``."""
    return 0.45 * math.log(torch.finfo(dtype).max)


def f_divergence_scores(logratios: Tensor, f_divergence_type: str = "reverse_kl",
                        alpha_coef: float = 0.5) -> Tensor:
    """Score f'(π_θ/π_ref) of each completion from its log-ratio u (table in the module docstring).

    Args:
        logratios: ``(B,)`` u = log π_θ(y|x) − log π_ref(y|x).
        f_divergence_type: one of :data:`F_DIVERGENCES`.
        alpha_coef: α of the α-divergence (TRL 1.x default 0.5); |α − 1| < 1e-6 is reverse KL.

    Returns:
        ``(B,)`` scores, finite for every finite u.
    """
    check_f_divergence(f_divergence_type, alpha_coef)
    cap = exp_cap(logratios.dtype)
    if f_divergence_type == "forward_kl":
        return -torch.expm1(torch.clamp(-logratios, max=cap))
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence" and abs(alpha_coef - 1.0) >= 1e-6:
        coef = 1.0 / (alpha_coef - 1.0)
        # Bound |coef · expm1(t)| by exp(cap), not just exp(t): a large coef must not overflow.
        limit = cap - max(0.0, math.log(abs(coef)))
        return coef * torch.expm1(torch.clamp((alpha_coef - 1.0) * logratios, max=limit))
    return logratios
