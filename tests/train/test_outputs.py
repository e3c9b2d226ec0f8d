"""Output a user can use (issue 13): every checkpoint is a Hugging Face model directory (a full
fine-tune loads with ``AutoModelForCausalLM``, LoRA with ``PeftModel``, the tokenizer beside it)
that still resumes exactly — checkpoints of the earlier layout too — and ``final/`` carries a
model card. Equalities of weights, logits and logged numbers are exact (the same float32
computation in one process), unless a tolerance is stated."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpokit.train.checkpoint import checkpoint_problem, write_checksums
from dpokit.train.config import SFTConfig
from dpokit.train.loop import train
from dpokit.train.modelcard import cli_argv, format_number, model_card
from tests.helpers import read_metrics
from tests.train.test_trainer import config

LORA = {"lora": True, "lora_r": 4}
IDS = torch.tensor([[1, 5, 9, 3, 17, 4, 30, 2]])
"""A token sequence to compare logits on."""


def run_config(workdir, out, kind, **overrides):
    """The 4-step run of these tests: checkpoints at steps 2 and 4, all kept."""
    return config(workdir, out, max_steps=4, save_steps=2, save_total_limit=None,
                  **(LORA if kind == "lora" else {}), **overrides)


@pytest.fixture(scope="module")
def runs(workdir):
    """Run directories of the full fine-tune and the LoRA run, uninterrupted."""
    return {kind: train(run_config(workdir, f"outputs-{kind}", kind), progress=False).parent
            for kind in ("full", "lora")}


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def final_weights(run_dir, kind):
    name = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    return load_file(str(run_dir / "final" / name))


def base_model(workdir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(workdir / "llama", local_files_only=True)


# ---------------------------------------------------------------- loading a checkpoint


def test_a_full_checkpoint_loads_in_plain_transformers(runs):
    """checkpoint-4 is final/ (the same step) to the bit, in every weight and the logits;
    checkpoint-2 holds the step-2 weights, which differ; each weight is stored once."""
    from transformers import AutoModelForCausalLM

    run_dir = runs["full"]
    last = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint-4", local_files_only=True)
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final", local_files_only=True)
    assert last.state_dict().keys() == final.state_dict().keys()
    for name, tensor in final.state_dict().items():
        assert torch.equal(last.state_dict()[name], tensor), name
    assert torch.equal(logits(last), logits(final))

    early_dir = run_dir / "checkpoint-2"
    early = AutoModelForCausalLM.from_pretrained(early_dir, local_files_only=True)
    stored = load_file(str(early_dir / "trainable.safetensors"))
    assert stored.keys() == dict(early.named_parameters()).keys()
    for name, tensor in early.named_parameters():
        assert torch.equal(tensor, stored[name]), name
    assert not torch.equal(logits(early), logits(final))

    index = json.loads((early_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"trainable.safetensors"}
    assert not (early_dir / "model.safetensors").exists()


def test_a_checkpoint_holds_the_tokenizer(workdir, runs):
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(workdir / "llama")
    for kind in ("full", "lora"):
        loaded = AutoTokenizer.from_pretrained(runs[kind] / "checkpoint-2")
        text = "why is the sun red? because of the sea"
        assert loaded(text)["input_ids"] == original(text)["input_ids"]
        assert (loaded.pad_token_id, loaded.eos_token_id) == (original.pad_token_id,
                                                              original.eos_token_id)
        assert loaded.chat_template == original.chat_template


def test_a_tied_model_checkpoint_loads_with_its_tie(workdir):
    """GPT-2 ties lm_head to the token embedding: stored once, tied again on loading, the
    logits those of final/."""
    from transformers import AutoModelForCausalLM

    run_dir = train(config(workdir, "outputs-gpt2", model=str(workdir / "gpt2"), max_steps=2,
                           save_steps=2), progress=False).parent
    checkpoint = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint-2",
                                                      local_files_only=True)
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final", local_files_only=True)
    assert checkpoint.lm_head.weight is checkpoint.get_input_embeddings().weight
    assert torch.equal(logits(checkpoint), logits(final))


def test_untrained_tensors_are_stored_for_from_pretrained(tmp_path):
    """A frozen parameter (here the final norm, set away from its initial ones) is not in
    trainable.safetensors; the index finds it in frozen.safetensors, so from_pretrained gets the
    whole model; resuming restores the trainable ones."""
    from transformers import AutoModelForCausalLM

    from dpokit.fixtures import tiny_causal_lm
    from dpokit.train.checkpoint import load_checkpoint, save_checkpoint

    def setup(seed):
        model = tiny_causal_lm("llama", vocab_size=64, seed=seed)
        model.model.norm.weight.requires_grad_(False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    model, optimizer, scheduler = setup(1)
    with torch.no_grad():
        model.model.norm.weight.fill_(0.5)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"global_step": 1}, rng={})
    assert "model.norm.weight" not in load_file(str(path / "trainable.safetensors"))
    assert load_file(str(path / "frozen.safetensors")).keys() == {"model.norm.weight"}
    loaded = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    other, optimizer, scheduler = setup(2)
    load_checkpoint(path, model=other, optimizer=optimizer, scheduler=scheduler)
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b) == a.requires_grad, name  # the frozen one is not restored


def test_a_lora_checkpoint_loads_with_peft(workdir, runs):
    """checkpoint-4 on the base model gives the logits of final/ (the same step) on another
    copy; the adapter file is the only copy of the adapter weights."""
    from peft import PeftModel

    run_dir = runs["lora"]
    checkpoint = PeftModel.from_pretrained(base_model(workdir), run_dir / "checkpoint-4")
    final = PeftModel.from_pretrained(base_model(workdir), run_dir / "final")
    assert torch.equal(logits(checkpoint), logits(final))
    assert not torch.equal(logits(checkpoint), logits(base_model(workdir)))  # it trained
    assert not (run_dir / "checkpoint-4" / "trainable.safetensors").exists()


def test_checksums_cover_the_hugging_face_files(runs):
    expected = {"full": {"config.json", "model.safetensors.index.json", "trainable.safetensors",
                         "tokenizer.json"},
                "lora": {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"}}
    for kind, names in expected.items():
        sums = json.loads((runs[kind] / "checkpoint-2" / "checksums.json").read_text())
        assert names <= set(sums), kind


def test_an_altered_adapter_file_is_caught(runs, tmp_path):
    path = tmp_path / "checkpoint-2"
    shutil.copytree(runs["lora"] / "checkpoint-2", path)
    adapter = path / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF
    adapter.write_bytes(bytes(data))
    assert checkpoint_problem(path) == "adapter_model.safetensors does not match its checksum"


# ---------------------------------------------------------------------------- resuming


def assert_same_continuation(straight_dir, resumed_dir, kind):
    """Steps 3 and 4 of the resumed run log exactly what the uninterrupted run logged, and
    end with the same final weights, bit for bit."""
    straight = [m for m in read_metrics(straight_dir) if m["step"] > 2]
    resumed = read_metrics(resumed_dir)
    assert [m["step"] for m in resumed] == [3, 4]
    for x, y in zip(straight, resumed, strict=True):
        for key in ("loss", "rewards/margins", "rewards/chosen", "grad_norm", "learning_rate"):
            assert x[key] == y[key], (x["step"], key)
    a, b = final_weights(straight_dir, kind), final_weights(resumed_dir, kind)
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(b[name], tensor), name


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_resume_from_the_new_layout_is_exact(workdir, runs, kind):
    resumed = train(run_config(workdir, f"outputs-resumed-{kind}", kind,
                               resume=str(runs[kind] / "checkpoint-2")), progress=False)
    assert_same_continuation(runs[kind], resumed.parent, kind)


OLD_FILES = {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng_0.pt",
             "trainer_state.json", "config.yaml"}
"""What a checkpoint of the earlier layout held (besides checksums.json)."""


def to_old_layout(path):
    """Rewrite the checkpoint at ``path`` as the earlier dpokit wrote it: the trainable
    parameters by their ``named_parameters`` names in ``trainable.safetensors`` (for LoRA the
    adapter keys with PEFT's adapter name ``default`` put back), no Hugging Face files."""
    adapter = path / "adapter_model.safetensors"
    if adapter.is_file():
        state = {key.removesuffix(".weight") + ".default.weight": tensor
                 for key, tensor in load_file(str(adapter)).items()}
    else:
        state = load_file(str(path / "trainable.safetensors"))
    for file in path.iterdir():
        if file.name not in OLD_FILES:
            file.unlink()
    save_file(state, str(path / "trainable.safetensors"))  # no metadata, as before
    write_checksums(path)
    assert {p.name for p in path.iterdir()} == OLD_FILES | {"checksums.json"}


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_an_old_layout_checkpoint_still_resumes(workdir, runs, kind, tmp_path):
    old = tmp_path / "checkpoint-2"
    shutil.copytree(runs[kind] / "checkpoint-2", old)
    to_old_layout(old)
    resumed = train(run_config(workdir, f"outputs-old-{kind}", kind, resume=str(old)),
                    progress=False)
    assert_same_continuation(runs[kind], resumed.parent, kind)


# --------------------------------------------------------------------------- model card


def read_card(path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def test_final_has_a_model_card(runs):
    from dpokit.train.modelcard import dpokit_version

    run_dir = runs["full"]
    card = read_card(run_dir / "final" / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.base_model is None  # a local base: a path, not a Hub id (in the table)
    assert {"dpokit", "dpo"} <= set(card.data.tags)
    last = [m for m in read_metrics(run_dir) if "loss" in m][-1]
    assert last["step"] == 4
    for expected in ("`sigmoid`", "β = 0.5", "| Steps | 4 |", "offline",
                     f"| loss | {format_number(last['loss'])} |",
                     f"| rewards/accuracies | {format_number(last['rewards/accuracies'])} |",
                     f"dpokit train --config {run_dir}/config.yaml", dpokit_version(),
                     "prefs.jsonl"):
        assert expected in card.text, expected
    assert "Evaluation" not in card.text  # no eval_data

    lora = read_card(runs["lora"] / "final" / "README.md")  # replaces PEFT's template
    assert lora.data.library_name == "peft" and "lora" in lora.data.tags
    assert "LoRA adapter (r = 4" in lora.text and "adapters off" in lora.text


def test_an_sft_card_says_sft(workdir):
    run_dir = train(config(workdir, "outputs-sft", cls=SFTConfig, max_steps=1),
                    progress=False).parent
    card = read_card(run_dir / "final" / "README.md")
    assert "sft" in card.data.tags and "dpo" not in card.data.tags
    assert "SFT" in card.text and "β" not in card.text
    assert f"dpokit sft --config {run_dir}/config.yaml" in card.text
    assert "nll_per_token" in card.text and "rewards/" not in card.text


def test_the_card_shows_the_last_records_and_the_command_line(workdir):
    """The pure renderer: the last training record with a loss (a window of skipped steps
    has none), the last evaluation record, the command line that started the run, torchrun
    with the run's processes, and a version given."""
    cfg = config(workdir, "runs/card", split="train", loss_type=["sigmoid", "sft"],
                 loss_weights=[1.0, 0.5], beta=0.2)
    records = [{"step": 1, "loss": 0.7, "rewards/margins": 0.1, "learning_rate": 1e-3},
               {"step": 2, "eval/loss": 0.65, "eval/rewards/accuracies": 0.75},
               {"step": 3, "loss": 0.6125, "rewards/margins": None, "learning_rate": 1e-3,
                "skipped_steps": 1},
               {"step": 4, "learning_rate": 1e-3, "skipped_steps": 2},
               {"step": 4, "probe/kl": 0.5}]
    argv = ["dpokit", "train", "--config", "my dpo.yaml"]
    card = model_card(cfg, records, 4, version="9.9", argv=argv, world_size=2)
    assert card.startswith("---\n") and "\n---\n" in card
    for expected in ("| Steps | 4 |", "(split `train`)", "`sigmoid`, `sft` (weights 1.0, 0.5)",
                     "β = 0.2", "the last logged step (3)", "| loss | 0.6125 |",
                     "| rewards/margins | n/a |", "gradient norm): 1.", "Evaluation at step 2",
                     "| eval/loss | 0.65 |", "| eval/rewards/accuracies | 0.75 |",
                     "| dpokit | 9.9 |", "dpokit train --config 'my dpo.yaml'",
                     f"torchrun --nproc-per-node 2 -m dpokit train --config "
                     f"{workdir}/runs/card/config.yaml"):
        assert expected in card, expected
    assert "probe/kl" not in card and "learning_rate" not in card
    bare = model_card(cfg, [], 0, version="9.9")
    assert "Final metrics" not in bare and "started with" not in bare


def test_the_command_line_is_recorded_only_from_the_cli():
    assert cli_argv(["/venv/bin/dpokit", "train", "--beta", "0.1"]) == ["dpokit", "train",
                                                                       "--beta", "0.1"]
    assert cli_argv(["/src/dpokit/__main__.py", "sft"]) == ["python", "-m", "dpokit", "sft"]
    assert cli_argv(["/venv/bin/pytest", "tests"]) is None
    assert cli_argv([]) is None
