"""TRL's tokenisation convention: EOS on text completions, the prompt as the common prefix."""

import logging

import pytest

from dpokit.data import RawRow, TokenizeSettings, parse_examples, tokenize_examples
from dpokit.data.tokenize import common_prefix_length
from dpokit.errors import DpokitError


def examples(*fields_list):
    return parse_examples([RawRow("d.jsonl", i + 1, f) for i, f in enumerate(fields_list)])


def test_plain_text_tokens_match_the_tokenizer_on_the_full_strings(tokenizer):
    """prompt_ids + chosen_ids is exactly tokenizer(prompt + chosen + EOS)."""
    (pair,) = tokenize_examples(examples(
        {"prompt": "the cat sat", "chosen": " on the mat.", "rejected": " under a tree"}),
        tokenizer)
    full_chosen = tokenizer("the cat sat on the mat.</s>")["input_ids"]
    full_rejected = tokenizer("the cat sat under a tree</s>")["input_ids"]
    assert pair.prompt_ids + pair.chosen_ids == full_chosen
    assert pair.prompt_ids + pair.rejected_ids == full_rejected
    assert pair.prompt_ids[0] == tokenizer.bos_token_id
    assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tokenizer.eos_token_id
    assert pair.prompt_ids == tokenizer("the cat sat")["input_ids"]


def test_eos_is_not_doubled(tokenizer):
    (pair,) = tokenize_examples(examples(
        {"prompt": "the cat", "chosen": " sat</s>", "rejected": " ran"}), tokenizer)
    assert pair.chosen_ids.count(tokenizer.eos_token_id) == 1


def test_chat_template_puts_the_generation_prompt_on_the_prompt_side(tokenizer):
    user = {"role": "user", "content": "what color is the sky?"}
    (pair,) = tokenize_examples(examples(
        {"prompt": [user], "chosen": {"role": "assistant", "content": "blue"},
         "rejected": {"role": "assistant", "content": "green sea"}}), tokenizer)
    assert tokenizer.decode(pair.prompt_ids).endswith("<|assistant|>\n")
    assert tokenizer.decode(pair.chosen_ids) == "blue</s>\n"
    expected = tokenizer.apply_chat_template(
        [user, {"role": "assistant", "content": "green sea"}], tokenize=True,
        return_dict=True)["input_ids"]
    assert pair.prompt_ids + pair.rejected_ids == list(expected)


def test_merge_across_the_boundary_shortens_the_prompt_and_warns_once(tokenizer, caplog):
    """'the ca' + 't sat' tokenises 'cat' as one token: the prompt is the common prefix."""
    rows = examples({"prompt": "the ca", "chosen": "t sat", "rejected": "t ran"},
                    {"prompt": "the do", "chosen": "g sat", "rejected": "g ran"})
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        pairs = tokenize_examples(rows, tokenizer)
    for pair, text in zip(pairs, ("the cat sat</s>", "the dog sat</s>"), strict=True):
        assert pair.prompt_ids + pair.chosen_ids == tokenizer(text)["input_ids"]
        assert pair.prompt_ids != tokenizer(text[:6])["input_ids"]
    assert caplog.text.count("is not a prefix of prompt+completion") == 1
    assert "2 of 2 rows had their prompt shortened" in caplog.text


def test_truncation_sides_and_limits(tokenizer):
    prompt = "the quick brown fox jumps over the lazy dog and the cat"
    rows = examples({"prompt": prompt, "chosen": " sat on the mat under the tree",
                     "rejected": " ran"})
    (full,) = tokenize_examples(rows, tokenizer, TokenizeSettings(max_length=None))
    (pair,) = tokenize_examples(rows, tokenizer, TokenizeSettings(
        max_length=len(full.prompt_ids) - 3 + 4, max_prompt_length=len(full.prompt_ids) - 3))
    assert pair.prompt_ids == full.prompt_ids[3:]  # left: keep the end of the prompt
    assert pair.chosen_ids == full.chosen_ids[:4]  # right: keep the start of the completion
    assert pair.rejected_ids == full.rejected_ids  # short enough already
    (pair,) = tokenize_examples(rows, tokenizer, TokenizeSettings(
        max_length=len(full.prompt_ids) + 2, prompt_truncation="right",
        completion_truncation="left"))
    assert pair.prompt_ids == full.prompt_ids
    assert pair.chosen_ids == full.chosen_ids[-2:]
    assert len(pair.prompt_ids) + len(pair.chosen_ids) <= len(full.prompt_ids) + 2


def test_rows_left_empty_by_truncation_are_dropped_and_counted(tokenizer, caplog):
    rows = examples({"prompt": "the quick brown fox jumps over the lazy dog", "chosen": " a",
                     "rejected": " b"}, {"prompt": "hi", "chosen": " yes", "rejected": " no"})
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        pairs = tokenize_examples(rows, tokenizer, TokenizeSettings(max_length=6))
    assert [p.row for p in pairs] == [2]
    assert "dropped 1 of 2 rows whose completion is empty" in caplog.text
    with pytest.raises(DpokitError, match="no rows left after truncation"):
        tokenize_examples(rows[:1], tokenizer, TokenizeSettings(max_length=6))


def test_chat_data_without_a_template_is_a_clear_error(tokenizer):
    from dpokit.fixtures import build_tokenizer

    bare = build_tokenizer(chat_template=False)
    rows = examples({"prompt": [{"role": "user", "content": "hi"}],
                     "chosen": {"role": "assistant", "content": "yes"},
                     "rejected": {"role": "assistant", "content": "no"}})
    with pytest.raises(DpokitError, match="needs a tokenizer with a chat template"):
        tokenize_examples(rows, bare)
    (pair,) = tokenize_examples(rows, bare, TokenizeSettings(text_mode="plain"))
    assert bare.decode(pair.prompt_ids, skip_special_tokens=True) == "user: hi\n"
    assert bare.decode(pair.chosen_ids) == "assistant: yes\n</s>"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_length": 0}, "max_length must be ≥ 1"),
    ({"prompt_truncation": "middle"}, "prompt_truncation must be"),
    ({"text_mode": "html"}, "text_mode must be"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(DpokitError, match=message):
        TokenizeSettings(**kwargs)


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0
