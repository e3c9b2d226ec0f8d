"""On-policy DPO (`online: true`) on a tiny model: it learns what the reward asks, resumes
exactly, and refuses what it cannot do with one line."""

import pytest

from dpokit.train.loop import train
from tests.helpers import read_metrics, run_cli, torchrun, write_jsonl
from tests.train.test_trainer import config

REWARD = '''
def short(prompts, completions, **kwargs):
    """Shorter completions are better: −(characters)."""
    return [-float(len(c)) for c in completions]


def wrong_length(prompts, completions, **kwargs):
    return [0.0]
'''


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "rewards.py"
    path.write_text(REWARD)
    return path


def online(workdir, out, reward_file, **overrides):
    values = {"online": True, "reward": f"{reward_file}:short", "loss_type": ["sigmoid_soft"],
              "max_new_tokens": 8, "beta": 1.0, "learning_rate": 1e-2, "batch_size": 8,
              "num_generations": 4,
              "max_steps": 30, "logging_steps": 10, "data": str(workdir / "sft.jsonl")}
    values.update(overrides)
    return config(workdir, out, **values)


def test_online_dpo_learns_the_reward(workdir, reward_file):
    """Rewarding short completions (−characters): over 30 steps the mean reward of the
    policy's own generations rises by more than 3 (window means over 10 steps × 8 prompts × 4
    generations; standard error ≈ 0.3) and they get shorter."""
    final = train(online(workdir, "online-learn", reward_file), progress=False)
    history = read_metrics(final.parent)
    first, last = history[0], history[-1]
    for key in ("reward/mean", "reward/std", "eos_fraction", "completion_tokens", "loss",
                "rewards/accuracies", "pairs_per_second"):
        assert key in first
    assert last["reward/mean"] > first["reward/mean"] + 3.0
    assert last["completion_tokens"] < first["completion_tokens"]


@pytest.mark.parametrize("label", ["soft", "hard"])
def test_online_resume_is_exact(workdir, reward_file, label):
    """Generation is seeded by the step and the batch: 2 + 2 steps equal 4 straight."""
    loss = ["sigmoid_soft"] if label == "soft" else ["sigmoid"]
    common = {"label": label, "loss_type": loss, "max_steps": 4, "logging_steps": 1,
              "eval_data": str(workdir / "sft.jsonl"), "eval_steps": 2}
    straight = read_metrics(train(online(workdir, f"on-{label}-a", reward_file, **common),
                                  progress=False).parent)
    out = f"on-{label}-b"
    train(online(workdir, out, reward_file, **{**common, "max_steps": 2}, save_steps=2),
          progress=False)
    resumed = read_metrics(train(online(workdir, out, reward_file, **common, save_steps=2,
                                        resume="auto"), progress=False).parent)
    assert [m["step"] for m in resumed] == [1, 2, 2, 3, 4, 4]  # steps 2, 4: train and eval
    for a, b in zip(straight, resumed, strict=True):
        keys = ("loss", "reward/mean", "completion_tokens", "rewards/margins", "kl_to_ref",
                "label_entropy")
        prefix = "eval/" if "eval/loss" in a else ""
        for key in keys:
            assert a[prefix + key] == pytest.approx(b[prefix + key], abs=1e-6), key


@pytest.mark.parametrize(("flags", "message"), [
    (["--reward", "{file}:wrong_length"], "returned 1 values for 8 completions at step 1"),
    (["--reward", "{file}:nothing"], "has no function 'nothing'"),
    (["--loss-type", "sigmoid"], "label soft trains on soft labels"),
    (["--num-generations", "1"], "num_generations must be ≥ 2"),
    (["--reward", "/nonexistent/r.py:f"], "file not found"),
    (["--reward", "{dir}"], "is not a Hugging Face model directory (no config.json)"),
])
def test_online_errors_are_one_line(workdir, reward_file, tmp_path, capsys, flags, message):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the cat"}] * 4)
    values = {"--model": str(workdir / "llama"), "--data": str(prompts),
              "--output-dir": str(tmp_path / "run"), "--reward": f"{reward_file}:short",
              "--loss-type": "sigmoid_soft", "--batch-size": "4", "--max-steps": "1",
              "--max-new-tokens": "4", "--save-steps": "null"}
    values.update({k: v.format(file=reward_file, dir=tmp_path)
                   for k, v in zip(flags[::2], flags[1::2], strict=True)})
    argv = ["train", "--online", *[x for kv in values.items() for x in kv]]
    code, out, err = run_cli(capsys, *argv)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert lines[-1].startswith("dpokit: error: ") and message in lines[-1], err
    assert sum("dpokit: error" in line for line in lines) == 1


def test_online_under_torchrun_two_processes(workdir, reward_file, tmp_path):
    """2 gloo processes, each generating for its own shard of the prompts: the run finishes
    (generation between collectives does not desynchronise DDP), logs every step with
    generation statistics in range, and saves its final model. (Not asserted: equality with
    one process — generation is seeded per micro-batch, so the samples differ.)"""
    out = tmp_path / "ddp"
    done = torchrun("-m", "dpokit", "train",
                    "--online", "--model", workdir / "llama", "--data", workdir / "sft.jsonl",
                    "--reward", f"{reward_file}:short", "--loss-type", "sigmoid_soft",
                    "--batch-size", "4", "--max-steps", "2", "--logging-steps", "1",
                    "--max-new-tokens", "4", "--save-steps", "null", "--device", "cpu",
                    "--ddp-timeout", "120", "--output-dir", out)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["pairs_per_second"] > 0 and 1 <= r["completion_tokens"] <= 4
        assert r["reward/mean"] <= 0 and 0 <= r["eos_fraction"] <= 1
    assert (out / "final" / "model.safetensors").is_file()


def test_online_metrics_and_evaluation(workdir, reward_file):
    """kl_to_ref (k3 from the paired samples) is 0 at step 1, where π_θ = π_ref, and grows;
    label_entropy lies in [0, log 2]; generation tokens/s is positive. Evaluation on prompts
    generates its own pairs (eval/reward/mean etc.), and eval_generate samples carry the
    reward, equal to the reward function applied to the text (−characters)."""
    import json
    import math

    final = train(online(workdir, "online-metrics", reward_file, max_steps=12, logging_steps=1,
                         eval_data=str(workdir / "sft.jsonl"), eval_steps=6, eval_generate=3),
                  progress=False)
    records = read_metrics(final.parent)
    train_rows = [r for r in records if "loss" in r]
    assert train_rows[0]["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)
    assert max(r["kl_to_ref"] for r in train_rows[-4:]) > 0.01
    for r in train_rows:
        assert 0.0 <= r["label_entropy"] <= math.log(2) + 1e-12
        assert r["generation/tokens_per_second"] > 0
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    for r in evals:
        assert r["eval/reward/mean"] <= 0 and 0 <= r["eval/eos_fraction"] <= 1
        assert math.isfinite(r["eval/loss"])
    samples = [json.loads(line) for line in
               (final.parent / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [6] * 3 + [12] * 3
    for s in samples:
        assert s["reward"] == -float(len(s["completion"]))


def test_a_large_label_temperature_gives_coin_flip_labels(workdir, reward_file):
    """τ → ∞: p = σ(Δr/τ) → ½, so label_entropy → log 2 (1e-6)."""
    import math

    final = train(online(workdir, "online-tau", reward_file, max_steps=2, logging_steps=1,
                         label_temperature=1e9), progress=False)
    for r in read_metrics(final.parent):
        assert r["label_entropy"] == pytest.approx(math.log(2), abs=1e-6)


def test_online_with_lora_learns_against_the_adapters_off_reference(workdir, reward_file):
    """With lora the reference is the policy with its adapters disabled: k3 KL is 0 at step 1
    (LoRA's B starts at zero) and the reward still rises (adapting lm_head too: PEFT's
    all-linear leaves it out, and attention/MLP adapters alone learn this reward slowly)."""
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "lm_head"]
    final = train(online(workdir, "online-lora", reward_file, lora=True, lora_r=8,
                         lora_target_modules=modules, learning_rate=3e-2, max_steps=30,
                         logging_steps=10), progress=False)
    history = read_metrics(final.parent)
    assert history[-1]["reward/mean"] > history[0]["reward/mean"] + 2.0
    first = train(online(workdir, "online-lora-1", reward_file, lora=True, max_steps=1,
                         logging_steps=1), progress=False)
    assert read_metrics(first.parent)[0]["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)


def test_reward_without_a_reader_is_refused(workdir, reward_file):
    from dpokit.errors import DpokitError

    with pytest.raises(DpokitError, match="reward is read by online training and by "
                                          "eval_generate"):
        config(workdir, "no-reader", reward=f"{reward_file}:short")


def test_iterative_online_dpo_refreshes_the_reference(workdir, reward_file):
    """sync_ref_model with α = 1 every 2 steps (iterative DPO), with gradient accumulation: the
    reference becomes the policy after steps 2 and 4, so the k3 KL of the samples is 0 at steps
    1, 3 and 5 (π_θ = π_ref when they are drawn) and positive at steps 2 and 4."""
    final = train(online(workdir, "online-iter", reward_file, max_steps=5, logging_steps=1,
                         sync_ref_model=True, ref_model_mixup_alpha=1.0, ref_model_sync_steps=2,
                         gradient_accumulation_steps=2, batch_size=4), progress=False)
    kl = {r["step"]: r["kl_to_ref"] for r in read_metrics(final.parent) if "kl_to_ref" in r}
    for step in (1, 3, 5):
        assert kl[step] == pytest.approx(0.0, abs=1e-5), kl
    for step in (2, 4):
        assert kl[step] > 1e-3, kl
