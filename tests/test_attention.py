"""The unpadded decoder (dpokit.attention) against transformers' own padded pass.

Oracle: the same model run the way transformers runs a padded batch (its own masks, SDPA),
float64; tolerance 1e-10 on log-prob sums and parameter gradients.
"""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dpokit.attention import (
    SEGMENT_ATTENTION,
    UNPADDED_MODEL_TYPES,
    enable_segment_attention,
    flatten,
)
from dpokit.errors import DpokitError
from dpokit.fixtures import MODEL_KINDS, tiny_causal_lm
from dpokit.logps import completion_logps
from tests.helpers import LAYOUTS, tokenized_pairs

ROWS = [
    {"prompt": "the cat sat", "chosen": " on the mat.", "rejected": " under the green tree!"},
    {"prompt": "what color is the sky?", "chosen": " blue", "rejected": " green and red sea"},
    {"prompt": "a", "chosen": " quick brown fox jumps over the lazy dog.", "rejected": " no"},
]


@pytest.fixture(scope="module")
def pairs(tokenizer):
    return tokenized_pairs(ROWS, tokenizer)


@pytest.fixture(params=["one call", "per segment"])
def cpu_path(request, monkeypatch):
    """Both CPU paths of the unpadded attention: a batch's segments as one masked call (short
    rows), or a call per segment without an L × L mask (the path long rows take)."""
    import dpokit.attention as attention

    if request.param == "per segment":
        monkeypatch.setattr(attention, "ONE_CALL_BUDGET", 0)
    return request.param


def logps_and_grads(model, batch, *, unpadded):
    model.zero_grad()
    out = completion_logps(model, batch, chunk_size=8, unpadded=unpadded)
    (out.logps * torch.linspace(0.5, 1.5, len(out.logps), dtype=out.logps.dtype)).sum().backward()
    return out.logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(model, batch):
    padded = copy.deepcopy(model)  # stays on transformers' SDPA
    expected, expected_grads = logps_and_grads(padded, batch, unpadded=False)
    got, grads = logps_and_grads(model, batch, unpadded=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_unpadded_equals_padded(pairs, tokenizer, kind, layout, cpu_path):
    model = tiny_causal_lm(kind, vocab_size=len(tokenizer), seed=5, dtype=torch.float64)
    assert_same(model, LAYOUTS[layout](pairs))
    assert model.config._attn_implementation == SEGMENT_ATTENTION


def test_decoder_sees_only_real_tokens(pairs, tokenizer):
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=5)
    batch = LAYOUTS["shared"](pairs)
    shapes = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True)
    with torch.no_grad():
        completion_logps(model, batch)
    handle.remove()
    real = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert shapes == [(1, real)]
    assert real < batch.input_ids.numel()  # the batch does have padding


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sliding_window_counts_positions_in_each_sequence(pairs, tokenizer, layout, cpu_path):
    """Qwen2 with a 3-token window on every layer: the padded oracle (right padding, one row
    per sequence) gets the window from transformers' own mask."""
    def qwen2(**window):
        config = AutoConfig.for_model(
            "qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
            **window)
        torch.manual_seed(6)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float64)

    model = qwen2(use_sliding_window=True, sliding_window=3, max_window_layers=0)
    oracle = copy.deepcopy(model)
    no_window = qwen2()
    no_window.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = completion_logps(oracle, LAYOUTS["right"](pairs), unpadded=False).logps
        got = completion_logps(model, LAYOUTS[layout](pairs), unpadded=True).logps
        full = completion_logps(no_window, LAYOUTS["right"](pairs), unpadded=False).logps
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert (full - expected).abs().max() > 1e-3  # the window matters for these sequences


def test_switched_model_is_plain_sdpa_on_other_calls(tokenizer):
    """After the switch, an ordinary call with a left-padded 2D mask (as in generation) gives
    what an untouched SDPA model gives."""
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=7, dtype=torch.float64)
    plain = copy.deepcopy(model)
    assert enable_segment_attention(model)
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        expected = plain(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[:, 2:], expected[:, 2:], rtol=0, atol=1e-12)


def test_eager_models_run_padded(pairs, tokenizer):
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=8, dtype=torch.float64)
    model.set_attn_implementation("eager")
    assert not enable_segment_attention(model)
    batch = LAYOUTS["shared"](pairs)
    with torch.no_grad():
        got = completion_logps(model, batch, unpadded=True).logps
        expected = completion_logps(model, batch, unpadded=False).logps
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_flatten_segments(pairs):
    batch = LAYOUTS["left"](pairs)
    flat = flatten(batch)
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) for p in pairs] + [
        len(p.prompt_ids) + len(p.rejected_ids) for p in pairs]
    assert [stop - start for start, stop in flat.segments.bounds] == lengths
    assert flat.input_ids.shape == (1, sum(lengths))
    real = batch.sequence_ids.reshape(-1) >= 0
    assert torch.equal(flat.input_ids[0], batch.input_ids.reshape(-1)[real])
    assert (flat.flat_index[~real] == -1).all()
    assert flat.segments.parts == tuple((n,) for n in lengths)  # causal, no masks


def test_flatten_rejects_interleaved_sequences(pairs):
    batch = LAYOUTS["packed"](pairs)
    ids = batch.sequence_ids.clone()
    ids[0, 0] = ids[0, -1]  # sequence of the last token also appears first
    with pytest.raises(DpokitError, match="split by another"):
        flatten(type(batch)(**{**batch.__dict__, "sequence_ids": ids}))


def tiny_of_type(model_type, vocab_size, *, window=None):
    """A 2-layer model of ``model_type`` from its config (float64, float32 for MoE kernels)."""
    if model_type == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=vocab_size, n_embd=32, n_layer=2,
                                      n_head=4, n_positions=256, pad_token_id=0)
    else:
        extra = {"num_local_experts": 2, "num_experts": 2, "num_experts_per_tok": 1,
                 "moe_intermediate_size": 32} if "moe" in model_type or model_type == "mixtral" \
            else {}
        if window:
            extra.update(sliding_window=window, use_sliding_window=True, max_window_layers=0)
        config = AutoConfig.for_model(
            model_type, vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, pad_token_id=0, **extra)
    moe = "moe" in model_type or model_type == "mixtral"
    torch.manual_seed(12)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if moe else torch.float64)
    return model.eval(), (1e-5 if moe else 1e-10)


@pytest.mark.parametrize("model_type", sorted(UNPADDED_MODEL_TYPES))
def test_every_switched_family_equals_its_padded_pass(pairs, tokenizer, model_type, cpu_path):
    """The allowlist is checked, not assumed: right-padded transformers pass as the oracle,
    with a 3-token sliding window where the family has one."""
    for window in (None, 3):
        model, tolerance = tiny_of_type(model_type, len(tokenizer), window=window)
        oracle = copy.deepcopy(model)
        with torch.no_grad():
            expected = completion_logps(oracle, LAYOUTS["right"](pairs), unpadded=False).logps
            for layout in ("left", "packed", "shared"):
                got = completion_logps(model, LAYOUTS[layout](pairs), unpadded=True).logps
                torch.testing.assert_close(got, expected, rtol=0, atol=tolerance,
                                           msg=f"{model_type} {layout} window={window}")
        assert model.config._attn_implementation == SEGMENT_ATTENTION


def test_families_outside_the_list_run_padded(tokenizer):
    """Qwen2-MoE builds a sliding-window mask but does not pass the window to attention: it
    must not be switched."""
    model, _ = tiny_of_type("qwen2_moe", len(tokenizer))
    assert model.config.model_type not in UNPADDED_MODEL_TYPES
    assert not enable_segment_attention(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_gpu_path_of_later_completions_equals_padded(pairs, tokenizer, model_type, monkeypatch):
    """The GPU path of a shared-prompt row's later completion (the prompt's and its own keys side
    by side, ``causal_lower_right``, key/value heads repeated for GQA) run on this CPU, where
    the bias materialises: log-probs and gradients equal to the padded pass (float64)."""
    import dpokit.attention as attention

    monkeypatch.setattr(attention, "keys_side_by_side", lambda device: True)
    used = []
    real_sdpa = attention._sdpa

    def recording(query, key, value, mask, **kwargs):
        used.append(type(mask).__name__)
        return real_sdpa(query, key, value, mask, **kwargs)

    monkeypatch.setattr(attention, "_sdpa", recording)
    model, _ = tiny_of_type(model_type, len(tokenizer))
    model.train()
    assert_same(model, LAYOUTS["shared"](pairs))
    assert "CausalBias" in used and "Tensor" not in used  # no mask of its own anywhere


def test_shared_rows_need_no_row_by_row_mask(pairs, tokenizer, monkeypatch):
    """Past ONE_CALL_BUDGET (long rows) the unpadded decoder builds no (L, L) mask for a
    shared-prompt row: the prompt and the chosen completion are one causal call, and the
    rejected completion's mask is |y_l| × (|x| + |y_w| + |y_l|). Below it (short rows, on a CPU)
    the batch is one call per layer with one (rows, 1, L_max, L_max) mask. The collated batch
    holds no mask at all."""
    import dpokit.attention as attention

    shapes = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        shapes.append(None if attn_mask is None else tuple(attn_mask.shape))
        return real_sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=5)
    batch = LAYOUTS["shared"](pairs)
    assert batch.attention_mask is None
    layers = model.config.num_hidden_layers
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    with torch.no_grad():
        completion_logps(model, batch)
    assert shapes == [(len(pairs), 1, max(lengths), max(lengths))] * layers
    shapes.clear()
    monkeypatch.setattr(attention, "ONE_CALL_BUDGET", len(pairs) * max(lengths) ** 2 - 1)
    with torch.no_grad():
        completion_logps(model, LAYOUTS["shared"](pairs))
    per_layer = [shape for p, n in zip(pairs, lengths, strict=True)
                 for shape in (None, (len(p.rejected_ids), n))]
    assert shapes == per_layer * layers


def test_one_call_is_not_taken_for_uneven_segments(tokenizer):
    """Segments padded to over 4× their own area (one long row among short ones) run a call
    each: the single call would spend most of its work on padding; so does a segment past
    ONE_CALL_MAX_LENGTH tokens."""
    from dpokit.attention import Segments, _one_call_plan

    even = Segments(((0, 10), (10, 20)), ((10,), (4, 3, 3)), torch.arange(20))
    assert _one_call_plan(even, None) is not None
    uneven = Segments(((0, 64), *((64 + i, 65 + i) for i in range(20))),
                      ((64,), *((1,),) * 20), torch.arange(84))
    assert _one_call_plan(uneven, None) is None
    long = Segments(((0, 513),), ((513,),), torch.arange(513))  # past ONE_CALL_MAX_LENGTH
    assert _one_call_plan(long, None) is None
