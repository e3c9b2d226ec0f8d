"""A review of the exact batch layouts (dpokit.attention, dpokit.attention_flex,
dpokit.data.collate) against oracles built independently of them.

Oracles: a dense boolean mask written out token by token from the segments' parts
(``tests.test_attention_flex.mask_by_hand``) under plain SDPA, float64, outputs and gradients
within 1e-10; ``create_block_mask``'s block mask; each ``prompt + completion`` run alone
through the model (no padding, float64). Llama-family models compute their RMSNorm in float32
even in a float64 model, so their parameter gradients agree with the oracle's to float32
rounding only (relative 1e-5); GPT-2's LayerNorm stays in float64 (relative 1e-9).
"""

import copy
import itertools
import random

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from transformers import AutoConfig, AutoModelForCausalLM

import dpokit.attention as attention
import dpokit.attention_flex as attention_flex
from dpokit.data.collate import collate_packed, collate_padded, collate_pairs, collate_shared
from dpokit.data.tokenize import TokenizedPair
from dpokit.logps import completion_logps
from tests.test_attention_flex import mask_by_hand, segments_of


def test_a_pair_without_a_soft_label_keeps_the_hard_label():
    """A batch where only some pairs carry ``label_prob``: the others are chosen ≻ rejected,
    p = 1 (``sigmoid_soft`` with p = 1 is ``sigmoid``), not p = 0, which flipped their
    preference (the old default). Weights default to 1, margins to 0, in every layout."""
    pairs = [TokenizedPair([1, 5], [6, 7], [8], label_prob=0.3, margin=0.5),
             TokenizedPair([1, 9], [10], [11, 12], weight=2.0)]
    for batch in (collate_padded(pairs, pad_token_id=0), collate_packed(pairs),
                  collate_shared(pairs, pad_token_id=0)):
        assert batch.label_probs.tolist() == pytest.approx([0.3, 1.0])
        assert batch.weights.tolist() == [1.0, 2.0] and batch.margins.tolist() == [0.5, 0.0]


class _Attention(torch.nn.Module):
    """What segment_attention reads of a transformers attention module."""

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _random_segments(rng):
    """Plain sequences and shared-prompt rows ``(|x|, |y_1|, …, |y_m|)`` (empty or one-token
    prompts, one-token completions, m up to 5), around the bucket and one-call boundaries."""
    parts = []
    for _ in range(rng.randint(1, 7)):
        if rng.random() < 0.4:
            parts.append((rng.choice([1, 2, 5, 16, 17, 40, 513]),))
        else:
            parts.append((rng.choice([0, 1, 3, 20]),
                          *(rng.choice([1, 2, 7, 16, 33]) for _ in range(rng.randint(1, 5)))))
    return segments_of(parts)


@pytest.mark.parametrize("seed", range(4))
def test_segment_attention_equals_sdpa_under_the_dense_mask(seed, monkeypatch):
    """Random segments through every CPU path (padded calls of many budgets, the per-segment
    calls, a mix, the GPU's keys-side-by-side path), GQA groups 1/2/4, sliding windows of 1 to
    30: outputs and q/k/v gradients equal SDPA under the dense mask of the definition (same
    segment, key not after the query, key in the prompt or in the query's own part, within
    the window), float64, 1e-10."""
    rng = random.Random(seed)
    for _ in range(25):
        segments = _random_segments(rng)
        total = segments.bounds[-1][1]
        window = rng.choice([None, None, 1, 2, 5, 30])
        monkeypatch.setattr(attention, "ONE_CALL_BUDGET", rng.choice([1 << 23, 0, 5000, 40000]))
        monkeypatch.setattr(attention, "ONE_CALL_MAX_LENGTH", rng.choice([512, 10, 30]))
        side_by_side = rng.random() < 0.25
        monkeypatch.setattr(attention, "keys_side_by_side",
                            lambda device, s=side_by_side: s or device.type != "cpu")
        groups = rng.choice([1, 2, 4])
        q = torch.randn(1, 4, total, 8, dtype=torch.float64, requires_grad=True)
        k, v = (torch.randn(1, 4 // groups, total, 8, dtype=torch.float64, requires_grad=True)
                for _ in range(2))
        got, _ = attention.segment_attention(_Attention(groups), q, k, v, None,
                                             dpokit_segments=segments, sliding_window=window)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask_by_hand(segments, window), enable_gqa=groups > 1)
        expected = expected.transpose(1, 2)
        upstream = torch.randn_like(expected)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
        for mine, theirs in zip(torch.autograd.grad(got, (q, k, v), upstream),
                                torch.autograd.grad(expected, (q, k, v), upstream),
                                strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("seed", range(2))
def test_flex_block_mask_and_forward_equal_the_dense_mask(seed, monkeypatch):
    """Random segments (lengths around the 128-token block, prompts of 0 tokens), windows of 1
    to 100, built in one chunk or one block row at a time: the block mask equals
    ``create_block_mask``'s (dense pattern, partial and full block counts, their indices),
    and the eager FlexAttention forward with it equals SDPA under the dense mask (GQA,
    float64, 1e-10)."""
    rng = random.Random(100 + seed)
    for _ in range(12):
        parts = []
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.5:
                parts.append((rng.choice([1, 2, 127, 128, 129, 300]),))
            else:
                parts.append((rng.choice([0, 1, 60, 128]),
                              *(rng.choice([1, 2, 7, 130]) for _ in range(rng.randint(1, 4)))))
        segments = segments_of(parts)
        total = segments.bounds[-1][1]
        window = rng.choice([None, 1, 5, 100])
        monkeypatch.setattr(attention_flex, "CHUNK_ELEMENTS", rng.choice([1 << 24, 128 * 128]))
        ours = attention_flex.segment_block_mask(segments, window)
        segment, part = attention_flex.token_labels(segments)
        theirs = create_block_mask(
            attention_flex.segment_mask_mod(segment, part, segments.position_ids, window),
            1, 1, total, total, device="cpu")
        dense = mask_by_hand(segments, window)
        assert torch.equal(ours.to_dense(), theirs.to_dense())
        for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
        for counts, indices in (("kv_num_blocks", "kv_indices"),
                                ("full_kv_num_blocks", "full_kv_indices")):
            for row, n in enumerate(getattr(ours, counts)[0, 0].tolist()):
                assert torch.equal(getattr(ours, indices)[0, 0, row, :n],
                                   getattr(theirs, indices)[0, 0, row, :n])
        q = torch.randn(1, 4, total, 16, dtype=torch.float64)
        k, v = (torch.randn(1, 2, total, 16, dtype=torch.float64) for _ in range(2))
        got = attention_flex.flex_segment_attention(q, k, v, ours, scaling=None, groups=2)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=dense, enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def _tiny(model_type, window):
    if model_type == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                      n_positions=256, pad_token_id=0)
    else:
        extra = ({"sliding_window": window, "use_sliding_window": True, "max_window_layers": 0}
                 if window else {})
        config = AutoConfig.for_model(
            model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, pad_token_id=0, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()


def _group_pairs(seed):
    """Pairs of its own and k-completion groups (k = 2..4, pairs among them): prompts and
    completions of one token among longer ones."""
    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(3, 64) for _ in range(n)]

    pairs = []
    for group in range(5):
        prompt = ids(rng.choice([1, 1, 2, 5, 9]))
        if rng.random() < 0.6:
            completions = [ids(rng.choice([1, 1, 2, 4, 7])) for _ in range(rng.choice([2, 3, 4]))]
            pairs += [TokenizedPair(prompt, completions[a], completions[b], group=group)
                      for a, b in itertools.combinations(range(len(completions)), 2)]
        else:
            pairs.append(TokenizedPair(prompt, ids(rng.choice([1, 6])), ids(rng.choice([1, 11]))))
    return pairs


def _alone(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    log_probs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return log_probs.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt) - 1:].sum()


@pytest.mark.parametrize(("model_type", "window", "grad_rtol"),
                         [("gpt2", None, 1e-9), ("qwen2", 3, 1e-5), ("llama", None, 1e-5)])
@pytest.mark.parametrize("path", ["padded calls", "per segment"])
def test_k_completion_groups_log_probs_and_gradients_equal_each_sequence_alone(
        model_type, window, grad_rtol, path, monkeypatch):
    """Pairs of their own beside k-completion groups, every layout, unpadded (both CPU paths):
    each pair's chosen and rejected log-prob equals its sequence run alone (1e-10), and the
    gradient of a weighted sum of them w.r.t. every parameter equals the oracle's (relative
    ``grad_rtol``, see the module docstring)."""
    if path == "per segment":
        monkeypatch.setattr(attention, "ONE_CALL_BUDGET", 0)
    pairs = _group_pairs(3)
    model = _tiny(model_type, window)
    oracle = copy.deepcopy(model)
    expected = torch.stack([_alone(oracle, p.prompt_ids, getattr(p, side))
                            for side in ("chosen_ids", "rejected_ids") for p in pairs])
    weights = torch.linspace(0.5, 1.5, len(expected), dtype=torch.float64)
    (expected * weights).sum().backward()
    expected_grads = {n: p.grad for n, p in oracle.named_parameters()}
    for layout in ("padded", "packed", "shared"):
        model.zero_grad(set_to_none=True)
        batch = collate_pairs(pairs, layout, pad_token_id=0)
        assert batch.pair_index is not None
        got = completion_logps(model, batch, chunk_size=5, unpadded=True).logps
        torch.testing.assert_close(got.detach(), expected.detach(), rtol=0, atol=1e-10,
                                   msg=layout)
        (got * weights).sum().backward()
        for name, parameter in model.named_parameters():
            scale = expected_grads[name].abs().max() + 1e-3
            error = (parameter.grad - expected_grads[name]).abs().max() / scale
            assert error < grad_rtol, (layout, name, float(error))
