"""Rewards the user names: Python functions (TRL's signature, completion_ids when they take it)
and local reward-model directories, scored in batches equal to one text at a time."""

import json

import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.rewards import RewardModel, load_reward, score
from dpokit.train.loop import train
from tests.helpers import read_metrics
from tests.train.test_trainer import config


def _classifier(tokenizer, num_labels=1, seed=3):
    from transformers import AutoModelForSequenceClassification

    from dpokit.fixtures import tiny_config

    cfg = tiny_config("llama", vocab_size=len(tokenizer))
    cfg.num_labels = num_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_config(cfg).eval()


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("reward-model")
    _classifier(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _one(model, tokenizer, text, *, special=True):
    """The oracle: the classifier's output on one unpadded text (``special``: with the
    tokenizer's special tokens added, as for a plain text; a chat template renders its own)."""
    ids = torch.tensor([tokenizer(text, add_special_tokens=special)["input_ids"]])
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, 0])


def test_a_reward_model_scores_batches_as_single_texts(reward_dir, tokenizer):
    """Mixed lengths in one padded batch (and a batch size that splits them) give each text's
    unpadded score (1e-5)."""
    reward = load_reward(str(reward_dir))
    assert isinstance(reward, RewardModel)
    prompts = ["the cat", "a much longer prompt about the sea and the moon", "hi"]
    completions = [" sat", " is blue and wide, and very deep indeed", " there friend"]
    reward.batch_size = 2
    got = reward(prompts, completions)
    oracle = _classifier(tokenizer)
    expected = [_one(oracle, tokenizer, p + c) for p, c in zip(prompts, completions, strict=True)]
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(round(x, 6) for x in got)) == 3  # the texts are told apart


def test_conversational_prompts_go_through_the_chat_template(reward_dir, tokenizer):
    reward = load_reward(str(reward_dir))
    messages = [{"role": "user", "content": "name a colour"}]
    text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": " teal"}], tokenize=False)
    assert reward.text(messages, " teal") == text
    assert reward([messages], [" teal"]) == pytest.approx(
        [_one(_classifier(tokenizer), tokenizer, text, special=False)], abs=1e-5)


def test_reward_model_errors(tmp_path, tokenizer):
    two = tmp_path / "two"
    _classifier(tokenizer, num_labels=2).save_pretrained(two)
    tokenizer.save_pretrained(two)
    with pytest.raises(DpokitError, match="has 2 outputs; a reward model has one"):
        load_reward(str(two))
    with pytest.raises(DpokitError, match=r"no config\.json"):
        load_reward(str(tmp_path))


def test_completion_ids_reach_functions_that_take_them():
    """Passed by keyword to a function naming it or taking **kwargs; never to one that takes
    neither (it would raise TypeError)."""
    seen = {}

    def named(prompts, completions, completion_ids):
        seen["named"] = completion_ids
        return [0.0] * len(completions)

    def kwargs(prompts, completions, **kw):
        seen["kwargs"] = kw.get("completion_ids")
        return [0.0] * len(completions)

    def plain(prompts, completions):
        return [1.0] * len(completions)

    for fn in (named, kwargs, plain):
        assert len(score(fn, "f", ["p"], ["c"], step=1, completion_ids=[[5, 2]])) == 1
    assert seen == {"named": [[5, 2]], "kwargs": [[5, 2]]}


def test_online_training_and_samples_with_a_reward_model(workdir, reward_dir, tmp_path):
    """`reward: DIR` trains on-policy and scores eval_generate samples: each sample's reward is
    the reward model's score of prompt + completion (a fresh load, one text at a time)."""
    final = train(config(workdir, "online-rm", online=True, reward=str(reward_dir),
                         loss_type=["sigmoid_soft"], max_new_tokens=6, max_steps=2,
                         eval_data=str(workdir / "sft.jsonl"), eval_generate=3,
                         data=str(workdir / "sft.jsonl")), progress=False)
    records = read_metrics(final.parent)
    assert [r["step"] for r in records if "reward/mean" in r] == [1, 2]
    samples = [json.loads(line) for line in
               (final.parent / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3
    from dpokit.models import load_tokenizer

    tokenizer = load_tokenizer(reward_dir)
    oracle = _classifier(tokenizer)
    for s in samples:
        assert s["reward"] == pytest.approx(
            _one(oracle, tokenizer, s["prompt"] + s["completion"]), abs=1e-5)
