"""Fixtures of the data tests."""

import pytest

import dpokit.data.pipeline as pipeline


@pytest.fixture
def counted(monkeypatch):
    """A list that gains one entry per ``tokenize_examples`` call the pipeline makes (the
    tokenisations that really ran, not read from a cache)."""
    calls = []
    original = pipeline.tokenize_examples

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "tokenize_examples", counting)
    return calls
