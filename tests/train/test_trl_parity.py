"""What a user comparing with TRL 1.16's DPOTrainer sees: no dropout by default
(``disable_dropout``), and TRL's ``logits/chosen``, ``logits/rejected``, ``entropy``,
``mean_token_accuracy`` and ``num_tokens`` beside the ``rewards/*`` and ``logps/*`` metrics.

Oracles are independent of dpokit's batching and chunked head: float64 copies of the models run
one unpadded sequence at a time with full logits (``tests.helpers.reference_token_logps`` and
:func:`token_stat_sums` here), on the first global batch ``epoch_batches(48, 4, seed=42,
epoch=0)[0]``. Step-1 metrics are computed before the first update, so they are the initial
model's. Tolerance 1e-5 (float32 training against float64).
"""

import copy
import dataclasses
import json
import logging
import math

import pytest
import torch
from torch import nn

from dpokit.data import epoch_batches
from dpokit.fixtures import tiny_causal_lm, tiny_config
from dpokit.logps import completion_logps
from dpokit.train.config import SFTConfig
from dpokit.train.loop import train
from tests.helpers import LAYOUTS, read_metrics, reference_token_logps, tokenized_pairs
from tests.train.test_trainer import config

BETA = 0.5


def token_stat_sums(model, prompt_ids, completion_ids) -> list[float]:
    """Over the completion tokens, float64, one unpadded sequence, the model's own full logits:
    Σ (1/V) Σ_v z_v (TRL's ``mean_logits``), Σ of the entropy −Σ_v p_v log p_v, and the count of
    tokens that are the argmax (TRL's ``is_top1``)."""
    model64 = copy.deepcopy(model).double()
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model64(input_ids=ids).logits[0, :-1]  # (L-1, V): position t predicts t+1
    logits, targets = logits[len(prompt_ids) - 1:], ids[0, len(prompt_ids):]
    log_p = logits.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return [float(logits.mean(-1).sum()), float(entropy.sum()),
            float((logits.argmax(-1) == targets).sum())]


def sequence_logp(model, prompt_ids, completion_ids) -> float:
    return float(reference_token_logps(model, prompt_ids, completion_ids)[0].sum())


def _with_dropout(kind, tokenizer, root, p=0.5, seed=3):
    """A tiny ``kind`` model whose every dropout probability is ``p``, saved under ``root``."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(kind, vocab_size=len(tokenizer))
    names = (("resid_pdrop", "embd_pdrop", "attn_pdrop") if kind == "gpt2"
             else ("attention_dropout",))
    for name in names:
        setattr(cfg, name, p)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg).eval()
    path = root / f"{kind}-dropout"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def dropout_models(tmp_path_factory, tokenizer):
    """GPT-2 with nn.Dropout(0.5) everywhere; Llama with a float attention_dropout of 0.5."""
    root = tmp_path_factory.mktemp("dropout")
    return {kind: _with_dropout(kind, tokenizer, root) for kind in ("gpt2", "llama")}


def _first_batch(cfg, tokenizer):
    """The items of the first global batch of a run of ``cfg`` (one process, seed 42)."""
    items = cfg.objective(tokenizer).load(cfg.data, None, progress=False)
    return [items[i] for i in epoch_batches(len(items), cfg.batch_size, seed=42, epoch=0)[0]]


def _step_1(cfg) -> dict:
    return read_metrics(train(cfg, progress=False).parent)[0]


def test_token_stats_match_a_float64_oracle_in_every_layout(tokenizer):
    """``completion_logps(token_stats=True)``: per sequence, the sums over its completion tokens
    of the vocabulary-mean logit and of the next-token entropy, and its argmax hits, in all
    four layouts, chunked (sizes 3 and 1024) and through the model's own forward; against
    :func:`token_stat_sums` to 1e-5 (the hits exactly)."""
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1)
    rows = [{"prompt": "the cat", "chosen": " sat on the mat", "rejected": " no"},
            {"prompt": "why is the sun red?", "chosen": " dust", "rejected": " the sea is red"},
            {"prompt": "a bird", "chosen": " flew", "rejected": " sat on a tree today"}]
    pairs = tokenized_pairs(rows, tokenizer)
    with torch.no_grad():  # a greedy continuation: every one of its tokens is an argmax hit
        greedy = model.generate(torch.tensor([pairs[0].prompt_ids]), max_new_tokens=3,
                                do_sample=False)[0, len(pairs[0].prompt_ids):].tolist()
    pairs[0] = dataclasses.replace(pairs[0], chosen_ids=greedy + pairs[0].chosen_ids)
    expected = torch.tensor(
        [token_stat_sums(model, p.prompt_ids, p.chosen_ids) for p in pairs]
        + [token_stat_sums(model, p.prompt_ids, p.rejected_ids) for p in pairs],
        dtype=torch.float64)
    assert 0 < expected[:, 2].sum() < sum(len(p.chosen_ids) + len(p.rejected_ids)
                                          for p in pairs)  # some hits, some misses
    for layout, collate in LAYOUTS.items():
        for chunk_size, fused in ((3, True), (1024, True), (1024, False)):
            with torch.no_grad():
                out = completion_logps(model, collate(pairs), chunk_size=chunk_size,
                                       fused=fused, token_stats=True)
            got = torch.stack([out.mean_logits, out.entropy, out.top1], dim=-1).double()
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5,
                                       msg=f"{layout}, chunk {chunk_size}, fused {fused}")
    out = completion_logps(model, LAYOUTS["right"](pairs))
    assert out.mean_logits is None and out.entropy is None  # not asked


def _token_expectations(model, batch) -> dict[str, float]:
    """TRL's per-token metrics of a batch of pairs from :func:`token_stat_sums`: the mean logit
    per chosen/rejected token, the entropy per completion token (both sides), the argmax hit
    rate over the chosen tokens."""
    chosen = torch.tensor([token_stat_sums(model, p.prompt_ids, p.chosen_ids) for p in batch])
    rejected = torch.tensor([token_stat_sums(model, p.prompt_ids, p.rejected_ids)
                             for p in batch])
    n_c, n_r = sum(len(p.chosen_ids) for p in batch), sum(len(p.rejected_ids) for p in batch)
    return {"logits/chosen": float(chosen[:, 0].sum()) / n_c,
            "logits/rejected": float(rejected[:, 0].sum()) / n_r,
            "entropy": float(chosen[:, 1].sum() + rejected[:, 1].sum()) / (n_c + n_r),
            "mean_token_accuracy": float(chosen[:, 2].sum()) / n_c}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_dpo_step_1_without_dropout_is_the_eval_mode_forward(workdir, tokenizer, tmp_path,
                                                             dropout_models, kind):
    """Dropout 0.5 in the policy (GPT-2: nn.Dropout modules; Llama: the float attention
    dropout, which TRL's own helper misses): by default step 1 logs the eval-mode loss,
    log-probs and logits of the first batch (π_ref another model, so h ≠ 0); with
    ``disable_dropout: false`` its loss differs (dropout is active)."""
    path, model = dropout_models[kind]
    ref = tiny_causal_lm("gpt2", vocab_size=len(tokenizer), seed=7)  # = workdir/"gpt2"
    common = {"model": str(path), "ref_model": str(workdir / "gpt2"), "max_steps": 1,
              "beta": BETA}
    cfg = config(workdir, "unused", output_dir=str(tmp_path / "off"), **common)
    assert cfg.disable_dropout  # TRL's default
    batch = _first_batch(cfg, tokenizer)
    chosen = [sequence_logp(model, p.prompt_ids, p.chosen_ids) for p in batch]
    rejected = [sequence_logp(model, p.prompt_ids, p.rejected_ids) for p in batch]
    ref_chosen = [sequence_logp(ref, p.prompt_ids, p.chosen_ids) for p in batch]
    ref_rejected = [sequence_logp(ref, p.prompt_ids, p.rejected_ids) for p in batch]
    h = [(c - rc) - (r - rr) for c, r, rc, rr in zip(chosen, rejected, ref_chosen,
                                                      ref_rejected, strict=True)]
    # sigmoid DPO: −log σ(βh) = log(1 + e^{−βh}), mean over the batch's pairs
    expected = {"loss": sum(math.log1p(math.exp(-BETA * x)) for x in h) / len(h),
                "logps/chosen": sum(chosen) / len(batch),
                "logps/rejected": sum(rejected) / len(batch),
                **_token_expectations(model, batch)}
    record = _step_1(cfg)
    for key, value in expected.items():
        assert record[key] == pytest.approx(value, abs=1e-5), key
    with_dropout = _step_1(config(workdir, "unused", output_dir=str(tmp_path / "on"),
                                  disable_dropout=False, **common))
    assert abs(with_dropout["loss"] - expected["loss"]) > 1e-3
    assert abs(with_dropout["logps/chosen"] - expected["logps/chosen"]) > 1e-2


def test_sft_step_1_without_dropout_is_the_eval_mode_forward(workdir, tokenizer, tmp_path,
                                                             dropout_models):
    """SFT: step 1 logs the eval-mode loss mean_i −(1/|y_i|) Σ_t log π(y_i,t|·) of the first
    batch and its num_tokens Σ_i |x_i| + |y_i|; with ``disable_dropout: false`` the loss
    differs."""
    path, model = dropout_models["gpt2"]
    common = {"model": str(path), "max_steps": 1}
    cfg = config(workdir, "unused", SFTConfig, output_dir=str(tmp_path / "off"), **common)
    batch = _first_batch(cfg, tokenizer)
    nll = [-sequence_logp(model, s.prompt_ids, s.completion_ids) / len(s.completion_ids)
           for s in batch]
    record = _step_1(cfg)
    assert record["loss"] == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    stats = torch.tensor([token_stat_sums(model, s.prompt_ids, s.completion_ids) for s in batch])
    tokens = sum(len(s.completion_ids) for s in batch)
    assert record["entropy"] == pytest.approx(float(stats[:, 1].sum()) / tokens, abs=1e-5)
    assert record["mean_token_accuracy"] == pytest.approx(float(stats[:, 2].sum()) / tokens,
                                                          abs=1e-9)
    assert record["num_tokens"] == sum(len(s.prompt_ids) + len(s.completion_ids) for s in batch)
    with_dropout = _step_1(config(workdir, "unused", SFTConfig, disable_dropout=False,
                                  output_dir=str(tmp_path / "on"), **common))
    assert abs(with_dropout["loss"] - record["loss"]) > 1e-3


def test_disable_dropout_reaches_lora_dropout_as_in_trl(workdir, caplog):
    """TRL applies ``disable_dropout_in_model`` to the PEFT-wrapped policy, so peft's
    ``lora_dropout`` (an nn.Dropout) goes to 0 too; dpokit warns that the configured value is
    off. With ``disable_dropout: false`` every probability stays as configured."""
    from dpokit.train.setup import add_lora, disable_dropout

    def probabilities(cfg):
        model = add_lora(tiny_causal_lm("gpt2", vocab_size=64, seed=0), cfg)
        disable_dropout(model, cfg)
        return {name: m.p for name, m in model.named_modules() if isinstance(m, nn.Dropout)}

    cfg = config(workdir, "unused", lora=True, lora_dropout=0.3)
    with caplog.at_level(logging.WARNING, logger="dpokit.train"):
        off = probabilities(cfg)
    assert any("lora_dropout" in name for name in off) and set(off.values()) == {0.0}
    assert "lora_dropout 0.3 is off under disable_dropout" in caplog.text
    kept = probabilities(config(workdir, "unused", lora=True, lora_dropout=0.3,
                                disable_dropout=False))
    assert {p for name, p in kept.items() if "lora_dropout" in name} == {0.3}
    assert {p for name, p in kept.items() if "lora_dropout" not in name} == {0.1}  # GPT-2's


def test_num_tokens_is_cumulative_and_resumes(workdir, tokenizer, tmp_path):
    """num_tokens at each log = Σ over every step so far of Σ_pairs 2|x| + |y_w| + |y_l| (TRL
    counts the attention mask of prompt+chosen and prompt+rejected rows). Logged every 2 steps;
    a run that crashes after its step-3 checkpoint (mid-window) and resumes logs the same
    sequence — and, with GPT-2's dropout on, the same losses. Evaluation records carry the
    logits metrics and no num_tokens (TRL's eval_num_tokens repeats the training count)."""
    from dpokit.train.loop import Probe

    def crash(model, step):
        if step == 4:
            raise RuntimeError("simulated crash")
        return {}

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "the cat", "chosen": " yes good answer", "rejected": " no bad sea"},
        {"prompt": "a bird", "chosen": " yes good answer", "rejected": " no bad moon"}]))
    common = {"model": str(workdir / "gpt2"), "disable_dropout": False, "logging_steps": 2,
              "save_steps": 3, "eval_data": str(eval_file), "eval_steps": 2}

    def run_config(out, **extra):
        return config(workdir, "unused", output_dir=str(tmp_path / out), **common, **extra)

    cfg = run_config("straight")
    items = cfg.objective(tokenizer).load(cfg.data, None, progress=False)
    order = epoch_batches(len(items), cfg.batch_size, seed=42, epoch=0)
    per_step = [sum(2 * len(items[i].prompt_ids) + len(items[i].chosen_ids)
                    + len(items[i].rejected_ids) for i in batch) for batch in order[:6]]
    expected = [sum(per_step[:s]) for s in (2, 4, 6)]

    straight = read_metrics(train(cfg, progress=False).parent)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(run_config("resumed"), progress=False, probe=Probe(1, crash))
    resumed = read_metrics(train(run_config("resumed", resume="auto"), progress=False).parent)
    resumed = [m for m in resumed if len(m) > 1]  # not the crashed run's empty probe lines
    for run in (straight, resumed):
        logs = [m for m in run if "loss" in m]
        assert [m["step"] for m in logs] == [2, 4, 6]
        assert [m["num_tokens"] for m in logs] == expected
        evals = [m for m in run if "eval/loss" in m]
        assert [m["step"] for m in evals] == [2, 4, 6]
        assert all("eval/num_tokens" not in m and "eval/logits/chosen" in m for m in evals)
    for a, b in zip(straight, resumed, strict=True):
        for key in ("loss", "eval/loss", "logits/chosen", "logits/rejected"):
            assert a.get(key) == pytest.approx(b.get(key), abs=1e-6), (a["step"], key)
