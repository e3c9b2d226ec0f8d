"""k scored completions per prompt: parsing, pair selection, batching by prompt, and the log-probs
of a group's shared row against the same pairs given one by one (float64 oracle, 1e-10)."""

import copy
import itertools
import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpokit.data import RawRow, parse_examples, tokenize_examples
from dpokit.data.batching import (
    epoch_batches,
    group_ids,
    micro_batches,
    rows_used,
    unit_spans,
)
from dpokit.data.collate import collate_pairs
from dpokit.data.formats import ColumnMap
from dpokit.data.groups import score_pairs
from dpokit.errors import DpokitError
from dpokit.fixtures import tiny_causal_lm
from dpokit.logps import completion_logps

GROUP_ROWS = [
    {"prompt": "the cat sat", "completions": [" on the mat.", " under a tree!", " no", " yes"],
     "scores": [3.0, 1.0, 2.0, 4.0]},
    {"prompt": "what color is the sky?",
     "completions": [{"response": " blue", "score": 5}, {"response": " green sea", "score": 1},
                     {"response": " red", "score": 3}]},
    {"prompt": "a", "completions": [" quick brown fox.", " lazy dog"], "scores": [1, 2]},
]


def rows(dicts, source="g.jsonl"):
    return [RawRow(source, i + 1, d) for i, d in enumerate(dicts)]


def pairs_of(dicts, tokenizer, selection="all"):
    examples = parse_examples(rows(dicts), ColumnMap(pairs_from_scores=selection))
    return tokenize_examples(examples, tokenizer)


def one_by_one(pairs):
    """The same pairs as pair rows of their own (what a user would give one by one)."""
    return [type(p)(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.weight, p.margin, p.source,
                    p.row, p.label_prob) for p in pairs]


@given(st.lists(st.integers(0, 4), min_size=2, max_size=7),
       st.sampled_from(["best_vs_worst", "best_vs_each", "all"]))
def test_score_pairs_prefer_strictly_higher_scores(scores, selection):
    pairs = score_pairs([float(s) for s in scores], selection)
    assert all(scores[i] > scores[j] for i, j in pairs)
    assert len(set(pairs)) == len(pairs)
    distinct = sum(a > b for a, b in itertools.permutations(scores, 2))
    lower = sum(s < max(scores) for s in scores)
    expected = {"all": distinct, "best_vs_each": lower,
                "best_vs_worst": int(max(scores) > min(scores))}[selection]
    assert len(pairs) == expected
    if pairs and selection != "all":
        assert {i for i, _ in pairs} == {scores.index(max(scores))}  # the first best


def test_rows_become_the_chosen_pairs():
    examples = parse_examples(rows(GROUP_ROWS), ColumnMap(pairs_from_scores="best_vs_each"))
    got = [(e.row, e.group, e.chosen, e.rejected) for e in examples]
    assert got == [(1, 0, " yes", " on the mat."), (1, 0, " yes", " under a tree!"),
                   (1, 0, " yes", " no"), (2, 1, " blue", " green sea"), (2, 1, " blue", " red"),
                   (3, 2, " lazy dog", " quick brown fox.")]  # group: the prompt's ordinal
    worst = parse_examples(rows(GROUP_ROWS), ColumnMap())  # best_vs_worst: the default
    assert [(e.chosen, e.rejected) for e in worst] == [
        (" yes", " under a tree!"), (" blue", " green sea"), (" lazy dog", " quick brown fox.")]
    assert len(parse_examples(rows(GROUP_ROWS), ColumnMap(pairs_from_scores="all"))) == 6 + 3 + 1


def test_one_row_per_completion_groups_equal_prompts():
    data = [{"prompt": "p", "completion": " a", "score": 1}, {"prompt": "q", "completion": " b",
                                                              "score": 2},
            {"prompt": "p", "completion": " c", "score": 2}, {"prompt": "q", "completion": " d",
                                                              "score": 1}]
    examples = parse_examples(rows(data), ColumnMap())
    assert [(e.prompt, e.chosen, e.rejected, e.row, e.group) for e in examples] == [
        ("p", " c", " a", 3, 0), ("q", " b", " d", 2, 1)]


def test_conversational_groups():
    data = [{"prompt": [{"role": "user", "content": "hi"}],
             "completions": [[{"role": "assistant", "content": "hello"}],
                             {"role": "assistant", "content": "go away"}],
             "scores": [2, 1]}]
    (example,) = parse_examples(rows(data), ColumnMap())
    assert example.conversational and example.chosen == [{"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "completions": [" a", " b"], "scores": [1]}, r"row 1, field 'scores': "
                                                                   r"expected a list of 2"),
    ({"prompt": "p", "completions": [" a", {"text": " b"}]}, r"field 'completions\[0\]': no score"),
    ({"prompt": "p", "completions": {"a": 1}, "scores": [1]}, "expected a list of completions"),
    ({"prompt": "p", "completions": [" a", "  "], "scores": [1, 2]},
     r"'completions\[1\]': empty completion"),
    ({"prompt": "p", "completions": [" a", " b"], "scores": [1, "x"]},
     r"'scores\[1\]': expected a number"),
    ({"completions": [" a", " b"], "scores": [1, 2]}, "'prompt': missing"),
    ({"prompt": "p", "completions": [{"text": " a", "score": 3}, " b"], "scores": [1, 2]},
     r"'completions\[0\]': its own score 3 differs from scores\[0\] = 1; give one"),
    ({"prompt": "p", "completions": [" a", [{"role": "assistant", "content": "b"}]],
      "scores": [1, 2]}, "conversation beside a text prompt"),
])
def test_bad_group_rows_name_the_row_and_field(row, message):
    with pytest.raises(DpokitError, match=message):
        parse_examples(rows([row]), ColumnMap())


def test_shapes_do_not_mix_and_ties_make_no_pair(caplog):
    mixed = [GROUP_ROWS[0], {"prompt": "p", "chosen": " a", "rejected": " b"}]
    with pytest.raises(DpokitError, match="row 2: has chosen/rejected while row 1 has a "
                                          "'completions' list"):
        parse_examples(rows(mixed), ColumnMap())
    tied = [GROUP_ROWS[0], {"prompt": "p", "completions": [" a", " b"], "scores": [2, 2]}]
    with caplog.at_level("WARNING"):
        assert len(parse_examples(rows(tied), ColumnMap())) == 1
    assert "1 of 2 prompts have no two completions of different scores" in caplog.text
    with pytest.raises(DpokitError, match="no preference pair"):
        parse_examples(rows(tied[1:]), ColumnMap())
    per_pair = [{"prompt": "p", "completion": " a", "score": 1, "weight": 2.0},
                {"prompt": "p", "completion": " b", "score": 2, "weight": 2.0}]
    with pytest.raises(DpokitError, match="cannot carry per-pair columns"):
        parse_examples(rows(per_pair), ColumnMap())


def test_a_group_shares_one_row_each_completion_once(tokenizer):
    pairs = pairs_of(GROUP_ROWS, tokenizer)
    batch = collate_pairs(pairs, "shared", pad_token_id=0)
    assert batch.input_ids.shape[0] == 3 and batch.num_pairs == 10
    assert [len(parts) - 1 for parts in batch.parts] == [4, 3, 2]  # k distinct completions
    assert batch.num_sequences == 9
    for b, pair in enumerate(pairs):  # pair_index finds each pair's completions in its row
        for side, ids in ((0, pair.chosen_ids), (1, pair.rejected_ids)):
            sequence = int(batch.pair_index[side, b])
            tokens = batch.input_ids[batch.sequence_ids == sequence].tolist()
            assert tokens[-len(ids):] == ids
    for layout in ("padded", "packed"):  # the other layouts share each sequence too
        assert collate_pairs(pairs, layout, pad_token_id=0).num_sequences == 9


def logps_and_grads(model, batch):
    model.zero_grad()
    out = completion_logps(model, batch, chunk_size=8, token_stats=True)
    weights = torch.linspace(0.5, 1.5, len(out.logps), dtype=out.logps.dtype)
    (out.logps * weights).sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["shared", "padded", "packed"])
@pytest.mark.parametrize("unpadded", [True, False])
def test_group_rows_equal_the_pairs_one_by_one(tokenizer, layout, unpadded):
    """Log-probs, token counts, entropy/argmax sums and gradients of every pair: a group's
    shared row against each pair with rows of its own (float64; log-probs to 1e-10). Gradients
    to 1e-6: Llama's RMSNorm computes in float32 even in a float64 model, and a completion
    three pairs share is backpropagated once with 3·g where the pairs one by one add g + g + g
    — equal up to that float32 rounding (the forward is identical)."""
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=3, dtype=torch.float64)
    pairs = pairs_of(GROUP_ROWS, tokenizer)
    alone = copy.deepcopy(model)
    got, grads = logps_and_grads(model, collate_pairs(pairs, layout, pad_token_id=0))
    expected, expected_grads = logps_and_grads(
        alone, collate_pairs(one_by_one(pairs), layout, pad_token_id=0))
    for name in ("logps", "tokens", "entropy", "top1", "mean_logits"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0,
                                   atol=1e-10, msg=name)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-6, atol=1e-6, msg=name)


def test_batches_keep_a_prompts_pairs_together(tokenizer):
    groups = np.array([-1, 5, 5, 5, -1, 9, 9, 2])
    spans = unit_spans(groups)
    assert spans == [(0, 1), (1, 4), (4, 5), (5, 7), (7, 8)]
    for epoch in range(3):
        batches = epoch_batches(len(groups), 2, seed=1, epoch=epoch, spans=spans)
        assert sorted(i for b in batches for i in b) == list(range(8))
        assert len(batches) == 3
        for batch in batches:
            for start, stop in spans:  # a unit is wholly in a batch, in order, or not at all
                inside = [i for i in batch if start <= i < stop]
                assert inside in ([], list(range(start, stop)))
    for world in (1, 2, 3):
        shares = [micro_batches(list(range(8)), 1, rank, world, groups) for rank in range(world)]
        assert len({len(s) for s in shares}) == 1  # the same count on every rank
        real = sorted(i for share in shares for micro, w in share if w for i in micro)
        assert real == list(range(8))
        for share in shares:
            for micro, _ in share:
                assert micro in ([0], [1, 2, 3], [4], [5, 6], [7])
    used = rows_used(8, 2, seed=1, total_steps=1, spans=spans)
    assert used == sorted(epoch_batches(8, 2, seed=1, epoch=0, spans=spans)[0])


def test_no_groups_batch_exactly_as_before():
    """Without groups the permutation and the micro-batches are the old ones."""
    for epoch in range(3):
        generator = torch.Generator().manual_seed(4 * 1_000_003 + epoch)
        order = torch.randperm(10, generator=generator).tolist()
        assert epoch_batches(10, 3, seed=4, epoch=epoch) == [order[i:i + 3]
                                                              for i in range(0, 10, 3)]
    assert unit_spans(np.full(5, -1)) is None
    assert micro_batches([4, 2, 7], 2, 0, 1) == [([4, 2], 1.0), ([7], 1.0)]
    assert micro_batches([4, 2, 7], 2, 1, 2) == [([7], 1.0)]


def test_group_ids_read_the_items(tokenizer):
    pairs = pairs_of(GROUP_ROWS, tokenizer, "best_vs_each")
    assert group_ids(pairs).tolist() == [0, 0, 0, 1, 1, 2]


def test_training_on_groups_equals_the_pairs_one_by_one(tmp_path, tokenizer):
    """One step over three prompts' pairs (a global batch of all of them): the same loss,
    metrics and weights as the same 10 pairs given as pair rows."""
    from safetensors.torch import load_file

    from dpokit.config import load_config
    from dpokit.train.config import DPOConfig
    from dpokit.train.loop import train
    from tests.helpers import read_metrics

    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=7)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GROUP_ROWS))
    examples = parse_examples(rows(GROUP_ROWS), ColumnMap(pairs_from_scores="all"))
    random.Random(0).shuffle(examples)  # any order: one batch holds them all
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(
        {"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}) + "\n"
        for e in examples))
    results = {}
    for name, data, batch_size in (("groups", "g.jsonl", 3), ("pairs", "p.jsonl", 10)):
        values = {"model": str(tmp_path / "m"), "data": str(tmp_path / data),
                  "output_dir": str(tmp_path / name), "batch_size": str(batch_size),
                  "max_steps": "1", "logging_steps": "1", "save_steps": "null",
                  "learning_rate": "1e-3", "adam_epsilon": "1e-2", "pairs_from_scores": "all",
                  "max_length": "64"}
        final = train(load_config(DPOConfig, None, values), progress=False)
        results[name] = (read_metrics(final.parent)[0], load_file(str(final /
                                                                      "model.safetensors")))
    (groups, group_weights), (pairs, pair_weights) = results["groups"], results["pairs"]
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm",
                "num_tokens"):
        assert groups[key] == pytest.approx(pairs[key], rel=1e-5, abs=1e-6), key
    # AdamW's first update is lr · g / (|g| + ε): with the default ε (1e-8) float32
    # summation-order noise in a gradient element near zero flips it by up to 2·lr, so ε = 1e-2
    # makes the update ≈ lr · g / ε, linear in g, and the weights compare the gradients (to
    # 0.1% of lr).
    for name, tensor in pair_weights.items():
        torch.testing.assert_close(group_weights[name], tensor, rtol=0, atol=1e-6)


def test_a_pair_of_its_own_keeps_equal_completions_apart(tokenizer):
    """A pair whose chosen equals its rejected (warned, not refused) keeps two sequences in
    every layout; within a group equal completions are one sequence."""
    (pair,) = pairs_of([{"prompt": "p", "completions": [" a b", " c"], "scores": [2, 1]}],
                       tokenizer)
    alone = type(pair)(pair.prompt_ids, pair.chosen_ids, pair.chosen_ids)
    for layout in ("shared", "padded", "packed"):
        batch = collate_pairs([alone], layout, pad_token_id=0)
        assert batch.num_sequences == 2 and batch.pair_index is None
    assert collate_pairs([alone], "shared", pad_token_id=0).parts[0][1:] == (
        len(pair.chosen_ids), len(pair.chosen_ids))
    twin = type(pair)(pair.prompt_ids, pair.chosen_ids, pair.chosen_ids, group=1)
    assert collate_pairs([twin], "shared", pad_token_id=0).num_sequences == 1


def test_eval_on_groups_equals_the_pairs_one_by_one(tmp_path, tokenizer, capsys):
    """``dpokit eval`` on one row per prompt: the same summary and per-pair records as on the
    pairs it chooses, given one by one."""
    from tests.helpers import run_cli

    tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=4).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GROUP_ROWS))
    examples = parse_examples(rows(GROUP_ROWS), ColumnMap(pairs_from_scores="best_vs_each"))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(
        {"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}) + "\n"
        for e in examples))
    summaries, records = {}, {}
    for name in ("g", "p"):
        code, out, err = run_cli(capsys, "eval", "--model", str(tmp_path / "m"), "--data",
                                 str(tmp_path / f"{name}.jsonl"), "--pairs-from-scores",
                                 "best_vs_each", "--batch-size", "2", "--json",
                                 "--per-example", str(tmp_path / f"{name}.out.jsonl"))
        assert code == 0, err
        summaries[name] = json.loads(out)
        records[name] = [json.loads(line) for line in
                         (tmp_path / f"{name}.out.jsonl").read_text().splitlines()]
    assert summaries["g"]["num_pairs"] == summaries["p"]["num_pairs"] == 6
    for key in ("logps/chosen", "logps/rejected"):
        assert summaries["g"][key] == pytest.approx(summaries["p"][key], abs=1e-5)
    for a, b in zip(records["g"], records["p"], strict=True):
        assert a["chosen_logps"] == pytest.approx(b["chosen_logps"], abs=1e-5)
        assert a["rejected_logps"] == pytest.approx(b["rejected_logps"], abs=1e-5)


@pytest.mark.parametrize("few", [[], [" a"]])
def test_a_prompt_with_fewer_than_two_completions_is_dropped_and_counted(few, caplog):
    """As a prompt of one row per completion with one completion: no pair, dropped with the
    others in one count (raw UltraFeedback holds such rows; they stopped the run)."""
    data = [{"prompt": "p", "completions": [" a", " b"], "scores": [2, 1]},
            {"prompt": "q", "completions": few, "scores": [1] * len(few)}]
    with caplog.at_level("WARNING", logger="dpokit"):
        (example,) = parse_examples(rows(data), ColumnMap())
    assert (example.chosen, example.rejected) == (" a", " b")
    assert "1 of 2 prompts have no two completions" in caplog.text
