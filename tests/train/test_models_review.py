"""Loading what was saved, as it was trained: a LoRA merged into a model whose head is tied to
its embedding; weights files that lack tensors (transformers would start them at random); adapter
files that do not match their config; code shipped in a model directory; an incomplete snapshot
in the hub cache; the loss settings on the model card. Logits are compared against peft's own
unmerged adapter (float32; 1e-5 absolute and relative covers the merge's rounding of
W + BA) or a model reloaded from disk."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpokit.errors import DpokitError
from dpokit.models import load_causal_lm, load_reward_model, load_tokenizer
from dpokit.train.loop import Probe, train
from tests.train.test_trainer import config

IDS = torch.tensor([[1, 5, 9, 3, 17, 4, 30, 2]])
"""A token sequence to compare logits on."""


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def tied_adapter(root, workdir, name, **lora):
    """A LoRA of random, non-zero weights (so it moves the model) on the tied GPT-2 of
    ``workdir``, saved by peft in ``root/name``; returns (directory, peft's unmerged logits)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(workdir / "gpt2", local_files_only=True)
    assert base.lm_head.weight is base.get_input_embeddings().weight
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **lora))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    model.eval()
    model.save_pretrained(root / name)
    return root / name, logits(model)


@pytest.mark.parametrize("lora", [
    pytest.param({"target_modules": ["c_attn", "lm_head"]}, id="lora-on-the-head"),
    pytest.param({"target_modules": ["c_attn", "wte"]}, id="lora-on-the-embedding"),
    pytest.param({"target_modules": ["c_attn"], "modules_to_save": ["lm_head"]},
                 id="modules-to-save-head"),
])
def test_a_merged_adapter_on_a_tied_model_is_the_adapter(workdir, tmp_path, lora):
    """``load_causal_lm(adapter)`` (eval, generate, an adapter's DPO reference) gives peft's
    unmerged logits: merging into the one shared matrix changed both the embedding and the
    head (logits off by ~7 before the fix). The merged model is untied and says so in its
    config, so it saves and reloads with plain transformers to the same logits."""
    from transformers import AutoModelForCausalLM

    directory, expected = tied_adapter(tmp_path, workdir, "adapter", **lora)
    merged = load_causal_lm(directory)
    # merged vs unmerged: float32 rounding (the bug was ~7 off)
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-4)
    assert merged.lm_head.weight is not merged.get_input_embeddings().weight
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    # merged vs unmerged: float32 rounding (the bug was ~7 off)
    torch.testing.assert_close(logits(again.eval()), expected, rtol=1e-4, atol=1e-4)


def test_an_adapter_not_on_the_tied_modules_stays_tied(workdir, tmp_path):
    directory, expected = tied_adapter(tmp_path, workdir, "adapter", target_modules=["c_attn"])
    merged = load_causal_lm(directory)
    # merged vs unmerged: float32 rounding (the bug was ~7 off)
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-4)
    assert merged.lm_head.weight is merged.get_input_embeddings().weight
    assert merged.config.tie_word_embeddings is True


def test_a_trained_lora_on_a_tied_head_loads_as_trained(workdir):
    """A 2-step LoRA run on GPT-2 with lm_head among its targets: ``final/`` through
    ``load_causal_lm`` gives the logits of the policy in memory at its last step."""
    held = {}

    def grab(model, step):
        held["policy"] = copy.deepcopy(model)
        return {}

    final = train(config(workdir, "review-tied-head", model=str(workdir / "gpt2"), max_steps=2,
                         lora=True, lora_r=4, learning_rate=5e-2,
                         lora_target_modules=["c_attn", "lm_head"]),
                  progress=False, probe=Probe(every=1, fn=grab))
    torch.testing.assert_close(logits(load_causal_lm(final)), logits(held["policy"]),
                               rtol=1e-4, atol=1e-4)  # merged vs unmerged: float32 rounding


# ------------------------------------------------------------- weights that are not all there


def test_weights_lacking_a_tensor_are_refused(workdir, tmp_path):
    """transformers starts a tensor missing from the weights at random (a warning only): the
    model would train or be evaluated partly random. One line naming the tensor instead."""
    directory = tmp_path / "partial"
    shutil.copytree(workdir / "llama", directory)
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DpokitError) as error:
        load_causal_lm(directory)
    message = str(error.value)
    assert "\n" not in message and str(directory) in message
    assert "model.layers.0.mlp.up_proj.weight" in message and "at random" in message


def test_a_causal_lm_is_no_reward_model_even_with_one_label(workdir, tmp_path):
    """A causal LM's directory whose config says num_labels 1 passed the outputs check and
    scored with a randomly initialised head; its missing score head is now refused."""
    directory = tmp_path / "lm-one-label"
    shutil.copytree(workdir / "llama", directory)
    settings = json.loads((directory / "config.json").read_text())
    settings["id2label"] = {"0": "LABEL_0"}
    settings["label2id"] = {"LABEL_0": 0}
    (directory / "config.json").write_text(json.dumps(settings))
    with pytest.raises(DpokitError, match=r"score\.weight.*at random"):
        load_reward_model(directory)


def test_a_sharded_model_with_an_index_loads_whole(tmp_path):
    from dpokit.fixtures import tiny_causal_lm

    model = tiny_causal_lm("llama", vocab_size=64, seed=5)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert torch.equal(logits(load_causal_lm(tmp_path / "sharded")), logits(model))
    shards[1].unlink()
    with pytest.raises(DpokitError, match=f"No such file.*{shards[1].name}"):
        load_causal_lm(tmp_path / "sharded")


@pytest.fixture
def trained_adapter(workdir, tmp_path):
    """A LoRA adapter on the Llama of ``workdir``, saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(workdir / "llama", local_files_only=True)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_adapter(directory, change):
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(directory / "adapter_model.safetensors"))


def test_an_adapter_file_lacking_a_tensor_is_refused(trained_adapter):
    """peft keeps the initial value of an adapter tensor its file lacks (a random lora_A under
    a trained lora_B), with a warning only."""
    name = sorted(load_file(str(trained_adapter / "adapter_model.safetensors")))[0]
    edit_adapter(trained_adapter, lambda tensors: tensors.pop(name))
    with pytest.raises(DpokitError) as error:
        load_causal_lm(trained_adapter)
    message = str(error.value)
    assert "\n" not in message and "1 missing" in message and name in message


def test_an_adapter_tensor_with_no_place_in_the_model_is_refused(trained_adapter):
    """peft drops, silently, a tensor its config puts on no module of the base."""
    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"

    def add(tensors):
        tensors[extra] = torch.ones(2, 32)

    edit_adapter(trained_adapter, add)
    with pytest.raises(DpokitError, match=f"1 with no place in the model \\({extra}\\)"):
        load_causal_lm(trained_adapter)


def test_a_truncated_adapter_file_is_one_line(trained_adapter):
    """A cut-short adapter file (a copy interrupted) raised safetensors' own error, with a
    traceback, out of peft."""
    file = trained_adapter / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])
    with pytest.raises(DpokitError, match=f"^cannot read the PEFT adapter {file}: it is "
                                          f"corrupt: .*header"):
        load_causal_lm(trained_adapter)


def test_a_whole_adapter_still_loads(trained_adapter, workdir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(workdir / "llama", local_files_only=True)
    expected = logits(PeftModel.from_pretrained(base, trained_adapter).eval())
    torch.testing.assert_close(logits(load_causal_lm(trained_adapter)), expected,
                               rtol=1e-4, atol=1e-4)  # merged vs unmerged: float32 rounding


# ------------------------------------------------------------------ code shipped in a model


SENTINEL = "dpokit-remote-code-ran"


def remote_code_model(workdir, tmp_path):
    """The Llama of ``workdir`` as a model of an unknown type whose config's ``auto_map`` points
    at code beside it; the code, if run, writes a sentinel file."""
    directory = tmp_path / "remote"
    shutil.copytree(workdir / "llama", directory)
    settings = json.loads((directory / "config.json").read_text())
    settings.update(model_type="shipped", architectures=["ShippedModel"],
                    auto_map={"AutoConfig": "shipped.ShippedConfig",
                              "AutoModelForCausalLM": "shipped.ShippedModel"})
    (directory / "config.json").write_text(json.dumps(settings))
    tokenizer = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer.update(tokenizer_class="ShippedTokenizer",
                     auto_map={"AutoTokenizer": ["shipped.ShippedTokenizer", None]})
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    (directory / "shipped.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(tmp_path / SENTINEL)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class ShippedConfig(LlamaConfig):\n    model_type = 'shipped'\n"
        "class ShippedModel(LlamaForCausalLM):\n    config_class = ShippedConfig\n"
        "class ShippedTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return directory


@pytest.mark.parametrize("load", [load_causal_lm, load_tokenizer], ids=["model", "tokenizer"])
def test_shipped_code_is_refused_in_one_line_that_says_how_to_allow_it(workdir, tmp_path, load):
    """Without trust_remote_code the code never runs, and the one line names the setting
    (transformers' first line only said where the code is)."""
    directory = remote_code_model(workdir, tmp_path)
    with pytest.raises(DpokitError) as error:
        load(directory)
    message = str(error.value)
    assert "\n" not in message and str(directory) in message
    assert "set trust_remote_code: true (--trust-remote-code)" in message
    assert not (tmp_path / SENTINEL).exists()


# ------------------------------------------------------------------------- the hub cache


def test_a_cached_snapshot_with_a_missing_blob_is_incomplete(workdir, tmp_path, monkeypatch):
    """An interrupted download leaves a snapshot link to no blob: one line saying the
    snapshot is incomplete, which files, and how to download it again — not "no file named
    model.safetensors" (weights) or a dtype read as float32 (``dtype: auto``)."""
    from dpokit.models import weights_dtype
    from tests.test_hub import cache_repo

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    source = tmp_path / "source"
    shutil.copytree(workdir / "llama", source)
    snapshot = cache_repo(cache, "Org/Cut", source)
    (snapshot / "model.safetensors").resolve().unlink()
    for load in (load_causal_lm, load_tokenizer, lambda name: weights_dtype(name, "auto")):
        with pytest.raises(DpokitError) as error:
            load("Org/Cut")
        message = str(error.value)
        assert "\n" not in message
        assert message.startswith("model Org/Cut: its snapshot in the Hugging Face cache")
        assert "incomplete: 1 of its files link to blobs that are not there " \
               "(model.safetensors)" in message
        assert message.endswith("download it again with `hf download Org/Cut`")


def test_a_directory_without_tokenizer_files_keeps_the_whole_reason(workdir, tmp_path):
    """transformers' message is a list after "from one of:"; its first line alone said
    nothing. The whole of it, on one line."""
    directory = tmp_path / "no-tokenizer"
    shutil.copytree(workdir / "llama", directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (directory / name).unlink(missing_ok=True)
    with pytest.raises(DpokitError) as error:
        load_tokenizer(directory)
    message = str(error.value)
    assert "\n" not in message and "from one of: (1) a `tokenizers` library" in message


# --------------------------------------------------------------------------- model card


@pytest.mark.parametrize(("settings", "shown"), [
    pytest.param({"rpo_alpha": 1.0, "label_smoothing": 0.1},
                 "`sigmoid` with label_smoothing = 0.1, rpo_alpha = 1.0 (NLL of the chosen "
                 "completion), β = 0.5", id="rpo-cdpo"),
    pytest.param({"loss_type": ["dpop"], "dpop_lambda": 5.0, "use_weighting": True,
                  "ld_alpha": 0.5},
                 "`dpop` with dpop_lambda = 5.0, ld_alpha = 0.5, use_weighting (WPO), β = 0.5",
                 id="dpop-wpo-ld"),
    pytest.param({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
                 "`sigmoid` with f_divergence_type = alpha_divergence (α = 0.3), β = 0.5",
                 id="f-divergence"),
    pytest.param({}, "loss_type `sigmoid`, β = 0.5", id="plain"),
])
def test_the_card_states_every_setting_of_the_loss(workdir, settings, shown):
    """An RPO run's card said "loss_type `sigmoid`" as a plain DPO run's: the settings that
    change the loss (an NLL term, a hyper-parameter off its default, WPO, LD-DPO, another
    f-divergence) are part of the objective it states."""
    from dpokit.train.modelcard import model_card

    card = model_card(config(workdir, "review-card", **settings), [], 3, version="9.9")
    (objective,) = [line for line in card.splitlines() if line.startswith("| Objective |")]
    assert shown in objective

