"""A PEFT adapter directory as ``model`` (an SFT LoRA run's ``final/``): the adapter trains on,
and the reference is the base with that adapter merged, frozen — π_ref is the SFT'd model, not
the base (which the LoRA "adapters off" reference would give)."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dpokit.errors import DpokitError
from dpokit.train.config import SFTConfig
from dpokit.train.loop import Probe, train
from tests.helpers import read_metrics, reference_token_logps
from tests.train.test_trainer import config


def load_base(workdir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(workdir / "llama", local_files_only=True).eval()


def merged_sft(workdir, adapter):
    """The oracle: base + adapter merged by peft itself, without dpokit."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(workdir), adapter).merge_and_unload().eval()


@pytest.fixture(scope="module")
def sft_final(workdir):
    """The ``final/`` of an SFT LoRA run (r 4, all-linear), trained enough to move the model."""
    return train(config(workdir, "adapter-sft", cls=SFTConfig, lora=True, lora_r=4,
                        max_steps=4, learning_rate=1e-2), progress=False)


@pytest.fixture(scope="module")
def dpo_final(workdir, sft_final):
    """DPO from the SFT adapter; a probe logs how far the base weights moved after each step."""
    base = load_base(workdir).state_dict()

    def base_change(model, step):
        moved = max(float((param - base[name.replace(".base_layer", "")]).abs().max())
                    for name, param in model.named_parameters() if "lora_" not in name)
        return {"base_change": moved}

    return train(config(workdir, "adapter-dpo", model=str(sft_final), max_steps=2),
                 progress=False, probe=Probe(every=1, fn=base_change))


@pytest.fixture(scope="module")
def adapter_run(workdir, sft_final):
    """A DPO run from the SFT adapter, set up (reference table computed) but not trained."""
    from dpokit.runtime import setup_runtime, shutdown_runtime
    from dpokit.train.setup import setup_run

    runtime = setup_runtime("cpu", "float32")
    try:
        yield setup_run(config(workdir, "adapter-setup", model=str(sft_final), max_steps=None),
                        runtime, progress=False)
    finally:
        shutdown_runtime(runtime)


def test_the_reference_is_the_base_with_the_sft_adapter(workdir, sft_final, adapter_run,
                                                        dpo_final):
    """The precomputed table holds log π_SFT (base + adapter merged, computed by peft and a
    float64 brute-force forward; 1e-4 covers float32 sums of ~10 tokens), far from the base's;
    and with policy = reference at step 1 the sigmoid loss is −log σ(0) = log 2 (to 1e-5)."""
    reference = adapter_run.objective.reference
    assert reference.mode == "precomputed"
    merged, base = merged_sft(workdir, sft_final), load_base(workdir)
    distance_to_base = 0.0
    for i, pair in enumerate(adapter_run.train_items[:6]):
        for column, ids in ((0, pair.chosen_ids), (1, pair.rejected_ids)):
            expected = float(reference_token_logps(merged, pair.prompt_ids, ids)[0].sum())
            assert float(reference.table[i, column]) == pytest.approx(expected, abs=1e-4)
            of_base = float(reference_token_logps(base, pair.prompt_ids, ids)[0].sum())
            distance_to_base = max(distance_to_base, abs(expected - of_base))
    assert distance_to_base > 0.05  # the SFT adapter moved the model: base ≠ reference

    first = next(m for m in read_metrics(dpo_final.parent) if "loss" in m)
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)


def test_only_the_adapter_trains(workdir, sft_final, adapter_run, dpo_final):
    """The policy is the SFT adapter (same tensors, same r and targets) and only its
    parameters are optimised; after training the base weights are bit-identical and the adapter
    moved."""
    model = adapter_run.model
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if "lora_" in name}
    optimised = sum(len(group["params"]) for group in adapter_run.optimizer.param_groups)
    assert optimised == len(trainable)
    assert adapter_run.config.lora and adapter_run.config.lora_r == 4

    changes = [m["probe/base_change"] for m in read_metrics(dpo_final.parent)
               if "probe/base_change" in m]
    assert changes and all(change == 0.0 for change in changes)
    before = load_file(str(sft_final / "adapter_model.safetensors"))
    after = load_file(str(dpo_final / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[key], after[key]) for key in before)


def test_the_dpo_final_is_an_adapter_on_the_base(workdir, sft_final, dpo_final):
    """``final/`` holds an adapter (no full weights) whose base is the base model — not the
    SFT adapter — and which peft loads onto it; the resolved config records the LoRA it is."""
    from peft import PeftModel

    assert not (dpo_final / "model.safetensors").exists()
    adapter = json.loads((dpo_final / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(workdir / "llama")
    assert adapter["r"] == 4
    policy = PeftModel.from_pretrained(load_base(workdir), dpo_final).eval()
    ids = torch.tensor([adapter_ids(workdir)])
    with torch.no_grad():
        dpo_logits = policy(input_ids=ids).logits
        sft_logits = merged_sft(workdir, sft_final)(input_ids=ids).logits
    assert not torch.allclose(dpo_logits, sft_logits, atol=1e-4)  # DPO trained it further
    recorded = (dpo_final.parent / "config.yaml").read_text()
    assert "lora: true" in recorded and "lora_r: 4" in recorded


def adapter_ids(workdir):
    """Token ids of one SFT row (prompt and completion)."""
    from dpokit.models import load_tokenizer

    row = json.loads((workdir / "sft.jsonl").read_text().splitlines()[0])
    return load_tokenizer(workdir / "llama")(row["prompt"] + row["completion"])["input_ids"]


def test_load_causal_lm_merges_the_adapter(workdir, sft_final, tmp_path):
    """``load_causal_lm(adapter)`` (what eval and generate call) is peft's merged model (logits
    to 1e-5); an adapter saved without a tokenizer uses its base's; positions come from the
    base's config.json."""
    from dpokit.models import load_causal_lm, load_tokenizer, position_limit

    ids = torch.tensor([adapter_ids(workdir)])
    ours = load_causal_lm(sft_final)
    assert not any("lora_" in name for name, _ in ours.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits,
                                   merged_sft(workdir, sft_final)(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(sft_final / name, bare / name)
    assert load_tokenizer(bare).get_vocab() == load_tokenizer(workdir / "llama").get_vocab()
    assert position_limit(bare) == position_limit(workdir / "llama")


def test_a_missing_base_is_one_line_naming_it(workdir, sft_final, tmp_path):
    adapter = tmp_path / "moved"
    shutil.copytree(sft_final, adapter)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    with pytest.raises(DpokitError) as error:
        train(config(workdir, "adapter-missing", model=str(adapter)), progress=False)
    message = str(error.value)
    assert "\n" not in message
    assert str(adapter) in message and str(tmp_path / "gone") in message
    assert "base_model_name_or_path" in message


def test_lora_settings_other_than_the_adapters_are_refused(workdir, sft_final):
    """An adapter as model continues it: lora is implied and its r/alpha/targets are taken;
    asking for another rank is a one-line error (the same rank is accepted)."""
    implied = config(workdir, "adapter-cfg", model=str(sft_final))
    assert implied.lora and implied.lora_r == 4 and implied.lora_alpha == 32.0
    assert len(implied.lora_target_modules) == 14  # all-linear of 2 Llama layers, expanded
    assert config(workdir, "adapter-cfg", model=str(sft_final), lora_r=4).lora_r == 4
    with pytest.raises(DpokitError, match=r"LoRA adapter.*lora_r 4.*drop lora_r 8"):
        config(workdir, "adapter-cfg", model=str(sft_final), lora_r=8)
    with pytest.raises(DpokitError, match="sync_ref_model is not supported"):
        config(workdir, "adapter-cfg", model=str(sft_final), sync_ref_model=True,
               precompute_ref_logps=False)


def test_a_non_finite_adapter_is_refused(workdir, sft_final, tmp_path):
    from safetensors.torch import save_file

    from dpokit.models import load_causal_lm

    adapter = tmp_path / "nan"
    shutil.copytree(sft_final, adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(DpokitError, match=r"adapter weight .* holds NaN or inf"):
        load_causal_lm(adapter)


def test_the_model_card_names_the_real_base_and_reference(workdir, sft_final, dpo_final):
    """An adapter run's card: the base the adapter names (front matter and table), where it
    started, and a reference of base + that adapter — not "adapters off"."""
    card = (dpo_final / "README.md").read_text()
    assert f"| Base model | `{workdir / 'llama'}` (started from the adapter" in card
    assert "base_model:" not in card  # a local base is no Hub id for the front matter
    assert f"(started from the adapter `{sft_final}`)" in card
    assert "base + that adapter, frozen" in card and "adapters off" not in card


def test_the_fingerprint_covers_the_adapters_base(workdir, sft_final, tmp_path):
    """The adapter unchanged, its base's weights replaced at the same path: another run (the
    adapter's identity digests its base)."""
    from dpokit.fixtures import tiny_causal_lm
    from dpokit.train.fingerprint import directory_identity

    base = tmp_path / "base"
    shutil.copytree(workdir / "llama", base)
    adapter = tmp_path / "adapter"
    shutil.copytree(sft_final, adapter)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    before = directory_identity(adapter)
    tiny_causal_lm("llama", vocab_size=512, seed=99).save_pretrained(base)
    assert directory_identity(adapter) != before


def test_an_adapter_trained_on_a_relative_path_names_its_base_absolutely(workdir, tmp_path,
                                                                         monkeypatch):
    """`dpokit sft --model llama --lora` run from the model's parent: the adapter records the
    base's absolute path, so it works as --model from any directory."""
    from dpokit.models import adapter_base

    monkeypatch.chdir(workdir)
    final = train(config(workdir, str(tmp_path / "rel"), cls=SFTConfig, lora=True, lora_r=4,
                         max_steps=1, model="llama"), progress=False)
    recorded = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((workdir / "llama").resolve())
    monkeypatch.chdir(tmp_path)
    assert adapter_base(final) == (workdir / "llama").resolve()
