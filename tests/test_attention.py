"""The unpadded decoder (dpokit.attention) against transformers' own padded pass.

Oracle: the same model run the way transformers runs a padded batch (its own masks, SDPA),
float64; tolerance 1e-10 on log-prob sums and parameter gradients.
"""

import collections
import copy
import itertools

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


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_batch_of_padded_calls_and_single_segments_equals_padded(pairs, tokenizer, kind,
                                                                   layout, monkeypatch):
    """With ONE_CALL_MAX_LENGTH between the batch's segment lengths, the short segments run in
    padded calls and the others on their own in the same layer; log-probs and every gradient
    (the padded calls' gather and the permutation back have hand-written backwards) equal the
    padded pass's in float64."""
    import dpokit.attention as attention

    batch = LAYOUTS[layout](pairs)
    lengths = sorted(b - a for a, b in attention.flatten(batch).segments.bounds)
    monkeypatch.setattr(attention, "ONE_CALL_MAX_LENGTH", lengths[len(lengths) // 2 - 1])
    plans = []
    real_plan = attention._segment_plan
    monkeypatch.setattr(attention, "_segment_plan",
                        lambda *a: plans.append(real_plan(*a)) or plans[-1])
    model = tiny_causal_lm(kind, vocab_size=len(tokenizer), seed=5, dtype=torch.float64)
    assert_same(model, batch)
    assert plans and all(p.calls and p.single and p.query_valid is not None for p in plans)


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


def tiny_of_type(model_type, vocab_size, *, window=None, hidden=32):
    """A 2-layer, 4-head model of ``model_type`` from its config (float64, float32 for MoE
    kernels); head dimension ``hidden`` / 4."""
    if model_type == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=vocab_size, n_embd=hidden, n_layer=2,
                                      n_head=4, n_positions=256, pad_token_id=0)
    else:
        extra = {"num_local_experts": 2, "num_experts": 2, "num_experts_per_tok": 1,
                 "moe_intermediate_size": 32} if "moe" in model_type or model_type == "mixtral" \
            else {}
        if window:
            extra.update(sliding_window=window, use_sliding_window=True, max_window_layers=0)
        config = AutoConfig.for_model(
            model_type, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
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
    each layer makes one unmasked causal call per padded length of ``[x, y_w]``
    (bucket_length) and one masked call per padded (|y_l|, |x| + |y_l|), with a
    (rows, 1, Lq, Lk) mask each. The collated batch holds no mask at all."""
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
    bucket = attention.bucket_length
    causal = {bucket(len(p.prompt_ids) + len(p.chosen_ids)) for p in pairs}
    later = collections.Counter((bucket(len(p.rejected_ids)),
                                 bucket(len(p.prompt_ids) + len(p.rejected_ids))) for p in pairs)
    with torch.no_grad():
        completion_logps(model, batch)
    per_layer = [None] * len(causal) + [(count, 1, lq, lk)
                                        for (lq, lk), count in sorted(later.items())]
    assert shapes == per_layer * layers
    shapes.clear()
    monkeypatch.setattr(attention, "ONE_CALL_BUDGET", min(map(bucket, lengths)) ** 2 - 1)
    with torch.no_grad():
        completion_logps(model, LAYOUTS["shared"](pairs))
    per_layer = [shape for p, n in zip(pairs, lengths, strict=True)
                 for shape in (None, (len(p.rejected_ids), n))]
    assert shapes == per_layer * layers


def test_segment_plan_buckets_segments_by_their_own_length():
    """Short segments go into padded calls by bucket_length (≤ 12.5% padding, at least 16), so
    one long row among short ones pads only itself; a segment past ONE_CALL_MAX_LENGTH runs on
    its own; a bucket over ONE_CALL_BUDGET is split; ``back`` puts every token where the
    calls' flattened outputs (then the single segments') hold it."""
    from dpokit.attention import ONE_CALL_BUDGET, Segments, _segment_plan, bucket_length

    assert [bucket_length(n) for n in (1, 16, 17, 100, 129, 151, 300, 512)] == \
        [16, 16, 32, 112, 160, 160, 320, 512]
    lengths = [64, *[1] * 20, 600, 70]
    stops = list(itertools.accumulate(lengths))
    bounds = tuple(zip([0, *stops[:-1]], stops, strict=True))
    parts = tuple((n,) if n != 70 else (30, 20, 20) for n in lengths)
    plan = _segment_plan(Segments(bounds, parts, torch.arange(stops[-1])), None)
    # the 20 one-token sequences; the 64-token one with the shared row's [x, y_1] (50 → 64),
    # both causal, unmasked; y_2's 20 queries (→ 32) over [x, y_2]'s 50 keys (→ 64), masked
    assert [tuple(c.query_index.shape) for c in plan.calls] == [(20, 16), (2, 64), (1, 32)]
    assert [c.key_index.shape[1] for c in plan.calls] == [16, 64, 64]
    assert [None if c.mask is None else tuple(c.mask.shape) for c in plan.calls] == \
        [None, None, (1, 1, 32, 64)]
    assert plan.single == (21,)
    flat = torch.cat([*(c.query_index.reshape(-1) for c in plan.calls),
                      torch.arange(*bounds[21])])
    torch.testing.assert_close(flat[plan.back], torch.arange(stops[-1]), rtol=0, atol=0)
    start = bounds[22][0]  # x = 30 tokens, y_1 and y_2 20 each
    later = plan.calls[2]
    assert torch.equal(later.query_index[0, :20], torch.arange(start + 50, start + 70))
    assert torch.equal(later.key_index[0, :50], torch.cat([torch.arange(start, start + 30),
                                                           torch.arange(start + 50, start + 70)]))
    mask = later.mask[0, 0]
    assert bool(mask[5, 10]) and bool(mask[5, 35]) and not bool(mask[5, 36])
    assert not mask[:20, 50:].any() and mask[20:, 0].all()  # padding: never seen; sees key 0
    many = Segments(tuple((i * 512, (i + 1) * 512) for i in range(40)), ((512,),) * 40,
                    torch.arange(40 * 512))
    calls = _segment_plan(many, None).calls
    assert [c.query_index.shape[0] for c in calls] == [ONE_CALL_BUDGET // 512**2, 8]


def test_padded_gather_and_permutation_backwards_equal_autograds():
    """The gathers into the padded calls and the permutation back have hand-written backwards
    (gathers summed over a token's slots, an index_copy_) for autograd's serial accumulating
    scatter: given gradients that are zero on the padding slots (what SDPA gives them), every
    token's gradient is the same to the bit — a prompt token is a key twice (its row's causal
    piece and the rejected completion's), and the tokens of single segments get zero from the
    gathers (here the last padded query slot is a real token's, so they must not read it)."""
    from dpokit.attention import Segments, _Permute, _segment_plan, _TakePadded

    lengths = [9, 600, 32, 24]  # 600 runs on its own; the last call is y_2's 16 queries
    parts = ((9,), (600,), (32,), (5, 3, 16))  # (filling their bucket) over [x, y_2]
    stops = list(itertools.accumulate(lengths))
    bounds = tuple(zip([0, *stops[:-1]], stops, strict=True))
    plan = _segment_plan(Segments(bounds, parts, torch.arange(stops[-1])), None)
    assert plan.single == (1,) and plan.key_take.shape[0] == 2
    assert plan.calls[-1].query_index.shape == (1, 16)
    assert plan.query_valid is not None and plan.key_valid is not None
    real_queries = torch.zeros(len(plan.query_gather), dtype=torch.bool)
    real_queries[plan.back[plan.back < len(plan.query_gather)]] = True
    assert bool(real_queries[-1])  # the slot the single segments' tokens are clamped to
    real_keys = torch.cat([c.real_keys.flatten() for c in plan.calls])
    for gather, take, valid, real in (
            (plan.query_gather, plan.query_take, plan.query_valid, real_queries),
            (plan.key_gather, plan.key_take, plan.key_valid, real_keys)):
        source = torch.randn(3, stops[-1], 4, dtype=torch.float64, requires_grad=True)
        upstream = torch.randn(3, len(gather), 4, dtype=torch.float64) * real[None, :, None]
        mine = torch.autograd.grad(_TakePadded.apply(source, gather, take, valid), source,
                                   upstream)[0]
        theirs = torch.autograd.grad(source[:, gather], source, upstream)[0]
        assert torch.equal(mine, theirs)
        assert not mine[:, bounds[1][0]:bounds[1][1]].any()
    flat = torch.randn(len(plan.query_gather) + 600, 2, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(stops[-1], 2, dtype=torch.float64)
    mine = torch.autograd.grad(_Permute.apply(flat, plan.back), flat, upstream)[0]
    assert torch.equal(mine, torch.autograd.grad(flat[plan.back], flat, upstream)[0])


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("layout", ["shared", "padded"])
def test_a_rows_log_probs_do_not_depend_on_its_batch(tokenizer, kind, layout):
    """A pair's log-probs alone equal, to the bit, those it gets beside longer pairs: the CPU
    kernel's rounding depends on the padded length, which is the row's own (bucket_length). A
    cached reference table then does not depend on the batches it was computed in."""
    from dpokit.data.collate import collate_pairs

    rows = [*ROWS, {"prompt": "a much longer prompt about the moon and the sea " * 3,
                    "chosen": " yes, that is a good long answer", "rejected": " no"}]
    pairs = tokenized_pairs(rows, tokenizer)
    model = tiny_causal_lm(kind, vocab_size=len(tokenizer), seed=7)
    with torch.no_grad():
        together = completion_logps(model, collate_pairs(pairs, layout, pad_token_id=0)).logps
        for i, pair in enumerate(pairs):
            alone = completion_logps(model, collate_pairs([pair], layout, pad_token_id=0)).logps
            assert torch.equal(alone, together[[i, i + len(pairs)]]), i
