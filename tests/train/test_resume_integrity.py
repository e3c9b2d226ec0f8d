"""From a review of exact resume, shuffling and sharding: a run interrupted at a checkpoint and
resumed must give the uninterrupted run's records (no step missing or repeated) and weights.

The oracle of every resume test is the uninterrupted run itself: its directory is copied as a
crash would leave it (``metrics.jsonl`` with records past the checkpoint, the checkpoint, no
``final/``) and resumed with ``--resume auto``."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dpokit.train.loop import train
from tests.helpers import k_completion_rows, read_metrics, write_jsonl
from tests.train.test_trainer import config

VOLATILE = ("_per_second",)


def crashed_copy(run_dir, target, step):
    """``run_dir`` as a crash after ``step``'s checkpoint (and later records) leaves it."""
    target.mkdir(parents=True)
    for name in ("metrics.jsonl", "samples.jsonl", "config.yaml"):
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, target / name)
    shutil.copytree(run_dir / f"checkpoint-{step}", target / f"checkpoint-{step}")
    return target


def comparable(records):
    return [{k: v for k, v in r.items() if not k.endswith(VOLATILE)} for r in records]


def assert_same_records(a, b, abs_=1e-6):
    a, b = comparable(a), comparable(b)
    assert [(r["step"], sorted(r)) for r in a] == [(r["step"], sorted(r)) for r in b]
    for x, y in zip(a, b, strict=True):
        for key, value in x.items():
            if isinstance(value, float):
                assert y[key] == pytest.approx(value, rel=0, abs=abs_), (x["step"], key)
            else:
                assert y[key] == value, (x["step"], key)


def assert_same_weights(a_final, b_final, name="model.safetensors", atol=1e-6):
    a, b = load_file(str(a_final / name)), load_file(str(b_final / name))
    assert sorted(a) == sorted(b)
    for key, tensor in a.items():
        torch.testing.assert_close(b[key], tensor, rtol=0, atol=atol)


def straight_and_resumed(workdir, tmp_path, name, step, cls=None, **overrides):
    """The uninterrupted run, and it resumed from a copy of its ``checkpoint-STEP``."""
    kwargs = {} if cls is None else {"cls": cls}
    straight = train(config(workdir, tmp_path / f"{name}-a", **kwargs, **overrides),
                     progress=False)
    # beside the first run: the resumed one finds its tokenised data (and tables) cached
    target = crashed_copy(straight.parent, tmp_path / f"{name}-b", step)
    resumed = train(config(workdir, target, **kwargs, **{**overrides, "resume": "auto"}),
                    progress=False)
    return straight, resumed


# ------------------------------------------------------------------ resume = uninterrupted


def test_resume_mid_epoch_with_fractional_epochs_accumulation_and_eval(workdir, tmp_path):
    """1.5 epochs of 6 steps (batch 4 × accumulation 2), a cosine schedule with warmup,
    evaluation every 2 steps; the crash after step 4's checkpoint (records up to step 7 were
    written): the resumed run crosses the epoch boundary and must log exactly the same."""
    evaluation = write_jsonl(tmp_path / "eval.jsonl",
                             [json.loads(line) for line in
                              (workdir / "prefs.jsonl").read_text().splitlines()[:6]])
    straight, resumed = straight_and_resumed(
        workdir, tmp_path, "frac", 4, max_steps=None, num_epochs=1.5, batch_size=4,
        gradient_accumulation_steps=2, save_steps=4, eval_steps=2, eval_data=str(evaluation),
        lr_scheduler="cosine", warmup_steps=2)
    a, b = read_metrics(straight.parent), read_metrics(resumed.parent)
    assert max(r["step"] for r in a) == 9
    assert_same_records(a, b)
    assert_same_weights(straight, resumed)


def test_resume_with_k_completion_groups_over_several_epochs(workdir, tmp_path):
    """Batching units are groups (a prompt's pairs): 3 epochs of 4 steps (batch 2 groups ×
    accumulation 2), the crash after step 6 (mid epoch 1)."""
    data = write_jsonl(tmp_path / "k.jsonl", k_completion_rows(16))
    straight, resumed = straight_and_resumed(
        workdir, tmp_path, "groups", 6, data=str(data), pairs_from_scores="all",
        max_steps=None, num_epochs=3, batch_size=2, gradient_accumulation_steps=2,
        save_steps=3, save_total_limit=None)
    a, b = read_metrics(straight.parent), read_metrics(resumed.parent)
    assert max(r["step"] for r in a) == 12
    assert_same_records(a, b)
    assert_same_weights(straight, resumed)


def test_sft_resume_with_dropout_and_a_linear_schedule(workdir, tmp_path):
    """SFT of GPT-2 with its dropout on (disable_dropout false: masks from the restored RNG),
    accumulation 2, a linear schedule with warmup, 1.5 epochs; the crash after step 5."""
    from dpokit.train.config import SFTConfig

    straight, resumed = straight_and_resumed(
        workdir, tmp_path, "sft", 5, cls=SFTConfig, model=str(workdir / "gpt2"),
        disable_dropout=False, max_steps=None, num_epochs=1.5, batch_size=4,
        gradient_accumulation_steps=2, save_steps=5, lr_scheduler="linear", warmup_steps=3)
    a, b = read_metrics(straight.parent), read_metrics(resumed.parent)
    assert max(r["step"] for r in a) == 9
    assert_same_records(a, b)
    assert_same_weights(straight, resumed)


def test_tr_dpo_resume_restores_the_moving_reference(workdir, tmp_path):
    """TR-DPO syncs π_ref every 2 steps; the crash after step 3 (between two syncs)."""
    straight, resumed = straight_and_resumed(
        workdir, tmp_path, "trdpo", 3, sync_ref_model=True, ref_model_sync_steps=2,
        ref_model_mixup_alpha=0.5, max_steps=7, save_steps=3)
    assert_same_records(read_metrics(straight.parent), read_metrics(resumed.parent))
    assert_same_weights(straight, resumed)


def test_lora_resume_with_lora_dropout(workdir, tmp_path):
    """LoRA with lora_dropout on (disable_dropout false) and the adapters-off reference."""
    straight, resumed = straight_and_resumed(
        workdir, tmp_path, "lora", 2, lora=True, lora_r=4, lora_dropout=0.2,
        disable_dropout=False, max_steps=5, save_steps=2, learning_rate=1e-2)
    assert_same_records(read_metrics(straight.parent), read_metrics(resumed.parent))
    assert_same_weights(straight, resumed, name="adapter_model.safetensors")


def test_resume_after_the_last_checkpoint_does_not_repeat_the_final_evaluation(workdir,
                                                                                tmp_path):
    """The run saved checkpoint-4 at its last step, evaluated (eval_steps null: at the end)
    and crashed writing final/. Resumed, it has no step left: it must write final/ without a
    second ``eval/`` record for step 4."""
    evaluation = write_jsonl(tmp_path / "eval.jsonl",
                             [json.loads(line) for line in
                              (workdir / "prefs.jsonl").read_text().splitlines()[:4]])
    straight, resumed = straight_and_resumed(
        workdir, tmp_path, "final-eval", 4, max_steps=4, save_steps=2,
        eval_data=str(evaluation))
    a, b = read_metrics(straight.parent), read_metrics(resumed.parent)
    assert [m["step"] for m in a if "eval/loss" in m] == [4]
    assert [m["step"] for m in b if "eval/loss" in m] == [4]
    assert_same_records(a, b)


# ------------------------------------------------------------------ two processes


def test_two_processes_with_groups_and_accumulation_resume_as_one_process(workdir, tmp_path):
    """k-completion groups on 2 gloo ranks (batch 1 group × accumulation 2 each; the last
    global batch of the epoch is 2 groups: one micro-batch and one zero-weight filler a rank),
    1.5 epochs, evaluation of 5 groups (uneven over the ranks) every 3 steps: = 1 process ×
    batch 2 × accumulation 2; and the 2-process run resumed from its step-3 checkpoint (a crash
    copy) = the 2-process run uninterrupted."""
    from tests.helpers import torchrun

    rows = k_completion_rows(14)
    data = write_jsonl(tmp_path / "k.jsonl", rows)
    evaluation = write_jsonl(tmp_path / "k-eval.jsonl", rows[:5])
    common = {"data": str(data), "pairs_from_scores": "all", "max_steps": None,
              "num_epochs": 1.5, "gradient_accumulation_steps": 2, "save_steps": 3,
              "eval_data": str(evaluation), "eval_steps": 3}
    one = train(config(workdir, tmp_path / "one", batch_size=2, **common), progress=False)

    def cli(out, *extra):
        args = ["-m", "dpokit", "train", "--model", str(workdir / "llama"), "--device", "cpu",
                "--data", str(data), "--output-dir", str(out), "--max-length", "64",
                "--beta", "0.5", "--logging-steps", "1", "--lr-scheduler", "constant",
                "--learning-rate", "1e-3", "--pairs-from-scores", "all", "--num-epochs", "1.5",
                "--batch-size", "1", "--gradient-accumulation-steps", "2", "--save-steps", "3",
                "--eval-data", str(evaluation), "--eval-steps", "3", *extra]
        done = torchrun(*args)
        assert done.returncode == 0, done.stderr[-3000:]

    cli(tmp_path / "two")
    target = crashed_copy(tmp_path / "two", tmp_path / "two-resumed", 3)
    cli(target, "--resume", "auto")
    a, b, c = (read_metrics(d) for d in (one.parent, tmp_path / "two", target))
    assert max(r["step"] for r in a) == 6
    assert_same_records(a, b, abs_=1e-5)
    assert_same_records(b, c)
    assert_same_weights(one, tmp_path / "two" / "final", atol=1e-5)
    assert_same_weights(tmp_path / "two" / "final", target / "final")


# ------------------------------------------------------------------ shuffling and sharding


def test_the_seed_draws_the_order_and_the_ranks_split_it_whole():
    """Another seed, another order (every epoch); the same seed, the same global batches for
    any process count: the ranks' micro-batches of a global batch are it, once, in order."""
    import numpy as np

    from dpokit.data.batching import epoch_batches, micro_batches, unit_spans

    groups = np.repeat(np.arange(20), [1, 2, 3] * 6 + [2, 2])
    spans = unit_spans(groups)
    for epoch in range(3):
        a = epoch_batches(len(groups), 6, seed=1, epoch=epoch, spans=spans)
        b = epoch_batches(len(groups), 6, seed=2, epoch=epoch, spans=spans)
        assert a != b
        assert sorted(i for batch in a for i in batch) == list(range(len(groups)))
        for batch in a:
            for world in (1, 2, 3, 4):
                for micro in (1, 2, 4):
                    seen = []
                    for rank in range(world):
                        parts = micro_batches(batch, micro, rank, world, groups)
                        assert len(parts) == len(micro_batches(batch, micro, 0, world, groups))
                        seen += [i for indices, weight in parts if weight for i in indices]
                    assert seen == batch



# ------------------------------------------------------------------ more resume variants


def test_dpo_resume_with_dropout_accumulation_and_the_uncached_data(workdir, tmp_path):
    """GPT-2 with its dropout on, accumulation 2, k-completion groups; the resumed run reads
    the data without the tokenised cache (tokenized_cache may change on resume)."""
    data = write_jsonl(tmp_path / "k.jsonl", k_completion_rows(12, seed=3))
    common = {"model": str(workdir / "gpt2"), "disable_dropout": False, "data": str(data),
              "pairs_from_scores": "best_vs_each", "batch_size": 2,
              "gradient_accumulation_steps": 2, "max_steps": 5, "save_steps": 2}
    straight = train(config(workdir, tmp_path / "a", **common), progress=False)
    target = crashed_copy(straight.parent, tmp_path / "b", 2)
    resumed = train(config(workdir, target, **common, tokenized_cache=False, resume="auto"),
                    progress=False)
    assert_same_records(read_metrics(straight.parent), read_metrics(resumed.parent))
    assert_same_weights(straight, resumed)


def test_online_resume_with_accumulation(workdir, tmp_path):
    """On-policy pairs generated per micro-batch (accumulation 2), crash after step 1."""
    reward = tmp_path / "rewards.py"
    reward.write_text("def short(prompts, completions, **kwargs):\n"
                      "    return [-float(len(c)) for c in completions]\n")
    straight, resumed = straight_and_resumed(
        workdir, tmp_path, "online", 1, online=True, reward=f"{reward}:short",
        loss_type=["sigmoid_soft"], max_new_tokens=6, beta=1.0, learning_rate=1e-2,
        batch_size=2, gradient_accumulation_steps=2, num_generations=2, max_steps=3,
        save_steps=1, data=str(workdir / "sft.jsonl"), save_total_limit=None)
    assert_same_records(read_metrics(straight.parent), read_metrics(resumed.parent))
    assert_same_weights(straight, resumed)


def test_resuming_with_more_rows_names_the_data(workdir, tmp_path):
    """Rows appended to the data file change the steps per epoch too: the refusal must say
    that the data differs, not send the user to the processes and batch sizes, which are
    unchanged."""
    from dpokit.errors import DpokitError

    rows = (workdir / "prefs.jsonl").read_text().splitlines()
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(rows[:40]) + "\n")
    train(config(workdir, tmp_path / "run", data=str(data), max_steps=4, save_steps=2),
          progress=False)
    data.write_text("\n".join(rows) + "\n")  # 8 more rows: 12 steps an epoch, not 10
    with pytest.raises(DpokitError) as refused:
        train(config(workdir, tmp_path / "run", data=str(data), max_steps=4, save_steps=2,
                     resume="auto"), progress=False)
    assert "data (content differs)" in str(refused.value), str(refused.value)


def test_resume_auto_of_a_finished_run_leaves_its_records_as_they_are(workdir, tmp_path):
    """A scheduler requeues a job that had finished (checkpoint at its last step, final
    evaluation, final/): ``--resume auto`` has no step to take and must not log the final
    evaluation a second time."""
    evaluation = write_jsonl(tmp_path / "eval.jsonl",
                             [json.loads(line) for line in
                              (workdir / "prefs.jsonl").read_text().splitlines()[:4]])
    common = {"max_steps": 4, "save_steps": 2, "eval_data": str(evaluation)}
    final = train(config(workdir, tmp_path / "run", **common), progress=False)
    before = (final.parent / "metrics.jsonl").read_text()
    train(config(workdir, tmp_path / "run", **common, resume="auto"), progress=False)
    assert (final.parent / "metrics.jsonl").read_text().splitlines() == before.splitlines()
