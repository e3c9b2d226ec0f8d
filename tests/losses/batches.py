"""Random preference batches and a one-call wrapper around ``dpo_loss`` for the loss tests."""

from __future__ import annotations

import numpy as np
import torch

from dpokit.losses import dpo_loss, resolve_losses
from tests.losses.oracles import Pairs, Params


def random_pairs(seed: int, n: int = 12, spread: float = 4.0) -> Pairs:
    """Summed log-probs of realistic size, log-ratios ~ N(0, spread²), lengths 1..40, data
    margins ~ U(0, 3) and soft labels ~ U(0, 1) (drawn last, so the other fields do not depend on
    them)."""
    rng = np.random.default_rng(seed)
    pc, pr = -rng.uniform(1.0, 60.0, n), -rng.uniform(1.0, 60.0, n)
    rc, rr = pc - rng.normal(0.0, spread, n), pr - rng.normal(0.0, spread, n)
    lc, lr = rng.integers(1, 41, n).astype(float), rng.integers(1, 41, n).astype(float)
    m = rng.uniform(0.0, 3.0, n)
    s = rng.uniform(0.0, 1.0, n)  # soft labels, drawn after everything else
    return Pairs(*(list(map(float, a)) for a in (pc, pr, rc, rr, lc, lr, m, s)))


def tensors(p: Pairs, dtype: torch.dtype = torch.float64, requires_grad: bool = False):
    """(pc, pr, rc, rr, lc, lr) as tensors; the policy log-probs optionally require grad."""
    out = [torch.tensor(v, dtype=dtype) for v in (p.pc, p.pr, p.rc, p.rr, p.lc, p.lr)]
    if requires_grad:
        out[0].requires_grad_(True)
        out[1].requires_grad_(True)
    return out


def margins(p: Pairs, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """The data margins m as a tensor, None when ``p`` has none."""
    return None if p.m is None else torch.tensor(p.m, dtype=dtype)


def label_probs(p: Pairs, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """The data's soft labels p as a tensor, None when ``p`` has none."""
    return None if p.s is None else torch.tensor(p.s, dtype=dtype)


def run(p: Pairs, q: Params, loss_type, dtype: torch.dtype = torch.float64,
        requires_grad: bool = False, **overrides):
    """``dpo_loss`` on ``p`` with the settings of ``q``.

    Each hyper-parameter of ``q`` is passed only when one of the losses declares it (dpo_loss
    refuses a non-default value that no loss reads); ``overrides`` are passed as given.
    """
    pc, pr, rc, rr, lc, lr = tensors(p, dtype, requires_grad)
    declared = {name for spec in resolve_losses(loss_type) for name in spec.hyper_parameter_names}
    options = {k: v for k, v in q.hyper_parameters().items() if k in declared}
    kwargs = dict(beta=q.beta, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr,
                  margins=margins(p, dtype), label_probs=label_probs(p, dtype),
                  f_divergence_type=q.f,
                  f_alpha_divergence_coef=q.alpha, **options)
    kwargs.update(overrides)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, **kwargs)
    return losses, chosen_rewards, rejected_rewards, (pc, pr)
