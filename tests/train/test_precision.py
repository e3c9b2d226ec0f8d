"""The load dtype and mixed precision are two keys (issue 13), as in transformers/TRL: ``dtype``
is what the weights are loaded (and a full fine-tune trained) in, ``bf16``/``fp16`` the autocast
around them. Checked on what a run actually holds: the dtype of every model it loads, of the
parameters it trains, of the weights it saves."""

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open

from dpokit.errors import DpokitError
from dpokit.models import weights_dtype
from dpokit.train.config import DPOConfig
from dpokit.train.fingerprint import check_same_run
from dpokit.train.loop import Probe, train
from tests.helpers import read_metrics, run_cli
from tests.train.test_trainer import config


@pytest.fixture
def loads(monkeypatch):
    """Every model the run loads, as ``(what, dtype of its parameters)``."""
    import dpokit.train.setup as setup

    seen = []
    original = setup.load_causal_lm

    def recording(path, **kwargs):
        model = original(path, **kwargs)
        seen.append((kwargs.get("what", "model"), next(model.parameters()).dtype))
        return model

    monkeypatch.setattr(setup, "load_causal_lm", recording)
    return seen


def trained_dtypes(run_dtypes):
    """A probe recording ``{trainable?: {dtypes}}`` of the model it is given."""
    def probe(model, step):
        for param in model.parameters():
            run_dtypes.setdefault(param.requires_grad, set()).add(param.dtype)
        return {}
    return Probe(every=1, fn=probe)


def saved_dtypes(directory, name):
    with safe_open(str(directory / name), "pt") as handle:
        return {handle.get_slice(key).get_dtype() for key in handle.keys()}  # noqa: SIM118 (not a dict)


def test_bfloat16_weights_full_fine_tune(workdir, loads, caplog):
    """dtype bfloat16: the reference and the policy load in bfloat16 and the policy trains in
    it (TRL's meaning, said once); its checkpoints hold bfloat16 weights; the loss stays within
    0.05 of the float32 run's at step 1 and falls."""
    fp32 = read_metrics(train(config(workdir, "p-fp32", max_steps=3), progress=False).parent)
    loads.clear()
    dtypes = {}
    final = train(config(workdir, "p-bf16w", max_steps=3, dtype="bfloat16", save_steps=3),
                  progress=False, probe=trained_dtypes(dtypes))
    # one load in bfloat16: the reference pass's model is the policy's start
    assert loads == [("reference model", torch.bfloat16)]
    assert dtypes == {True: {torch.bfloat16}}
    assert saved_dtypes(final.parent / "checkpoint-3", "trainable.safetensors") == {"BF16"}
    assert "weights train in bfloat16" in caplog.text
    bf16 = [m for m in read_metrics(final.parent) if "loss" in m]  # (not the probe's)
    assert all(math.isfinite(m["loss"]) for m in bf16)
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], abs=0.05)
    assert bf16[-1]["loss"] < bf16[0]["loss"]


def test_mixed_precision_keeps_float32_weights(workdir, loads):
    """bf16: true alone is autocast: every model loads in float32 and trains in float32."""
    dtypes = {}
    train(config(workdir, "p-amp", max_steps=1, bf16=True), progress=False,
          probe=trained_dtypes(dtypes))
    assert loads == [("reference model", torch.float32)]  # the policy starts from it
    assert dtypes == {True: {torch.float32}}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_lora_base_in_half_precision_adapters_in_float32(workdir, loads, dtype):
    """LoRA on a bfloat16/float16 base: the base (which is also the reference: adapters off)
    is loaded once in that dtype, frozen; the adapters train in float32 (peft upcasts them) and
    are saved in float32; the step-1 loss is log 2 (policy = reference) and training moves it."""
    dtypes = {}
    final = train(config(workdir, f"p-lora-{dtype}", max_steps=2, lora=True, lora_r=4,
                         dtype=dtype), progress=False, probe=trained_dtypes(dtypes))
    assert loads == [("model", getattr(torch, dtype))]
    assert dtypes == {False: {getattr(torch, dtype)}, True: {torch.float32}}
    assert saved_dtypes(final, "adapter_model.safetensors") == {"F32"}
    metrics = [m for m in read_metrics(final.parent) if "loss" in m]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert metrics[-1]["loss"] != metrics[0]["loss"]


def test_float16_full_fine_tune_is_refused_before_loading(workdir, capsys, monkeypatch):
    import dpokit.train.setup as setup

    def never(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(setup, "load_causal_lm", never)
    code, _, err = run_cli(capsys, "train", "--model", str(workdir / "llama"), "--data",
                           str(workdir / "prefs.jsonl"), "--dtype", "float16",
                           "--output-dir", str(workdir / "p-fp16"))
    lines = [x for x in err.splitlines() if "dpokit: error" in x]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "float16" in lines[0] and "bf16" not in lines[0].split("use")[0]
    assert "dtype: bfloat16" in lines[0] and "lora: true" in lines[0]
    assert not (workdir / "p-fp16").exists()


def test_bf16_and_fp16_together_are_refused(workdir):
    with pytest.raises(DpokitError, match="bf16 and fp16 are both set"):
        config(workdir, "p-both", bf16=True, fp16=True)


def test_auto_reads_the_dtype_config_json_names(workdir, tmp_path, loads):
    """auto: the dtype the model's config.json names (transformers 5 ``dtype`` or the older
    ``torch_dtype``), float32 when it names none; a run with auto loads in it."""
    model = tmp_path / "bf16-model"
    shutil.copytree(workdir / "llama", model)
    settings = json.loads((model / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        settings.pop(key, None)
    (model / "config.json").write_text(json.dumps(settings))
    assert weights_dtype(model, "auto") == "float32"
    assert weights_dtype(model, "float16") == "float16"
    for key in ("torch_dtype", "dtype"):
        (model / "config.json").write_text(json.dumps({**settings, key: "bfloat16"}))
        assert weights_dtype(model, "auto") == "bfloat16"
    train(config(workdir, "p-auto", model=str(model), max_steps=1, dtype="auto", lora=True,
                 lora_r=4), progress=False)
    assert loads == [("model", torch.bfloat16)]


def test_eval_and_generate_load_in_dtype(workdir, tmp_path, monkeypatch):
    import dpokit.models as models

    seen = []
    original = models._from_pretrained

    def recording(*args, **kwargs):
        model = original(*args, **kwargs)
        seen.append(next(model.parameters()).dtype)
        return model

    monkeypatch.setattr(models, "_from_pretrained", recording)
    from dpokit.evaluate import EvalConfig, GenerateConfig, run_eval, run_generate

    result = run_eval(EvalConfig(model=str(workdir / "llama"), ref_model=str(workdir / "llama"),
                                 data=str(workdir / "prefs.jsonl"), dtype="bfloat16",
                                 max_length=64), progress=False)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert math.isfinite(result.metrics["loss"])
    run_generate(GenerateConfig(model=str(workdir / "llama"), data=str(workdir / "prefs.jsonl"),
                                output=str(tmp_path / "s.jsonl"), dtype="bfloat16",
                                max_new_tokens=2), progress=False)
    assert seen[-1] == torch.bfloat16


def test_a_checkpoint_from_before_the_split_resumes_with_its_meaning(tmp_path):
    """A checkpoint written when ``dtype: bfloat16`` meant autocast (no bf16 key recorded)
    resumes with dtype float32 + bf16: true, and is refused with bfloat16 weights."""
    old = {"dtype": "bfloat16", "beta": 0.1}
    same = {"dtype": "float32", "bf16": True, "fp16": False, "beta": 0.1}
    check_same_run(tmp_path, old, same)
    with pytest.raises(DpokitError, match=r"bf16 true → false; dtype float32 → bfloat16"):
        check_same_run(tmp_path, old, {**same, "dtype": "bfloat16", "bf16": False})


def test_a_trl_file_loads_in_its_dtype(workdir, tmp_path, loads):
    """TRL's ``dtype: bfloat16`` with use_peft: the base loads in bfloat16 and, by TRL's
    default, the forward runs under bf16 autocast."""
    import yaml

    from dpokit.config import load_config

    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(workdir / "llama"), "dataset_name": str(workdir / "prefs.jsonl"),
        "dtype": "bfloat16", "use_peft": True, "lora_r": 4, "max_steps": 1,
        "per_device_train_batch_size": 4, "max_length": 64, "save_strategy": "no",
        "output_dir": str(tmp_path / "out")}))
    loaded = load_config(DPOConfig, path)
    assert (loaded.dtype, loaded.bf16, loaded.fp16) == ("bfloat16", True, False)
    train(loaded, progress=False)
    assert loads == [("model", torch.bfloat16)]


def test_lora_keys_without_lora_are_refused_natively_and_dropped_from_trl(workdir, tmp_path):
    """Native: ``lora_r`` without ``lora: true`` would silently train every weight — refused,
    naming the key. A TRL file: TRL reads lora_* only with use_peft, so they are dropped with a
    note (a full fine-tune, as TRL runs it)."""
    import yaml

    from dpokit.config import load_config
    from dpokit.trl_config import translate

    with pytest.raises(DpokitError, match=r"lora_r, lora_alpha set but lora is false"):
        config(workdir, "p-lora-keys", lora_r=8, lora_alpha=16)
    assert config(workdir, "p-lora-on", lora=True, lora_r=8).lora_r == 8
    result = translate({"model_name_or_path": "m", "use_peft": False, "lora_r": 8})
    assert not any(key.startswith("lora_") for key in result.values)
    assert ("lora_r", "no effect without use_peft (as in TRL)") in result.notes
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": str(workdir / "llama"),
                                    "dataset_name": "d", "lora_r": 8}))
    loaded = load_config(DPOConfig, path)
    assert not loaded.lora and loaded.lora_r == 16 and loaded.lora_dropout == 0.0
    path.write_text(yaml.safe_dump({"model_name_or_path": str(workdir / "llama"),
                                    "dataset_name": "d", "lora_r": 8, "use_peft": True}))
    loaded = load_config(DPOConfig, path)
    assert loaded.lora and loaded.lora_r == 8 and loaded.lora_dropout == 0.05  # TRL's default


def test_a_trl_file_with_the_native_lora_key_keeps_its_lora_settings():
    from dpokit.trl_config import translate

    out = translate({"model_name_or_path": "m", "lora": True, "lora_r": 64}).values
    assert out["lora"] is True and out["lora_r"] == 64
