"""The training loop on tiny models: learning, accumulation, resume, reference modes, saving."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dpokit.config import load_config
from dpokit.fixtures import tiny_causal_lm
from dpokit.train.config import DPOConfig, SFTConfig
from dpokit.train.loop import train
from tests.helpers import PROMPTS, read_metrics


def config(workdir, out, cls=DPOConfig, **overrides):
    values = {"model": str(workdir / "llama"), "data": str(workdir / "prefs.jsonl"),
              "output_dir": str(workdir / out), "batch_size": 4, "learning_rate": 1e-3,
              "logging_steps": 1, "save_steps": None, "max_steps": 6, "beta": 0.5,
              "lr_scheduler": "constant", "max_length": 64}
    if cls is SFTConfig:
        values.pop("beta")
        values["data"] = str(workdir / "sft.jsonl")
    values.update(overrides)
    return load_config(cls, None, {k: v if isinstance(v, str) else json.dumps(v)
                                   for k, v in values.items()})


def weights(final_dir):
    return load_file(str(final_dir / "model.safetensors"))


def test_dpo_learns_the_preference(workdir):
    final = train(config(workdir, "learn", max_steps=10), progress=False)
    history = [m for m in read_metrics(final.parent) if "loss" in m]
    assert len(history) == 10
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["rewards/accuracies"] == 1.0
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"]
    for key in ("step", "epoch", "loss", "learning_rate", "grad_norm", "rewards/chosen",
                "logps/rejected", "pairs_per_second"):
        assert key in history[0]


def test_saved_model_reloads_in_plain_transformers(workdir, tokenizer):
    from transformers import AutoModelForCausalLM

    from dpokit.data import collate_padded, load_preference_pairs
    from dpokit.logps import sequence_logps
    from tests.helpers import reference_token_logps

    final = train(config(workdir, "reload", max_steps=2), progress=False)
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    pairs = load_preference_pairs(workdir / "prefs.jsonl", tokenizer)[:3]
    with torch.no_grad():
        ours = sequence_logps(model, collate_padded(pairs, pad_token_id=0)).chosen_logps
    expected = [float(reference_token_logps(model, p.prompt_ids, p.chosen_ids)[0].sum())
                for p in pairs]
    torch.testing.assert_close(ours.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(workdir / "llama", local_files_only=True)
    assert not torch.equal(base.lm_head.weight, model.lm_head.weight)  # it did train


def test_gradient_accumulation_equals_one_big_batch(workdir):
    """batch 8 = batch 4 × accumulation 2 = batch 2 × accumulation 4 (losses and weights)."""
    runs = {}
    for bs, acc in ((8, 1), (4, 2), (2, 4)):
        final = train(config(workdir, f"acc{bs}", batch_size=bs, gradient_accumulation_steps=acc,
                             max_steps=3), progress=False)
        runs[bs] = (read_metrics(final.parent), weights(final))
    for bs in (4, 2):
        for a, b in zip(runs[8][0], runs[bs][0], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
            assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-6)
        # Weights to 2e-5: AdamW divides by √v, so float32 summation-order noise in gradient
        # elements near zero moves an update by up to ~1% of lr (1e-3) after a few steps.
        for name, tensor in runs[8][1].items():
            torch.testing.assert_close(runs[bs][1][name], tensor, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_resume_is_exact(workdir, kind):
    """6 steps straight = 3 steps, stop, resume to 6 (metrics and final weights)."""
    model = str(workdir / kind)
    straight = train(config(workdir, f"straight-{kind}", model=model, save_steps=3),
                     progress=False)
    stopped = config(workdir, f"resumed-{kind}", model=model, save_steps=3, max_steps=3)
    train(stopped, progress=False)
    resumed = train(config(workdir, f"resumed-{kind}", model=model, save_steps=3,
                           resume="auto"), progress=False)
    a, b = read_metrics(straight.parent), read_metrics(resumed.parent)
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "rewards/margins", "grad_norm", "learning_rate"):
            assert x[key] == pytest.approx(y[key], rel=0, abs=1e-6), (x["step"], key)
    for name, tensor in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[name], tensor, rtol=0, atol=1e-6)


def test_reference_modes_give_the_same_losses(workdir):
    """Frozen copy = precomputed (cached on disk, reused) = TR-DPO before its first sync."""
    base = read_metrics(train(config(workdir, "ref-model", max_steps=2, precompute_ref_logps=False),
                         progress=False).parent)
    cache_dir = workdir / ".dpokit_cache"
    before = set(cache_dir.glob("*.safetensors")) if cache_dir.exists() else set()
    # chunk_size is part of the cache key and unused elsewhere: this table is new.
    pre = read_metrics(train(config(workdir, "ref-pre", max_steps=2, precompute_ref_logps=True,
                               chunk_size=513), progress=False).parent)
    (cache,) = set(cache_dir.glob("*.safetensors")) - before  # one new table, for these tokens
    stamp = cache.stat().st_mtime_ns
    again = read_metrics(train(config(workdir, "ref-pre2", max_steps=2, precompute_ref_logps=True,
                                 chunk_size=513), progress=False).parent)
    assert cache.stat().st_mtime_ns == stamp  # second run reused the cache
    assert set(cache_dir.glob("*.safetensors")) - before == {cache}
    tr = read_metrics(train(config(workdir, "ref-tr", max_steps=2, sync_ref_model=True,
                              ref_model_sync_steps=100), progress=False).parent)
    for other in (pre, again, tr):
        for x, y in zip(base, other, strict=True):
            assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
            assert x["rewards/chosen"] == pytest.approx(y["rewards/chosen"], abs=1e-5)


def test_lora_reference_is_the_base_model_with_adapters_disabled(workdir):
    """With LoRA the reference (adapters off) equals a separate frozen copy of the base."""
    adapters = read_metrics(train(config(workdir, "lora-a", lora=True, max_steps=2, lora_r=4,
                                    precompute_ref_logps=False), progress=False).parent)
    separate = read_metrics(train(config(workdir, "lora-b", lora=True, max_steps=2, lora_r=4,
                                    ref_model=str(workdir / "llama"),
                                    precompute_ref_logps=False), progress=False).parent)
    cached = read_metrics(train(config(workdir, "lora-c", lora=True, max_steps=2, lora_r=4),
                           progress=False).parent)  # default: adapters-off pass, cached
    for x, y, z in zip(adapters, separate, cached, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["loss"] == pytest.approx(z["loss"], abs=1e-5)
    assert (workdir / "lora-a" / "final" / "adapter_model.safetensors").is_file()


def test_tr_dpo_sync_mixes_the_reference(workdir):
    from dpokit.objectives import Reference

    policy = tiny_causal_lm("llama", vocab_size=64, seed=1)
    ref = tiny_causal_lm("llama", vocab_size=64, seed=2)
    before = ref.lm_head.weight.detach().clone()
    Reference("model", model=ref).sync(policy, 0.25)
    torch.testing.assert_close(ref.lm_head.weight,
                               0.25 * policy.lm_head.weight + 0.75 * before)


def test_reference_free_loss_loads_no_reference(workdir):
    history = read_metrics(train(config(workdir, "simpo", loss_type="simpo", max_steps=3),
                            progress=False).parent)
    assert history[-1]["loss"] < history[0]["loss"]


def test_sft_lowers_the_completion_nll(workdir):
    final = train(config(workdir, "sft", cls=SFTConfig, max_steps=24, learning_rate=3e-3),
                  progress=False)
    history = read_metrics(final.parent)
    assert history[-1]["nll_per_token"] < 0.7 * history[0]["nll_per_token"]
    assert (final / "model.safetensors").is_file()


def test_eval_data_is_evaluated(workdir):
    final = train(config(workdir, "evals", max_steps=4, eval_steps=2,
                         eval_data=str(workdir / "prefs.jsonl")), progress=False)
    evals = [m for m in read_metrics(final.parent) if "eval/loss" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]
    assert "eval/rewards/accuracies" in evals[0]


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recomputation_changes_nothing_but_memory(workdir, recompute):
    plain = read_metrics(train(config(workdir, f"{recompute}-off", max_steps=2,
                                      selective_checkpointing=False,
                                      gradient_checkpointing=False), progress=False).parent)
    checkpointed = read_metrics(train(config(
        workdir, f"{recompute}-on", max_steps=2, gradient_checkpointing=recompute == "full",
        selective_checkpointing=recompute == "selective"), progress=False).parent)
    for x, y in zip(plain, checkpointed, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)


def recompute_modes(monkeypatch):
    """The modes the trainer passes to enable_recompute, one per run."""
    import dpokit.train.setup as setup

    modes = []
    original = setup.enable_recompute
    monkeypatch.setattr(setup, "enable_recompute",
                        lambda model, mode: (modes.append(mode), original(model, mode))[1])
    return modes


@pytest.mark.parametrize(("available", "settings", "expected", "switched", "warned"), [
    (None, {}, "none", False, False),  # unknown memory: the time rule's choice
    (64 << 30, {}, "none", False, False),  # plenty
    (0, {}, "full", True, True),  # nothing fits: the leanest, with a warning
    (0, {"gradient_checkpointing": False}, "selective", True, True),  # whole layers refused
    (0, {"gradient_checkpointing": False, "selective_checkpointing": False}, "none", False, True),
    (0, {"selective_checkpointing": True, "gradient_checkpointing": False}, "selective", False,
     True),
    (0, {"gradient_checkpointing": True}, "full", False, False),  # asked for: no estimate
])
def test_automatic_recomputation_fits_the_memory(workdir, monkeypatch, caplog, available,
                                                 settings, expected, switched, warned):
    """A null gradient_checkpointing recomputes whole layers when the estimate would not fit in
    80% of the memory available (dpokit.memory, faked here); the numbers are those of the plain
    run (test_recomputation_changes_nothing_but_memory). The tiny model's time rule picks no
    recomputation."""
    import dpokit.memory

    monkeypatch.setattr(dpokit.memory, "available_bytes", lambda device, **_: available)
    modes = recompute_modes(monkeypatch)
    name = "-".join(["fit", str(available), *(f"{k}={v}" for k, v in sorted(settings.items()))])
    with caplog.at_level("INFO", logger="dpokit.train"):
        train(config(workdir, name, max_steps=1, **settings), progress=False)
    assert modes == [expected]
    assert ("may not fit in memory" in caplog.text) == warned
    assert (f"recomputation {expected} instead of none (auto, for memory" in caplog.text) \
        == switched
    from dpokit.bench import switched_mode  # the benchmark's row reads the same line

    assert switched_mode(caplog.text) == (expected if switched else None)


def memory_need(workdir, monkeypatch, name):
    """The trainer's own ``need(mode)`` estimate of the default config (a one-step run with
    unbounded memory, its ``fit_memory`` call recorded)."""
    import dpokit.memory
    import dpokit.train.setup as setup

    needs = []
    original = setup.fit_memory
    monkeypatch.setattr(setup, "fit_memory",
                        lambda preferred, allowed, need, available: (
                            needs.append(need), original(preferred, allowed, need, available))[1])
    monkeypatch.setattr(dpokit.memory, "available_bytes", lambda device, **_: 1 << 50)
    train(config(workdir, name, max_steps=1), progress=False)
    return needs[0]


def assert_same_steps(final_a, final_b, *, steps):
    """Two runs took the same steps: losses 1e-6, gradient norms 1e-5, weights within float32
    rounding (an accumulated step equals the step on the union)."""
    a, b = read_metrics(final_a.parent), read_metrics(final_b.parent)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, steps + 1))
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    for name, tensor in weights(final_a).items():
        torch.testing.assert_close(tensor, weights(final_b)[name], rtol=1e-5, atol=1e-7)


def test_micro_batch_tokens_by_hand():
    """Items of 10, 50, 20, 30 tokens; groups (spans) [0, 1] and [2, 3] make units of 60 and 50.
    Mean: batch × mean unit; largest: the batch's longest units together (unpadded) or batch ×
    the longest (padded)."""
    from dpokit.train.setup import micro_batch_tokens

    items = [10, 50, 20, 30]
    assert micro_batch_tokens(items, None, 2, padded=False) == (55.0, 80)
    assert micro_batch_tokens(items, None, 2, padded=True) == (55.0, 100)
    assert micro_batch_tokens(items, None, 9, padded=False) == (247.5, 110)  # all of them
    assert micro_batch_tokens(items, [(0, 2), (2, 4)], 1, padded=False) == (55.0, 60)
    assert micro_batch_tokens(items, [(0, 2), (2, 4)], 2, padded=True) == (110.0, 120)
    assert micro_batch_tokens(items, [(0, 1), (1, 4)], 1, padded=False) == (55.0, 100)
    assert micro_batch_tokens([], None, 4, padded=False) == (0.0, 0)
    # whole rows: each item holds its group's shared row (60 for [0, 1], 50 for [2, 3])
    rows = [60, 60, 50, 50]
    assert micro_batch_tokens(rows, [(0, 2), (2, 4)], 1, padded=False,
                              whole_rows=True) == (55.0, 60)
    assert micro_batch_tokens(rows, [(0, 2), (2, 4)], 2, padded=False,
                              whole_rows=True) == (110.0, 110)


def test_the_memory_plan_counts_a_group_as_one_row(tmp_path, workdir, monkeypatch):
    """k = 4 scored completions, all 6 pairs: the plan's largest micro-batch is the group's
    shared row (prompt once, each of the 4 completions once), not the 6 pairs' prompts and
    completions summed (6 prompts + 12 completions)."""
    import dpokit.train.setup as setup

    prompt = "why is the sky blue today"
    completions = [" because of the air", " no", " blue light scatters more", " the sea"]
    (tmp_path / "g.jsonl").write_text(json.dumps(
        {"prompt": prompt, "completions": completions, "scores": [1, 2, 3, 4]}) + "\n")
    seen = []
    original = setup.micro_batch_tokens

    def recording(per_item, spans, batch_size, **kwargs):
        result = original(per_item, spans, batch_size, **kwargs)
        seen.append(result)
        return result

    monkeypatch.setattr(setup, "micro_batch_tokens", recording)
    run = train(config(workdir, "plan-group", data=str(tmp_path / "g.jsonl"), batch_size=1,
                       max_steps=1, pairs_from_scores="all"), progress=False)
    from dpokit.models import load_tokenizer

    tokenizer = load_tokenizer(run)
    from dpokit.data import load_preference_pairs
    from dpokit.data.formats import ColumnMap

    pairs = load_preference_pairs(tmp_path / "g.jsonl", tokenizer,
                                  columns=ColumnMap(pairs_from_scores="all"))
    assert len(pairs) == 6
    distinct = {tuple(p.chosen_ids) for p in pairs} | {tuple(p.rejected_ids) for p in pairs}
    assert len(distinct) == 4
    row = len(pairs[0].prompt_ids) + sum(len(c) for c in distinct)
    summed = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert seen[0] == (float(row), row) and row < summed / 2


def test_fitting_recomputation_between_the_modes(workdir, monkeypatch, caplog):
    """Memory for selective recomputation but not for none: selective, said in the log. The
    estimates come from a first run (the trainer's own need(mode)); the second is given the
    midpoint of none's and selective's."""
    import dpokit.memory

    need = memory_need(workdir, monkeypatch, "fit-probe")
    assert need("none") > need("selective") > need("full") > 0
    between = (need("none") + need("selective")) / 2 / 0.8
    monkeypatch.setattr(dpokit.memory, "available_bytes", lambda device, **_: between)
    modes = recompute_modes(monkeypatch)
    with caplog.at_level("INFO", logger="dpokit.train"):
        train(config(workdir, "fit-between", max_steps=1), progress=False)
    assert modes == ["selective"]
    assert "recomputation selective instead of none" in caplog.text
    assert "may not fit" not in caplog.text


def test_micro_batches_are_halved_up_front_when_nothing_else_fits(workdir, monkeypatch,
                                                                   caplog):
    """With no memory to spare even whole-layer recomputation does not fit: the micro-batch is
    halved before the first step (4 → 2 → 1 pairs, said once) and the run trains exactly as
    batch_size 1 × 4 accumulation steps does (losses 1e-6, weights float32 rounding); the
    decision needs no out-of-memory error, so it holds under torchrun too (every rank decides
    from the all-reduced minimum). With dropout on (its masks depend on the micro-batch) it only
    warns, as on-policy data does (Objective.splittable, tested with the loop's halving)."""
    import dpokit.memory
    from dpokit.objectives.dpo import DPOObjective

    monkeypatch.setattr(dpokit.memory, "available_bytes", lambda device, **_: 0)
    modes = recompute_modes(monkeypatch)
    sizes, forward = [], DPOObjective.forward
    monkeypatch.setattr(DPOObjective, "forward", lambda self, policy, batch: (
        sizes.append(batch.num_pairs), forward(self, policy, batch))[1])
    with caplog.at_level("INFO", logger="dpokit.train"):
        halved = train(config(workdir, "plan-halved", batch_size=4, max_steps=3), progress=False)
    assert modes == ["full"]
    assert sizes == [1] * 12  # 3 steps of 4 forwards of one pair
    assert caplog.text.count("micro-batches of 1 pairs instead of batch_size 4 (auto, for "
                             "memory") == 1
    assert "may not fit in memory (recomputation full, micro-batches of 1:" in caplog.text
    monkeypatch.undo()
    plain = train(config(workdir, "plan-accumulated", batch_size=1,
                         gradient_accumulation_steps=4, max_steps=3,
                         gradient_checkpointing=True), progress=False)
    assert_same_steps(halved, plain, steps=3)

    monkeypatch.setattr(dpokit.memory, "available_bytes", lambda device, **_: 0)
    caplog.clear()
    with caplog.at_level("INFO", logger="dpokit.train"):
        train(config(workdir, "plan-dropout", batch_size=4, max_steps=1,
                     disable_dropout=False), progress=False)
    assert "micro-batches of" not in caplog.text
    assert "may not fit in memory (recomputation full:" in caplog.text


def test_micro_batches_stay_whole_when_the_memory_is_there(workdir, monkeypatch, caplog):
    """Memory for whole layers at batch 4 but not for none: recomputation switches, the
    micro-batch stays 4 (the trainer's own estimate, as in the test above)."""
    import dpokit.memory

    need = memory_need(workdir, monkeypatch, "plan-probe")
    just = (need("full") + need("selective")) / 2 / 0.8  # whole layers fit, selective not
    monkeypatch.setattr(dpokit.memory, "available_bytes", lambda device, **_: just)
    with caplog.at_level("INFO", logger="dpokit.train"):
        run = train(config(workdir, "plan-whole", max_steps=1), progress=False)
    assert "recomputation full instead of none" in caplog.text
    assert "micro-batches of" not in caplog.text and "may not fit" not in caplog.text
    assert read_metrics(run.parent)[0]["step"] == 1


def test_save_total_limit_keeps_the_newest_checkpoints(workdir):
    run_dir = train(config(workdir, "limit", max_steps=5, save_steps=1, save_total_limit=2),
                    progress=False).parent
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-4",
                                                                     "checkpoint-5"]
    assert not list(run_dir.glob(".checkpoint-*"))


def test_bfloat16_autocast_trains_close_to_float32(workdir):
    fp32 = read_metrics(train(config(workdir, "fp32", max_steps=3), progress=False).parent)
    bf16 = read_metrics(train(config(workdir, "bf16", max_steps=3, bf16=True),
                         progress=False).parent)
    assert all(math.isfinite(m["loss"]) for m in bf16)
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], abs=0.05)
    assert bf16[-1]["loss"] < bf16[0]["loss"]


def test_lora_merge_writes_a_plain_model(workdir):
    from transformers import AutoModelForCausalLM

    final = train(config(workdir, "lora-merge", lora=True, lora_r=4, max_steps=2,
                         merge_lora=True), progress=False)
    merged = AutoModelForCausalLM.from_pretrained(final / "merged", local_files_only=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_sft_on_conversations_and_tensorboard_events(workdir):
    rows = [{"messages": [{"role": "user", "content": p},
                          {"role": "assistant", "content": "yes good answer"}]} for p in PROMPTS]
    data = workdir / "sft_chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    final = train(config(workdir, "sft-chat", cls=SFTConfig, data=str(data), max_steps=12,
                         learning_rate=3e-3), progress=False)
    history = read_metrics(final.parent)
    assert history[-1]["nll_per_token"] < history[0]["nll_per_token"]
    pytest.importorskip("tensorboard")
    assert list((final.parent / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("layout", [{"shared_prompt": True}, {"padding_free": True}])
def test_layouts_train_identically(workdir, layout):
    name = next(iter(layout))
    padded = read_metrics(train(config(workdir, f"layout-padded-{name}", max_steps=2,
                                       shared_prompt=False),
                           progress=False).parent)
    other = read_metrics(train(config(workdir, f"layout-{name}", max_steps=2,
                                 **layout), progress=False).parent)
    for x, y in zip(padded, other, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_eval_pairs_get_their_own_reference_logps(workdir):
    """A separate eval file: the cached reference (default) and a live one agree."""
    rows = [{"prompt": "why is the sun red?", "chosen": " because of the sea",
             "rejected": " no moon"}, {"prompt": "a bird", "chosen": " flew over the tree",
                                       "rejected": " sat"}]
    eval_file = workdir / "eval_other.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = [read_metrics(train(config(workdir, f"eval-ref-{flag}", max_steps=1,
                                 eval_data=str(eval_file), precompute_ref_logps=flag),
                          progress=False).parent) for flag in (True, False)]
    cached, live = (next(m for m in run if "eval/loss" in m) for run in runs)
    assert cached["eval/loss"] == pytest.approx(live["eval/loss"], abs=1e-5)
    assert cached["eval/rewards/chosen"] == pytest.approx(live["eval/rewards/chosen"], abs=1e-5)


def test_lora_reference_runs_without_dropout(workdir):
    """GPT-2 has dropout: the adapters-off reference must be computed in eval mode, so the
    cached and the live reference agree."""
    runs = [read_metrics(train(config(workdir, f"lora-drop-{flag}", model=str(workdir / "gpt2"),
                                 lora=True, lora_r=4, max_steps=1, precompute_ref_logps=flag,
                                 lora_target_modules=["c_attn"]), progress=False).parent)
            for flag in (True, False)]
    assert runs[0][0]["rewards/chosen"] == pytest.approx(runs[1][0]["rewards/chosen"], abs=1e-5)


def test_a_fresh_run_refuses_a_directory_with_checkpoints(workdir):
    from dpokit.errors import DpokitError

    train(config(workdir, "taken", max_steps=2, save_steps=2), progress=False)
    with pytest.raises(DpokitError, match=r"holds an earlier run .*resume it with --resume auto"):
        train(config(workdir, "taken", max_steps=2, save_steps=2), progress=False)


def test_resume_between_logging_steps_logs_the_same_numbers(workdir):
    """A crash after the step-3 checkpoint but before the step-4 log is saved: the resumed run
    still logs at step 4 the mean over steps 3 and 4, as the uninterrupted run does."""
    from dpokit.train.loop import Probe

    def crash(model, step):
        if step == 4:
            raise RuntimeError("simulated crash")
        return {}

    straight = train(config(workdir, "win-a", save_steps=3, logging_steps=2), progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(workdir, "win-b", save_steps=3, logging_steps=2), progress=False,
              probe=Probe(1, crash))
    resumed = train(config(workdir, "win-b", save_steps=3, logging_steps=2, resume="auto"),
                    progress=False)
    a = read_metrics(straight.parent)
    b = [m for m in read_metrics(resumed.parent) if "loss" in m]  # no probe lines
    assert [m["step"] for m in a] == [m["step"] for m in b] == [2, 4, 6]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)


def test_selective_recomputation_decides_itself_from_the_activation_size(workdir, caplog):
    """The test model frees far below 64 MiB per micro-batch: auto leaves it off; an explicit
    setting wins."""
    import logging

    with caplog.at_level(logging.INFO, logger="dpokit.train"):
        train(config(workdir, "auto-recompute", max_steps=1), progress=False)
    assert any("selective recomputation off (auto" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dpokit.train"):
        train(config(workdir, "forced-recompute", max_steps=1, selective_checkpointing=True),
              progress=False)
    assert not any("(auto" in r.getMessage() for r in caplog.records)


def test_eval_generate_writes_samples_and_a_resume_redraws_them(workdir):
    """eval_generate: at each evaluation the first N eval prompts are completed by the policy
    into samples.jsonl (step, prompt, completion, eos, tokens); a resumed run truncates the file
    at its checkpoint (a stale line past it is dropped) and writes the same samples an
    uninterrupted run does (generation is seeded by the step)."""
    common = {"eval_data": str(workdir / "prefs.jsonl"), "eval_steps": 2, "eval_generate": 3,
              "max_new_tokens": 4, "temperature": 0.8, "max_steps": 4}
    straight = train(config(workdir, "gen-straight", **common), progress=False)
    samples = [json.loads(line) for line in
               (straight.parent / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 2, 4, 4, 4]
    assert all(1 <= s["tokens"] <= 4 and isinstance(s["completion"], str) for s in samples)
    assert samples[0]["prompt"] in PROMPTS
    first = train(config(workdir, "gen-resumed", **{**common, "max_steps": 2}, save_steps=2),
                    progress=False)  # stops at step 2 with a checkpoint; resumed below to step 4
    assert first.name == "final"
    with (first.parent / "samples.jsonl").open("a") as handle:
        handle.write('{"step": 4, "prompt": "stale"}\n')
    resumed = train(config(workdir, "gen-resumed", **common, save_steps=2, resume="auto"),
                    progress=False)
    again = [json.loads(line) for line in
             (resumed.parent / "samples.jsonl").read_text().splitlines()]
    assert again == samples


def test_changing_eval_data_does_not_redo_the_training_rows_reference(workdir, tmp_path):
    """The training and the evaluation rows' reference tables are two cache entries: a run with
    other eval_data computes only its evaluation entry (the training one is read, unchanged),
    and both runs' training losses are equal."""
    cache_dir = tmp_path / ".dpokit_cache"  # beside the run directories
    rows = (workdir / "prefs.jsonl").read_text().splitlines(keepends=True)
    evals = []
    for i in range(2):
        evals.append(tmp_path / f"eval{i}.jsonl")
        evals[-1].write_text("".join(rows[i * 4:i * 4 + 4]))
    common = {"max_steps": 2, "chunk_size": 517, "seed": 5}  # a key of its own

    def tables():
        return {p: p.stat().st_mtime_ns for p in cache_dir.glob("*.safetensors")}

    before = {}
    a = read_metrics(train(config(workdir, "unused", output_dir=str(tmp_path / "a"),
                                  eval_data=str(evals[0]), **common), progress=False).parent)
    first = {p: t for p, t in tables().items() if p not in before}
    assert len(first) == 2  # training + evaluation
    b = read_metrics(train(config(workdir, "unused", output_dir=str(tmp_path / "b"),
                                  eval_data=str(evals[1]), **common), progress=False).parent)
    second = {p: t for p, t in tables().items() if p not in before}
    assert len(second) == 3 and all(second[p] == t for p, t in first.items())  # one new
    train_a = [m["loss"] for m in a if "loss" in m]
    assert train_a == [m["loss"] for m in b if "loss" in m]
    assert [m["eval/loss"] for m in a if "eval/loss" in m] != [
        m["eval/loss"] for m in b if "eval/loss" in m]
