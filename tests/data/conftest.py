"""Fixtures of the data tests."""

import pytest

import dpokit.data.pipeline as pipeline
from tests.helpers import count_calls


@pytest.fixture
def counted(monkeypatch):
    """A list that gains one entry per ``tokenize_examples`` call the pipeline makes (the
    tokenisations that really ran, not read from a cache)."""
    return count_calls(monkeypatch, pipeline, "tokenize_examples")
