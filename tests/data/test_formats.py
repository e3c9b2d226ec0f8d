"""The preference formats users have, and bad rows named by file, row and field."""

import logging

import pytest

from dpokit.data import ColumnMap, RawRow, parse_example, parse_examples
from dpokit.errors import DpokitError

USER = {"role": "user", "content": "What color is the sky?"}
BLUE = {"role": "assistant", "content": "It is blue."}
GREEN = {"role": "assistant", "content": "It is green."}


def row(fields, number=7):
    return RawRow("prefs.jsonl", number, fields)


def test_standard_format_with_weight_and_margin():
    example = parse_example(row({"prompt": "The sky is", "chosen": " blue.",
                                 "rejected": " green.", "weight": "0.5", "margin": 2}))
    assert (example.prompt, example.chosen, example.rejected) == ("The sky is", " blue.", " green.")
    assert (example.weight, example.margin) == (0.5, 2.0)
    assert not example.conversational and example.where == "prefs.jsonl, row 7"


def test_conversational_single_message_or_list():
    example = parse_example(row({"prompt": [USER], "chosen": BLUE, "rejected": [GREEN]}))
    assert example.conversational
    assert example.prompt == [USER] and example.chosen == [BLUE] and example.rejected == [GREEN]


def test_implicit_prompt_conversations_share_a_prefix():
    example = parse_example(row({"chosen": [USER, BLUE], "rejected": [USER, GREEN]}))
    assert example.prompt == [USER] and example.chosen == [BLUE] and example.rejected == [GREEN]


def test_implicit_prompt_text_keeps_the_space_in_the_completion():
    example = parse_example(row({"chosen": "The sky is blue.", "rejected": "The sky is green."}))
    assert (example.prompt, example.chosen, example.rejected) == ("The sky is", " blue.", " green.")


def test_column_mapping():
    columns = ColumnMap(prompt="question", chosen="good", rejected="bad", weight="w")
    example = parse_example(row({"question": "q?", "good": " a", "bad": " b", "w": 3}), columns)
    assert (example.prompt, example.chosen, example.rejected, example.weight) == (
        "q?", " a", " b", 3.0)


@pytest.mark.parametrize(("fields", "message"), [
    ({"prompt": "p", "rejected": "b"}, "field 'chosen': missing"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "field 'chosen': expected a string"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "field 'prompt': expected a string"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "field 'chosen': empty completion"),
    ({"prompt": [USER], "chosen": {"role": "assistant", "content": ""}, "rejected": GREEN},
     "field 'chosen': empty completion"),
    ({"prompt": [USER], "chosen": [{"role": "robot", "content": "x"}], "rejected": [GREEN]},
     "field 'chosen': message 0 has unknown role 'robot'"),
    ({"prompt": [{"content": "x"}], "chosen": [BLUE], "rejected": [GREEN]},
     "field 'prompt': message 0 must be an object with 'role' and 'content'"),
    ({"prompt": [USER], "chosen": [{"role": "assistant", "content": 3}], "rejected": [GREEN]},
     "message 0 content must be a string"),
    ({"prompt": "p", "chosen": "a\ud800", "rejected": "b"}, "field 'chosen': undecodable text"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "weight": "heavy"},
     "field 'weight': expected a number, got 'heavy'"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")},
     "field 'margin': expected a finite number"),
    ({"chosen": [BLUE], "rejected": [GREEN]}, "field 'prompt': missing, and chosen/rejected"),
])
def test_bad_rows_name_file_row_and_field(fields, message):
    with pytest.raises(DpokitError) as info:
        parse_example(row(fields))
    assert str(info.value).startswith("prefs.jsonl, row 7, field ")
    assert message in str(info.value)


def test_identical_pairs_warn_with_count(caplog):
    rows = [row({"prompt": "p", "chosen": "same", "rejected": "same"}, 1),
            row({"prompt": "p", "chosen": "a", "rejected": "b"}, 2),
            row({"prompt": "q", "chosen": "x", "rejected": "x"}, 3)]
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        examples = parse_examples(rows)
    assert len(examples) == 3
    assert "2 of 3 rows have identical chosen and rejected" in caplog.text
    assert "prefs.jsonl, row 1" in caplog.text


def test_mixed_formats_are_an_error():
    rows = [row({"prompt": "p", "chosen": "a", "rejected": "b"}, 1),
            row({"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]}, 2)]
    with pytest.raises(DpokitError, match="row 2: mixes conversational and plain-text"):
        parse_examples(rows)


def test_implicit_prompt_moves_one_space_only_as_trl_does():
    example = parse_example(row({"chosen": "Q:  yes", "rejected": "Q:  no"}))
    assert (example.prompt, example.chosen, example.rejected) == ("Q: ", " yes", " no")


@pytest.mark.parametrize(("chosen", "rejected", "relation"), [
    ("the cat sat", "the cat sat", "identical"),
    ("the cat sat", "the cat sat on", "one is a prefix of the other"),
    ([USER, BLUE], [USER, BLUE], "identical"),
])
def test_implicit_prompt_without_a_completion_says_why(chosen, rejected, relation):
    with pytest.raises(DpokitError, match=f"chosen/rejected are {relation}"):
        parse_example(row({"chosen": chosen, "rejected": rejected}))


def test_tools_and_template_kwargs_are_kept_for_the_chat_template():
    example = parse_example(row({"prompt": [USER], "chosen": BLUE, "rejected": GREEN,
                                 "tools": '[{"name": "search"}]',
                                 "chat_template_kwargs": {"enable_thinking": False}}))
    assert example.template_kwargs == {"tools": [{"name": "search"}], "enable_thinking": False}
    with pytest.raises(DpokitError, match="field 'tools': not valid JSON"):
        parse_example(row({"prompt": [USER], "chosen": BLUE, "rejected": GREEN, "tools": "[x"}))
