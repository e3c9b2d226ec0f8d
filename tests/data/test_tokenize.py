"""TRL's tokenisation convention: EOS on text completions, the prompt as the common prefix."""

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpokit.data import RawRow, TokenizeSettings, parse_examples, tokenize_examples
from dpokit.data.tokenize import common_prefix_length, truncate_to_length
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


def trl_sequence(prompt, completion, limit, mode):
    """TRL 1.16's DataCollatorForPreference truncation of one sequence (the oracle):
    ``(prompt + completion)[:L]`` (keep_start) or ``[-L:]`` (keep_end), with its mask."""
    ids, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
    cut = slice(None, limit) if mode == "keep_start" else slice(-limit, None)
    return ids[cut], mask[cut]


@settings(max_examples=300, deadline=None)
@given(p=st.integers(1, 12), c=st.integers(1, 12), r=st.integers(1, 12), limit=st.integers(2, 16),
       mode=st.sampled_from(["keep_start", "keep_end"]))
def test_truncation_mode_against_trl_per_sequence(p, c, r, limit, mode):
    """Both modes keep every sequence within max_length. keep_start equals TRL's per-sequence
    cut whenever the prompt fits; keep_end equals it for the longer completion when that one
    fits with a prompt token, keeps the shorter completion whole then, and gives it a suffix of
    TRL's sequence (the shared prompt loses the same tokens for both). A completion of
    max_length or more leaves no shared prompt: the pair is dropped (empty completions)."""
    prompt, chosen, rejected = list(range(p)), list(range(100, 100 + c)), list(range(200, 200 + r))
    kept_prompt, (kept_c, kept_r) = truncate_to_length(
        prompt, [chosen, rejected], TokenizeSettings(max_length=limit, truncation_mode=mode))
    for kept, whole in ((kept_c, chosen), (kept_r, rejected)):
        assert len(kept_prompt) + len(kept) <= limit or not kept
        ids, mask = trl_sequence(prompt, whole, limit, mode)
        ours = kept_prompt + kept
        if mode == "keep_start" and p < limit:
            assert ours == ids and [0] * len(kept_prompt) + [1] * len(kept) == mask
        if mode == "keep_end" and max(c, r) >= limit:
            assert kept_c == kept_r == []  # no shared prompt fits: the pair is dropped
        elif mode == "keep_end":
            assert kept_prompt and kept_prompt == prompt[len(prompt) - len(kept_prompt):]
            assert kept == whole  # the completions are kept whole
            assert ours == ids[len(ids) - len(ours):]  # a suffix of TRL's
            if len(whole) == max(c, r):
                assert ours == ids and [0] * len(kept_prompt) + [1] * len(kept) == mask


def test_keep_end_through_the_tokenizer_and_sft(tokenizer, tmp_path):
    """keep_end on real rows: the prompt's start goes, the completions stay; SFT (one
    sequence) equals TRL's ``[-L:]`` exactly."""
    import json

    from dpokit.data.sft import load_sft_sequences

    prompt = "the quick brown fox jumps over the lazy dog and the cat"
    rows = examples({"prompt": prompt, "chosen": " sat on the mat", "rejected": " ran"})
    (full,) = tokenize_examples(rows, tokenizer, TokenizeSettings(max_length=None))
    limit = len(full.chosen_ids) + 3
    (pair,) = tokenize_examples(rows, tokenizer, TokenizeSettings(max_length=limit,
                                                                  truncation_mode="keep_end"))
    assert pair.prompt_ids == full.prompt_ids[-3:]
    assert (pair.chosen_ids, pair.rejected_ids) == (full.chosen_ids, full.rejected_ids)
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": prompt, "completion": " sat on the mat"}) + "\n")
    (whole,) = load_sft_sequences(data, tokenizer, settings=TokenizeSettings(max_length=None))
    (cut,) = load_sft_sequences(data, tokenizer, settings=TokenizeSettings(
        max_length=limit, truncation_mode="keep_end"))
    ids, mask = trl_sequence(whole.prompt_ids, whole.completion_ids, limit, "keep_end")
    assert cut.prompt_ids + cut.completion_ids == ids
    assert [0] * len(cut.prompt_ids) + [1] * len(cut.completion_ids) == mask
    short = len(whole.completion_ids) - 2  # the completion alone is longer than max_length
    (end,) = load_sft_sequences(data, tokenizer, settings=TokenizeSettings(
        max_length=short, truncation_mode="keep_end"))
    ids, mask = trl_sequence(whole.prompt_ids, whole.completion_ids, short, "keep_end")
    assert end.prompt_ids + end.completion_ids == ids  # TRL's last L tokens
    assert len(end.prompt_ids) == 1 and len(end.completion_ids) == sum(mask[1:])  # the scored


def test_backend_ids_equal_the_tokenizers_and_a_disagreement_falls_back(tokenizer):
    """``batch_ids`` reads the Rust backend directly only after it gave the tokenizer's own ids
    on a first batch — texts with special-token strings, unicode, whitespace runs — and a backend
    that disagrees is never used."""
    from dpokit.data.tokenize import batch_ids

    texts = ["hello world</s>", "<s> a  b\n\tc", "ünïcödé ☃ 文字", "", "x" * 300, " lead"]
    direct = {}
    assert batch_ids(tokenizer, texts, direct) == tokenizer(texts)["input_ids"]
    assert direct == {"ok": True}
    assert batch_ids(tokenizer, texts[::-1], direct) == tokenizer(texts[::-1])["input_ids"]

    class Wrong:
        backend_tokenizer = type("B", (), {"encode_batch": staticmethod(
            lambda texts, add_special_tokens: [type("E", (), {"ids": [0]})() for _ in texts])})()

        def __call__(self, texts):
            return tokenizer(texts)

    wrong, verdict = Wrong(), {}
    assert batch_ids(wrong, texts, verdict) == tokenizer(texts)["input_ids"]
    assert verdict == {"ok": False}
    assert batch_ids(wrong, texts, verdict) == tokenizer(texts)["input_ids"]


def test_the_backend_is_checked_once_per_tokenizer_not_per_chunk(tokenizer):
    """A large file is tokenised chunk by chunk: the backend-vs-tokenizer comparison (a second,
    plain encoding of the batch) runs on the first chunk's three columns only, and every chunk
    still gets the tokenizer's own ids."""
    import copy

    plain_calls = []

    class Counting(type(tokenizer)):
        def __call__(self, texts, *args, **kwargs):
            plain_calls.append(len(texts))
            return super().__call__(texts, *args, **kwargs)

    counting = copy.deepcopy(tokenizer)
    counting.__class__ = Counting
    rows = [{"prompt": f"the cat {i}", "chosen": " sat.", "rejected": " ran away"}
            for i in range(6)]
    first = tokenize_examples(examples(*rows[:3]), counting)
    assert plain_calls == [3, 3, 3]  # prompt, chosen, rejected columns of the first chunk
    second = tokenize_examples(examples(*rows[3:]), counting)
    assert plain_calls == [3, 3, 3]
    ids = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in first + second]
    assert ids == [(p.prompt_ids, p.chosen_ids, p.rejected_ids)
                   for p in tokenize_examples(examples(*rows), tokenizer)]
