"""Random preference batches and a one-call wrapper around ``dpo_loss`` for the loss tests."""

from __future__ import annotations

import numpy as np
import torch

from dpokit.losses import dpo_loss, get_loss
from tests.losses.oracles import Pairs, Params


def random_pairs(seed: int, n: int = 12, spread: float = 4.0) -> Pairs:
    """Summed log-probs of realistic size, log-ratios ~ N(0, spread²), lengths 1..40."""
    rng = np.random.default_rng(seed)
    pc, pr = -rng.uniform(1.0, 60.0, n), -rng.uniform(1.0, 60.0, n)
    rc, rr = pc - rng.normal(0.0, spread, n), pr - rng.normal(0.0, spread, n)
    lc, lr = rng.integers(1, 41, n).astype(float), rng.integers(1, 41, n).astype(float)
    return Pairs(*(list(map(float, a)) for a in (pc, pr, rc, rr, lc, lr)))


def tensors(p: Pairs, dtype: torch.dtype = torch.float64, requires_grad: bool = False):
    """(pc, pr, rc, rr, lc, lr) as tensors; the policy log-probs optionally require grad."""
    out = [torch.tensor(v, dtype=dtype) for v in (p.pc, p.pr, p.rc, p.rr, p.lc, p.lr)]
    if requires_grad:
        out[0].requires_grad_(True)
        out[1].requires_grad_(True)
    return out


def run(p: Pairs, q: Params, loss_type, dtype: torch.dtype = torch.float64,
        requires_grad: bool = False, **overrides):
    """``dpo_loss`` on ``p`` with the settings of ``q`` (ε passed only to losses that use it)."""
    pc, pr, rc, rr, lc, lr = tensors(p, dtype, requires_grad)
    names = [loss_type] if isinstance(loss_type, str) else loss_type
    smoothing = any(get_loss(name).uses_label_smoothing for name in names)
    kwargs = dict(beta=q.beta, loss_type=loss_type, label_smoothing=q.eps if smoothing else 0.0,
                  chosen_lengths=lc, rejected_lengths=lr, discopop_tau=q.tau,
                  simpo_gamma=q.gamma, bco_delta=q.delta, f_divergence_type=q.f,
                  f_alpha_divergence_coef=q.alpha)
    kwargs.update(overrides)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, **kwargs)
    return losses, chosen_rewards, rejected_rewards, (pc, pr)
