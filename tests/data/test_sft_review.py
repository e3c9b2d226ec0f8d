"""SFT rows → trained tokens, loss and metrics against an independent re-implementation of TRL
1.16's SFTTrainer (review): ``tokenize_fn`` + ``build_labels`` + the ``[:L]`` / ``[-L:]``
truncation, the float64 masked NLL of the model's own logits divided by the trained tokens
(``num_items_in_batch``: ``labels[..., 1:] != -100``), TRL's ``entropy`` and
``mean_token_accuracy`` over those tokens, and ``num_tokens`` (``attention_mask.sum()``: every
input token, a chat template's untrained tokens after the assistant mask included).

Pinned bugs: ``num_tokens`` left out the template's tokens after a ``{% generation %}`` span
(1 a row lower than TRL's here); ``assistant_only_loss`` on a ``text`` or plain prompt-completion
row trained the whole text / the completion where TRL refuses the data."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from dpokit.data import TokenizeSettings
from dpokit.data.sft import load_sft_sequences
from dpokit.errors import DpokitError
from dpokit.fixtures import tiny_causal_lm
from dpokit.objectives.sft import SFTObjective
from tests.helpers import read_metrics, run_cli, write_jsonl

SYSTEM = {"role": "system", "content": "be brief"}
USER = {"role": "user", "content": "what color is the sky?"}

GENERATION_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '</s>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ m['content'] + '</s>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
"""Assistant mask ``content</s>``; the ``\\n`` after it is rendered, untrained (the tail)."""


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def gen_tokenizer(tokenizer):
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = GENERATION_TEMPLATE
    return copied


def _chat(tok, messages, **kwargs):
    return tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def trl_example(tok, row, *, completion_only_loss, assistant_only_loss, max_length=None,
                truncation_mode="keep_start"):
    """TRL 1.16's SFT preparation of one row (re-implemented from sft_trainer.py 1292-1464,
    tokenising with the tokenizer directly): ``(input_ids, labels)`` after truncation, or
    None where TRL's filter drops the row. ``completion_only_loss`` None is TRL's rule."""
    if completion_only_loss is None:
        completion_only_loss = "prompt" in row and "completion" in row
    masks = []
    if "prompt" in row and isinstance(row["prompt"], list):  # conversational prompt-completion
        prompt = _chat(tok, row["prompt"], add_generation_prompt=True)["input_ids"]
        full = _chat(tok, row["prompt"] + row["completion"],
                     return_assistant_tokens_mask=assistant_only_loss)
        ids = list(full["input_ids"])
        n = _common(prompt, ids)
        if completion_only_loss:
            masks.append([0] * n + [1] * (len(ids) - n))
        if assistant_only_loss:
            masks.append(list(full["assistant_masks"]))
    elif "prompt" in row:  # plain prompt-completion: EOS appended
        completion = row["completion"]
        completion += "" if completion.endswith(tok.eos_token) else tok.eos_token
        prompt = tok(row["prompt"])["input_ids"]
        ids = tok(row["prompt"] + completion)["input_ids"]
        n = _common(prompt, ids)
        if completion_only_loss:
            masks.append([0] * n + [1] * (len(ids) - n))
    elif "messages" in row:
        full = _chat(tok, row["messages"], return_assistant_tokens_mask=assistant_only_loss)
        ids = list(full["input_ids"])
        if assistant_only_loss:
            masks.append(list(full["assistant_masks"]))
    else:
        text = row["text"]
        ids = tok(text if text.endswith(tok.eos_token) else text + tok.eos_token)["input_ids"]
    labels = [t if all(bits) else -100 for t, *bits in zip(ids, *masks, strict=True)]
    if max_length is not None:
        window = slice(None, max_length) if truncation_mode == "keep_start" else slice(
            -max_length, None)
        ids, labels = ids[window], labels[window]
        if all(label == -100 for label in labels):
            return None
    return ids, labels


def _write(tmp_path, rows, name="rows.jsonl"):
    return write_jsonl(tmp_path / name, rows)


def _trained(seq):
    """The positions dpokit trains in its sequence (prompt + completion): the completion's."""
    return [i >= len(seq.prompt_ids) for i in range(len(seq.prompt_ids) + len(seq.completion_ids))]


# --- num_tokens: every input token of TRL's attention mask -----------------------------------

@pytest.mark.parametrize(("max_length", "mode"), [
    (None, "keep_start"), (64, "keep_start"), (50, "keep_start"), (49, "keep_start"),
    (3, "keep_end"), (8, "keep_end"), (64, "keep_end")])
def test_num_tokens_counts_the_template_tokens_after_the_assistant_mask(
        gen_tokenizer, tmp_path, max_length, mode):
    """TRL's ``num_tokens`` adds ``attention_mask.sum()``: the whole (truncated) rendering,
    the ``\\n`` after ``</s>`` included; dpokit counted the trained sequence only (1 a row
    lower: fails on the old code in every case, each keeps at least one newline). The trained
    tokens are TRL's exactly (oracle: the rendering's assistant mask, truncated by TRL's
    slice)."""
    tok = gen_tokenizer
    rows = [{"messages": [SYSTEM, USER, assistant("blue sky")]},
            {"prompt": [USER], "completion": [assistant("green sea and a red sun")]}]
    settings = TokenizeSettings(max_length=max_length, truncation_mode=mode)
    got = load_sft_sequences(_write(tmp_path, rows), tok, settings=settings,
                             assistant_only_loss=True)
    expected = [trl_example(tok, r, completion_only_loss=True, assistant_only_loss=True,
                            max_length=max_length, truncation_mode=mode) for r in rows]
    assert len(got) == len(expected) and None not in expected
    objective = SFTObjective(SimpleNamespace(padding_free=False), tok)
    batch = objective.collate(list(got), range(len(got)))
    assert batch.extras["input_tokens"].tolist() == [len(ids) for ids, _ in expected]
    kept_newline = 0
    for seq, (ids, labels) in zip(got, expected, strict=True):
        n = len(seq.prompt_ids) + len(seq.completion_ids)
        assert seq.prompt_ids + seq.completion_ids == ids[:n]
        # the first token is never predicted (TRL counts labels[..., 1:])
        assert _trained(seq)[1:] == [label != -100 for label in labels[1:n]]
        assert all(label == -100 for label in labels[n:])
        kept_newline += len(ids) - n
    # keep_start 50 cuts the first row's newline (TRL's [:50]), not the second's
    assert kept_newline == (1 if max_length in (49, 50) else 2)


def test_num_tokens_logged_by_a_training_run_is_trls(gen_tokenizer, tmp_path):
    """End to end: ``dpokit sft`` with ``assistant_only_loss`` logs TRL's ``num_tokens``,
    Σ over the step's rows of their rendered tokens (the old code logged 4 fewer: one
    untrained newline per row)."""
    from dpokit.train.config import SFTConfig
    from dpokit.train.loop import train
    from tests.train.test_trainer import config

    model_dir = tmp_path / "model"
    tiny_causal_lm("llama", vocab_size=len(gen_tokenizer), seed=3).save_pretrained(model_dir)
    gen_tokenizer.save_pretrained(model_dir)
    rows = [{"messages": [USER, assistant(" ".join(["blue"] * (i + 1)))]} for i in range(4)]
    data = _write(tmp_path, rows)
    cfg = config(tmp_path, "run", SFTConfig, model=str(model_dir), data=str(data),
                 max_steps=1, batch_size=4, assistant_only_loss=True)
    record = read_metrics(train(cfg, progress=False).parent)[0]
    expected = sum(len(_chat(gen_tokenizer, r["messages"])["input_ids"]) for r in rows)
    assert record["num_tokens"] == expected


# --- assistant_only_loss needs conversational rows -------------------------------------------

@pytest.mark.parametrize("row", [{"text": "the cat sat on the mat"},
                                 {"prompt": "the cat", "completion": " sat"}],
                         ids=["text", "prompt-completion"])
def test_assistant_only_loss_refuses_a_plain_text_row_naming_it(tokenizer, tmp_path, row):
    """TRL raises "You set `assistant_only_loss=True`, but the dataset is not
    conversational"; the old code trained the whole text (or the completion) in silence."""
    conversation = {"messages": [USER, assistant("blue")]}
    path = _write(tmp_path, [conversation, row])
    with pytest.raises(DpokitError, match=r"rows\.jsonl, row 2, .*assistant_only_loss needs "
                                          r"conversational rows"):
        load_sft_sequences(path, tokenizer, assistant_only_loss=True)
    assert len(load_sft_sequences(path, tokenizer)) == 2  # trained without the flag


def test_assistant_only_loss_on_text_rows_is_one_line_from_the_cli(workdir, tmp_path, capsys):
    data = _write(tmp_path, [{"text": "the cat sat on the mat"}])
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump({"model": str(workdir / "llama"), "data": str(data),
                                    "output_dir": str(tmp_path / "out"), "max_steps": 1,
                                    "assistant_only_loss": True}))
    code, _, err = run_cli(capsys, "sft", "--config", str(path))
    lines = [x for x in err.splitlines() if "dpokit: error" in x]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "row 1" in lines[0] and "assistant_only_loss" in lines[0], lines[0]
    assert not (tmp_path / "out" / "final").exists()


# --- the loss and metrics against a float64 oracle of TRL's -----------------------------------

CASES = [
    # (rows, completion_only_loss, assistant_only_loss, max_length, truncation_mode)
    ("pc", None, False, None, "keep_start"),
    ("pc", False, False, 10, "keep_start"),
    ("pc", True, False, 10, "keep_end"),
    ("messages", None, False, 16, "keep_end"),
    ("messages", None, True, None, "keep_start"),
    ("messages", True, True, 13, "keep_end"),
    ("chat_pc", None, True, 30, "keep_start"),  # the first row's prompt fills 30: dropped
    ("chat_pc", True, True, 20, "keep_end"),
    ("chat_pc", False, False, None, "keep_start"),
    ("text", None, False, 6, "keep_start"),
]
"""Each cuts at least one row where it sets ``max_length`` (lengths 5-51 tokens)."""

ROWS = {
    "pc": [{"prompt": "the cat", "completion": " sat on the mat"},
           {"prompt": "why is the sun red?", "completion": " the sky is blue"},
           {"prompt": "", "completion": "a bird flew</s>"}],
    "messages": [{"messages": [SYSTEM, USER, assistant("blue sky")]},
                 {"messages": [USER, assistant("the quick brown fox jumps over the dog")]}],
    "chat_pc": [{"prompt": [SYSTEM, USER], "completion": [assistant("green")]},
                {"prompt": [USER], "completion": [assistant("red sea under the moon")]}],
    "text": [{"text": "the cat sat on the mat"}, {"text": "a dog ran under a tree"}],
}


def _oracle(model, examples):
    """TRL's loss (Σ masked NLL / Σ trained tokens, ``labels[..., 1:]``), entropy and token
    accuracy over a batch, each sequence alone through the float64 model."""
    model64 = copy.deepcopy(model).double()
    nll = entropy = hits = count = 0.0
    with torch.no_grad():
        for ids, labels in examples:
            log_probs = model64(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            targets = torch.tensor(labels[1:])
            keep = targets != -100
            lp = log_probs[keep]
            nll -= float(lp.gather(-1, targets[keep, None]).sum())
            entropy -= float((lp.exp() * lp).sum())
            hits += float((lp.argmax(-1) == targets[keep]).sum())
            count += int(keep.sum())
    return {"loss": nll / count, "entropy": entropy / count, "mean_token_accuracy": hits / count,
            "num_tokens": float(sum(len(ids) for ids, _ in examples))}


@pytest.mark.parametrize(("kind", "completion_only_loss", "assistant_only_loss", "max_length",
                          "mode"), CASES)
@pytest.mark.parametrize("padding_free", [False, True])
def test_loss_and_metrics_equal_trls_float64(gen_tokenizer, tmp_path, kind, completion_only_loss,
                                             assistant_only_loss, max_length, mode,
                                             padding_free):
    """One global batch through :class:`SFTObjective` (``loss_normalization: token``, padded
    or packed) against the oracle: loss to 1e-5 (float32 forward against float64), entropy to
    1e-4, the token accuracy and num_tokens exactly."""
    tok = gen_tokenizer
    rows = ROWS[kind]
    settings = TokenizeSettings(max_length=max_length, truncation_mode=mode)
    got = list(load_sft_sequences(_write(tmp_path, rows), tok, settings=settings,
                                  completion_only_loss=completion_only_loss,
                                  assistant_only_loss=assistant_only_loss))
    expected = [trl_example(tok, r, completion_only_loss=completion_only_loss,
                            assistant_only_loss=assistant_only_loss, max_length=max_length,
                            truncation_mode=mode) for r in rows]
    expected = [e for e in expected if e is not None and any(x != -100 for x in e[1][1:])]
    assert len(got) == len(expected) > 0
    model = tiny_causal_lm("llama", vocab_size=len(tok), seed=5)
    cfg = SimpleNamespace(padding_free=padding_free, chunk_size=7, unpadded=True,
                          loss_normalization="token")
    objective = SFTObjective(cfg, tok)
    policy = objective.policy(model).train()
    out = objective.forward(policy, objective.collate(got, range(len(got))))
    scaled = float(out.loss_sum.detach()) / objective.units(got)  # the loop's scale, one rank
    means = objective.means({k: float(v) for k, v in out.sums.items()})
    oracle = _oracle(model, expected)
    assert scaled == pytest.approx(oracle["loss"], abs=1e-5)
    assert means["loss"] == pytest.approx(oracle["loss"], abs=1e-5)
    assert means["entropy"] == pytest.approx(oracle["entropy"], abs=1e-4)
    assert means["mean_token_accuracy"] == oracle["mean_token_accuracy"]
    assert means["num_tokens"] == oracle["num_tokens"]


def test_the_trl_oracle_tells_the_cases_apart(gen_tokenizer):
    """The oracle is not vacuous: the generation template's assistant mask leaves the newline
    after ``</s>`` out, and keep_end keeps the end where keep_start keeps the start."""
    row = {"messages": [USER, assistant("blue sky")]}
    ids, labels = trl_example(gen_tokenizer, row, completion_only_loss=None,
                              assistant_only_loss=True)
    assert gen_tokenizer.decode(ids[-1]) == "\n" and labels[-1] == -100 and labels[-2] != -100
    start = trl_example(gen_tokenizer, row, completion_only_loss=None, assistant_only_loss=False,
                        max_length=5)
    end = trl_example(gen_tokenizer, row, completion_only_loss=None, assistant_only_loss=False,
                      max_length=5, truncation_mode="keep_end")
    assert start[0] == ids[:5] and end[0] == ids[-5:]
    assert json.dumps(start) != json.dumps(end)
