"""TRL 1.16's own example runs (issue 13), as a TRL user would move them: the commands in the
docstrings of ``trl/scripts/dpo.py`` and ``trl/scripts/sft.py`` (TRL 1.16.0), written as the
YAML ``trl dpo --config`` reads, with the hub model and dataset replaced by local fixtures of the
same shape and the length cut by a flag. Each either trains, or stops with one line naming the
key dpokit cannot honour and what to use — after which the rest trains."""

import json

import pytest
import yaml

from tests.helpers import read_metrics, run_cli

DPO_EXAMPLE = {  # trl/scripts/dpo.py, first command
    "dataset_name": "trl-lib/ultrafeedback_binarized",
    "model_name_or_path": "Qwen/Qwen2-0.5B-Instruct", "learning_rate": 5.0e-7,
    "num_train_epochs": 1, "per_device_train_batch_size": 2, "max_steps": 1000,
    "gradient_accumulation_steps": 8, "eval_strategy": "steps", "eval_steps": 50,
    "output_dir": "Qwen2-0.5B-DPO", "remove_unused_columns": False}
DPO_LORA_EXAMPLE = {**DPO_EXAMPLE, "learning_rate": 5.0e-6, "use_peft": True, "lora_r": 32,
                    "lora_alpha": 16}  # the second command
SFT_EXAMPLE = {  # trl/scripts/sft.py, first command
    "model_name_or_path": "Qwen/Qwen2-0.5B", "dataset_name": "trl-lib/Capybara",
    "learning_rate": 2.0e-5, "num_train_epochs": 1, "packing": True,
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 8,
    "eos_token": "<|im_end|>", "eval_strategy": "steps", "eval_steps": 100,
    "output_dir": "Qwen2-0.5B-SFT", "push_to_hub": True}


@pytest.fixture(scope="module")
def datasets(workdir, tmp_path_factory):
    """Local stand-ins with the hub datasets' splits: preference pairs (train/test) and
    conversations (train/test), as shard files named by split."""
    root = tmp_path_factory.mktemp("trl-examples")
    prefs = root / "ultrafeedback"
    prefs.mkdir()
    rows = (workdir / "prefs.jsonl").read_text().splitlines(keepends=True)
    (prefs / "train.jsonl").write_text("".join(rows[:40]))
    (prefs / "test.jsonl").write_text("".join(rows[40:]))
    chats = root / "capybara"
    chats.mkdir()
    for split, n in (("train", 40), ("test", 8)):
        (chats / f"{split}.jsonl").write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": f"question {i}?"},
            {"role": "assistant", "content": "yes good answer " * (1 + i % 3)}]}) + "\n"
            for i in range(n)))
    return {"prefs": prefs, "chats": chats}


def _run(capsys, command, example, tmp_path, **local):
    path = tmp_path / f"{command}.yaml"
    path.write_text(yaml.safe_dump({**example, **local}))
    return run_cli(capsys, command, "--config", str(path), "--max-steps", "2",
                   "--eval-steps", "1", "--logging-steps", "1", "--max-length", "64")


@pytest.mark.parametrize("example", [DPO_EXAMPLE, DPO_LORA_EXAMPLE], ids=["full", "lora"])
def test_trls_dpo_examples_train(workdir, datasets, tmp_path, capsys, example):
    code, _, err = _run(capsys, "train", example, tmp_path,
                        model_name_or_path=str(workdir / "qwen2"),
                        dataset_name=str(datasets["prefs"]), output_dir=str(tmp_path / "out"))
    assert code == 0, err[-3000:]
    assert "read as a TRL config" in err and "remove_unused_columns" in err
    records = read_metrics(tmp_path / "out")
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert any("eval/loss" in r for r in records)  # eval_strategy steps on the test split
    resolved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert (resolved["batch_size"], resolved["gradient_accumulation_steps"], resolved["lora"],
            resolved["eval_split"], resolved["bf16"]) == (
        2, 8, bool(example.get("use_peft")), "test", True)


def test_trls_sft_example_is_refused_key_by_key_then_trains(workdir, datasets, tmp_path,
                                                           capsys):
    """packing, eos_token and push_to_hub have no dpokit equivalent: each is one line naming it
    and what to do; without them the example trains on the conversations (every token, TRL's
    rule for messages rows, with TRL's token-mean loss)."""
    example = dict(SFT_EXAMPLE)
    local = {"model_name_or_path": str(workdir / "qwen2"),
             "dataset_name": str(datasets["chats"]), "output_dir": str(tmp_path / "out")}
    refused = []
    for _ in range(3):
        code, _, err = _run(capsys, "sft", example, tmp_path, **local)
        lines = [x for x in err.splitlines() if "dpokit: error" in x]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        key = lines[0].split("TRL key ")[1].split(":")[0]
        assert "is not supported (" in lines[0], lines[0]
        refused.append(key)
        del example[key]
    assert sorted(refused) == ["eos_token", "packing", "push_to_hub"]
    code, _, err = _run(capsys, "sft", example, tmp_path, **local)
    assert code == 0, err[-3000:]
    records = read_metrics(tmp_path / "out")
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    resolved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert (resolved["completion_only_loss"], resolved["loss_normalization"]) == (None, "token")
