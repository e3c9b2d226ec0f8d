"""KL divergences: discrete, Gaussian closed form, and Monte-Carlo estimators (docs/theory.md §1).

All functions are pure and batched: leading dimensions broadcast, ``dim=-1`` is the outcome axis
where there is one. Inputs are log-probabilities so that nothing underflows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from dpokit.errors import DpokitError


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Discrete KL divergence from log-probabilities.

        KL(p ‖ q) = Σ_y p(y) (log p(y) − log q(y))

    Terms with p(y) = 0 contribute 0 (the convention 0·log 0 = 0), also in the gradient;
    p(y) > 0 with q(y) = 0 gives +inf, as it should.

    Args:
        log_p: ``(..., Y)`` log-probabilities of p (rows sum to 1 in probability).
        log_q: ``(..., Y)`` log-probabilities of q, broadcastable against ``log_p``.

    Returns:
        ``(...)`` KL(p ‖ q) ≥ 0 in nats.
    """
    log_p, log_q = torch.broadcast_tensors(log_p, log_q)
    support = log_p > float("-inf")
    # Mask before subtracting so that −inf − (−inf) never appears, not even in the backward pass.
    safe_log_p = torch.where(support, log_p, torch.zeros_like(log_p))
    safe_log_q = torch.where(support, log_q, torch.zeros_like(log_q))
    terms = safe_log_p.exp() * (safe_log_p - safe_log_q)
    return torch.where(support, terms, torch.zeros_like(terms)).sum(dim=-1)


def kl_from_log_ratio(log_q: Tensor, log_ratio: Tensor) -> Tensor:
    """KL(p ‖ q) from log q and the log-ratio t = log p − log q, as a sum of terms ≥ 0.

        KL(p ‖ q) = Σ_y q(y) g(t(y)),    g(t) = 1 + (t − 1)·eᵗ = Σ_{k≥2} (k − 1)·tᵏ/k!  ≥ 0

    This equals Σ_y p(y) t(y) whenever p and q both sum to 1 (it adds Σ q − Σ p = 0). No term is
    negative, so nothing cancels as p → q, where KL ≈ ½ Σ q t² and the direct Σ p·t of
    :func:`kl_divergence` keeps only its rounding (~1e-16 absolute) once the KL is that small.
    Each term is accurate to a few ulps *given t*: the series (22 terms) for |t| < ½, else
    q + (t − 1)·p, which never forms eᵗ alone and so cannot overflow. Give t directly (e.g.
    r/β − log Z in centred form), not as the difference of two rounded log-probabilities, or
    the rounding of those comes back as ~1e-16 in t.

    Args:
        log_q: ``(..., Y)`` log q(y); outcomes with q(y) = 0 (−inf) contribute 0, so p must
            vanish there too.
        log_ratio: ``(..., Y)`` t(y) = log p(y) − log q(y); −inf where p(y) = 0 < q(y).

    Returns:
        ``(...)`` KL(p ‖ q) ≥ 0 in nats.
    """
    log_q, log_ratio = torch.broadcast_tensors(log_q, log_ratio)
    q = log_q.exp()
    p = (log_q + log_ratio).exp()
    small = log_ratio.abs() < 0.5
    series = q * _power_series(torch.where(small, log_ratio, torch.zeros_like(log_ratio)),
                               _G_COEFFICIENTS)
    closed = q + torch.where(p > 0, (log_ratio - 1.0) * p, torch.zeros_like(p))
    terms = torch.where(small, series, closed)
    return torch.where(log_q > float("-inf"), terms, torch.zeros_like(terms)).sum(dim=-1)


_SERIES_ORDER = 22
"""Highest power kept in the series for |x| < ½: the next term is < ½²³/23! ≈ 5e-30 of x²."""

_G_COEFFICIENTS = tuple((k - 1) / math.factorial(k) for k in range(2, _SERIES_ORDER + 1))
"""(k − 1)/k! for k = 2..22: g(t) = 1 + (t − 1)eᵗ = Σ_k (k − 1) tᵏ/k!."""


def _power_series(x: Tensor, coefficients: tuple[float, ...]) -> Tensor:
    """Σ_k c_k x^k for k = 2, 3, …, by Horner's rule: x²·(c₂ + x·(c₃ + x·(…)))."""
    total = torch.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        total = total * x + c
    return total * x * x


def gaussian_kl(mu_p: Tensor | float, sigma_p: Tensor | float,
                mu_q: Tensor | float, sigma_q: Tensor | float) -> Tensor:
    """Closed-form KL between two univariate Gaussians, elementwise (broadcasting).

        KL(N(μ_p, σ_p²) ‖ N(μ_q, σ_q²)) = log(σ_q/σ_p) + (σ_p² + (μ_p − μ_q)²)/(2σ_q²) − 1/2

    computed as ½(expm1(2ℓ) − 2ℓ) + (μ_p − μ_q)²/(2σ_q²) with ℓ = log(σ_p/σ_q), which keeps full
    relative precision when the two curves almost overlap (KL → 0).

    Args:
        mu_p, sigma_p: mean and standard deviation (> 0) of p.
        mu_q, sigma_q: mean and standard deviation (> 0) of q.

    Returns:
        KL(p ‖ q) in nats, broadcast shape of the inputs (float64 for Python floats).
    """
    mu_p, sigma_p, mu_q, sigma_q = _as_float_tensors(mu_p, sigma_p, mu_q, sigma_q)
    for name, sigma in (("sigma_p", sigma_p), ("sigma_q", sigma_q)):
        bad = ~((sigma > 0) & torch.isfinite(sigma))  # NaN fails the comparison too
        if bool(bad.any()):  # (σ_q = 0 gave NaN, not the KL's +inf; σ < 0 a number)
            raise DpokitError(f"gaussian_kl: {name} must be a finite standard deviation > 0, "
                              f"got {sigma[bad].flatten()[0].item()}")
    log_ratio = torch.log(sigma_p) - torch.log(sigma_q)
    spread = 0.5 * (torch.expm1(2.0 * log_ratio) - 2.0 * log_ratio)
    shift = (mu_p - mu_q) ** 2 / (2.0 * sigma_q**2)
    return spread + shift


class KLEstimates(NamedTuple):
    """Per-sample estimators of KL(p ‖ q) for samples y ~ p (Schulman, "Approximating KL")."""

    k1: Tensor
    """−log ρ: unbiased, high variance, can be negative."""
    k2: Tensor
    """½ (log ρ)²: biased (low bias when p ≈ q), always ≥ 0."""
    k3: Tensor
    """(ρ − 1) − log ρ: unbiased, always ≥ 0, low variance."""


def kl_estimators(log_p: Tensor, log_q: Tensor) -> KLEstimates:
    """The k1, k2, k3 estimators of KL(p ‖ q), one value per sample drawn from p.

    With the log-ratio log ρ = log q(y) − log p(y) of a sample y ~ p:

        k1 = −log ρ,    k2 = ½ (log ρ)²,    k3 = (ρ − 1) − log ρ = expm1(log ρ) − log ρ.

    E_p[k1] = E_p[k3] = KL(p ‖ q); k3 ≥ 0 for every sample (log is concave). ``expm1`` keeps k3
    accurate when ρ ≈ 1; k3 is +inf only when ρ itself overflows the dtype (q(y)/p(y) > ~1e38 in
    float32), which is the honest value.

    Args:
        log_p: ``(...)`` log p(y) of each sample.
        log_q: ``(...)`` log q(y) of the same samples.

    Returns:
        ``KLEstimates(k1, k2, k3)``, each of the broadcast shape; average them over samples.
    """
    log_ratio = log_q - log_p
    return KLEstimates(
        k1=-log_ratio,
        k2=0.5 * log_ratio**2,
        k3=torch.expm1(log_ratio) - log_ratio,
    )


def _as_float_tensors(*values: Tensor | float) -> list[Tensor]:
    """Tensors of one common float dtype: that of the float tensors given, float64 if none."""
    dtypes = [v.dtype for v in values if isinstance(v, Tensor) and v.is_floating_point()]
    dtype = dtypes[0] if dtypes else torch.float64
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return [v.to(dtype) if isinstance(v, Tensor) else torch.as_tensor(v, dtype=dtype)
            for v in values]
