"""The divergence guard and non-finite numbers (issue 12): a diverging run stops with one line and
exit 2, writes no non-finite weights, keeps metrics.jsonl valid JSON; single bad steps are
skipped and counted; corrupt weights and cache entries are caught on load."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpokit.errors import DpokitError
from dpokit.objectives.dpo import DPOObjective
from dpokit.train.loop import train
from tests.helpers import run_cli
from tests.train.test_trainer import config


def _strict_lines(path):
    """Every line parsed as strict JSON (NaN/Infinity tokens rejected)."""
    def reject(token):
        raise ValueError(f"non-JSON token {token}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def test_a_diverging_run_stops_with_one_line_and_saves_nothing(workdir, tmp_path, capsys):
    """lr 10³⁰ without clipping: the first update makes the weights ~10³⁰ and the next forward
    overflows float32 (lr 100 diverged on one CPU and converged on another — float rounding
    decides a chaotic run, so the test does not lean on it): the loss goes non-finite, 3 skipped
    steps in a row stop the run (exit 2, one line naming the step); no final/ is written, every
    checkpoint written (one per step) holds finite weights, metrics.jsonl is strict JSON and
    counts the skipped steps."""
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", str(workdir / "llama"), "--data",
                           str(workdir / "prefs.jsonl"), "--output-dir", str(out),
                           "--batch-size", "4", "--logging-steps", "1", "--max-length", "64",
                           "--beta", "0.5", "--lr-scheduler", "constant", "--learning-rate",
                           "1e30", "--max-grad-norm", "null", "--max-steps", "40",
                           "--save-steps", "1", "--save-total-limit", "null")
    lines = [line for line in err.replace("\r", "\n").splitlines() if "dpokit: error" in line]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and "training diverged" in lines[0], err[-2000:]
    assert not (out / "final").exists()
    checkpoints = list(out.glob("checkpoint-*/*.safetensors"))
    assert checkpoints
    for path in checkpoints:
        state = load_file(str(path))
        assert all(bool(torch.isfinite(t).all()) for t in state.values()), path
    records = _strict_lines(out / "metrics.jsonl")
    assert records[-1]["skipped_steps"] >= 1


def test_a_single_bad_step_is_skipped_and_counted(workdir, monkeypatch):
    """A NaN loss at step 2 only: no update at that step (the weights after it equal those
    before), its metrics are not logged (the record has no loss), and training goes on."""
    calls = {"n": 0}
    original = DPOObjective.forward

    def forward(self, policy, batch):
        out = original(self, policy, batch)
        calls["n"] += 1
        if calls["n"] == 2:  # the one micro-batch of step 2
            return type(out)(out.loss_sum * math.nan, out.sums, out.examples)
        return out

    snapshots = {}

    def probe(model, step):
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return {}

    from dpokit.train.loop import Probe

    monkeypatch.setattr(DPOObjective, "forward", forward)
    final = train(config(workdir, "skip-one", max_steps=4), progress=False,
                  probe=Probe(1, probe))
    records = [r for r in _strict_lines(final.parent / "metrics.jsonl") if "probe/" not in
               "".join(r)]
    by_step = {r["step"]: r for r in records if "learning_rate" in r}
    assert "loss" not in by_step[2] and by_step[2]["skipped_steps"] == 1
    assert math.isfinite(by_step[3]["loss"]) and by_step[4]["skipped_steps"] == 1
    for key, value in snapshots[1].items():
        assert torch.equal(value, snapshots[2][key]), key  # step 2 changed nothing
    assert any(not torch.equal(v, snapshots[3][k]) for k, v in snapshots[2].items())


def test_a_model_with_nan_weights_is_refused_on_load(workdir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(workdir / "llama", bad)
    state = load_file(str(bad / "model.safetensors"))
    name = sorted(state)[0]
    state[name][0] = math.nan
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "train", "--model", str(bad), "--data",
                           str(workdir / "prefs.jsonl"), "--output-dir", str(tmp_path / "r"),
                           "--max-steps", "1", "--save-steps", "null")
    assert code == 2 and err.count("\n") == 1 and "NaN or inf" in err and name in err, err


def test_a_corrupt_reference_cache_entry_is_rebuilt(workdir, tmp_path):
    """Garbage bytes in the cached reference table: detected, removed, recomputed — the run's
    loss equals the clean run's."""
    cache = workdir / ".dpokit_cache"
    before = set(cache.glob("*.safetensors"))
    first = train(config(workdir, "cache-a", max_steps=1, seed=11), progress=False)
    (entry,) = set(cache.glob("*.safetensors")) - before  # this run's (rows of seed 11)
    loss = _strict_lines(first.parent / "metrics.jsonl")[0]["loss"]
    for garbage in (b"\x00garbage" * 10, entry.read_bytes()[:40]):
        entry.write_bytes(garbage)
        again = train(config(workdir, f"cache-b{len(garbage)}", max_steps=1, seed=11),
                      progress=False)
        assert _strict_lines(again.parent / "metrics.jsonl")[0]["loss"] == pytest.approx(
            loss, abs=1e-7)
        assert load_file(str(entry))["ref_logps"].shape[1] == 2  # rebuilt in place


def test_max_nonfinite_steps_must_be_positive(workdir):
    with pytest.raises(DpokitError, match="max_nonfinite_steps must be ≥ 1"):
        config(workdir, "x", max_nonfinite_steps=0)
