"""Activation recomputation (dpokit.train.recompute): same gradients, less memory kept.

Oracle for the numbers: the same model without recomputation, float64, tolerance 1e-12.
Memory: the bytes the forward pass leaves allocated (profiler, CPU), which is what the
backward pass keeps; selective recomputation must keep clearly less, full recomputation less
still.
"""

import gc

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dpokit.errors import DpokitError
from dpokit.fixtures import tiny_causal_lm
from dpokit.train.recompute import (
    AUTO_MIN_FREED_BYTES,
    SAVED_OPS,
    _policy,
    auto_selective,
    enable_recompute,
    fit_memory,
    freed_bytes,
    lm_head_scratch_bytes,
    training_state_bytes,
)
from dpokit.train.recompute import kept_bytes as estimated_kept_bytes


def model_for(mode, dtype=torch.float64):
    model = tiny_causal_lm("llama", vocab_size=128, hidden_size=64, num_layers=2,
                           intermediate_size=176, seed=11, dtype=dtype)
    enable_recompute(model, mode)
    model.train()
    return model


def loss_of(model, ids):
    logits = model(input_ids=ids).logits
    return logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recomputation_keeps_the_gradients(mode):
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    plain, recomputed = model_for("none"), model_for(mode)
    losses = []
    for model in (plain, recomputed):
        loss = loss_of(model, ids)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-12)
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def kept_bytes(model, ids):
    """Bytes allocated during the forward pass and still allocated at its end."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = loss_of(model, ids)
    kept = sum(event.self_cpu_memory_usage for event in prof.key_averages())
    loss.backward()
    return kept


def test_selective_recomputation_keeps_less_memory():
    ids = torch.randint(0, 128, (4, 256), generator=torch.Generator().manual_seed(1))
    kept = {mode: kept_bytes(model_for(mode, torch.float32), ids)
            for mode in ("none", "selective", "full")}
    assert kept["selective"] < 0.8 * kept["none"]
    assert kept["full"] < kept["selective"]


@pytest.mark.parametrize(("hidden", "inner", "layers"), [(64, 176, 2), (128, 352, 4)])
def test_the_kept_activations_estimate_matches_the_allocator(hidden, inner, layers):
    """kept_bytes (9·H + 4·I values a token and layer without recomputation, 6·H + 2·I with
    selective) against the bytes the forward pass leaves allocated (profiler) for the decoder's
    hidden states only (no LM head): within −10%/+25% — the rest is the embedding output and
    the final norm, which the estimate leaves out (measured 1.03–1.09× and 1.00×)."""
    ids = torch.randint(0, 128, (4, 256), generator=torch.Generator().manual_seed(2))
    for mode in ("none", "selective"):
        model = tiny_causal_lm("llama", vocab_size=128, hidden_size=hidden, num_layers=layers,
                               intermediate_size=inner, seed=1, dtype=torch.float32)
        enable_recompute(model, mode)
        model.train()
        gc.collect()  # no earlier test's garbage freed inside the profile (negative bytes)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = model.model(input_ids=ids).last_hidden_state.sum()
        kept = sum(event.self_cpu_memory_usage for event in prof.key_averages())
        out.backward()
        estimate = estimated_kept_bytes(model.config, ids.numel(), 4, mode)
        assert 0.9 * estimate < kept < 1.25 * estimate, mode


def test_kept_bytes_by_hand():
    """H = 512, I = 1408, 8 layers, 1,000 float32 tokens: none 8 · (9·512 + 4·1408) values a
    token, selective 8 · (6·512 + 2·1408), full 8 · 512 + (9·512 + 4·1408) (the layer inputs and
    one layer recomputed)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=1408,
                                  num_hidden_layers=8, num_attention_heads=8)
    assert estimated_kept_bytes(config, 1000, 4, "none") == 1000 * 8 * 10_240 * 4
    assert estimated_kept_bytes(config, 1000, 4, "selective") == 1000 * 8 * 5_888 * 4
    assert estimated_kept_bytes(config, 1000, 4, "full") == 1000 * (8 * 512 + 10_240) * 4


def test_lm_head_scratch_by_hand():
    """3 float32 chunks of min(chunk_size, tokens) positions × the vocabulary."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", vocab_size=152_064, hidden_size=64,
                                  num_hidden_layers=1, num_attention_heads=4)
    assert lm_head_scratch_bytes(config, 5000, 1024) == 3 * 1024 * 152_064 * 4
    assert lm_head_scratch_bytes(config, 100, 1024) == 3 * 100 * 152_064 * 4
    config.width_multiplier = 2.0  # a head the chunked path does not reproduce: full logits
    assert lm_head_scratch_bytes(config, 5000, 1024) == 3 * 5000 * 152_064 * 4


def test_fit_memory_takes_the_fastest_mode_that_fits():
    need = {"none": 100, "selective": 60, "full": 20}.__getitem__
    both = {"selective", "full"}
    assert fit_memory("none", both, need, available=200) == "none"  # 100 ≤ 0.8 · 200
    assert fit_memory("none", both, need, available=100) == "selective"  # 60 ≤ 80 < 100
    assert fit_memory("none", both, need, available=50) == "full"
    assert fit_memory("none", both, need, available=10) == "full"  # none fits: the leanest
    assert fit_memory("none", {"full"}, need, available=100) == "full"  # selective turned off
    assert fit_memory("none", {"selective"}, need, available=10) == "selective"  # no full
    assert fit_memory("none", set(), need, available=10) == "none"  # gradient_checkpointing off
    assert fit_memory("selective", both, need, available=100) == "selective"
    assert fit_memory("selective", both, need, available=50) == "full"
    assert fit_memory("none", both, need, available=None) == "none"  # unknown: as preferred
    assert fit_memory("none", both, need, available=100, share=1.0) == "none"


def test_selective_policy_saves_matmuls_and_attention_only():
    names = {str(op) for op in SAVED_OPS}
    assert "aten.mm.default" in names and "aten.addmm.default" in names
    assert any("scaled_dot_product" in name for name in names)
    assert not any(word in name for name in names for word in ("silu", "mul", "pow", "add."))


def test_modes_switch_the_layers():
    assert not any(getattr(m, "gradient_checkpointing", False)
                   for m in model_for("none").modules())
    for mode in ("selective", "full"):
        layers = model_for(mode).model.layers
        assert all(layer.gradient_checkpointing for layer in layers)


def test_freed_bytes_by_hand():
    """Llama shape H = 512, I = 1408, 8 layers; 1,000 tokens in float32:
    1000 · 8 · (3·512 + 2·1408) · 4 B = 1000 · 8 · 4352 · 4 = 139,264,000 B."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=1408,
                                  num_hidden_layers=8, num_attention_heads=8)
    assert freed_bytes(config, 1000, 4) == 139_264_000
    gpt2 = AutoConfig.for_model("gpt2", n_embd=64, n_layer=3, n_head=4)  # I = 4·H
    assert freed_bytes(gpt2, 10, 2) == 10 * 3 * (3 * 64 + 2 * 256) * 2
    assert freed_bytes(config, 1000, 4) >= AUTO_MIN_FREED_BYTES > freed_bytes(config, 100, 4)


def test_auto_selective_weighs_activations_against_the_trained_state():
    """On when the freed activations reach 64 MiB and half of weights + grads + 2 AdamW moments
    (16 B a float32 parameter): the benchmark's 26 M model at 8 pairs of ~151 tokens frees
    ~168 MB against a 421 MB state (off: ~12% faster for ~150 MB); at 2 pairs of ~2,037 tokens
    ~567 MB (on); with LoRA the state counts 0 (on from 64 MiB)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=1408,
                                  num_hidden_layers=8, num_attention_heads=8)
    state = 16 * 26_300_000
    assert not auto_selective(freed_bytes(config, 8 * 151, 4), state)
    assert auto_selective(freed_bytes(config, 2 * 2037, 4), state)
    assert auto_selective(AUTO_MIN_FREED_BYTES, 0)
    assert not auto_selective(AUTO_MIN_FREED_BYTES - 1, 0)
    model = tiny_causal_lm("llama", vocab_size=64, seed=0)
    numel = sum(p.numel() for p in model.parameters())
    assert training_state_bytes(model, lora=False) == 16 * numel
    assert training_state_bytes(model, lora=True) == 0
    model.model.embed_tokens.weight.requires_grad_(False)
    frozen = model.model.embed_tokens.weight.numel()
    assert training_state_bytes(model, lora=False) == 16 * (numel - frozen)


def test_attention_with_dropout_is_recomputed_not_replayed():
    """Replaying a dropout-drawing kernel from the cache would shift the RNG for the layer's
    later dropouts in the recomputation (CUDA flash/efficient kernels draw inside the op)."""
    from torch.utils.checkpoint import CheckpointPolicy

    flash = torch.ops.aten._scaled_dot_product_flash_attention.default
    q = torch.zeros(1, 1, 2, 4)
    assert _policy(None, flash, q, q, q, 0.0) == CheckpointPolicy.MUST_SAVE
    assert _policy(None, flash, q, q, q, 0.1) == CheckpointPolicy.PREFER_RECOMPUTE
    assert _policy(None, torch.ops.aten.mm.default, q, q) == CheckpointPolicy.MUST_SAVE
    assert _policy(None, torch.ops.aten.silu.default, q) == CheckpointPolicy.PREFER_RECOMPUTE


def test_models_without_checkpointing_support_get_a_clear_error():
    model = tiny_causal_lm("llama", vocab_size=64, seed=0)
    model.supports_gradient_checkpointing = False
    with pytest.raises(DpokitError, match="does not support activation checkpointing"):
        enable_recompute(model, "selective")
    enable_recompute(model, "none")  # nothing asked, nothing raised
