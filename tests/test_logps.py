"""Sequence log-probabilities against a slow reference: full logits, one example at a time,
float64. Tolerance 1e-5 (absolute, on sums of ~5–40 token log-probs)."""

import copy

import pytest
import torch

from dpokit.data.collate import collate_packed, collate_padded
from dpokit.fixtures import MODEL_KINDS, tiny_causal_lm
from dpokit.logps import sequence_logps
from tests.helpers import LAYOUTS, reference_token_logps, tokenized_pairs

ROWS = [
    {"prompt": "the cat sat", "chosen": " on the mat.", "rejected": " under the green tree!"},
    {"prompt": "what color is the sky?", "chosen": " blue", "rejected": " green and red sea"},
    {"prompt": "a", "chosen": " quick brown fox jumps over the lazy dog.", "rejected": " no"},
    {"prompt": "why is the sun red? answer the question", "chosen": " yes", "rejected": " no!"},
]


@pytest.fixture(scope="module")
def pairs(tokenizer):
    return tokenized_pairs(ROWS, tokenizer)


def collate(pairs, layout):
    return LAYOUTS[layout](pairs)


def reference(model, pairs):
    chosen = [reference_token_logps(model, p.prompt_ids, p.chosen_ids) for p in pairs]
    rejected = [reference_token_logps(model, p.prompt_ids, p.rejected_ids) for p in pairs]
    return chosen, rejected


@pytest.fixture(scope="module", params=MODEL_KINDS)
def model(request, tokenizer):
    return tiny_causal_lm(request.param, vocab_size=len(tokenizer), seed=1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_summed_logps_match_slow_reference(model, pairs, layout):
    chosen, rejected = reference(model, pairs)
    with torch.no_grad():
        out = sequence_logps(model, collate(pairs, layout), chunk_size=7, wpo=True)
    expected_chosen = torch.tensor([float(t.sum()) for t, _ in chosen])
    expected_rejected = torch.tensor([float(t.sum()) for t, _ in rejected])
    torch.testing.assert_close(out.chosen_logps.double(), expected_chosen.double(), rtol=0,
                               atol=1e-5)
    torch.testing.assert_close(out.rejected_logps.double(), expected_rejected.double(), rtol=0,
                               atol=1e-5)
    assert out.chosen_tokens.tolist() == [len(p.chosen_ids) for p in pairs]
    assert out.rejected_tokens.tolist() == [len(p.rejected_ids) for p in pairs]
    expected_wpo = torch.tensor([float(w.mean()) for _, w in chosen])
    torch.testing.assert_close(out.chosen_wpo.double(), expected_wpo.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64_model_is_exact(pairs, tokenizer, layout):
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=2, dtype=torch.float64)
    chosen, _ = reference(model, pairs)
    with torch.no_grad():
        out = sequence_logps(model, collate(pairs, layout), chunk_size=5)
    assert out.chosen_logps.dtype == torch.float64
    torch.testing.assert_close(out.chosen_logps, torch.stack([t.sum() for t, _ in chosen]),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("recompute", [True, False])
def test_lm_head_runs_only_on_completion_positions_in_chunks(pairs, tokenizer, recompute,
                                                             monkeypatch):
    """The head sees ≤ chunk_size rows per call, and only the positions that are scored; it
    runs again in backward when the batch's logits pass KEEP_LOGITS_BYTES (0 here), not when
    they fit (this tiny vocabulary)."""
    import dpokit.logps

    if recompute:
        monkeypatch.setattr(dpokit.logps, "KEEP_LOGITS_BYTES", 0)
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=3)
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: seen.append(args[0].shape[0]))
    batch = collate_padded(pairs, pad_token_id=0)
    out = sequence_logps(model, batch, chunk_size=6)
    out.chosen_logps.sum().backward()  # recomputation in backward calls the head again
    handle.remove()
    scored = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert max(seen) <= 6
    assert sum(seen) == (2 if recompute else 1) * scored  # forward (+ recompute), nothing else
    assert scored < batch.input_ids.numel() / 2


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_match_the_full_logits_path(pairs, tokenizer, layout, recompute, monkeypatch):
    import dpokit.logps

    if recompute:
        monkeypatch.setattr(dpokit.logps, "KEEP_LOGITS_BYTES", 0)
    model = tiny_causal_lm("qwen2", vocab_size=len(tokenizer), seed=4)
    batch = collate(pairs, layout)
    grads = []
    for fused in (True, False):
        model.zero_grad()
        out = sequence_logps(model, batch, chunk_size=4, fused=fused)
        (out.chosen_logps - 0.5 * out.rejected_logps).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_ld_alpha_weights_tokens_beyond_the_shared_length(model, pairs):
    chosen, rejected = reference(model, pairs)
    alpha = 0.3
    with torch.no_grad():
        out = sequence_logps(model, collate_packed(pairs), ld_alpha=alpha)
        plain = sequence_logps(model, collate_packed(pairs), ld_alpha=1.0)
        unweighted = sequence_logps(model, collate_packed(pairs))
    torch.testing.assert_close(plain.chosen_logps, unweighted.chosen_logps)
    for i, ((c, _), (r, _)) in enumerate(zip(chosen, rejected, strict=True)):
        shared = min(len(c), len(r))
        assert float(out.chosen_logps[i]) == pytest.approx(
            float(c[:shared].sum() + alpha * c[shared:].sum()), abs=1e-5)
        assert float(out.rejected_logps[i]) == pytest.approx(
            float(r[:shared].sum() + alpha * r[shared:].sum()), abs=1e-5)


def test_lora_model_and_disabled_adapters(pairs, tokenizer):
    """A PEFT/LoRA-wrapped model gives the same numbers as its merged weights, and with the
    adapters disabled the same numbers as the base model."""
    from peft import LoraConfig, get_peft_model

    base = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=5)
    base_logps = sequence_logps(base, collate_padded(pairs, pad_token_id=0)).chosen_logps.detach()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = collate_padded(pairs, pad_token_id=0)
    with torch.no_grad():
        lora_logps = sequence_logps(peft_model, batch).chosen_logps
        with peft_model.disable_adapter():
            disabled = sequence_logps(peft_model, batch).chosen_logps
    merged = copy.deepcopy(peft_model).merge_and_unload()
    chosen, _ = reference(merged, pairs)
    torch.testing.assert_close(lora_logps.double(), torch.stack([t.sum() for t, _ in chosen]),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(disabled, base_logps, rtol=0, atol=1e-6)
    assert (lora_logps - base_logps).abs().max() > 1e-3  # the adapter does change the policy
    out = sequence_logps(peft_model, batch)
    out.chosen_logps.sum().backward()
    trainable = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def test_scaled_heads_match_the_models_own_forward(pairs, tokenizer):
    """Granite divides its logits by ``logits_scaling``: the chunked head must do the same."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "granite", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    batch = collate_padded(pairs, pad_token_id=0)
    with torch.no_grad():
        fused = sequence_logps(model, batch).chosen_logps
        full = sequence_logps(model, batch, fused=False).chosen_logps
    torch.testing.assert_close(fused, full, rtol=0, atol=1e-5)


def test_ld_alpha_keeps_float64_precision(pairs, tokenizer):
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=2, dtype=torch.float64)
    chosen, rejected = reference(model, pairs)
    with torch.no_grad():
        out = sequence_logps(model, collate_packed(pairs), ld_alpha=0.3)
    for i, ((c, _), (r, _)) in enumerate(zip(chosen, rejected, strict=True)):
        shared = min(len(c), len(r))
        assert float(out.chosen_logps[i]) == pytest.approx(
            float(c[:shared].sum() + 0.3 * c[shared:].sum()), abs=1e-12)
