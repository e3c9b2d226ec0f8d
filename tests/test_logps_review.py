"""Review of :mod:`dpokit.logps` against a float64 brute-force oracle.

Oracle: the model's own plain forward on each ``prompt + completion`` alone (one row, no mask,
no position ids), float64, Σ log_softmax gathered at the completion tokens — and, for
gradients, autograd through that plain forward. Tolerances: 1e-10 on float64 sums and on
gradients of a model that computes in float64 throughout (GPT-2); 1e-6 (gradients up to ~6)
where Llama's RMSNorm casts to float32 (the rounding of a summed gradient differs by layout).
"""

import copy
import logging
import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import dpokit.logps
from dpokit.data.collate import collate_pairs, pad_sequences
from dpokit.data.tokenize import TokenizedPair
from dpokit.errors import DpokitError
from dpokit.fixtures import tiny_causal_lm
from dpokit.logps import completion_logps, logit_transform, sequence_logps

V = 64
LAYOUTS = ("padded", "packed", "shared")


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def make_pairs():
    """Prompts of 4, 1 and 2 tokens; completions of 1 to 7 tokens."""
    rng = random.Random(0)

    def ids(n):
        return [rng.randrange(3, V) for _ in range(n)]

    return [TokenizedPair(ids(4), ids(3), ids(5)), TokenizedPair(ids(1), ids(1), ids(2)),
            TokenizedPair(ids(2), ids(7), ids(1))]


def alone(model, prompt, completion):
    """Per-token log π of ``completion`` after ``prompt``: the sequence alone, full logits."""
    ids = torch.tensor([prompt + completion])
    log_probs = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    return log_probs.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt) - 1:]


def oracle(model, pairs):
    with torch.no_grad():
        return torch.stack([alone(model, p.prompt_ids, getattr(p, side)).sum()
                            for side in ("chosen_ids", "rejected_ids") for p in pairs])


def build(model_type, **kwargs):
    config = AutoConfig.for_model(
        model_type, vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # untied and tied embeddings
def test_every_chunk_size_layout_and_path_equals_each_sequence_alone(kind):
    """Chunks of 1, not dividing the 19 scored tokens, and larger than them; prompts and
    completions of one token; padded and unpadded decoders; chunked head and full forward."""
    model = tiny_causal_lm(kind, vocab_size=V, seed=1, dtype=torch.float64)
    pairs = make_pairs()
    want = oracle(model, pairs)
    for layout in LAYOUTS:
        for chunk_size in (1, 4, 1000):
            for unpadded in (True, False):
                for fused in (True, False):
                    with torch.no_grad():
                        out = sequence_logps(model, collate_pairs(pairs, layout, pad_token_id=0),
                                             chunk_size=chunk_size, unpadded=unpadded,
                                             fused=fused)
                    got = torch.cat([out.chosen_logps, out.rejected_logps])
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-10,
                                               msg=f"{layout} {chunk_size} {unpadded} {fused}")
                    assert out.chosen_tokens.tolist() == [len(p.chosen_ids) for p in pairs]


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gradients_equal_autograd_through_the_plain_forward(kind, recompute, monkeypatch):
    if recompute:
        monkeypatch.setattr(dpokit.logps, "KEEP_LOGITS_BYTES", 0)
    model = tiny_causal_lm(kind, vocab_size=V, seed=1, dtype=torch.float64)
    pairs = make_pairs()
    model.zero_grad()
    objective = sum(alone(model, p.prompt_ids, p.chosen_ids).sum()
                    - 0.5 * alone(model, p.prompt_ids, p.rejected_ids).sum() for p in pairs)
    objective.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    atol = 1e-10 if kind == "gpt2" else 1e-6  # |grad| up to ~6: float32-level rounding
    for layout in LAYOUTS:
        for fused in (True, False):
            model.zero_grad()
            out = sequence_logps(model, collate_pairs(pairs, layout, pad_token_id=0),
                                 chunk_size=3, fused=fused)
            (out.chosen_logps - 0.5 * out.rejected_logps).sum().backward()
            for name, param in model.named_parameters():
                torch.testing.assert_close(param.grad, want[name], rtol=0, atol=atol,
                                           msg=f"{layout} fused={fused} {name}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_completion_with_nothing_before_it_is_refused(layout):
    """An empty prompt (a tokenizer without BOS): nothing predicts the first completion token.
    Before the fix it was silently left out — a 3-token completion scored as 2 tokens, its
    log-prob that of the last two given the first."""
    model = tiny_causal_lm("llama", vocab_size=V, seed=1)
    batch = collate_pairs([TokenizedPair([], [5, 6, 7], [8, 9])], layout, pad_token_id=0)
    with pytest.raises(DpokitError, match="sequence 0 of the batch starts with a completion"):
        sequence_logps(model, batch)


def test_an_empty_completion_is_the_empty_sum_in_the_models_dtype():
    """No completion token: log-prob 0, 0 tokens, float64 for a float64 model (it came back
    float32 when no sequence of the batch had a completion token)."""
    model = tiny_causal_lm("llama", vocab_size=V, seed=1, dtype=torch.float64)
    out = completion_logps(model, pad_sequences([([5, 6], 2), ([7], 1)], pad_token_id=0))
    assert out.logps.dtype == torch.float64
    assert out.logps.tolist() == [0.0, 0.0] and out.tokens.tolist() == [0, 0]
    pairs = [TokenizedPair([3, 4], [5, 6, 7], [])]
    out = sequence_logps(model, collate_pairs(pairs, "padded", pad_token_id=0))
    assert out.rejected_logps.tolist() == [0.0] and out.rejected_tokens.tolist() == [0]
    torch.testing.assert_close(out.chosen_logps, oracle(model, pairs)[:1], rtol=0, atol=1e-10)


def test_a_token_outside_the_vocabulary_is_a_one_line_error():
    """A tokenizer larger than the model: was an ``IndexError`` traceback from the embedding
    (a device-side assert on a GPU)."""
    model = tiny_causal_lm("llama", vocab_size=V, seed=1)
    batch = collate_pairs([TokenizedPair([3, 4], [V + 3], [5])], "padded", pad_token_id=0)
    with pytest.raises(DpokitError, match=rf"token id {V + 3} \(batch row 0, column 2\)"):
        sequence_logps(model, batch)


def test_hyperclovax_multiplies_its_logits_by_logits_scaling():
    """HyperCLOVA X computes ``lm_head(h) * logits_scaling``; the chunked head divided by it
    as for Granite: 1.93 nats off on these pairs with ``logits_scaling=4``."""
    model = build("hyperclovax", logits_scaling=4.0)
    pairs = make_pairs()
    want = oracle(model, pairs)
    for layout in LAYOUTS:
        with torch.no_grad():
            out = sequence_logps(model, collate_pairs(pairs, layout, pad_token_id=0))
        torch.testing.assert_close(torch.cat([out.chosen_logps, out.rejected_logps]), want,
                                   rtol=0, atol=1e-10, msg=layout)


@pytest.mark.parametrize("model_type", ["bert", "roformer"])
def test_a_prediction_head_before_the_output_embedding_is_not_skipped(model_type):
    """BERT-style decoders (``is_decoder``) apply a dense + activation + norm head before the
    output embedding; the chunked head took ``get_output_embeddings()`` alone (0.50 nats off on
    BERT, 0.57 on RoFormer). They now run their own forward."""
    extra = {"embedding_size": 32} if model_type == "roformer" else {}
    model = build(model_type, is_decoder=True, **extra)
    pairs = make_pairs()
    with torch.no_grad():
        out = sequence_logps(model, collate_pairs(pairs, "padded", pad_token_id=0))
    torch.testing.assert_close(torch.cat([out.chosen_logps, out.rejected_logps]),
                               oracle(model, pairs), rtol=0, atol=1e-10)


def test_xlstm_soft_cap_and_inkling_vocabulary_are_in_the_transform():
    """xLSTM caps its logits under ``output_logit_soft_cap`` (30 by default: every xLSTM was
    off), Inkling cuts its head's padded rows at ``unpadded_vocab_size`` (the normaliser ran
    over them). Oracle: transformers' own ``soft_cap`` and the cut written out."""
    from transformers.models.xlstm.modeling_xlstm import soft_cap

    logits = torch.randn(5, 16, dtype=torch.float64) * 40
    xlstm = AutoConfig.for_model("xlstm", output_logit_soft_cap=7.0)
    torch.testing.assert_close(logit_transform(xlstm)(logits), soft_cap(logits, 7.0),
                               rtol=0, atol=1e-12)
    config = copy.deepcopy(xlstm)
    config.unpadded_vocab_size = 10
    torch.testing.assert_close(logit_transform(config)(logits), soft_cap(logits[:, :10], 7.0),
                               rtol=0, atol=1e-12)
    config.logits_mup_width_multiplier = 2.0  # Inkling's hidden-state divisor: full forward
    assert logit_transform(config) is None


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_never_give_a_finite_result(value, fused):
    """One vocabulary row of the head made non-finite: every log-prob, WPO statistic and
    LD-DPO-weighted sum (α = 0 included) is non-finite, never a finite wrong number."""
    model = tiny_causal_lm("llama", vocab_size=V, seed=1, dtype=torch.float64)
    with torch.no_grad():
        model.lm_head.weight[10] = value
    out = completion_logps(model, collate_pairs(make_pairs(), "padded", pad_token_id=0),
                           fused=fused, wpo=True, ld_alpha=0.0)
    assert not torch.isfinite(out.logps).any() and not torch.isfinite(out.wpo).any()


def test_a_pair_whose_prompt_tokenises_to_nothing_is_refused_up_front_naming_its_row():
    """The data path refuses the pairs :func:`completion_logps` would find unpredicted — an
    empty prompt under a tokenizer that adds no BOS — before any training, naming the row
    (TRL scores such a completion without its first token). With BOS the same row is read."""
    from dpokit.data import RawRow, parse_examples, tokenize_examples
    from dpokit.fixtures import build_tokenizer

    rows = [RawRow("d.jsonl", 1, {"prompt": "the cat", "chosen": " sat", "rejected": " ran"}),
            RawRow("d.jsonl", 2, {"prompt": "", "chosen": "the dog", "rejected": "a bird"})]
    examples = parse_examples(rows)
    with pytest.raises(DpokitError, match=r"d\.jsonl, row 2: the prompt is no token"):
        tokenize_examples(examples, build_tokenizer(chat_template=False, add_bos=False))
    pairs = tokenize_examples(examples, build_tokenizer(chat_template=False))
    assert [len(p.prompt_ids) for p in pairs] == [len(pairs[0].prompt_ids), 1]  # BOS alone


@pytest.mark.parametrize("per_segment", [False, True])
def test_an_empty_last_completion_of_the_longest_shared_row_collates(per_segment, monkeypatch):
    """``collate_shared`` set the first-token predictor of an empty completion too: past the
    end of the longest row that was an IndexError; the attention's segment plan then divided
    by its zero queries. Its pair's other log-prob is the oracle's, on the batched calls and
    the per-segment ones."""
    from dpokit import attention

    if per_segment:
        monkeypatch.setattr(attention, "ONE_CALL_MAX_LENGTH", 0)
    model = tiny_causal_lm("llama", vocab_size=V, seed=1, dtype=torch.float64)
    pairs = [TokenizedPair([3, 4], [5, 6, 7], [])]
    out = sequence_logps(model, collate_pairs(pairs, "shared", pad_token_id=0))
    assert out.rejected_logps.tolist() == [0.0] and out.rejected_tokens.tolist() == [0]
    torch.testing.assert_close(out.chosen_logps, oracle(model, pairs)[:1], rtol=0, atol=1e-10)
