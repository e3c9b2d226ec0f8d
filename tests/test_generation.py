"""Generation (`dpokit.generation`, `dpokit generate`): greedy decoding against a step-by-step
argmax oracle, sampling against the model's exact next-token distribution, seeding, errors."""

import json

import pytest
import torch

from dpokit.data import TokenizeSettings
from dpokit.data.prompts import Prompt, load_prompts, tokenize_prompt
from dpokit.fixtures import tiny_causal_lm
from dpokit.generation import generate_completions
from tests.helpers import run_cli, write_jsonl

PROMPTS = ["the cat sat", "what color is the sky? it is", "a"]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=5).eval()


def _prompts(tokenizer, texts=PROMPTS):
    return [Prompt(t, tokenize_prompt(t, tokenizer, TokenizeSettings())) for t in texts]


@torch.no_grad()
def _greedy_oracle(model, ids, eos, max_new_tokens):
    """One unpadded sequence, the full forward each step, argmax of the last logits."""
    out = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] == eos:
            break
    return out


@pytest.mark.parametrize(("num_generations", "batch_size"), [(1, 3), (3, 6), (2, 64), (5, 2)])
def test_greedy_equals_the_argmax_oracle_in_left_padded_batches(model, tokenizer,
                                                               num_generations, batch_size):
    """Every generation of every prompt, in left-padded batches (with more than one generation
    the prompt's cache is computed once and shared), equals the one-prompt argmax oracle."""
    prompts = _prompts(tokenizer)
    got = generate_completions(model, tokenizer, prompts, max_new_tokens=6, temperature=0.0,
                               batch_size=batch_size, num_generations=num_generations)
    assert len({len(p.prompt_ids) for p in prompts}) > 1  # padding is exercised
    for prompt, group in zip(prompts, got, strict=True):
        expected = _greedy_oracle(model, prompt.prompt_ids, tokenizer.eos_token_id, 6)
        assert len(group) == num_generations
        for completion in group:
            assert completion.ids == expected
            assert completion.eos == (expected[-1] == tokenizer.eos_token_id)
            assert completion.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_sampling_follows_the_model_distribution_and_is_seeded(model, tokenizer):
    """2,000 one-token samples of one prompt: every token's frequency within 4.5σ of the
    model's softmax probability (temperature 1, no top-k/top-p: the exact distribution)."""
    (prompt,) = _prompts(tokenizer, ["the cat sat"])
    n = 2000
    state = torch.get_rng_state()
    (samples,) = generate_completions(model, tokenizer, [prompt], num_generations=n,
                                      max_new_tokens=1, temperature=1.0, seed=3, batch_size=500)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    with torch.no_grad():
        probs = model(input_ids=torch.tensor([prompt.prompt_ids])).logits[0, -1].softmax(-1)
    counts = torch.bincount(torch.tensor([c.ids[0] for c in samples]),
                            minlength=len(probs)).double()
    sigma = (n * probs.double() * (1 - probs.double())).sqrt()
    assert ((counts - n * probs.double()).abs() <= 4.5 * sigma + 1.0).all()
    again = generate_completions(model, tokenizer, [prompt], num_generations=50,
                                 max_new_tokens=4, seed=3)
    same = generate_completions(model, tokenizer, [prompt], num_generations=50,
                                max_new_tokens=4, seed=3)
    other = generate_completions(model, tokenizer, [prompt], num_generations=50,
                                 max_new_tokens=4, seed=4)
    assert [c.ids for c in again[0]] == [c.ids for c in same[0]]
    assert [c.ids for c in again[0]] != [c.ids for c in other[0]]


def test_generate_command_writes_samples(model, tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "the cat sat", "chosen": "ignored"},
        {"prompt": [{"role": "user", "content": "what color is the sky?"}]}])
    out = tmp_path / "samples.jsonl"
    code, stdout, err = run_cli(capsys, "generate", "--model", str(model_dir), "--data",
                                str(data), "--output", str(out), "--num-generations", "2",
                                "--max-new-tokens", "5", "--temperature", "0")
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and "wrote 4 completions" in stdout
    assert records[0]["completion"] == records[1]["completion"]  # greedy: the same twice
    assert all(1 <= r["tokens"] <= 5 and isinstance(r["eos"], bool) for r in records)
    chat = load_prompts(data, tokenizer)[1]
    expected = tokenizer.apply_chat_template(chat.prompt, tokenize=True,
                                             add_generation_prompt=True, return_dict=True)
    assert chat.prompt_ids == list(expected["input_ids"])  # the chat template, generation prompt
    assert records[2]["prompt"] == [{"role": "user", "content": "what color is the sky?"}]


def test_generate_scores_samples_with_a_reward(model, tokenizer, tmp_path, capsys):
    """--reward adds each completion's reward (here: characters, and the token count from
    completion_ids); a reward returning NaN is a one-line error naming it, and writes nothing."""
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "r.py").write_text(
        "def chars(prompts, completions, completion_ids, **kw):\n"
        "    return [len(c) + 1000 * len(i) for c, i in zip(completions, completion_ids)]\n"
        "def nan(prompts, completions, **kw):\n"
        "    return [float('nan')] * len(completions)\n")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the cat sat"}] * 2)
    out = tmp_path / "samples.jsonl"
    argv = ["generate", "--model", str(model_dir), "--data", str(data), "--output", str(out),
            "--num-generations", "3", "--max-new-tokens", "6"]
    code, _, err = run_cli(capsys, *argv, "--reward", f"{tmp_path / 'r.py'}:chars")
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6
    for r in records:
        assert r["reward"] == len(r["completion"]) + 1000 * r["tokens"]
    out.unlink()
    code, _, err = run_cli(capsys, *argv, "--reward", f"{tmp_path / 'r.py'}:nan")
    assert code == 2 and err.count("\n") == 1 and "returned a non-finite value (nan)" in err
    assert not out.exists()


@pytest.mark.parametrize(("rows", "flags", "message"), [
    ([{"text": "x"}], [], "row 1, field 'prompt': missing"),
    ([{"prompt": 3}], [], "row 1, field 'prompt': expected a non-empty string"),
    ([{"prompt": "x"}], ["--temperature", "-1"], "temperature must be a finite number ≥ 0"),
    ([{"prompt": "x"}], ["--top-p", "0"], "top_p must be in (0, 1]"),
    ([{"prompt": "x"}], ["--max-new-tokens", "0"], "max_new_tokens must be ≥ 1"),
])
def test_generate_errors_are_one_line(model, tokenizer, tmp_path, capsys, rows, flags, message):
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    code, out, err = run_cli(capsys, "generate", "--model", str(model_dir), "--data", str(data),
                             "--output", str(tmp_path / "s.jsonl"), *flags)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "s.jsonl").exists()
