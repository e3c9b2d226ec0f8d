"""An ML engineer switching from TRL 1.16: alignment-handbook-style DPO and SFT recipes (cosine
schedule with warmup, gradient accumulation, evaluation and checkpoint cadence, weighted loss
lists, precomputed reference, LoRA, chat data) fed as they are to ``dpokit train --config`` /
``dpokit sft --config``.

Oracles: transformers 5's documented rules written out as closed forms (optimizer steps =
⌈epochs · ⌈rows / (batch · accumulation)⌉⌉, warmup = ⌈warmup_steps · steps⌉ for a fraction,
the cosine schedule, the logged ``learning_rate`` being the rate the step used, eval/save every
N steps plus TRL's evaluation at the last step), and — where ``/tmp/bv/bin/trl`` (TRL 1.16) is
installed — TRL itself run on the same files, every metric both log compared record by record
(rel 1e-4: float32 against float32 with other padding and kernels; ``logits/*`` and
``mean_token_accuracy`` left out: dpokit's window means are token-weighted, TRL's the mean of
micro-batch values — README, "Coming from TRL").
"""

import json
import logging
import math
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from dpokit.config import load_config
from dpokit.train.config import DPOConfig
from tests.helpers import read_metrics, run_cli

TRL = Path("/tmp/bv/bin/trl")
ROWS = 21  # not a multiple of the global batch: the last step of an epoch is short


@pytest.fixture(scope="module")
def data(workdir, tmp_path_factory):
    """Local stand-ins for hub datasets with train/test splits (shard files named by split):
    preference pairs, prompt-completion rows, and conversations."""
    root = tmp_path_factory.mktemp("switch")
    rows = [json.loads(x) for x in (workdir / "prefs.jsonl").read_text().splitlines()]
    out = {}
    for name, train, test in (("prefs", rows[:ROWS], rows[40:44]),
                              ("prefs8", rows[:8], rows[40:44])):
        (root / name).mkdir()
        for split, part in (("train", train), ("test", test)):
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        out[name] = root / name
    (root / "sft8").mkdir()
    (root / "sft8" / "train.jsonl").write_text("".join(json.dumps(
        {"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in rows[:8]))
    (root / "chat8").mkdir()
    (root / "chat8" / "train.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": r["prompt"]},
        {"role": "assistant", "content": r["chosen"].strip()}]}) + "\n" for r in rows[:8]))
    out.update(sft8=root / "sft8", chat8=root / "chat8")
    return out


def zephyr_dpo(workdir, data, **extra):
    """alignment-handbook's zephyr-7b-dpo-full recipe, shrunk (keys TRL 1.16 no longer has —
    max_prompt_length, warmup_ratio — left out, so TRL runs it too)."""
    return {"model_name_or_path": str(workdir / "llama"), "dataset_name": str(data["prefs"]),
            "dtype": None, "bf16": False, "use_cpu": True, "beta": 0.1, "do_eval": True,
            "eval_strategy": "steps", "eval_steps": 3, "gradient_accumulation_steps": 2,
            "gradient_checkpointing": True,
            "gradient_checkpointing_kwargs": {"use_reentrant": False}, "learning_rate": 5e-4,
            "log_level": "info", "logging_steps": 2, "lr_scheduler_type": "cosine",
            "max_length": 64, "num_train_epochs": 2, "optim": "adamw_torch",
            "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
            "save_strategy": "steps", "save_steps": 4, "save_total_limit": 1, "seed": 42,
            "warmup_steps": 0.1, "report_to": "none", **extra}


def cosine_lr(k: int, peak: float, warmup: int, total: int) -> float:
    """transformers' ``get_cosine_schedule_with_warmup`` (num_cycles 0.5) after k scheduler
    steps."""
    if k < warmup:
        return peak * k / max(1, warmup)
    progress = (k - warmup) / max(1, total - warmup)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _write(tmp_path, name, values):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_zephyr_recipe_steps_schedule_and_cadence_follow_transformers(workdir, data, tmp_path,
                                                                       capsys):
    """21 rows, batch 2 × accumulation 2, 2 epochs: ⌈21/4⌉ = 6 steps an epoch, 12 in all;
    warmup 0.1 → ⌈1.2⌉ = 2 steps; the logged rate of step s is the cosine's after s − 1 steps;
    logs every 2 steps, evaluations every 3 and at the last step (transformers 5 evaluates a
    step strategy's last step), checkpoints every 4 keeping 1; final/ loads with transformers
    and holds the tokenizer."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "train", "--config",
                           str(_write(tmp_path, "zephyr", zephyr_dpo(workdir, data))),
                           "--output_dir", str(out))
    assert code == 0, err[-3000:]
    assert err.count("read as a TRL config") == 1
    total, warmup, peak = 12, 2, 5e-4
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    evals = [r["step"] for r in records if "eval/loss" in r]
    assert [r["step"] for r in train if r["step"] % 2 == 0] == [2, 4, 6, 8, 10, 12]
    for r in train:
        assert r["learning_rate"] == pytest.approx(cosine_lr(r["step"] - 1, peak, warmup, total),
                                                   rel=1e-9, abs=1e-15), r["step"]
        assert r["epoch"] == pytest.approx(r["step"] / 6, abs=1e-4)
    assert evals == [3, 6, 9, 12]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12"]
    names = {"loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected",
             "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
             "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy", "num_tokens"}
    assert names <= set(train[0]), names - set(train[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "final")
    assert AutoTokenizer.from_pretrained(out / "final").eos_token


def test_a_dpokit_logging_steps_flag_moves_trls_eval_steps_fallback(workdir, data, tmp_path):
    """transformers: eval_strategy steps without eval_steps evaluates every logging_steps — the
    final logging_steps, whichever flag set it. Old code fixed eval_steps from the file's
    logging_steps (or TRL's 10) before dpokit's own flags were merged: ``--logging-steps 5``
    evaluated every 10 steps."""
    values = {"model_name_or_path": str(workdir / "llama"), "dataset_name": str(data["prefs"]),
              "eval_strategy": "steps", "output_dir": str(tmp_path / "o")}
    path = _write(tmp_path, "ev", values)
    assert load_config(DPOConfig, path, {"logging_steps": "5"}).eval_steps == 5
    assert load_config(DPOConfig, path, None, {"logging_steps": 5}).eval_steps == 5
    assert load_config(DPOConfig, path).eval_steps == 10  # TRL's logging_steps default
    path = _write(tmp_path, "ev0", {**values, "eval_steps": 0, "logging_steps": 3})
    assert load_config(DPOConfig, path, {"logging_steps": "7"}).eval_steps == 7


def test_a_dpokit_eval_strategy_flag_evaluates_trls_test_split(workdir, data, tmp_path):
    """TRL's script evaluates dataset_test_split whenever eval_strategy is not no. Old code
    decided it before dpokit's flags were merged: ``--eval-strategy steps`` over a TRL file left
    eval_data unset, and the run silently never evaluated."""
    path = _write(tmp_path, "split", {
        "model_name_or_path": str(workdir / "llama"), "dataset_name": str(data["prefs"]),
        "dataset_test_split": "test", "logging_steps": 4, "output_dir": str(tmp_path / "o")})
    config = load_config(DPOConfig, path, {"eval_strategy": "steps"})
    assert (config.eval_data, config.eval_split, config.eval_steps) == (
        str(data["prefs"]), "test", 4)
    config = load_config(DPOConfig, path)  # TRL's default eval_strategy: no evaluation
    assert (config.eval_strategy, config.eval_data) == ("no", None)


def test_lora_keys_without_use_peft_are_said_when_read(workdir, data, tmp_path, caplog):
    """TRL ignores lora_* without use_peft; so does dpokit, but old code said it only in
    ``dpokit config convert``: a run with ``lora_r: 64`` and no use_peft (or dpokit's own
    ``--lora``, which does not reach the file's lora_* keys) trained without a word."""
    path = _write(tmp_path, "lo", {
        "model_name_or_path": str(workdir / "llama"), "dataset_name": str(data["prefs"]),
        "lora_r": 64, "lora_alpha": 128, "output_dir": str(tmp_path / "o")})
    with caplog.at_level(logging.WARNING, logger="dpokit"):
        config = load_config(DPOConfig, path)
    assert (config.lora, config.lora_r) == (False, 16)
    lines = [r.getMessage() for r in caplog.records if "read as a TRL config" in r.getMessage()]
    assert len(lines) == 1 and "lora_alpha, lora_r" in lines[0] and "use_peft" in lines[0]
    assert load_config(DPOConfig, path, None, {"use_peft": True}).lora_r == 64
    # dpokit's own --lora is TRL's --use_peft: the file's lora_* keys are read (they were
    # dropped, the run trained at r=16)
    config = load_config(DPOConfig, path, {"lora": "true"})
    assert (config.lora, config.lora_r, config.lora_alpha) == (True, 64, 128)
    config = load_config(DPOConfig, _write(tmp_path, "off", {
        "model_name_or_path": str(workdir / "llama"), "dataset_name": str(data["prefs"]),
        "use_peft": True, "lora_r": 64, "output_dir": str(tmp_path / "o")}), {"lora": "false"})
    assert (config.lora, config.lora_r) == (False, 16)  # --no-lora wins over use_peft


# ---- TRL 1.16 itself as the oracle ---------------------------------------------------------


def _trl(command: str, config: Path, output_dir: Path) -> list[dict]:
    """``trl COMMAND --config CONFIG`` in TRL's own environment; its log history (the last
    checkpoint's trainer_state.json: transformers saves one at the last step)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([str(TRL), command, "--config", str(config), "--output_dir",
                           str(output_dir)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    last = max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((last / "trainer_state.json").read_text())["log_history"]


SKIP = {"step", "epoch", "logits/chosen", "logits/rejected", "mean_token_accuracy"}


def _compare(theirs: list[dict], ours: list[dict]) -> int:
    """Every metric both log, record by record (train and eval records keyed by step);
    returns how many values were compared."""
    def keyed(records, eval_prefix):
        out = {}
        for r in records:
            kind = "eval" if any(k.startswith(eval_prefix) for k in r) else "train"
            if kind == "eval" or "loss" in r:
                out[kind, r["step"]] = {k.replace(eval_prefix, "eval/", 1): v
                                        for k, v in r.items()}
        return out

    t, o = keyed(theirs, "eval_"), keyed(ours, "eval/")
    assert sorted(t) == sorted(o), (sorted(t), sorted(o))  # the same log and eval steps
    compared = 0
    for key, theirs_record in t.items():
        ours_record = o[key]
        trained = {k for k in theirs_record if not k.startswith("eval/")} - SKIP
        missing = {k for k in trained if k not in ours_record and k not in (
            "learning_rate", "grad_norm") and not k.startswith("train_")}
        assert not missing, (key, missing)
        for name in sorted((set(theirs_record) & set(ours_record)) - SKIP):
            margins = name.replace("accuracies", "margins")
            if name.endswith("rewards/accuracies") and abs(ours_record[margins]) < 1e-5:
                continue  # π = π_ref (step 1): every pair a tie, TRL's count float noise
            a, b = float(theirs_record[name]), float(ours_record[name])
            assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), (key, name, a, b)
            compared += 1
    return compared


@pytest.mark.slow
@pytest.mark.skipif(not TRL.exists(), reason="TRL 1.16 (/tmp/bv) is not installed")
def test_dpo_recipe_trains_like_trl_step_by_step(workdir, data, tmp_path, capsys):
    """8 rows, batch 2 × accumulation 4: every step is the whole data in both frameworks, so
    the whole trajectory must agree — a weighted loss list, cosine with warmup, weight decay,
    adam_beta2, clipping, the precomputed reference and per-step evaluation."""
    values = zephyr_dpo(workdir, data, dataset_name=str(data["prefs8"]), beta=0.2,
                        loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 0.5],
                        gradient_accumulation_steps=4, learning_rate=1e-3, warmup_steps=0.2,
                        weight_decay=0.05, adam_beta2=0.95, max_grad_norm=0.5,
                        num_train_epochs=5, logging_steps=1, eval_steps=2, save_steps=100,
                        per_device_eval_batch_size=4, precompute_ref_log_probs=True)
    path = _write(tmp_path, "dpo", values)
    theirs = _trl("dpo", path, tmp_path / "trl")
    code, _, err = run_cli(capsys, "train", "--config", str(path), "--output_dir",
                           str(tmp_path / "ours"))
    assert code == 0, err[-3000:]
    assert _compare(theirs, read_metrics(tmp_path / "ours")) > 5 * 12


@pytest.mark.slow
@pytest.mark.skipif(not TRL.exists(), reason="TRL 1.16 (/tmp/bv) is not installed")
@pytest.mark.parametrize("kind", ["sft8", "chat8"])
def test_sft_recipe_trains_like_trl_step_by_step(workdir, data, tmp_path, capsys, kind):
    """SFTConfig's defaults (completion-only loss for prompt-completion rows, every token of a
    conversation; the token mean over the global batch; the model's dropout) under the same
    schedule and accumulation."""
    path = _write(tmp_path, "sft", {
        "model_name_or_path": str(workdir / "llama"), "dataset_name": str(data[kind]),
        "bf16": False, "use_cpu": True, "gradient_accumulation_steps": 4,
        "per_device_train_batch_size": 2, "gradient_checkpointing": True,
        "learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_steps": 0.2,
        "weight_decay": 0.05, "max_grad_norm": 0.5, "num_train_epochs": 4, "logging_steps": 1,
        "save_steps": 100, "max_length": 64, "seed": 42, "report_to": "none",
        "packing": False})
    theirs = _trl("sft", path, tmp_path / "trl")
    code, _, err = run_cli(capsys, "sft", "--config", str(path), "--output_dir",
                           str(tmp_path / "ours"))
    assert code == 0, err[-3000:]
    assert _compare(theirs, read_metrics(tmp_path / "ours")) >= 4 * 4
