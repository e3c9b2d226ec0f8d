"""Summed completion log-probs of real ``transformers`` families against each sequence alone.

Oracle: the model's own plain forward on each ``prompt + completion`` alone (one row, no
padding, no mask, no position ids), float64, Σ log_softmax at the completion tokens. Every
layout (right/left padded, packed, shared; pairs of their own and a k-completion group),
``unpadded`` on and off, the chunked head and the full forward (``fused``), LD-DPO's
``ld_alpha``. Tolerance 1e-9 on the sums in float64 (eager attention's float32 softmax: 1e-6).
Each test here failed before its fix, except the allowlist check, which guards the families
:data:`dpokit.logps.LAYOUT_MODEL_TYPES` lets keep their layout.
"""

import copy
import logging
import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dpokit.data.collate import as_padded, collate_padded, collate_pairs
from dpokit.data.tokenize import TokenizedPair
from dpokit.logps import LAYOUT_MODEL_TYPES, completion_logps, sequence_logps, takes_layout

V = 64
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
MOE = {"num_experts": 2, "num_local_experts": 2, "num_experts_per_tok": 1,
       "moe_intermediate_size": 32}
WINDOW = {"sliding_window": 4}
CONFIGS = {
    # checked families (LAYOUT_MODEL_TYPES); a 4-token window where the family has one
    "apertus": {}, "arcee": {}, "bitnet": {}, "cohere": {"logit_scale": 0.5},
    "cohere2": {"logit_scale": 0.5, **WINDOW}, "cohere2_moe": {},
    "deepseek_v3": {"num_key_value_heads": 4, "n_routed_experts": 2, "num_experts_per_tok": 1,
                    "first_k_dense_replace": 1, "kv_lora_rank": 8, "q_lora_rank": 8,
                    "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8, "n_group": 1,
                    "topk_group": 1},
    "diffllama": {}, "doge": {}, "ernie4_5": {}, "exaone4": WINDOW,
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 3.0, "attn_logit_softcapping": 5.0,
               **WINDOW},
    "gemma3_text": {"head_dim": 8, "final_logit_softcapping": 3.0,
                    "layer_types": ["sliding_attention", "full_attention"], **WINDOW},
    "glm": {}, "glm4": {}, "granite": {"logits_scaling": 2.0, "embedding_multiplier": 3.0,
                                       "residual_multiplier": 0.5, "attention_multiplier": 0.2},
    "granite_swa": WINDOW, "granitemoe": {"logits_scaling": 2.0, **MOE},
    "helium": {"head_dim": 8}, "hunyuan_v1_dense": {"head_dim": 8}, "internlm3": {},
    "jetmoe": {}, "llama": {}, "minicpm3": {"num_key_value_heads": 4, "qk_rope_head_dim": 4,
                                           "qk_nope_head_dim": 4, "v_head_dim": 8,
                                           "kv_lora_rank": 8, "q_lora_rank": 8},
    "ministral": {"head_dim": 8, **WINDOW}, "mistral": WINDOW, "mixtral": {**MOE, **WINDOW},
    "nemotron": {}, "olmo": {}, "olmo2": {}, "olmo3": WINDOW, "olmoe": MOE, "persimmon": {},
    "phi": {}, "phi3": WINDOW, "phimoe": {**MOE, **WINDOW},
    "qwen2": {"use_sliding_window": True, "max_window_layers": 1, **WINDOW},
    "qwen2_moe": {**MOE, "shared_expert_intermediate_size": 32},
    "qwen3": {"head_dim": 8, "use_sliding_window": True, "max_window_layers": 1, **WINDOW},
    "qwen3_moe": {**MOE, "head_dim": 8}, "seed_oss": {}, "smollm3": {}, "stablelm": {},
    "starcoder2": WINDOW, "vaultgemma": {"head_dim": 8},
    "gpt2": dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "gpt_neox": dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256),
    "falcon": dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   new_decoder_architecture=True, num_kv_heads=2, alibi=False),
    "gptj": dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=256, rotary_dim=4),
    "codegen": dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=256, n_ctx=256,
                    rotary_dim=4),
    "gpt_bigcode": dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=256),
    # families outside the list: their packed and shared batches run as a padded one
    "falcon_alibi": dict(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, alibi=True),
    "bloom": dict(vocab_size=V, hidden_size=32, n_layer=2, n_head=4),
    "mpt": dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=256),
    "opt": dict(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32),
    "gpt_neo": dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                    max_position_embeddings=256, attention_types=[[["global", "local"], 1]],
                    window_size=4),
    "gpt_oss": {**MOE, "head_dim": 8, "layer_types": ["sliding_attention", "full_attention"],
                **WINDOW},
    "lfm2": {"layer_types": ["conv", "full_attention"], "block_ff_dim": 64},
    "minimax": {},
    "jamba": {**MOE, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 1, "mamba_d_state": 4, "mamba_dt_rank": 4,
              "use_mamba_kernels": False},
    "recurrent_gemma": {"logits_soft_cap": 2.0, "block_types": ["recurrent", "attention"],
                        "lru_width": 32, "attention_window_size": 4, "num_key_value_heads": 1},
    "llama4_text": {},
}
SPECIAL = {"gpt2", "gpt_neox", "falcon", "gptj", "codegen", "gpt_bigcode", "falcon_alibi",
           "bloom", "mpt", "opt", "gpt_neo"}
EAGER_SOFTMAX = {"mpt", "gpt_neo", "gemma2", "granite_swa", "vaultgemma"}
"""Families whose eager attention takes the softmax in float32 (tolerance 1e-6)."""


def build(name):
    """A tiny random float64 model of family ``name`` (eager experts: grouped matmuls take no
    float64), in eval mode."""
    model_type = "falcon" if name == "falcon_alibi" else name
    kwargs = dict(CONFIGS[name]) if name in SPECIAL else {**COMMON, **CONFIGS[name]}
    config = AutoConfig.for_model(model_type, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  **kwargs)
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float64,
                                                 experts_implementation="eager")
    except (ValueError, TypeError):  # no experts to choose for
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    return model.eval()


def alone(model, prompt, completion, ld_alpha=None, shared=None):
    """Σ log π(completion | prompt): the sequence alone through the model's own forward,
    float64; with ``ld_alpha``, tokens past ``shared`` weigh α."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    token = log_probs.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt) - 1:]
    if ld_alpha is not None:
        weight = torch.full((len(token),), ld_alpha, dtype=torch.float64)
        token = token * weight.index_fill(0, torch.arange(min(shared, len(token))), 1.0)
    return token.sum()


def make_pairs(group=False):
    """Three pairs of their own — a 1-token prompt with a 1-token chosen, completions ending
    in EOS with the pad id (0) inside one — and, with ``group``, a 3-pair k-completion group."""
    rng = random.Random(3)

    def ids(n):
        return [rng.randrange(3, V) for _ in range(n)]

    pairs = [TokenizedPair(ids(6), ids(7), ids(9)), TokenizedPair(ids(1), ids(1), ids(12)),
             TokenizedPair(ids(3), [*ids(5), 0, 2], [*ids(2), 2])]
    if group:
        prompt, a, b, c = ids(5), ids(3), ids(6), ids(1)
        pairs += [TokenizedPair(prompt, a, b, group=7), TokenizedPair(prompt, a, c, group=7),
                  TokenizedPair(prompt, b, c, group=7)]
    return pairs


def expected(model, pairs, ld_alpha=None):
    oracle = copy.deepcopy(model)
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            shared = min(len(p.chosen_ids), len(p.rejected_ids))
            out.append(alone(oracle, p.prompt_ids, getattr(p, side), ld_alpha, shared))
    return torch.stack(out)


LAYOUTS = {
    "right": lambda pairs: collate_padded(pairs, pad_token_id=0),
    "left": lambda pairs: collate_padded(pairs, pad_token_id=0, padding_side="left"),
    "packed": lambda pairs: collate_pairs(pairs, "packed", pad_token_id=0),
    "shared": lambda pairs: collate_pairs(pairs, "shared", pad_token_id=0),
}


def assert_alone(model, layouts, *, group=True, fused=(True, False), unpadded=(True, False),
                 ld_alpha=None, atol=1e-9, chunk_size=5):
    """Every requested layout and switch equals each sequence alone."""
    pairs = make_pairs(group=group and ld_alpha is None)
    want = expected(model, pairs, ld_alpha)
    for layout in layouts:
        for f in fused:
            for u in unpadded:
                candidate = copy.deepcopy(model)
                with torch.no_grad():
                    out = sequence_logps(candidate, LAYOUTS[layout](pairs), fused=f,
                                         unpadded=u, ld_alpha=ld_alpha, chunk_size=chunk_size)
                got = torch.cat([out.chosen_logps, out.rejected_logps]).double()
                torch.testing.assert_close(got, want, rtol=0, atol=atol,
                                           msg=f"{layout} fused={f} unpadded={u}")


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_the_full_forward_keeps_the_sliding_window_of_a_shared_row(name):
    """``fused=False`` (the model's own forward, also taken automatically for heads the chunked
    path cannot reproduce) handed the shared layout a window-less 4D mask: every token past
    the window was wrong (0.13 on Mistral, 0.41 on Gemma-2)."""
    assert_alone(build(name), ["shared"], fused=(False,),
                 atol=1e-6 if name in EAGER_SOFTMAX else 1e-9)


@pytest.mark.parametrize("name", ["bloom", "mpt", "falcon_alibi", "opt", "gpt_neo", "gpt_oss",
                                  "lfm2", "minimax", "jamba", "recurrent_gemma"])
def test_unchecked_families_compute_packed_and_shared_batches_as_each_sequence_alone(name):
    """Families outside the checked list silently mixed sequences in a packed row or a shared
    row — state-space/convolution/recurrent layers carry state across the boundary (LFM2,
    MiniMax, Jamba, RecurrentGemma), ALiBi or positions built from a 2D mask (MPT, OPT),
    a window kept out of the mask (GPT-Neo), sinks (gpt-oss): errors 1e-4 to 0.12 — or
    crashed with a traceback (Bloom, Falcon with ALiBi: ``too many values to unpack``). They
    now run those batches padded."""
    model = build(name)
    assert not takes_layout(model, "packed") and not takes_layout(model, "shared")
    atol = 1e-6 if name in EAGER_SOFTMAX else 1e-9
    assert_alone(model, ["packed", "shared"], fused=(True,), atol=atol)


def test_recurrent_gemmas_logit_soft_cap_is_applied_by_the_chunked_head():
    """RecurrentGemma caps its logits under the name ``logits_soft_cap``; the chunked head left
    it out, so every layout was off (0.044 right-padded)."""
    assert_alone(build("recurrent_gemma"), ["right", "left"], fused=(True,), unpadded=(False,))


def test_a_model_whose_get_decoder_is_itself_is_read_through_its_inner_model():
    """Llama-4's text model: ``get_decoder()`` returns the causal LM itself, whose logits the
    chunked head then took for hidden states (a shape-mismatch traceback); its decoder is
    ``model.model``."""
    assert_alone(build("llama4_text"), ["right", "shared"], fused=(True,), unpadded=(True,))


@pytest.mark.parametrize("name", sorted(LAYOUT_MODEL_TYPES))
def test_every_checked_family_equals_each_sequence_alone(name):
    """The allowlist is checked, not assumed: the padded decoder (``unpadded=False``) on packed
    and shared batches, and the default path on the shared one, each sequence alone as the
    oracle."""
    model = build(name)
    assert takes_layout(model, "packed") and takes_layout(model, "shared")
    atol = 1e-6 if name in EAGER_SOFTMAX else 1e-9
    assert_alone(model, ["packed", "shared"], fused=(True,), unpadded=(False,), atol=atol)
    assert_alone(model, ["shared"], fused=(True,), unpadded=(True,), atol=atol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ld_alpha_on_an_unchecked_family(layout):
    """LD-DPO's weights after the padded re-layout: tokens past min(|y_w|, |y_l|) weigh α."""
    assert_alone(build("lfm2"), [layout], fused=(True,), unpadded=(True,), ld_alpha=0.3)


def test_as_padded_keeps_sequences_pairs_and_columns():
    """The re-laid-out batch holds each sequence ``prompt + completion`` once, numbered as
    before, with the group's pair index and the per-pair weights."""
    pairs = make_pairs(group=True)
    pairs[0] = TokenizedPair(pairs[0].prompt_ids, pairs[0].chosen_ids, pairs[0].rejected_ids,
                             weight=0.5)
    reference = collate_padded(pairs, pad_token_id=0)
    for layout in ("packed", "shared"):
        batch = as_padded(collate_pairs(pairs, layout, pad_token_id=0))
        assert batch.layout == "padded"
        assert torch.equal(batch.pair_index, reference.pair_index)
        assert torch.equal(batch.weights, reference.weights)
        for s in range(reference.num_sequences):
            for field in ("input_ids", "completion_mask", "position_ids"):
                real = reference.sequence_ids[s] >= 0
                assert torch.equal(getattr(batch, field)[s][batch.sequence_ids[s] >= 0],
                                   getattr(reference, field)[s][real]), (layout, s, field)


def test_rows_at_exactly_the_models_positions():
    """GPT-2 with 16 learned positions: sequences of exactly 16 tokens, whose shared row is
    longer than 16 (positions continue from the prompt in each completion)."""
    config = AutoConfig.for_model("gpt2", vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                  n_positions=16, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    rng = random.Random(5)
    pairs = [TokenizedPair([rng.randrange(3, V) for _ in range(6)],
                           [rng.randrange(3, V) for _ in range(10)],
                           [rng.randrange(3, V) for _ in range(10)]),
             TokenizedPair([7], [8] * 15, [9])]
    want = expected(model, pairs)
    for layout in LAYOUTS:
        for unpadded in (True, False):
            with torch.no_grad():
                out = completion_logps(copy.deepcopy(model), LAYOUTS[layout](pairs),
                                       unpadded=unpadded)
            torch.testing.assert_close(out.logps, want, rtol=0, atol=1e-9, msg=layout)
