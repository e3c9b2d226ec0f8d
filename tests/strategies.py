"""Hypothesis strategies for distributions and rewards over small outcome spaces."""

import numpy as np
from hypothesis import strategies as st


@st.composite
def distributions(draw, size=None, min_size=2, max_size=8, allow_zeros=False):
    """A probability vector (float64 numpy) with entries bounded away from 0 unless allow_zeros."""
    n = size if size is not None else draw(st.integers(min_size, max_size))
    weights = draw(st.lists(st.floats(0.01, 10.0), min_size=n, max_size=n))
    p = np.array(weights, dtype=np.float64)
    if allow_zeros:
        mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        mask[draw(st.integers(0, n - 1))] = True  # at least one outcome keeps mass
        p = p * np.array(mask, dtype=np.float64)
    return p / p.sum()


def rewards(n, scale=20.0):
    return st.lists(st.floats(-scale, scale), min_size=n, max_size=n).map(
        lambda r: np.array(r, dtype=np.float64))


betas = st.floats(0.05, 50.0)
