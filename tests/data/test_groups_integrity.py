"""k scored completions per prompt against pair rows, from a review's findings (each failed
before its fix): a group row keeps what a pair row keeps, and prompts of different shards stay
different groups."""

import copy
import json

from dpokit.data import RawRow, parse_examples, tokenize_examples
from dpokit.data.batching import group_ids, unit_spans
from dpokit.data.formats import ColumnMap

USER = [{"role": "user", "content": "what color is the sky?"}]
BLUE = [{"role": "assistant", "content": "blue"}]
GREEN = [{"role": "assistant", "content": "green sea"}]
EXTRA = {"tools": [{"name": "search"}], "chat_template_kwargs": {"enable_thinking": False}}


def rows(dicts, source="g.jsonl"):
    return [RawRow(source, i + 1, d) for i, d in enumerate(dicts)]


def test_group_rows_keep_tools_and_chat_template_kwargs(tokenizer):
    """A pair row's ``tools``/``chat_template_kwargs`` reach the chat template; the same row
    given as k scored completions drops them silently (groups.py builds the pair's fields from
    prompt/chosen/rejected/weight/margin/label_prob only), so the prompt is rendered — and
    trained on — without the tools."""
    pair_row = {"prompt": USER, "chosen": BLUE, "rejected": GREEN, **EXTRA}
    list_row = {"prompt": USER, "completions": [BLUE, GREEN], "scores": [2, 1], **EXTRA}
    per_completion = [{"prompt": USER, "completion": BLUE, "score": 2, **EXTRA},
                      {"prompt": USER, "completion": GREEN, "score": 1, **EXTRA}]
    (pair,) = parse_examples(rows([pair_row]), ColumnMap())
    assert pair.template_kwargs == {"tools": [{"name": "search"}], "enable_thinking": False}
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = ("{% if tools %}<|system|>\n{{ tools | tojson }}</s>\n{% endif %}"
                               + tokenizer.chat_template)
    (expected,) = tokenize_examples([pair], templated)
    for data in ([list_row], per_completion):
        (grouped,) = parse_examples(rows(data), ColumnMap())
        assert (grouped.chosen, grouped.rejected) == (pair.chosen, pair.rejected)
        assert grouped.template_kwargs == pair.template_kwargs, json.dumps(data[0])[:60]
        (got,) = tokenize_examples([grouped], templated)
        assert got.prompt_ids == expected.prompt_ids


def test_group_ids_are_unique_across_shards(tmp_path, tokenizer):
    """``group`` is the row number of the prompt's first row, which restarts at 1 in every
    shard of a data directory: two different prompts, each the first row of its shard, get
    the same id, follow each other and become ONE batching unit (batch_size counts them as one
    prompt, they always share a micro-batch)."""
    from dpokit.data import load_preference_pairs

    data = tmp_path / "data"
    data.mkdir()
    for name, prompt in (("part-0.jsonl", "the cat sat"), ("part-1.jsonl", "a red moon")):
        row = {"prompt": prompt, "completions": [" on the mat.", " no"], "scores": [2, 1]}
        (data / name).write_text(json.dumps(row) + "\n")
    pairs = load_preference_pairs(data, tokenizer)
    assert len(pairs) == 2 and pairs[0].prompt_ids != pairs[1].prompt_ids
    groups = group_ids(pairs)
    assert len(unit_spans(groups)) == 2, f"group ids {groups.tolist()}: one unit of 2 prompts"
