"""Exact log Z for a Markov (bigram) reference with a token-additive reward (docs/theory.md §3).

The reference generates y_1..y_T with π_ref(y) = π_0(y_1) Π_{t≥2} P(y_t | y_{t−1}), where π_0
is the first-token distribution given the prompt and P a V×V transition matrix; the reward adds
over tokens, r(y) = Σ_t r_t(y_t). Then exp(r/β) factorises along the chain and Z is a product of
matrices, computed by the backward recursion in log space

    log b_T(v)     = 0
    log b_{t−1}(u) = logsumexp_v [ log P(v|u) + r_t(v)/β + log b_t(v) ]
    log Z          = logsumexp_v [ log π_0(v) + r_1(v)/β + log b_1(v) ]

in O(T·V²) time instead of the V^T terms of enumeration.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpokit.errors import DpokitError, check_beta


def _per_position(token_rewards: Tensor, length: int) -> Tensor:
    """Token rewards as a ``(T, V)`` table: a ``(V,)`` vector is used at every position."""
    if token_rewards.dim() == 1:
        return token_rewards.expand(length, -1)
    if token_rewards.dim() == 2 and token_rewards.shape[0] == length:
        return token_rewards
    raise DpokitError(
        f"token_rewards must have shape (V,) or (T, V) = ({length}, V), "
        f"got {tuple(token_rewards.shape)}")


def markov_logps(sequences: Tensor, log_init: Tensor, log_trans: Tensor) -> Tensor:
    """log π_ref(y) = log π_0(y_1) + Σ_{t≥2} log P(y_t | y_{t−1}).

    Args:
        sequences: ``(N, T)`` int64 tokens.
        log_init: ``(V,)`` log π_0.
        log_trans: ``(V, V)`` log P, row = previous token, column = next token.

    Returns:
        ``(N,)`` sequence log-probabilities.
    """
    logps = log_init[sequences[:, 0]]
    if sequences.shape[1] > 1:
        logps = logps + log_trans[sequences[:, :-1], sequences[:, 1:]].sum(dim=-1)
    return logps


def token_additive_reward(sequences: Tensor, token_rewards: Tensor) -> Tensor:
    """r(y) = Σ_t r_t(y_t) for ``(N, T)`` tokens and ``(V,)`` or ``(T, V)`` token rewards."""
    table = _per_position(token_rewards, sequences.shape[1])
    positions = torch.arange(sequences.shape[1], device=sequences.device)
    return table[positions, sequences].sum(dim=-1)


def markov_log_partition(log_init: Tensor, log_trans: Tensor, token_rewards: Tensor,
                         beta: float, length: int) -> Tensor:
    """Exact log Z over all V^T sequences of a bigram reference, by backward recursion.

        Z = Σ_{y ∈ V^T} π_0(y_1) e^{r_1(y_1)/β} Π_{t=2..T} P(y_t|y_{t−1}) e^{r_t(y_t)/β}

    Args:
        log_init: ``(..., V)`` log π_0 (leading dimensions batch over prompts).
        log_trans: ``(V, V)`` or ``(..., V, V)`` log P(next | previous).
        token_rewards: ``(V,)`` or ``(T, V)`` per-token rewards r_t(v).
        beta: β > 0.
        length: T ≥ 1.

    Returns:
        ``(...)`` log Z. Cost O(T·V²), memory O(V²).
    """
    if length < 1:
        raise DpokitError(f"length must be ≥ 1, got {length}")
    vocab = log_trans.shape[-1]
    if (log_trans.dim() < 2 or log_trans.shape[-2] != vocab or log_init.shape[-1] != vocab
            or token_rewards.shape[-1] != vocab):
        # A size-1 axis would otherwise broadcast: one reward for every token, silently.
        raise DpokitError(
            f"markov_log_partition: log_init {tuple(log_init.shape)}, log_trans "
            f"{tuple(log_trans.shape)} and token_rewards {tuple(token_rewards.shape)} must all "
            f"end in the vocabulary size V = {vocab} (log_trans (..., V, V))")
    scaled = _per_position(token_rewards, length) / check_beta(beta)
    log_backward = torch.zeros_like(log_init)
    for t in range(length - 1, 0, -1):
        # (..., 1, V) + (V, V) → logsumexp over the next token v gives (..., V) indexed by u.
        log_backward = torch.logsumexp(
            log_trans + (scaled[t] + log_backward).unsqueeze(-2), dim=-1)
    return torch.logsumexp(log_init + scaled[0] + log_backward, dim=-1)


def markov_sample(num_samples: int, length: int, log_init: Tensor, log_trans: Tensor, *,
                  generator: torch.Generator | None = None) -> Tensor:
    """Exact ancestral samples y ~ π_ref of a bigram reference: ``(num_samples, length)`` int64."""
    tokens = torch.multinomial(log_init.exp().expand(num_samples, -1), 1, replacement=True,
                               generator=generator)
    columns = [tokens]
    trans = log_trans.exp()
    for _ in range(1, length):
        columns.append(torch.multinomial(trans[columns[-1][:, 0]], 1, generator=generator))
    return torch.cat(columns, dim=1)


def markov_scorer(log_init: Tensor, log_trans: Tensor, token_rewards: Tensor):
    """A :data:`~dpokit.theory.enumerate.Scorer` for the bigram reference and additive reward."""

    def scorer(sequences: Tensor) -> tuple[Tensor, Tensor]:
        return (markov_logps(sequences, log_init, log_trans),
                token_additive_reward(sequences, token_rewards))

    return scorer


def random_markov_reference(vocab_size: int, *, seed: int = 0,
                            dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """A random bigram reference ``(log_init (V,), log_trans (V, V))``.

    π_0 and each row of P are drawn from the uniform Dirichlet (normalised Exp(1) variables),
    reproducibly from ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    exponentials = -(1.0 - torch.rand(vocab_size + 1, vocab_size, generator=generator,
                                      dtype=torch.float64)).log()  # u ∈ (0, 1]
    logs = (exponentials / exponentials.sum(dim=-1, keepdim=True)).log().to(dtype)
    return logs[0], logs[1:]
