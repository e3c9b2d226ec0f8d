"""k scored completions per prompt, from a review of groups.py and prompts.py: the pairs each
``pairs_from_scores`` mode yields (and their order) against a brute force, the scores a row may
hold, prompts shared across non-adjacent rows, the errors' file/row/field, and a group's
log-probs against a float64 forward of each pair alone. Tests marked "fails before the fix"
pinned a bug of the reviewed code."""

import doctest
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dpokit.data.groups as groups_module
from dpokit.data import RawRow, parse_examples, tokenize_examples
from dpokit.data.collate import collate_pairs
from dpokit.data.formats import ColumnMap
from dpokit.data.groups import PAIR_SELECTIONS, score_pairs
from dpokit.data.io import load_rows
from dpokit.data.prompts import load_prompts, tokenize_prompt
from dpokit.data.tokenize import TokenizeSettings
from dpokit.errors import DpokitError
from dpokit.fixtures import tiny_causal_lm
from dpokit.logps import completion_logps
from tests.helpers import write_jsonl


def rows(dicts, source="g.jsonl"):
    return [RawRow(source, i + 1, d) for i, d in enumerate(dicts)]


def error(call, *args, **kwargs) -> str:
    """The one-line message of the ``DpokitError`` ``call`` raises."""
    with pytest.raises(DpokitError) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def brute_pairs(scores, selection):
    """The pairs by definition: every ordered (i, j) with s_i > s_j, kept as the mode says,
    ordered by the chosen's score (highest first, then its index), then the rejected's index."""
    k = len(scores)
    every = sorted(((i, j) for i in range(k) for j in range(k) if scores[i] > scores[j]),
                   key=lambda p: (-scores[p[0]], p[0], p[1]))
    if not every:
        return []
    top = max(scores)
    best = scores.index(top)  # the first of the best
    if selection == "all":
        return every
    if selection == "best_vs_each":
        return [p for p in every if p[0] == best]
    bottom = min(scores)
    return [(best, max(j for j in range(k) if scores[j] == bottom))]  # the last of the worst


@given(st.lists(st.integers(-2, 3), min_size=0, max_size=7), st.sampled_from(PAIR_SELECTIONS))
def test_score_pairs_equal_the_brute_force_in_order(scores, selection):
    """Which pairs, and in which order (fails before the fix for ``all``: its rejected came in
    score order, against the docstring's own example)."""
    assert score_pairs([float(s) for s in scores], selection) == brute_pairs(scores, selection)


def test_score_pairs_docstring_examples_hold():
    """The doctest of score_pairs (fails before the fix: ``all`` gave [(1, 2), (1, 0), (2, 0)])."""
    result = doctest.testmod(groups_module, verbose=False)
    assert result.attempted >= 3 and result.failed == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("selection", PAIR_SELECTIONS)
def test_score_pairs_refuse_non_finite_scores(bad, selection):
    """NaN compares false both ways: [nan, 1, 2] gave best_vs_worst [(0, 0)], the NaN one as
    chosen and rejected (fails before the fix); ±inf is refused too, as the data path refuses
    it (get_number)."""
    with pytest.raises(ValueError, match="score 0 is"):
        score_pairs([bad, 1.0, 2.0], selection)


def test_string_scores_read_as_their_numbers():
    as_text = [{"prompt": "p", "completions": [" a", " b", " c"], "scores": ["9", "2", " 6 "]}]
    numbers = [{"prompt": "p", "completions": [" a", " b", " c"], "scores": [9, 2, 6]}]
    csv_cell = [{"prompt": "p", "completions": '[" a", " b", " c"]', "scores": "[9, 2, 6]"}]
    for selection in PAIR_SELECTIONS:
        expected = [(e.chosen, e.rejected) for e in
                    parse_examples(rows(numbers), ColumnMap(pairs_from_scores=selection))]
        assert len(expected) == len(brute_pairs([9, 2, 6], selection))
        for data in (as_text, csv_cell):
            got = parse_examples(rows(data), ColumnMap(pairs_from_scores=selection))
            assert [(e.chosen, e.rejected) for e in got] == expected


@pytest.mark.parametrize("scores, field, problem", [
    ([1, None], "scores[1]", "missing score"),
    ([1, ""], "scores[1]", "missing score"),
    ([1, "nan"], "scores[1]", "expected a finite number"),
    ([float("inf"), 1], "scores[0]", "expected a finite number"),
    ([1, True], "scores[1]", "expected a number"),
    ([1, [2]], "scores[1]", "expected a number"),
])
def test_bad_scores_name_the_file_row_and_field(scores, field, problem):
    data = [{"prompt": "q", "completions": [" x", " y"], "scores": [1, 2]},
            {"prompt": "p", "completions": [" a", " b"], "scores": scores}]
    message = error(parse_examples, rows(data), ColumnMap())
    assert message.startswith(f"g.jsonl, row 2, field {field!r}: {problem}"), message


def test_nan_and_infinity_literals_of_a_json_file_are_refused(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"prompt": "p", "completion": " a", "score": 1}\n'
                    '{"prompt": "p", "completion": " b", "score": NaN}\n'
                    '{"prompt": "p", "completion": " c", "score": -Infinity}\n')
    message = error(parse_examples, load_rows(path), ColumnMap())
    assert message.startswith(f"{path}, row 2, field 'score': expected a finite number")


@pytest.mark.parametrize("completions, message", [
    ([], "'scores': expected a list of 0 numbers"),  # (scores of 2: the row is inconsistent)
    ([" only"], "'scores': expected a list of 1 numbers"),
    ({" a": 1}, "expected a list of completions"),
    ([" a", None], "'completions[1]': expected a string or a list of messages"),
])
def test_empty_and_single_lists_name_the_row(completions, message):
    data = [{"prompt": "q", "completions": [" x", " y"], "scores": [1, 2]},
            {"prompt": "p", "completions": completions, "scores": [1] * 2}]
    assert message in error(parse_examples, rows(data), ColumnMap())
    assert error(parse_examples, rows(data), ColumnMap()).startswith("g.jsonl, row 2, field")


def test_one_row_per_completion_groups_non_adjacent_rows_as_the_brute_force():
    """Rows of one prompt scattered through the file (a single completion, ties, a duplicate
    completion): each prompt's pairs, in order of its first row, as brute_pairs says."""
    data = [("p", " a", 1), ("q", " x", 5), ("r", " only", 3), ("p", " b", 3), ("s", " t", 2),
            ("q", " y", 5), ("p", " a", 2), ("s", " u", 2), ("q", " z", 1), ("p", " c", 3)]
    dicts = [{"prompt": p, "completion": c, "score": s} for p, c, s in data]
    for selection in PAIR_SELECTIONS:
        expected, ordinal = [], {}
        for prompt in dict.fromkeys(p for p, _, _ in data):
            ordinal[prompt] = len(ordinal)
            mine = [(c, s, n + 1) for n, (p, c, s) in enumerate(data) if p == prompt]
            for i, j in brute_pairs([s for _, s, _ in mine], selection):
                expected.append((prompt, mine[i][0], mine[j][0], mine[i][2], ordinal[prompt]))
        got = parse_examples(rows(dicts), ColumnMap(pairs_from_scores=selection))
        assert [(e.prompt, e.chosen, e.rejected, e.row, e.group) for e in got] == expected
        assert {e.group for e in got} == {0, 1}  # r (one completion) and s (a tie): no pair


def test_rows_of_one_prompt_under_other_tools_are_other_groups():
    """The same prompt text with other tools is another input to the chat template. Before the
    fix the rows formed one group and every pair took the first row's tools: the pair of the
    rows without tools was rendered — and trained on — with them (fails before the fix)."""
    user = [{"role": "user", "content": "weather?"}]
    tools = {"tools": [{"name": "forecast"}]}
    data = [{"prompt": user, "completion": {"role": "assistant", "content": "rain"},
             "score": 2, **tools},
            {"prompt": user, "completion": {"role": "assistant", "content": "no idea"},
             "score": 1},
            {"prompt": user, "completion": {"role": "assistant", "content": "calling"},
             "score": 1, **tools},
            {"prompt": user, "completion": {"role": "assistant", "content": "sunny"},
             "score": 3}]
    got = parse_examples(rows(data), ColumnMap())
    assert [(e.chosen[0]["content"], e.rejected[0]["content"], e.group, e.template_kwargs)
            for e in got] == [("rain", "calling", 0, tools), ("sunny", "no idea", 1, None)]


def test_shapes_across_shards_name_the_first_rows_file():
    """A mixed directory: the message named "row 1" with no file, read as row 1 of the
    offending shard (fails before the fix)."""
    data = (rows([{"prompt": "p", "completions": [" a", " b"], "scores": [1, 2]}], "d/part-0.jsonl")
            + rows([{"prompt": "p", "chosen": " a", "rejected": " b"}], "d/part-1.jsonl"))
    assert error(parse_examples, data, ColumnMap()) == (
        "d/part-1.jsonl, row 1: has chosen/rejected while d/part-0.jsonl, row 1 has a "
        "'completions' list; one data set holds one shape")


def test_a_renamed_scores_column_must_exist():
    """scores_column: a typo fell back to the objects' own scores silently (fails before the
    fix); the right name reads the column."""
    data = [{"prompt": "p", "completions": [{"text": " a", "score": 1},
                                            {"text": " b", "score": 2}], "human": [2, 1]}]
    assert error(parse_examples, rows(data), ColumnMap(scores="humans")) == (
        "g.jsonl: no column 'humans' (scores_column); columns: completions, human, prompt")
    with pytest.raises(DpokitError, match=r"its own score 1 differs from human\[0\] = 2"):
        parse_examples(rows(data), ColumnMap(scores="human"))


def test_empty_csv_weight_cells_are_no_per_pair_column(tmp_path):
    """A CSV of one row per completion with a weight column left empty: no weight (as
    check_filled reads an empty numeric cell), not a refusal (fails before the fix); a filled
    one is refused naming its row."""
    path = tmp_path / "g.csv"
    path.write_text("prompt,completion,score,weight\np, a,1,\np, b,2,\n")
    (example,) = parse_examples(load_rows(path), ColumnMap())
    assert (example.chosen, example.rejected, example.weight) == (" b", " a", None)
    path.write_text("prompt,completion,score,weight\np, a,1,2.0\np, b,2,2.0\n")
    message = error(parse_examples, load_rows(path), ColumnMap())
    assert message.startswith(f"{path}, row 1: one row per completion cannot carry per-pair "
                              f"columns (weight)")


def pair_logps(out, pairs):
    """(chosen, rejected) log-probs of each pair: completion_logps gives all chosen, then all
    rejected, in every layout (a group's shared sequences read through its pair_index)."""
    n = len(pairs)
    assert len(out.logps) == 2 * n
    return out.logps[:n], out.logps[n:]


def forward_alone(model, prompt_ids, completion_ids):
    """Σ log π(y_t | x, y_<t) by one float64 forward of x + y alone and a log-softmax."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    targets = ids[0, 1:]
    return logp[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum().item()


@pytest.mark.parametrize("layout", ["shared", "packed", "padded"])
def test_group_logps_equal_each_pair_alone(tokenizer, layout):
    """Non-adjacent rows of two prompts, a completion given twice (with two scores) and a tie,
    pairs_from_scores=all: every pair's log-probs in the group's batch equal a float64 forward
    of prompt + completion alone (1e-9: the model's float32 RMSNorm is per element, the same in
    both), and each distinct completion of a prompt is one sequence."""
    data = [{"prompt": "the cat sat", "completion": " on the mat.", "score": 3},
            {"prompt": "a red moon", "completion": " rises", "score": 1},
            {"prompt": "the cat sat", "completion": " no", "score": 1},
            {"prompt": "a red moon", "completion": " sets slowly", "score": 2},
            {"prompt": "the cat sat", "completion": " on the mat.", "score": 2},
            {"prompt": "the cat sat", "completion": " under a tree!", "score": 1}]
    examples = parse_examples(rows(data), ColumnMap(pairs_from_scores="all"))
    pairs = tokenize_examples(examples, tokenizer)
    assert len(pairs) == (len(brute_pairs([3, 1, 2, 1], "all"))
                          + len(brute_pairs([1, 2], "all")))
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=5, dtype=torch.float64)
    model.eval()
    batch = collate_pairs(pairs, layout, pad_token_id=0)
    assert batch.num_sequences == 3 + 2  # " on the mat." once, though two rows hold it
    with torch.no_grad():
        out = completion_logps(model, batch, chunk_size=4)
    chosen, rejected = pair_logps(out, pairs)
    expected_chosen = [forward_alone(model, p.prompt_ids, p.chosen_ids) for p in pairs]
    expected_rejected = [forward_alone(model, p.prompt_ids, p.rejected_ids) for p in pairs]
    torch.testing.assert_close(chosen.double(), torch.tensor(expected_chosen, dtype=torch.float64),
                               rtol=0, atol=1e-9)
    torch.testing.assert_close(rejected.double(),
                               torch.tensor(expected_rejected, dtype=torch.float64),
                               rtol=0, atol=1e-9)


# --- prompts.py ---------------------------------------------------------------------------------

def test_a_lone_surrogate_in_a_text_prompt_is_one_line(tmp_path, tokenizer):
    r"""JSON's "\ud800" reads as a lone surrogate; the tokenizer raised a TypeError traceback
    for a text prompt (fails before the fix); a chat prompt was already refused."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "hi \\ud800 there"}\n')
    assert error(load_prompts, path, tokenizer) == (
        f"{path}, row 2, field 'prompt': undecodable text (invalid Unicode)")


def test_a_huge_bad_prompt_value_is_cut_in_the_message(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ["x" * 100_000]}])
    message = error(load_prompts, path, tokenizer)
    assert message.startswith(f"{path}, row 1, field 'prompt': expected a non-empty string")
    assert len(message) < 300 and message.endswith("(list)")


def test_prompt_truncation_applies_to_generation_prompts(tokenizer):
    """max_prompt_length cut the start of a prompt whatever prompt_truncation said (fails
    before the fix for 'right'); the oracle is the untruncated ids, sliced."""
    text = "the quick brown fox jumps over the lazy dog " * 3
    whole = tokenize_prompt(text, tokenizer, TokenizeSettings())
    assert len(whole) > 5
    left = tokenize_prompt(text, tokenizer, TokenizeSettings(max_prompt_length=5))
    right = tokenize_prompt(text, tokenizer, TokenizeSettings(max_prompt_length=5,
                                                              prompt_truncation="right"))
    assert left == whole[-5:] and right == whole[:5]
    assert tokenize_prompt(text, tokenizer, TokenizeSettings(max_prompt_length=len(whole))) \
        == whole


def test_generation_prompts_are_the_pairs_prompts(tokenizer):
    """A prompt for generation is tokenised as the same prompt of a pair row (text: the plain
    call; chat: the template with the generation prompt), so what is generated from is what
    the pair is trained on."""
    chat = [{"role": "user", "content": "hi there"}]
    for prompt, chosen, rejected in (("the sky is", " blue", " green"),
                                     (chat, [{"role": "assistant", "content": "hello"}],
                                      [{"role": "assistant", "content": "go"}])):
        (example,) = parse_examples(rows([{"prompt": prompt, "chosen": chosen,
                                           "rejected": rejected}]), ColumnMap())
        (pair,) = tokenize_examples([example], tokenizer)
        assert tokenize_prompt(prompt, tokenizer, TokenizeSettings()) == pair.prompt_ids, \
            json.dumps(prompt)
