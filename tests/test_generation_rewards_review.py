"""Review of `dpokit.generation` and `dpokit.rewards` against independent oracles.

Generation: the logits every sampled token was drawn from, in left-padded batches with a shared
prompt cache, equal a float64 re-scoring of the unpadded prompt + completion (the raw π_θ, which
DPO's loss re-scores; sampling draws from its temperature/top-k/top-p adjustment, whose support
every sampled token lies in); completions end at their first stop token; greedy is the float64
step-by-step argmax; non-finite logits, empty prompts, a tokenizer without a pad token and
batch_size 0 are one-line errors or work, no tracebacks. Rewards: every way a reward function
can fail (SystemExit included) is a one-line error naming it and the row; sets, huge ints and
meta tensors; relative imports; a missing module; a reward model with another tokenizer than
the policy's scores re-tokenised text.
"""

import copy
import math

import pytest
import torch

from dpokit.data.prompts import Prompt
from dpokit.errors import DpokitError
from dpokit.fixtures import build_tokenizer, tiny_causal_lm, tiny_config
from dpokit.generation import Completion, completion_records, generate_completions
from dpokit.rewards import load_reward, score, score_groups


class _Ids:
    """What generation reads of a tokenizer, for a model over a few ids."""

    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return ""


def _law_logps(logits, temperature, top_k, top_p):
    """log of the next-token law of temperature, then top-k, then nucleus top-p (the smallest
    set of the most likely tokens holding ≥ top_p of the mass), float64; −inf off its support."""
    scaled = logits.double() / temperature
    if top_k:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], -math.inf)
    probs = scaled.softmax(-1)
    sorted_, order = probs.sort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[(sorted_.cumsum(0) - sorted_) < top_p]] = True
    probs = torch.where(keep, probs, 0.0)
    return (probs / probs.sum()).log()


def _recording(model):
    """Make ``model.generate`` keep its raw per-step logits; returns the list they go to."""
    calls = []
    original = model.generate

    def generate(*args, **kwargs):
        out = original(*args, **kwargs, output_logits=True, return_dict_in_generate=True)
        calls.append(torch.stack(out.logits, 1))  # (B, new tokens, V), raw, before warpers
        return out.sequences

    model.generate = generate
    return calls


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sampled_tokens_come_from_the_unpadded_models_logits(tokenizer, kind):
    """Prompts of 1, 2 and 7 tokens (left padding, one row's prefill cache fully masked), 3
    generations each sharing the prompt's cache, split over calls (batch_size 4): for every
    generated token, the logits generate drew it from, log-softmaxed, equal a float64 forward of
    the unpadded prompt + completion so far (the raw π_θ DPO re-scores) within 1e-5 nats; and
    every sampled token lies in the float64 temperature 0.7 / top-k 20 / top-p 0.8 support."""
    model = tiny_causal_lm(kind, vocab_size=len(tokenizer), seed=11)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # a peaked law: top-p cuts
    prompts = [Prompt("", [1]), Prompt("", [1, 40, 50, 60, 70, 80, 90]), Prompt("", [1, 7])]
    calls = _recording(model)
    groups = generate_completions(model, tokenizer, prompts, num_generations=3,
                                  max_new_tokens=6, temperature=0.7, top_k=20, top_p=0.8,
                                  seed=4, batch_size=4)
    del model.generate
    recorded = [row for logits in calls for row in logits]  # one per completion, in order
    flat = [(p, c) for p, group in zip(prompts, groups, strict=True) for c in group]
    assert len(recorded) == len(flat) == 9
    reference = copy.deepcopy(model).double()  # the same weights, float64
    worst = 0.0
    for (prompt, completion), logits in zip(flat, recorded, strict=True):
        n = len(completion.ids)
        with torch.no_grad():
            oracle = reference(input_ids=torch.tensor([prompt.prompt_ids + completion.ids]))
        oracle = oracle.logits[0, len(prompt.prompt_ids) - 1:-1]  # (n, V): predicts each token
        got = logits[:n].double().log_softmax(-1)
        worst = max(worst, float((got - oracle.log_softmax(-1)).abs().max()))
        for t, token in enumerate(completion.ids):
            assert _law_logps(oracle[t], 0.7, 20, 0.8)[token] > -math.inf, (prompt, t)
    assert worst < 1e-5
    assert len({tuple(c.ids) for _, c in flat}) > 3  # really sampled, not one repeated answer


def test_greedy_is_the_float64_argmax_in_padded_batches():
    """A float64 GPT-2 (absolute positions, which left padding would shift if mishandled),
    greedy, prompts of three lengths, 2 generations each: each completion is the step-by-step
    argmax of the unpadded full forward, stopping after EOS."""
    model = tiny_causal_lm("gpt2", vocab_size=12, seed=2, dtype=torch.float64)
    prompts = [Prompt("", [1, 3]), Prompt("", [1, 4, 5, 6, 7, 8]), Prompt("", [1])]
    got = generate_completions(model, _Ids(), prompts, num_generations=2, max_new_tokens=8,
                               temperature=0.0, batch_size=4)
    for prompt, group in zip(prompts, got, strict=True):
        expected = []
        with torch.no_grad():
            for _ in range(8):
                logits = model(input_ids=torch.tensor([prompt.prompt_ids + expected])).logits
                expected.append(int(logits[0, -1].argmax()))
                if expected[-1] == 2:
                    break
        assert [c.ids for c in group] == [expected, expected]


def test_completions_end_at_their_first_stop_token():
    """A model over 8 ids whose generation_config ends on ids 2 and 5 (the tokenizer's EOS is
    2): 200 sampled completions of up to 6 tokens. Each stops at its first stop token, which it
    keeps (eos True), or has exactly 6 tokens and no stop token (eos False); both kinds occur,
    both stop ids end some; the records count exactly the kept tokens."""
    from transformers import GenerationConfig

    model = tiny_causal_lm("llama", vocab_size=8, seed=1)
    model.generation_config = GenerationConfig(eos_token_id=[2, 5])
    prompts = [Prompt("p.jsonl", [1, 3], source="p.jsonl", row=1),
               Prompt("p.jsonl", [1, 4, 6, 7], source="p.jsonl", row=2)]
    groups = generate_completions(model, _Ids(), prompts, num_generations=100,
                                  max_new_tokens=6, seed=0, batch_size=64)
    flat = [c for group in groups for c in group]
    for c in flat:
        assert not {2, 5} & set(c.ids[:-1])
        assert c.eos == (c.ids[-1] in (2, 5))
        assert c.eos or len(c.ids) == 6
    assert {c.eos for c in flat} == {True, False}
    assert {c.ids[-1] for c in flat if c.eos} == {2, 5}
    records = completion_records(prompts, groups)
    assert [r["tokens"] for r in records] == [len(c.ids) for c in flat]


def test_non_finite_logits_are_a_one_line_error_naming_the_prompt(tokenizer):
    """A token whose embedding is NaN makes only the rows that contain it NaN. Greedy decoding
    returned NaN's argmax as the completion, exit 0; sampling failed with torch's RuntimeError
    ("probability tensor contains inf, nan…") traceback. Now both name the prompt's row."""
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=5)
    with torch.no_grad():
        model.get_input_embeddings().weight[77] = float("nan")
    prompts = [Prompt("a", [1, 5, 6], "p.jsonl", 1), Prompt("b", [1, 8], "p.jsonl", 2),
               Prompt("c", [1, 9, 77, 10], "p.jsonl", 3)]
    for temperature, k in ((0.0, 1), (1.0, 2)):
        with pytest.raises(DpokitError) as caught:
            generate_completions(model, tokenizer, prompts, num_generations=k,
                                 max_new_tokens=3, temperature=temperature)
        message = str(caught.value)
        assert "\n" not in message and message.startswith("p.jsonl, row 3: ")
        assert "not finite" in message and "generated token 1" in message
    ok = generate_completions(model, tokenizer, prompts[:2], max_new_tokens=3, temperature=0.0)
    assert all(len(c.ids) >= 1 for group in ok for c in group)  # finite rows still generate


def test_empty_prompts_and_bad_batch_sizes_are_one_line_errors(tokenizer):
    """A prompt of no tokens: alone an IndexError traceback; beside others it was completed
    from nothing (all padding), silently. batch_size 0: ZeroDivisionError."""
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=5)
    for prompts in ([Prompt("x", [], "p.jsonl", 4)],
                    [Prompt("y", [1, 5], "p.jsonl", 3), Prompt("x", [], "p.jsonl", 4)]):
        with pytest.raises(DpokitError, match=r"^p\.jsonl, row 4: the prompt has no tokens"):
            generate_completions(model, tokenizer, prompts, num_generations=2,
                                 max_new_tokens=2)
    with pytest.raises(DpokitError, match="batch_size must be ≥ 1, got 0"):
        generate_completions(model, tokenizer, [Prompt("y", [1, 5])], batch_size=0)


def test_a_tokenizer_without_a_pad_token_generates_the_same(tokenizer):
    """A tokenizer with no pad token (GPT-2's, passed to the API as is) failed with
    "RuntimeError: Could not infer dtype of NoneType". The pad id is irrelevant (the attention
    mask is explicit): the same seeded completions as with a pad token."""
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=5)
    prompts = [Prompt("", [1, 5]), Prompt("", [1, 5, 6, 7])]
    expected = generate_completions(model, tokenizer, prompts, num_generations=2,
                                    max_new_tokens=4, seed=9)
    no_pad = build_tokenizer()
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    got = generate_completions(model, no_pad, prompts, num_generations=2, max_new_tokens=4,
                               seed=9)
    assert [[c.ids for c in g] for g in got] == [[c.ids for c in g] for g in expected]


# --- rewards --------------------------------------------------------------------------------

def _exits(prompts, completions, **kwargs):
    raise SystemExit(0)


def _a_set(prompts, completions, **kwargs):
    return {3.0, 1.0}


def _huge(prompts, completions, **kwargs):
    return [1.0, 10**400]


def _meta(prompts, completions, **kwargs):
    return [0.0, torch.tensor(1.0, device="meta")]


def _inf(prompts, completions, **kwargs):
    return [0.0, -math.inf]


def _nan_tensor(prompts, completions, **kwargs):
    return torch.tensor([0.0, math.nan])


def _short(prompts, completions, **kwargs):
    return [0.0]


def _words(prompts, completions, **kwargs):
    return ["1.0", "2.0"]


def _raises(prompts, completions, **kwargs):
    return [1.0 / (len(c) - len(c)) for c in completions]


@pytest.mark.parametrize(("fn", "message"), [
    # SystemExit escaped: `dpokit train` ended mid-run with exit 0, no final model
    (_exits, "reward f failed at step 2: SystemExit: 0"),
    # a set was read in hash order (rewards met other completions)
    (_a_set, "reward f returned set, not a list of 2 numbers at step 2"),
    # OverflowError traceback
    (_huge, "reward f returned a non-finite value (inf) for completion 1 (q.jsonl, row 8) at "
            "step 2"),
    # RuntimeError traceback (Tensor.item() on a meta tensor)
    (_meta, "reward f returned a non-number (Tensor tensor(..., device='meta'"),
    (_inf, "reward f returned a non-finite value (-inf) for completion 1 (q.jsonl, row 8)"),
    (_nan_tensor, "reward f returned a non-finite value (nan) for completion 1 (q.jsonl, row 8)"),
    (_short, "reward f returned 1 values for 2 completions at step 2"),
    (_words, "reward f returned a non-number (str '1.0') for completion 0 (p.jsonl, row 7)"),
    (_raises, "reward f failed at step 2: ZeroDivisionError: float division by zero"),
])
def test_bad_rewards_are_one_line_errors_naming_the_reward_and_row(fn, message):
    with pytest.raises(DpokitError) as caught:
        score(fn, "f", ["p", "q"], ["c", "dd"], step=2, rows=["p.jsonl, row 7", "q.jsonl, row 8"])
    assert "\n" not in str(caught.value) and str(caught.value).startswith(message), caught.value


def test_reward_files_and_modules_that_exit_or_are_missing(tmp_path, monkeypatch):
    """A reward file or module calling sys.exit() at import ended the process (status 0 for
    sys.exit()); now a one-line error. A module that does not exist names it."""
    (tmp_path / "exits_at_import_r1.py").write_text("import sys\nsys.exit()\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DpokitError, match=r"importing .*exits_at_import_r1\.py failed "
                                          r"\(SystemExit"):
        load_reward(f"{tmp_path / 'exits_at_import_r1.py'}:fn")
    with pytest.raises(DpokitError, match=r"cannot import exits_at_import_r1 \(SystemExit"):
        load_reward("exits_at_import_r1:fn")
    with pytest.raises(DpokitError) as caught:
        load_reward("no_such_reward_module_r1.sub:fn")
    assert str(caught.value) == ("reward 'no_such_reward_module_r1.sub:fn': cannot import "
                                 "no_such_reward_module_r1.sub (ModuleNotFoundError: No module "
                                 "named 'no_such_reward_module_r1')")


def test_a_reward_file_with_relative_imports(tmp_path, monkeypatch):
    """Named as a file, a reward with `from .helper import …` cannot import (as under `python
    file.py`): one line that says to name it as package.module:function — which works."""
    package = tmp_path / "relative_rewards_r1"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helper.py").write_text("SCALE = 2.5\n")
    (package / "reward.py").write_text(
        "from .helper import SCALE\n\n"
        "def fn(prompts, completions, **kw):\n    return [SCALE * len(c) for c in completions]\n")
    with pytest.raises(DpokitError) as caught:
        load_reward(f"{package / 'reward.py'}:fn")
    message = str(caught.value)
    assert "\n" not in message and "attempted relative import" in message
    assert "name it as package.module:function" in message
    monkeypatch.chdir(tmp_path)
    reward = load_reward("relative_rewards_r1.reward:fn")
    assert score(reward, "r", ["p", "p"], ["ab", "abcd"], step=0) == [5.0, 10.0]


def _classifier(vocab_size, *, max_positions=1024, seed=0):
    from transformers import AutoModelForSequenceClassification

    cfg = tiny_config("llama", vocab_size=vocab_size, max_positions=max_positions)
    cfg.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_config(cfg).eval()


def test_a_reward_model_with_another_tokenizer_scores_the_text(tokenizer, tmp_path):
    """Policy and reward model with different tokenizers (vocabularies 512 and 300, the reward
    one without BOS): each generated completion's reward is the reward model's score of its own
    tokenisation of prompt + completion text, alone (1e-5) — not of the policy's ids."""
    rm_tokenizer = build_tokenizer(vocab_size=300, add_bos=False)
    rm = _classifier(len(rm_tokenizer), seed=4)
    rm.save_pretrained(tmp_path / "rm")
    rm_tokenizer.save_pretrained(tmp_path / "rm")
    policy = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=5)
    texts = ["the cat sat on", "what color is the sky? it is"]
    prompts = [Prompt(t, tokenizer(t)["input_ids"], "p.jsonl", i + 1)
               for i, t in enumerate(texts)]
    groups = generate_completions(policy, tokenizer, prompts, num_generations=2,
                                  max_new_tokens=6, seed=1)
    reward = load_reward(str(tmp_path / "rm"))
    got = score_groups(reward, "rm", texts, groups, step=0, rows=[p.where for p in prompts])
    expected, differ = [], False
    for text, group in zip(texts, groups, strict=True):
        for c in group:
            ids = rm_tokenizer(text + c.text)["input_ids"]
            differ |= ids[-len(c.ids):] != c.ids
            with torch.no_grad():
                expected.append(float(rm(input_ids=torch.tensor([ids])).logits[0, 0]))
    assert differ  # the policy's ids would be other tokens to the reward model
    assert got == pytest.approx(expected, abs=1e-5)


def test_a_reward_model_text_too_long_names_the_row(tokenizer, tmp_path):
    """The "longer than the reward model has positions" error named only the completion's
    index among all of the step's completions; now its data row and generation too."""
    _classifier(len(tokenizer), max_positions=16).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    reward = load_reward(str(tmp_path / "rm"))
    long = " sat on the mat and the dog ran far away under the tree with the moon and sun"
    groups = [[Completion([5], " sat", True)], [Completion([5], " sat", True),
                                                Completion([5] * 20, long, False)]]
    with pytest.raises(DpokitError) as caught:
        score_groups(reward, "rm", ["the cat", "the dog"], groups, step=3,
                     rows=["p.jsonl, row 1", "p.jsonl, row 2"])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("reward rm failed at step 3: completion 2 (p.jsonl, row 2, "
                              "generation 2) with its prompt is")
