"""The process group under torchrun: started with the configured collective timeout."""

from datetime import timedelta

import pytest

from dpokit.errors import DpokitError


def test_the_process_group_gets_ddp_timeout(monkeypatch):
    """WORLD_SIZE=2 (as torchrun sets it): ``init_process_group`` gets gloo on CPU and
    ``timeout`` = ddp_timeout seconds, so a rank left waiting in a collective raises instead of
    hanging forever."""
    import torch.distributed as dist

    from dpokit import runtime

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    state = runtime.setup_runtime("cpu", "float32", timeout_s=90)
    assert seen["backend"] == "gloo" and seen["timeout"] == timedelta(seconds=90)
    assert (state.rank, state.world_size) == (1, 2)


def test_ddp_timeout_is_read_from_the_config_and_checked(workdir):
    from dpokit.train.config import DPOConfig

    common = {"model": str(workdir / "llama"), "data": str(workdir / "prefs.jsonl")}
    assert DPOConfig(**common).ddp_timeout == 1800  # transformers' default
    with pytest.raises(DpokitError, match="ddp_timeout must be ≥ 1, got 0"):
        DPOConfig(**common, ddp_timeout=0).validate()
