"""Preference metrics: sums and counts reduce exactly; means equal TRL's per-batch formulas.

Oracle: numpy means of the TRL expressions (``(chosen > rejected).float().mean()`` etc.);
equalities to 1e-12.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpokit.losses import (
    METRIC_KEYS,
    METRIC_NAMES,
    add_metric_sums,
    metric_means,
    preference_metrics,
)


def _batch(seed: int, n: int):
    rng = np.random.default_rng(seed)
    chosen_r, rejected_r = rng.normal(0, 1, n), rng.normal(0, 1, n)
    rejected_r[: n // 4] = chosen_r[: n // 4]  # ties count as inaccurate
    pc, pr = -rng.uniform(1, 50, n), -rng.uniform(1, 50, n)
    return [torch.tensor(a) for a in (chosen_r, rejected_r, pc, pr)]


def test_names_are_trls():
    assert METRIC_NAMES == ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                            "rewards/margins", "logps/chosen", "logps/rejected")
    assert METRIC_KEYS[:-1] == METRIC_NAMES and METRIC_KEYS[-1] == "count"


def test_means_match_trl_formulas():
    chosen_r, rejected_r, pc, pr = _batch(0, 16)
    sums = preference_metrics(chosen_r, rejected_r, pc, pr)
    assert float(sums["count"]) == 16.0
    means = metric_means(sums)
    c, r = chosen_r.numpy(), rejected_r.numpy()
    expected = {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(),
                "rewards/accuracies": (c > r).astype(float).mean(),
                "rewards/margins": (c - r).mean(), "logps/chosen": pc.numpy().mean(),
                "logps/rejected": pr.numpy().mean()}
    assert means == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert means["rewards/accuracies"] <= 0.75  # the 4 tied pairs are not counted accurate


@given(st.integers(0, 10_000), st.integers(1, 20), st.integers(1, 20))
def test_split_batches_reduce_to_the_whole_batch(seed, n_first, n_second):
    """Sums of two uneven micro-batches, added, give the whole batch's means (1e-12)."""
    whole = _batch(seed, n_first + n_second)
    first = [t[:n_first] for t in whole]
    second = [t[n_first:] for t in whole]
    combined = add_metric_sums(preference_metrics(*first), preference_metrics(*second))
    assert metric_means(combined) == pytest.approx(metric_means(preference_metrics(*whole)),
                                                   rel=1e-12, abs=1e-12)
    # the naive mean of the two micro-batch means is wrong whenever the halves differ in size
    if n_first != n_second:
        naive = (metric_means(preference_metrics(*first))["rewards/chosen"]
                 + metric_means(preference_metrics(*second))["rewards/chosen"]) / 2
        exact = float(whole[0].mean())
        assert metric_means(combined)["rewards/chosen"] == pytest.approx(exact, abs=1e-12)
        assert naive != pytest.approx(exact, abs=1e-12) or whole[0].std() == 0


def test_sums_are_stackable_for_all_reduce_and_detached():
    chosen_r, rejected_r, pc, pr = _batch(1, 8)
    pc.requires_grad_(True)
    sums = preference_metrics(chosen_r, rejected_r, pc, pr)
    stacked = torch.stack([sums[k] for k in METRIC_KEYS])
    assert stacked.shape == (7,) and stacked.dtype == torch.float64
    assert not stacked.requires_grad


def test_empty_reduction_gives_nan_not_an_error():
    empty = [torch.zeros(0, dtype=torch.float64) for _ in range(4)]
    means = metric_means(preference_metrics(*empty))
    assert all(math.isnan(v) for v in means.values())
