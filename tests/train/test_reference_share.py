"""One load of the weights when π_ref is the model the policy starts from: the reference pass's
model becomes the policy (no second load), a cached table loads no reference model, and the
numbers are those of two separate loads, bit for bit."""

import pytest
import torch

from dpokit.train import setup
from dpokit.train.loop import train
from tests.helpers import read_metrics
from tests.train.test_trainer import config, weights


@pytest.fixture
def loads(monkeypatch):
    """The directories ``load_causal_lm`` loads during setup, in order."""
    seen = []
    real = setup.load_causal_lm

    def counting(path, **kwargs):
        seen.append((str(path), kwargs.get("what", "model")))
        return real(path, **kwargs)

    monkeypatch.setattr(setup, "load_causal_lm", counting)
    return seen


def _history(final):
    return [{k: m[k] for k in ("step", "loss", "rewards/margins", "grad_norm")}
            for m in read_metrics(final.parent) if "loss" in m]


def test_the_reference_pass_model_becomes_the_policy(workdir, tmp_path, loads, monkeypatch):
    cfg = config(workdir, tmp_path / "a" / "run", max_steps=3)  # caches: beside the run
    shared = train(cfg, progress=False)
    assert loads == [(str(workdir / "llama"), "reference model")]  # was two loads of it
    # the oracle: the pass's model freed and the policy loaded again (as before), via a pass
    # that reports changed buffers — the same numbers and weights, bit for bit
    calls = iter(range(10**6))
    real = setup._buffers
    monkeypatch.setattr(setup, "_buffers", lambda model: {
        **real(model), "changed": torch.tensor(float(next(calls)))})
    loads.clear()
    cfg = config(workdir, tmp_path / "b" / "run", max_steps=3)
    separate = train(cfg, progress=False)
    assert [what for _, what in loads] == ["reference model", "model"]
    assert _history(shared) == _history(separate)
    a, b = weights(shared), weights(separate)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cached_reference_table_loads_no_reference_model(workdir, tmp_path, loads):
    cfg = config(workdir, tmp_path / "first", max_steps=2)
    first = train(cfg, progress=False)
    loads.clear()
    cfg = config(workdir, tmp_path / "second", max_steps=2)  # the same cache beside it
    second = train(cfg, progress=False)
    assert loads == [(str(workdir / "llama"), "model")]  # the policy alone: the table is cached
    assert _history(first) == _history(second)


def test_a_reference_model_of_another_directory_is_not_the_policy(workdir, tmp_path, loads):
    cfg = config(workdir, tmp_path / "other", max_steps=1, ref_model=str(workdir / "qwen2"))
    train(cfg, progress=False)
    assert loads == [(str(workdir / "qwen2"), "reference model"),
                     (str(workdir / "llama"), "model")]
