"""The exact theory engine: every quantity of the derivation in docs/theory.md, computed.

Pure functions on torch tensors (any float dtype, batched over leading dimensions, ``dim=-1`` the
outcome axis), in log space. No model code and no I/O here.
"""

from dpokit.theory.enumerate import (
    DEFAULT_MAX_SEQUENCES,
    EnumeratedPartition,
    Scorer,
    check_enumeration_budget,
    count_sequences,
    enumerate_log_partition,
    iter_scores,
    iter_sequences,
)
from dpokit.theory.estimate import PartitionEstimate, estimate_log_partition
from dpokit.theory.fullspace import (
    FullSpaceKL,
    constant_outside_log_partition,
    full_space_kl,
    log1mexp,
)
from dpokit.theory.kl import KLEstimates, gaussian_kl, kl_divergence, kl_estimators
from dpokit.theory.markov import (
    markov_log_partition,
    markov_logps,
    markov_sample,
    markov_scorer,
    random_markov_reference,
    token_additive_reward,
)
from dpokit.theory.optimal import (
    expected_reward,
    implicit_reward,
    log_partition,
    log_preference_probability,
    optimal_policy,
    preference_probability,
    rl_objective,
)
from dpokit.theory.sampling import RejectionSamples, accept_log_probability, rejection_sample

__all__ = [
    "DEFAULT_MAX_SEQUENCES",
    "EnumeratedPartition",
    "FullSpaceKL",
    "KLEstimates",
    "PartitionEstimate",
    "RejectionSamples",
    "Scorer",
    "accept_log_probability",
    "check_enumeration_budget",
    "constant_outside_log_partition",
    "count_sequences",
    "enumerate_log_partition",
    "estimate_log_partition",
    "expected_reward",
    "full_space_kl",
    "gaussian_kl",
    "implicit_reward",
    "iter_scores",
    "iter_sequences",
    "kl_divergence",
    "kl_estimators",
    "log1mexp",
    "log_partition",
    "log_preference_probability",
    "markov_log_partition",
    "markov_logps",
    "markov_sample",
    "markov_scorer",
    "optimal_policy",
    "preference_probability",
    "random_markov_reference",
    "rejection_sample",
    "rl_objective",
    "token_additive_reward",
]
