"""Generation, rewards and `dpokit generate` against exact oracles and their edge cases: the
sampled law against the model's whole enumerated output space, prompts past a model's positions,
reward functions that return the wrong thing, reward models scored in any batch as alone
(whatever their tokenizer's padding side and pad token), and output files that are the data."""

import json
import math

import pytest
import torch

from dpokit.data.prompts import Prompt
from dpokit.errors import DpokitError
from dpokit.fixtures import build_tokenizer, tiny_causal_lm, tiny_config
from dpokit.generation import generate_completions
from dpokit.rewards import load_reward, score
from tests.helpers import count_calls, run_cli, write_jsonl


class _Ids:
    """What generation reads of a tokenizer, for a model over a vocabulary of a few ids."""

    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return ""


def _law(logits, temperature, top_k, top_p):
    """The next-token law of temperature, then top-k, then nucleus top-p (the smallest set of
    the most likely tokens holding ≥ top_p of the mass), float64."""
    scaled = logits.double() / temperature
    if top_k:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], -math.inf)
    probs = scaled.softmax(-1)
    if top_p < 1:
        sorted_, order = probs.sort(descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[(sorted_.cumsum(0) - sorted_) < top_p]] = True
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    return probs


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 3, 0.9)])
def test_samples_follow_the_exact_law_on_the_whole_output_space(temperature, top_k, top_p):
    """A model over 6 ids, 2 new tokens: every completion (EOS first, or any 2 tokens) has its
    exact probability by enumeration. 3,000 samples of one prompt, generated beside longer
    prompts (left padding) with its KV cache shared by its generations, and with a checkpoint
    generation_config that would change the law (repetition penalty, suppressed token, top-k),
    match it (another end token in it does end a completion: tests/test_review_followups.py):
    every outcome within 4.5σ (+1), no sample off the support."""
    from transformers import GenerationConfig

    model = tiny_causal_lm("llama", vocab_size=6, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(15)  # a peaked law, not near-uniform
    model.generation_config = GenerationConfig(repetition_penalty=3.0, suppress_tokens=[5],
                                               top_k=2, do_sample=True)
    prompt = [1, 3, 4]
    exact = {}
    with torch.no_grad():
        first = _law(model(input_ids=torch.tensor([prompt])).logits[0, -1], temperature, top_k,
                     top_p)
        for a in range(6):
            if a == 2:
                exact[(a,)] = float(first[a])
                continue
            second = _law(model(input_ids=torch.tensor([[*prompt, a]])).logits[0, -1],
                          temperature, top_k, top_p)
            for b in range(6):
                exact[(a, b)] = float(first[a] * second[b])
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-9)
    n = 3000
    prompts = [Prompt("", prompt), Prompt("", [1, 5, 3, 4, 5, 3]), Prompt("", [1, 4, 4, 3, 5])]
    groups = generate_completions(model, _Ids(), prompts, num_generations=n, max_new_tokens=2,
                                  temperature=temperature, top_k=top_k, top_p=top_p, seed=1,
                                  batch_size=3 * n)
    counts = {}
    for completion in groups[0]:
        counts[tuple(completion.ids)] = counts.get(tuple(completion.ids), 0) + 1
    assert all(exact.get(outcome, 0.0) > 0 for outcome in counts), "a sample off the support"
    for outcome, p in exact.items():
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts.get(outcome, 0) - n * p) <= 4.5 * sigma + 1.0, (outcome, p)


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_refuses_prompts_past_the_model_positions(tokenizer, tmp_path, capsys, kind):
    """A prompt of 13 tokens and max_new_tokens 12 on a model of 16 positions: GPT-2 failed
    with an IndexError traceback, Llama generated past its positions silently. Now one line
    naming the row, exit 2, nothing written; 3 new tokens still fit and run."""
    model_dir = _save(tiny_causal_lm(kind, vocab_size=len(tokenizer), seed=5, max_positions=16),
                      tokenizer, tmp_path / kind)
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"},
                                              {"prompt": "the cat sat on the mat and the dog ran"}])
    out = tmp_path / "s.jsonl"
    argv = ["generate", "--model", str(model_dir), "--data", str(data), "--output", str(out)]
    capsys.readouterr()  # saving may print a progress bar
    code, stdout, err = run_cli(capsys, *argv, "--max-new-tokens", "12")
    assert code == 2 and stdout == "" and err.count("\n") == 1, err
    assert f"{data}, row 2: 25 tokens (its prompt and max_new_tokens)" in err
    assert "positions" in err and not out.exists()
    code, _, err = run_cli(capsys, *argv, "--max-new-tokens", "3")
    assert code == 0, err


def _classifier(tokenizer, kind="llama", max_positions=1024, seed=0):
    from transformers import AutoModelForSequenceClassification

    cfg = tiny_config(kind, vocab_size=len(tokenizer), max_positions=max_positions)
    cfg.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_config(cfg).eval()


@torch.no_grad()
def _alone(model, ids):
    """The oracle: the classifier's output on one unpadded sequence."""
    return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


PROMPTS = ["the cat", "a", "what color is the sky?"]
COMPLETIONS = [" sat on the mat", " b", " blue"]


@pytest.mark.parametrize("case", ["left_padding", "pad_is_eos"])
def test_reward_model_scores_padded_batches_as_single_texts(tmp_path, case):
    """A batch of texts of different lengths scores each as alone (1e-5) when the reward
    model's tokenizer pads on the left (a GPT-2 classifier: absolute positions shift) or pads
    with another id than the model's pad_token_id (the model then took a pad for the last
    token). Both gave batch-dependent scores (differences ~0.1)."""
    tokenizer = build_tokenizer()
    if case == "left_padding":
        model, tokenizer.padding_side = _classifier(tokenizer, "gpt2"), "left"
    else:
        model = _classifier(tokenizer, "llama")
        tokenizer.pad_token = tokenizer.eos_token  # id 2; the model's pad_token_id is 0
    path = _save(model, tokenizer, tmp_path / "rm")
    if case == "left_padding":  # saved tokenizers keep their padding side in the config
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config,
                                                                "padding_side": "left"}))
    reward = load_reward(str(path))
    assert reward.tokenizer.padding_side == ("left" if case == "left_padding" else "right")
    assert reward.tokenizer.pad_token_id != 0 or case == "left_padding"
    got = score(reward, str(path), PROMPTS, COMPLETIONS, step=0)
    expected = [_alone(model, tokenizer(p + c)["input_ids"])
                for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert got == pytest.approx(expected, abs=1e-5)


def test_reward_model_refuses_texts_past_its_positions(tmp_path, tokenizer):
    """A prompt + completion of 29 tokens on a reward model of 16 positions was scored past
    them silently (Llama); now one line naming the completion and the limit."""
    path = _save(_classifier(tokenizer, "llama", max_positions=16), tokenizer, tmp_path / "rm")
    reward = load_reward(str(path))
    long = " sat on the mat and the dog ran far away under the tree with the moon and sun"
    assert len(tokenizer("the cat" + long)["input_ids"]) > 16
    assert len(score(reward, "rm", ["the cat"], [" sat"], step=0)) == 1
    with pytest.raises(DpokitError) as caught:
        score(reward, "rm", ["the cat", "the cat"], [" sat", long], step=3)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("reward rm failed at step 3: completion 1")
    assert "longer than the reward model has positions (max_position_embeddings = 16)" in message


def test_a_reward_file_may_define_dataclasses(tmp_path):
    """A reward file with `from __future__ import annotations` and a dataclass failed to
    import (dataclasses look the module up in sys.modules: AttributeError 'NoneType' …). Two
    files of the same name in two directories stay two modules."""
    for name, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "reward.py").write_text(
            "from __future__ import annotations\nimport dataclasses\n\n"
            "@dataclasses.dataclass\nclass Weights:\n    scale: float = " + str(value) + "\n\n"
            "def fn(prompts, completions, **kwargs):\n"
            "    return [Weights().scale] * len(completions)\n")
    a = load_reward(f"{tmp_path / 'a' / 'reward.py'}:fn")
    b = load_reward(f"{tmp_path / 'b' / 'reward.py'}:fn")
    assert score(a, "a", ["p"], ["c"], step=0) == [1.0]
    assert score(b, "b", ["p"], ["c"], step=0) == [2.0]


def _strings(prompts, completions, **kwargs):
    return [str(i) for i in range(len(completions))]


def _one_string(prompts, completions, **kwargs):
    return "12"


def _scalar(prompts, completions, **kwargs):
    return 3.0


def _zero_dim(prompts, completions, **kwargs):
    return torch.tensor(1.0)


def _two_lines(prompts, completions, **kwargs):
    raise ValueError("first line\nsecond line")


@pytest.mark.parametrize(("fn", "message"), [
    (_strings, "reward f returned a non-number (str '0') for completion 0 at step 2"),
    (_one_string, "reward f returned str, not a list of 2 numbers at step 2"),
    (_scalar, "reward f returned float, not a list of 2 numbers at step 2"),
    (_zero_dim, "reward f returned Tensor, not a list of 2 numbers at step 2"),
    (_two_lines, "reward f failed at step 2: ValueError: first line / second line"),
])
def test_rewards_of_the_wrong_type_are_one_line_errors(fn, message):
    """Strings were read as numbers ('12' as the two rewards 1 and 2), a 0-d tensor and a
    scalar gave "failed: TypeError", a two-line exception a two-line error."""
    with pytest.raises(DpokitError) as caught:
        score(fn, "f", ["p", "q"], ["c", "d"], step=2)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(message)


def test_rewards_as_tensors_and_numpy_numbers_are_read():
    """The stricter check still reads what reward code returns: a tensor, NumPy scalars."""
    import numpy as np

    def tensor(prompts, completions, **kwargs):
        return torch.tensor([0.5, -1.0])

    def column(prompts, completions, **kwargs):
        return [np.float32(1.5), np.int64(2)]

    assert score(tensor, "t", ["p", "q"], ["c", "d"], step=0) == [0.5, -1.0]
    assert score(column, "n", ["p", "q"], ["c", "d"], step=0) == [1.5, 2.0]


def test_conversational_completions_reach_functions_as_trl_passes_them():
    """TRL passes a conversational prompt's completion to a reward function as
    [{"role": "assistant", "content": text}]; TRL's own conversational rewards index it so
    (completion[0]["content"]) and failed on dpokit's plain text. Text prompts keep text."""
    seen = []

    def trl_style(prompts, completions, **kwargs):
        seen.extend(completions)
        return [float(len(c[0]["content"])) if isinstance(c, list) else -1.0
                for c in completions]

    chat = [{"role": "user", "content": "name a colour"}]
    assert score(trl_style, "f", [chat, "plain"], [" teal", " red"], step=0) == [5.0, -1.0]
    assert seen == [[{"role": "assistant", "content": " teal"}], " red"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return _save(tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=5), tokenizer,
                 tmp_path_factory.mktemp("generate") / "model")


def test_generate_refuses_a_bad_reward_before_generating(model_dir, tmp_path, capsys,
                                                         monkeypatch):
    """A reward naming a missing function was found only after every completion had been
    generated (hours on a real data set); now before generation starts."""
    import dpokit.generation

    calls = count_calls(monkeypatch, dpokit.generation, "generate_completions")
    (tmp_path / "r.py").write_text("def chars(prompts, completions, **kw):\n"
                                   "    return [len(c) for c in completions]\n")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat sat"}])
    code, out, err = run_cli(capsys, "generate", "--model", str(model_dir), "--data", str(data),
                             "--output", str(tmp_path / "s.jsonl"), "--reward",
                             f"{tmp_path / 'r.py'}:charz")
    assert code == 2 and out == "" and err.count("\n") == 1 and "has no function 'charz'" in err
    assert calls == [] and not (tmp_path / "s.jsonl").exists()


def test_generate_names_the_row_of_a_bad_reward(model_dir, tmp_path, capsys):
    """A reward value that is NaN names the data row and the generation it belongs to, not
    only its index among all completions."""
    (tmp_path / "r.py").write_text(
        "def third(prompts, completions, **kw):\n"
        "    return [float('nan') if i == 3 else 0.0 for i in range(len(completions))]\n")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat sat"}, {"prompt": "a bird"}])
    code, _, err = run_cli(capsys, "generate", "--model", str(model_dir), "--data", str(data),
                           "--output", str(tmp_path / "s.jsonl"), "--num-generations", "2",
                           "--max-new-tokens", "3", "--reward", f"{tmp_path / 'r.py'}:third")
    assert code == 2 and err.count("\n") == 1
    assert f"non-finite value (nan) for completion 3 ({data}, row 2, generation 2)" in err


def test_generate_with_conversational_prompts_and_a_trl_reward(model_dir, tmp_path, capsys):
    """`dpokit generate --reward` on chat prompts with a reward written for TRL's
    conversational format: each record's reward is its completion's length."""
    (tmp_path / "r.py").write_text(
        "def length(prompts, completions, **kw):\n"
        "    return [len(c[0]['content']) for c in completions]\n")
    data = write_jsonl(tmp_path / "p.jsonl",
                       [{"prompt": [{"role": "user", "content": "what color is the sky?"}]}])
    out = tmp_path / "s.jsonl"
    code, _, err = run_cli(capsys, "generate", "--model", str(model_dir), "--data", str(data),
                           "--output", str(out), "--num-generations", "2", "--max-new-tokens",
                           "6", "--reward", f"{tmp_path / 'r.py'}:length")
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    assert len(records) == 2
    assert all(r["reward"] == len(r["completion"]) for r in records)


def test_outputs_that_are_the_data_file_are_refused(model_dir, tmp_path, capsys, monkeypatch):
    """`dpokit generate --data samples.jsonl` (an earlier output: it has a prompt column) with
    the default output samples.jsonl replaced the data with its own completions; `dpokit eval
    --per-example` naming the data file replaced it too. Both now refuse, one line."""
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    rows = [{"prompt": "the cat sat", "chosen": " on the mat", "rejected": " no"}]
    write_jsonl(tmp_path / "samples.jsonl", rows)
    before = (tmp_path / "samples.jsonl").read_text()
    code, out, err = run_cli(capsys, "generate", "--model", str(model_dir), "--data",
                             "samples.jsonl")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "output samples.jsonl is the data file" in err
    code, out, err = run_cli(capsys, "eval", "--model", str(model_dir), "--data",
                             str(tmp_path / "samples.jsonl"), "--per-example", "./samples.jsonl")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "per_example ./samples.jsonl is the data file" in err
    assert (tmp_path / "samples.jsonl").read_text() == before


def test_a_reward_file_imports_its_sibling_modules(tmp_path, monkeypatch):
    """``reward: path/to/reward.py:fn`` whose file imports a helper module beside it (as
    ``python reward.py`` would let it) failed with "importing ... failed (No module named
    'scoring')"; and ``module:fn`` for a module in the working directory failed under the
    ``dpokit`` console script, whose sys.path starts with its bin directory, not the cwd."""
    import sys

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    folder = tmp_path / "rewards_with_helper"
    folder.mkdir()
    (folder / "scoring_helper_a.py").write_text("def length(c):\n    return -float(len(c))\n")
    (folder / "reward.py").write_text(
        "from scoring_helper_a import length\n\n"
        "def fn(prompts, completions, **kw):\n    return [length(c) for c in completions]\n")
    reward = load_reward(f"{folder / 'reward.py'}:fn")
    assert reward(["p", "p"], ["ab", "abcd"]) == [-2.0, -4.0]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "cwd_reward_module_b.py").write_text(
        "def fn(prompts, completions, **kw):\n    return [1.5 for c in completions]\n")
    monkeypatch.chdir(cwd)
    assert load_reward("cwd_reward_module_b:fn")(["p"], ["x"]) == [1.5]
