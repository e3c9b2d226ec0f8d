"""On-policy DPO against a review's findings (each test failed before its fix): samples from π_θ
with the run's settings only, a reward model scoring the chat template's own tokens, a
reference-free loss online."""

import pytest
import torch

from dpokit.data.prompts import Prompt
from dpokit.generation import generate_completions
from dpokit.train.loop import train
from tests.train.test_online import online, reward_file  # noqa: F401  (fixture)


def test_generation_samples_the_policy_not_the_models_generation_config(tokenizer):
    """Completions must come from π_θ with the run's sampling settings alone. A checkpoint's
    generation_config.json (e.g. Qwen2.5-Instruct ships repetition_penalty 1.05) is merged
    into ``model.generate`` here, so the "on-policy" samples come from another distribution
    (kl_to_ref's unbiasedness claim fails too). Greedy decoding must equal the argmax chain."""
    from dpokit.fixtures import tiny_causal_lm

    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=7).eval()
    ids = tokenizer("the cat sat")["input_ids"]
    x, chain = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(40):
            nxt = int(model(x).logits[0, -1].argmax())
            chain.append(nxt)
            if nxt == tokenizer.eos_token_id:
                break
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    model.generation_config.repetition_penalty = 50.0  # as loaded from generation_config.json
    (got,), = generate_completions(model, tokenizer, [Prompt("the cat sat", ids)],
                                   temperature=0, max_new_tokens=40)
    assert got.ids == chain


def test_reward_model_scores_the_chat_template_without_a_second_bos(tokenizer, tmp_path):
    """A conversational prompt is rendered with the reward tokenizer's chat template; when
    the template starts with ``{{ bos_token }}`` (Llama-3 reward models), tokenising that text
    again with special tokens doubles the BOS, so the reward model scores the wrong sequence
    (TRL tokenises it with add_special_tokens=False)."""
    from transformers import AutoModelForSequenceClassification

    from dpokit.fixtures import tiny_config
    from dpokit.rewards import RewardModel

    tok = type(tokenizer).from_pretrained(_save(tokenizer, tmp_path / "tok"))
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    cfg = tiny_config("llama", vocab_size=len(tok))
    cfg.num_labels = 1
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    messages = [{"role": "user", "content": "name a colour"},
                {"role": "assistant", "content": " red"}]
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids[:2] != [tok.bos_token_id] * 2
    with torch.no_grad():
        expected = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
    got = RewardModel(tmp_path / "rm")([messages[:1]], [" red"])[0]
    assert got == pytest.approx(expected, abs=1e-5)


def _save(tokenizer, path):
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("settings", [{"label": "hard", "loss_type": ["simpo"]},
                                      {"ld_alpha": 0.5}])
def test_online_with_a_reference_free_loss(workdir, reward_file, settings):  # noqa: F811
    """simpo (no π_ref) online with hard labels trains (it died in forward with a KeyError):
    finite losses, and no kl_to_ref logged, there being no reference to measure it against —
    nor with ld_alpha, whose down-weighted log-probs make the ratio no log π_ref/π_θ."""
    import math

    from tests.helpers import read_metrics

    name = "online-" + "-".join(map(str, settings.values())).replace("[", "").replace("]", "")
    cfg = online(workdir, name.replace("'", ""), reward_file, max_steps=2, logging_steps=1,
                 num_generations=2, batch_size=4, **settings)
    final = train(cfg, progress=False)
    records = [m for m in read_metrics(final.parent) if "loss" in m]
    assert len(records) == 2 and all(math.isfinite(m["loss"]) for m in records)
    assert all("kl_to_ref" not in m for m in records)


def test_generation_runs_in_the_precision_trained_on(workdir, reward_file, monkeypatch):  # noqa: F811
    """With bf16 autocast the policy's log-probs are computed under autocast; the on-policy
    samples are drawn under it too (they were drawn in float32): the same π_θ."""
    import dpokit.objectives.online as online_module

    seen = []
    original = online_module.generate_completions

    def recording(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(*args, **kwargs)

    monkeypatch.setattr(online_module, "generate_completions", recording)
    train(online(workdir, "online-bf16", reward_file, bf16=True, max_steps=1, batch_size=2,
                 num_generations=2, max_new_tokens=2), progress=False)
    assert seen and all(seen)
