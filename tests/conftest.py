"""Shared test settings: float64 oracles, deterministic seeds, hypothesis profiles."""

import os

import torch
from hypothesis import settings

settings.register_profile("default", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=600, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained in the test session (BOS, EOS, PAD, chat template)."""
    from dpokit.fixtures import build_tokenizer

    return build_tokenizer()
