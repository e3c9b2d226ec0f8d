"""The loss variants: one pure function per loss, ``(LossInputs, **hyper-parameters) -> (B,)``.

Notation (docs/theory.md §5): β > 0; u_w, u_l the chosen/rejected log-ratios log π_θ − log π_ref
of the summed completion log-probabilities; s_w, s_l their f-divergence scores (s = u for
reverse_kl, the default); Δ = s_w − s_l (the margin h under reverse_kl); z = β·Δ; |y| the
completion length in tokens; m the per-pair margin from the data; ε = ``label_smoothing``. A
variant takes exactly the hyper-parameters its :class:`~dpokit.losses.registry.LossSpec` declares,
as keyword arguments; ``dpo_loss`` has checked their ranges. Formulas follow TRL 1.x
``DPOTrainer._compute_loss`` unless a docstring says otherwise; each cites its paper. Everything
is in log space (``logsigmoid``, ``softplus``), so no logit difference is ever exponentiated
unguarded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.scores import LossInputs, exp_cap


def smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """−(1−ε) log σ(z) − ε log σ(−z): the logistic loss with labels flipped w.p. ε (cDPO)."""
    loss = -F.logsigmoid(z)
    if eps:
        loss = (1.0 - eps) * loss - eps * F.logsigmoid(-z)
    return loss


def sigmoid(x: LossInputs, *, label_smoothing: float) -> Tensor:
    """DPO (arXiv:2305.18290, Eq. 7), conservative with ε > 0 (cDPO, ericmitchell.ai/cdpo.pdf).

        L = −(1−ε) log σ(βΔ) − ε log σ(−βΔ)

    TRL 0.x applied ``label_smoothing`` here exactly so; TRL 1.x ignores it for ``sigmoid``.
    """
    return smoothed_logistic(x.beta * x.delta_score, label_smoothing)


def hinge(x: LossInputs) -> Tensor:
    """SLiC hinge (arXiv:2305.10425, margin 1 on βΔ): L = max(0, 1 − βΔ)."""
    return torch.relu(1.0 - x.beta * x.delta_score)


def ipo(x: LossInputs) -> Tensor:
    """IPO (arXiv:2310.12036, Eq. 17, β = τ) on per-token averaged scores, as TRL 1.x computes it.

        L = (s_w/|y_w| − s_l/|y_l| − 1/(2β))²
    """
    chosen_len, rejected_len = x.lengths
    margin = x.chosen_scores / chosen_len - x.rejected_scores / rejected_len
    return (margin - 1.0 / (2.0 * x.beta)) ** 2


def exo_pair(x: LossInputs, *, label_smoothing: float) -> Tensor:
    """EXO-pref (arXiv:2402.00856, Eq. 16): KL([σ(z), σ(−z)] ‖ [1−ε, ε]) with z = βΔ, ε ∈ (0, 1).

        L = σ(z)(log σ(z) − log(1−ε)) + σ(−z)(log σ(−z) − log ε)
    """
    z = x.beta * x.delta_score
    log_q_w, log_q_l = F.logsigmoid(z), F.logsigmoid(-z)
    eps = torch.tensor(label_smoothing, dtype=z.dtype, device=z.device)
    return (log_q_w.exp() * (log_q_w - torch.log1p(-eps))
            + log_q_l.exp() * (log_q_l - torch.log(eps)))


def nca_pair(x: LossInputs) -> Tensor:
    """NCA for pairs (arXiv:2402.05369), on raw log-ratios:

        L = −log σ(βu_w) − ½ log σ(−βu_w) − ½ log σ(−βu_l)
    """
    r_w, r_l = x.beta * x.chosen_logratios, x.beta * x.rejected_logratios
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def robust(x: LossInputs, *, label_smoothing: float) -> Tensor:
    """Robust DPO (arXiv:2403.00409), unbiased under label flips w.p. ε ∈ [0, ½):

        L = [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)
    """
    z, eps = x.beta * x.delta_score, label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def bco_pair(x: LossInputs, *, bco_delta: float | Tensor) -> Tensor:
    """BCO on pairs (arXiv:2404.04656) with reward shift δ = ``bco_delta``:

        L = −log σ(βu_w − δ) − log σ(−(βu_l − δ))

    The function stays pure: δ is what the caller passes, a float or a 0-dim Tensor. TRL 0.x
    used the running mean of the rewards βu over all pairs seen so far (folding the current
    batch's mean of cat(βu_w, βu_l) in first); dpokit's trainer keeps no such mean and passes
    the configured constant. δ = 0 is TRL 1.x, which dropped it.
    """
    delta = bco_delta
    r_w, r_l = x.beta * x.chosen_logratios, x.beta * x.rejected_logratios
    return -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))


def sppo_hard(x: LossInputs) -> Tensor:
    """SPPO with hard labels (arXiv:2405.00675, Eq. 4.7 with P(y_w ≻ y_l) = 1):

        L = (u_w − 1/(2β))² + (u_l + 1/(2β))²
    """
    half = 0.5 / x.beta
    return (x.chosen_logratios - half) ** 2 + (x.rejected_logratios + half) ** 2


def aot(x: LossInputs, *, label_smoothing: float) -> Tensor:
    """AOT, paired (arXiv:2406.05882): couples the batch through sorting.

        d = sort_B(log π_θ(y_w) − log π_θ(y_l)) − sort_B(log π_ref(y_w) − log π_ref(y_l))
        L = −(1−ε) log σ(βd) − ε log σ(−βd)
    """
    policy = torch.sort(x.policy_chosen_logps - x.policy_rejected_logps).values
    ref = torch.sort(x.ref_chosen_logps - x.ref_rejected_logps).values
    return smoothed_logistic(x.beta * (policy - ref), label_smoothing)


def aot_unpaired(x: LossInputs, *, label_smoothing: float) -> Tensor:
    """AOT, unpaired (arXiv:2406.05882): d = sort_B(u_w) − sort_B(u_l), loss as ``aot``."""
    chosen = torch.sort(x.chosen_logratios).values
    rejected = torch.sort(x.rejected_logratios).values
    return smoothed_logistic(x.beta * (chosen - rejected), label_smoothing)


def apo_zero(x: LossInputs) -> Tensor:
    """APO-zero (arXiv:2408.06266, Eq. 7): L = 1 − σ(βu_w) + σ(βu_l)."""
    # 1 − σ(a) = σ(−a), exact where σ(a) rounds to 1.
    beta = x.beta
    return torch.sigmoid(-beta * x.chosen_logratios) + torch.sigmoid(beta * x.rejected_logratios)


def apo_down(x: LossInputs) -> Tensor:
    """APO-down (arXiv:2408.06266, Eq. 8): L = σ(βu_w) + 1 − σ(β(u_w − u_l))."""
    chosen = x.chosen_logratios
    return torch.sigmoid(x.beta * chosen) + torch.sigmoid(-x.beta * (chosen - x.rejected_logratios))


def discopop(x: LossInputs, *, discopop_tau: float) -> Tensor:
    """DiscoPOP, log-ratio modulated loss (arXiv:2406.08414, Eq. 5), z = βΔ, τ = ``discopop_tau``:

        L = −log σ(z) · (1 − σ(z/τ)) + exp(−z) · σ(z/τ)

    computed as softplus(−z)·σ(−z/τ) + exp(−z + log σ(z/τ)); the exponent is bounded for τ < 1
    and capped (see :func:`~dpokit.losses.scores.exp_cap`) otherwise.
    """
    z, tau = x.beta * x.delta_score, discopop_tau
    exponent = torch.clamp(-z + F.logsigmoid(z / tau), max=exp_cap(z.dtype))
    return F.softplus(-z) * torch.sigmoid(-z / tau) + torch.exp(exponent)


def sft(x: LossInputs) -> Tensor:
    """Supervised NLL of the chosen completions, the token mean over the whole batch (as TRL):

        L_i = −Σ_j log π_θ(y_w,j) / Σ_j |y_w,j|        (the same value for every pair i)

    Couples the batch (its value depends on every pair's length).
    """
    chosen_len, _ = x.lengths
    nll = -x.chosen_plain_logps.sum() / chosen_len.sum()  # TRL: the plain per-token log-probs
    return nll.expand_as(x.policy_chosen_logps)


def sigmoid_norm(x: LossInputs) -> Tensor:
    """Length-normalised DPO, TRL 1.x's ``sigmoid_norm`` (SimPO's normalisation, reference kept):

        L = −log σ(β (s_w/|y_w| − s_l/|y_l|))
    """
    chosen_len, rejected_len = x.lengths
    return -F.logsigmoid(x.beta * (x.chosen_scores / chosen_len - x.rejected_scores / rejected_len))


def simpo(x: LossInputs, *, simpo_gamma: float, label_smoothing: float) -> Tensor:
    """SimPO (arXiv:2405.14734), reference-free, γ = ``simpo_gamma``, as TRL's CPOTrainer:

        z = β (log π_θ(y_w)/|y_w| − log π_θ(y_l)/|y_l|) − γ,   L = −(1−ε) log σ(z) − ε log σ(−z)

    CPOTrainer adds ``cpo_alpha``·NLL by default; here that is the separate ``rpo_alpha`` term.
    """
    chosen_len, rejected_len = x.lengths
    margin = x.policy_chosen_logps / chosen_len - x.policy_rejected_logps / rejected_len
    return smoothed_logistic(x.beta * margin - simpo_gamma, label_smoothing)


def odpo(x: LossInputs, *, odpo_alpha: float) -> Tensor:
    """DPO with an offset (ODPO, Amini et al. 2024, arXiv:2402.10571), α = ``odpo_alpha`` ≥ 0:

        L = −log σ(βΔ − α·m)

    m is the pair's margin from the data (``margins``, the ``margin_column``): the pair must be
    won by at least the offset α·m. The paper computes its offset Δ_r from the two responses'
    scores, α·log(score(y_w) − score(y_l)) or a linearly scaled score difference; here the data
    column holds m directly, so the offset is α·m. Δ is the score margin, so f-divergences apply
    as for ``sigmoid``; α = 0 is exactly ``sigmoid`` without label smoothing.
    """
    return -F.logsigmoid(x.beta * x.delta_score - odpo_alpha * x.margins)


def dpop(x: LossInputs, *, dpop_lambda: float) -> Tensor:
    """DPO-Positive (DPOP, Pal et al. 2024, arXiv:2402.13228), λ = ``dpop_lambda`` ≥ 0:

        L = −log σ(β[h − λ·max(0, log π_ref(y_w) − log π_θ(y_w))])

    h = u_w − u_l is the log-ratio margin (docs/theory.md §5); the penalty is active only while
    the chosen completion's likelihood is below the reference's, which keeps mass on y_w where
    plain DPO lets both likelihoods fall (likelihood displacement, §6). λ = 0 is ``sigmoid``.
    """
    u_w = x.chosen_logratios
    h = u_w - x.rejected_logratios
    return -F.logsigmoid(x.beta * (h - dpop_lambda * F.relu(-u_w)))


def sigmoid_soft(x: LossInputs) -> Tensor:
    """DPO on soft Bradley–Terry labels p = P(y_w ≻ y_l) (``label_probs``, the data's
    ``label_prob`` column), the cross-entropy to the preference probability (docs/theory.md §6):

        L = −p log σ(βΔ) − (1 − p) log σ(−βΔ),        ∂L/∂(βΔ) = σ(βΔ) − p

    Its minimum over Δ is βΔ = logit p: with p = σ(r(y_w) − r(y_l)) that is βh = r(y_w) − r(y_l),
    which π* satisfies, so soft labels keep π* as the fixed point where hard ones (p = 1,
    ``sigmoid``) push h up without end. p = 1 is ``sigmoid``; a constant p = 1 − ε is cDPO.
    """
    z, p = x.beta * x.delta_score, x.label_probs
    return -p * F.logsigmoid(z) - (1.0 - p) * F.logsigmoid(-z)

