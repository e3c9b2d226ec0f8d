"""Review findings for the unpadded / shared-prompt log-probs (each test fails on purpose).

Oracle: every ``prompt + completion`` run alone through the model, no padding, float64.
"""

import copy
import random

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dpokit.data.collate import collate_pairs
from dpokit.data.tokenize import TokenizedPair
from dpokit.fixtures import tiny_causal_lm
from dpokit.logps import completion_logps


def _tiny(model_type, **extra):
    config = AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()


def _alone(model, prompt, completion):
    """Σ log π(completion | prompt), the sequence alone (float64, no padding)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return log_probs.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt) - 1:].sum()


def _pairs():
    rng = random.Random(3)

    def ids(n):
        return [rng.randrange(3, 64) for _ in range(n)]

    return [TokenizedPair(ids(6), ids(7), ids(9)), TokenizedPair(ids(2), ids(3), ids(12))]


def _expected(model, pairs):
    oracle = copy.deepcopy(model)
    return torch.stack([_alone(oracle, p.prompt_ids, getattr(p, side))
                        for side in ("chosen_ids", "rejected_ids") for p in pairs])


def test_shared_layout_padded_decoder_applies_the_sliding_window():
    """The shared layout through the padded decoder (``unpadded=False``) hands transformers a
    4D ``dense_mask`` (logps.py ``_mask``), which it uses as given on every layer: a
    sliding-window layer then attends past its window. Each sequence alone is the oracle."""
    model = _tiny("qwen2", sliding_window=3, use_sliding_window=True, max_window_layers=0)
    pairs = _pairs()
    with torch.no_grad():
        got = completion_logps(model, collate_pairs(pairs, "shared", pad_token_id=0),
                               unpadded=False).logps
    torch.testing.assert_close(got, _expected(model, pairs), rtol=0, atol=1e-10)


def test_default_shared_layout_on_an_unswitched_sliding_window_family():
    """The default settings (shared layout, ``unpadded=True``) on a sliding-window family that is
    not in ``UNPADDED_MODEL_TYPES`` (Cohere2 here; Gemma-2, which loads with eager attention,
    takes the same path): the model silently runs the padded decoder with the window-less
    ``dense_mask``, so every token past the window gets a wrong log-prob."""
    model = _tiny("cohere2", sliding_window=3)
    pairs = _pairs()
    with torch.no_grad():
        got = completion_logps(model, collate_pairs(pairs, "shared", pad_token_id=0)).logps
    torch.testing.assert_close(got, _expected(model, pairs), rtol=0, atol=1e-10)


def test_a_rows_log_probs_do_not_depend_on_the_lm_head_chunking_of_its_batch():
    """``completion_logps`` cuts the batch's completion positions into LM-head chunks of
    ``chunk_size`` from the batch's start (logps.py, the ``for start in range(0, len(targets),
    chunk_size)`` loop), so where a pair's tokens fall, and the row count of the matmul that
    computes their logits, depends on the other pairs. The CPU GEMM rounds rows of a small
    remainder block differently (here M in {1, 2, 3, 5, 6, 7, 9, 10, 11}), so the same pair gets
    log-probs a float32 ulp apart alone and in a batch — what ``bucket_length`` exists to
    prevent for attention (BLAS-dependent: on this CPU several of these pairs differ)."""
    rng = random.Random(9)

    def ids(n):
        return [rng.randrange(3, 500) for _ in range(n)]

    model = tiny_causal_lm("llama", vocab_size=512, seed=7)
    fillers = [TokenizedPair(ids(10), ids(100), ids(100)) for _ in range(5)]
    fillers.append(TokenizedPair(ids(10), ids(20), ids(3)))  # 1,023 completion tokens
    lasts = [TokenizedPair(ids(20), ids(2), ids(2)) for _ in range(12)]
    b = len(fillers) + 1
    differ = []
    with torch.no_grad():
        for i, last in enumerate(lasts):
            together = completion_logps(
                model, collate_pairs([*fillers, last], "shared", pad_token_id=0)).logps
            alone = completion_logps(model, collate_pairs([last], "shared", pad_token_id=0)).logps
            if not torch.equal(alone, together[[b - 1, 2 * b - 1]]):
                differ.append(i)
    assert not differ, f"pairs {differ} get other log-probs beside the fillers than alone"
