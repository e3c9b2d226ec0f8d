"""A TRL 1.16 SFT config read by ``dpokit sft`` (issue 13): TRL's SFTConfig keys, its token-mean
loss, and which tokens it trains on (completion_only_loss, assistant_only_loss, text rows)."""

import json

import pytest
import torch
import yaml

from dpokit.config import load_config
from dpokit.data.sft import load_sft_sequences
from dpokit.errors import DpokitError
from dpokit.train.config import SFTConfig
from dpokit.train.loop import train
from tests.helpers import read_metrics, reference_token_logps, run_cli
from tests.test_trl_config import assert_every_key_accounted_for
from tests.train.test_trainer import config

# TRL 1.16's SFTConfig-only fields at their defaults (read from trl 1.16's dataclass), with the
# ModelConfig/ScriptArguments keys a TRL SFT script reads.
TRL_SFT_DEFAULTS = {
    "learning_rate": 2e-05, "model_init_kwargs": None, "trust_remote_code": False,
    "router_aux_loss_coef": None, "chat_template_path": None, "dataset_text_field": "text",
    "dataset_kwargs": None, "dataset_num_proc": None, "eos_token": None, "max_length": 1024,
    "truncation_mode": "keep_start", "shuffle_dataset": False, "packing": False,
    "packing_strategy": "bfd", "padding_free": False, "pad_to_multiple_of": "auto",
    "eval_packing": None, "completion_only_loss": None, "assistant_only_loss": False,
    "loss_type": "nll", "activation_offloading": False, "pad_token": None,
    "model_name_or_path": "m", "dataset_name": "d", "dataset_train_split": "train",
    "use_peft": False, "dtype": "float32", "bf16": None, "gradient_checkpointing": True,
    "per_device_train_batch_size": 8, "num_train_epochs": 3.0, "max_steps": -1,
    "output_dir": "out", "report_to": "none", "seed": 42,
}


def test_every_trl_sft_key_at_its_default_builds_an_sft_config(workdir, tmp_path):
    assert_every_key_accounted_for(TRL_SFT_DEFAULTS, SFTConfig)
    path = tmp_path / "trl_sft.yaml"
    path.write_text(yaml.safe_dump({**TRL_SFT_DEFAULTS, "model_name_or_path": str(
        workdir / "llama"), "dataset_name": str(workdir / "sft.jsonl")}))
    loaded = load_config(SFTConfig, path)
    assert (loaded.loss_normalization, loaded.completion_only_loss, loaded.bf16,
            loaded.num_epochs, loaded.text_column, loaded.learning_rate) == (
        "token", None, True, 3.0, "text", 2e-5)


@pytest.mark.parametrize(("key", "value", "says"), [
    ("packing", True, "padding_free"),
    ("loss_type", "dft", "NLL"),
    ("eos_token", "<|im_end|>", "tokenizer"),
    ("chat_template_path", "t.jinja", "chat template"),
])
def test_trl_sft_keys_dpokit_cannot_honour_are_refused(tmp_path, workdir, capsys, key, value,
                                                       says):
    path = tmp_path / "trl_sft.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": str(workdir / "llama"),
                                    "dataset_name": str(workdir / "sft.jsonl"), key: value}))
    code, _, err = run_cli(capsys, "sft", "--config", str(path))
    lines = [x for x in err.splitlines() if "dpokit: error" in x]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert key in lines[0] and says in lines[0], lines[0]


def _first_batch(cfg, tokenizer):
    from dpokit.data import epoch_batches

    items = cfg.objective(tokenizer).load(cfg.data, None, progress=False)
    return [items[i] for i in epoch_batches(len(items), cfg.batch_size, seed=42, epoch=0)[0]]


def test_token_normalization_is_trls_loss_and_accumulates_exactly(workdir, tokenizer, tmp_path):
    """loss_normalization token: step 1 logs Σ_i Σ_t −log π(y_i,t) / Σ_i |y_i| over the first
    global batch (float64 oracle, one unpadded sequence at a time, to 1e-5) — not the example
    mean, which differs on these rows of unequal length; 2 micro-batches of 2 accumulate to
    the weights of one batch of 4 (each micro-batch divided by the global batch's tokens)."""
    from transformers import AutoModelForCausalLM

    words = "yes good answer the cat sat on a mat under red sea moon".split()
    data = _write(tmp_path, [{"prompt": f"question {i}:", "completion": " " + " ".join(
        words[:1 + (i * 5) % len(words)])} for i in range(16)])
    common = {"data": str(data), "max_steps": 2, "loss_normalization": "token",
              "save_steps": 2}
    cfg = config(workdir, "unused", SFTConfig, output_dir=str(tmp_path / "a"), **common)
    batch = _first_batch(cfg, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(workdir / "llama", local_files_only=True)
    nll = [-float(reference_token_logps(model, s.prompt_ids, s.completion_ids)[0].sum())
           for s in batch]
    lengths = [len(s.completion_ids) for s in batch]
    assert len(set(lengths)) > 1
    token_mean = sum(nll) / sum(lengths)
    example_mean = sum(x / n for x, n in zip(nll, lengths, strict=True)) / len(nll)
    assert abs(token_mean - example_mean) > 1e-3
    a = train(cfg, progress=False).parent
    record = read_metrics(a)[0]
    assert record["loss"] == pytest.approx(token_mean, abs=1e-5)
    assert record["nll_per_token"] == pytest.approx(token_mean, abs=1e-5)
    example = read_metrics(train(config(workdir, "unused", SFTConfig, max_steps=1, data=str(data),
                                        output_dir=str(tmp_path / "e")), progress=False).parent)
    assert example[0]["loss"] == pytest.approx(example_mean, abs=1e-5)
    b = train(config(workdir, "unused", SFTConfig, output_dir=str(tmp_path / "b"), batch_size=2,
                     gradient_accumulation_steps=2, **common), progress=False).parent
    from safetensors.torch import load_file

    wa = load_file(a / "checkpoint-2" / "trainable.safetensors")
    wb = load_file(b / "checkpoint-2" / "trainable.safetensors")
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, rtol=0, atol=2e-6, msg=name)


def _write(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_which_tokens_are_trained_on(tokenizer, tmp_path):
    """completion_only_loss True: the completion (a conversation's last message); False: every
    token after the first; None (TRL's rule): the completion of prompt-completion rows, every
    token of messages and text rows. A text row is language modelling with EOS appended."""
    chat = tokenizer  # (it has a chat template)
    pc = _write(tmp_path, [{"prompt": "the cat", "completion": " sat on the mat"}])
    (default,) = load_sft_sequences(pc, tokenizer)
    (whole,) = load_sft_sequences(pc, tokenizer, completion_only_loss=False)
    (rule,) = load_sft_sequences(pc, tokenizer, completion_only_loss=None)
    full = default.prompt_ids + default.completion_ids
    assert len(default.prompt_ids) > 1 and rule == default
    assert whole.prompt_ids == full[:1] and whole.completion_ids == full[1:]
    text = _write(tmp_path, [{"text": "the cat sat on the mat"}])
    (lm,) = load_sft_sequences(text, tokenizer, completion_only_loss=None)
    ids = tokenizer("the cat sat on the mat" + tokenizer.eos_token)["input_ids"]
    assert lm.prompt_ids + lm.completion_ids == ids and len(lm.prompt_ids) == 1
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    msgs = _write(tmp_path, [{"messages": conversation}])
    (last,) = load_sft_sequences(msgs, chat)
    (every,) = load_sft_sequences(msgs, chat, completion_only_loss=None)
    (assistant,) = load_sft_sequences(msgs, chat, completion_only_loss=None,
                                      assistant_only_loss=True)
    assert assistant == last and len(last.prompt_ids) > 1
    # assistant_only_loss wins over completion_only_loss false, as TRL's assistant mask does
    assert load_sft_sequences(msgs, chat, completion_only_loss=False,
                              assistant_only_loss=True) == [last]
    assert every.prompt_ids + every.completion_ids == last.prompt_ids + last.completion_ids
    assert len(every.prompt_ids) == 1


def test_assistant_only_loss_refuses_several_assistant_turns(tokenizer, tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]
    path = _write(tmp_path, [{"messages": turns[:2]}, {"messages": turns}])
    with pytest.raises(DpokitError, match=r"row 2.*2 assistant messages.*one row per turn"):
        load_sft_sequences(path, tokenizer, assistant_only_loss=True)


def test_a_trl_sft_yaml_trains_like_its_conversion(tmp_path, workdir, capsys):
    trl = {"model_name_or_path": str(workdir / "llama"),
           "dataset_name": str(workdir / "sft.jsonl"), "per_device_train_batch_size": 4,
           "max_steps": 2, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
           "logging_steps": 1, "max_length": 64, "bf16": False, "packing": False,
           "dataset_text_field": "text", "save_strategy": "no",
           "output_dir": str(tmp_path / "trl")}
    path = tmp_path / "trl_sft.yaml"
    path.write_text(yaml.safe_dump(trl))
    code, _, err = run_cli(capsys, "sft", "--config", str(path))
    assert code == 0, err[-2000:]
    code, converted, err = run_cli(capsys, "config", "convert", "--to", "sft", str(path))
    assert code == 0, err
    assert "dpokit sft --config" in converted and "loss_normalization: token" in converted
    native = yaml.safe_load(converted)
    native["output_dir"] = str(tmp_path / "converted")
    (tmp_path / "native.yaml").write_text(yaml.safe_dump(native))
    code, _, err = run_cli(capsys, "sft", "--config", str(tmp_path / "native.yaml"))
    assert code == 0, err[-2000:]
    runs = [read_metrics(tmp_path / name) for name in ("trl", "converted")]
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]
    code, _, err = run_cli(capsys, "config", "convert", str(path))  # --to train: not DPO keys
    assert code == 2 and "--to sft" in err
