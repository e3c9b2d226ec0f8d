"""TRL's schedule keys (issue 13): eval_strategy / save_strategy (steps | epoch | no),
per_device_eval_batch_size, precompute_ref_batch_size, and warmup_steps as a fraction."""

import json

import pytest

from dpokit.errors import DpokitError
from dpokit.train.loop import train
from tests.train.test_trainer import config


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def eval_file(workdir):
    rows = (workdir / "prefs.jsonl").read_text().splitlines()[:5]
    path = workdir / "eval5.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize(("strategy", "eval_steps", "expected"), [
    ("epoch", None, [6, 12]), ("steps", 4, [4, 8, 12]), ("steps", None, [12]), ("no", 4, [])])
def test_eval_strategy(workdir, tmp_path, eval_file, strategy, eval_steps, expected):
    """48 rows, batch 8: an epoch is 6 steps; a 12-step run evaluates where the strategy says
    (the final evaluation only when the last step had none)."""
    out = train(config(workdir, str(tmp_path / "run"), batch_size=8, max_steps=12,
                       eval_data=str(eval_file), eval_strategy=strategy,
                       eval_steps=eval_steps), progress=False).parent
    assert [r["step"] for r in _records(out) if "eval/loss" in r] == expected


@pytest.mark.parametrize(("strategy", "expected"), [("epoch", ["checkpoint-12", "checkpoint-6"]),
                                                    ("steps", ["checkpoint-12", "checkpoint-8"]),
                                                    ("no", [])])
def test_save_strategy(workdir, tmp_path, strategy, expected):
    out = tmp_path / "run"
    train(config(workdir, str(out), batch_size=8, max_steps=12, save_steps=4,
                 save_total_limit=2, save_strategy=strategy), progress=False)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == expected
    assert (out / "final" / "config.json").is_file()


def test_batch_sizes_of_evaluation_and_reference_pass_keep_the_numbers(workdir, tmp_path,
                                                                       eval_file):
    """Eval micro-batches of 1 and a reference pass in batches of 3: the same losses (within
    float32 rounding) as the defaults."""
    runs = [train(config(workdir, str(tmp_path / name), batch_size=4, max_steps=2,
                         eval_data=str(eval_file), **extra), progress=False).parent
            for name, extra in (("default", {}),
                                ("small", {"per_device_eval_batch_size": 1,
                                           "precompute_ref_batch_size": 3}))]
    default, small = (_records(r) for r in runs)
    assert len(default) == len(small) == 3
    for a, b in zip(default, small, strict=True):
        key = "loss" if "loss" in a else "eval/loss"
        assert a[key] == pytest.approx(b[key], abs=1e-5)


def test_warmup_steps_as_a_fraction(workdir, tmp_path):
    """warmup_steps 0.5 of 4 steps = 2 warmup steps: the same learning rates as warmup_steps 2."""
    rates = []
    for name, warmup in (("fraction", 0.5), ("steps", 2)):
        out = train(config(workdir, str(tmp_path / name), max_steps=4, warmup_steps=warmup,
                           lr_scheduler="linear"), progress=False).parent
        rates.append([r["learning_rate"] for r in _records(out)])
    assert rates[0] == rates[1] and rates[0][0] < rates[0][1]


def test_warmup_steps_above_one_must_be_whole(workdir):
    with pytest.raises(DpokitError, match="warmup_steps must be a whole number"):
        config(workdir, "x", warmup_steps=2.5)
