"""The shared-prompt layout on models with sliding-window attention, from a review's findings
(both failed before the fix: the padded decoder path took a window-less 4D mask).

Oracle: every ``prompt + completion`` run alone through the model, no padding, float64.
"""

import copy
import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dpokit.data.collate import collate_pairs
from dpokit.data.tokenize import TokenizedPair
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


@pytest.mark.parametrize(("model_type", "extra"), [
    ("mistral", {"sliding_window": 3}),  # every layer slides, no layer_types
    ("qwen2", {"sliding_window": 3, "use_sliding_window": True, "max_window_layers": 1}),  # mixed
    ("qwen3", {"sliding_window": 3, "use_sliding_window": True, "max_window_layers": 1}),
    ("gemma2", {"sliding_window": 3, "head_dim": 8}),  # alternating, eager; float32 norms
    ("qwen2", {"sliding_window": 3}),  # use_sliding_window false: no layer slides
])
@pytest.mark.parametrize("unpadded", [False, True])
def test_the_shared_layout_keeps_every_layers_window(model_type, extra, unpadded):
    """Each family and layer pattern, padded decoder and the default (unpadded where the family
    is switched): equal to each sequence alone in float64, 1e-10 (Gemma-2: 1e-6, its RMSNorm
    computes in float32; a window ignored is off by ~1e-2)."""
    model = _tiny(model_type, **extra)
    pairs = _pairs()
    with torch.no_grad():
        got = completion_logps(model, collate_pairs(pairs, "shared", pad_token_id=0),
                               unpadded=unpadded).logps
    atol = 1e-6 if model_type == "gemma2" else 1e-10
    torch.testing.assert_close(got, _expected(model, pairs), rtol=0, atol=atol)


def test_the_reference_cache_is_keyed_on_the_log_prob_code(monkeypatch):
    """A release that changes how log-probs are computed (this file's fix) must not read a
    reference table an earlier one cached: the source of logps/attention/collate is in the
    reference cache's settings."""
    import dpokit.objectives.reference as reference

    before = reference.logps_code_digest()
    original = type(reference.Path("x")).read_bytes

    def edited(self):
        data = original(self)
        return data + b"# edited" if self.name == "logps.py" else data

    monkeypatch.setattr(type(reference.Path("x")), "read_bytes", edited)
    assert reference.logps_code_digest() != before
