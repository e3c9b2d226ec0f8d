"""From a review of the reference policy (``objectives/reference.py``) and the DPO objective's
forward (``objectives/dpo.py``, ``objectives/base.py``), each against an independent oracle:

- the objective's loss and metric sums against a float64 DPO loss written out here on the same
  tokens (log-probs from a float64 copy of each model, one unpadded sequence at a time), and
  sums that add exactly across micro-batches;
- the precomputed table looked up by row index, in any batch order, against the same oracle;
- LoRA with adapters disabled against a separate frozen copy of the base, whatever the
  policy's mode and dropout;
- TR-DPO's soft update at the right steps, against the formula in float64;
- the on-disk cache: each thing that changes the reference log-probs gives a new entry whose
  table equals a fresh pass without any cache; what does not change them reuses the entry.
"""

import json
import math
import random
import shutil

import pytest
import torch

from dpokit.config import load_config
from dpokit.data import collate_pairs
from dpokit.fixtures import tiny_causal_lm
from dpokit.objectives.reference import Reference, compute_reference_table, hash_directory
from dpokit.train.config import DPOConfig
from tests.helpers import PROMPTS, reference_token_logps, tokenized_pairs, write_jsonl

ATOL = 1e-4
"""Summed float32 log-probs of ~10-token completions of a tiny model against float64: their
rounding is ~1e-6 per token; 1e-4 leaves room and is far below any real disagreement."""


def dpo_config(root, **overrides):
    values = {"model": str(root / "llama"), "data": str(root / "prefs.jsonl"),
              "output_dir": str(root / "runs" / "run"), "batch_size": 4, "beta": 0.5,
              "max_length": 64}
    values.update(overrides)
    return load_config(DPOConfig, None, {k: v if isinstance(v, str) else json.dumps(v)
                                         for k, v in values.items()})


def preference_rows(n=12, seed=0):
    """Pairs whose completions differ in length (LD-DPO's α then changes the numbers)."""
    rng = random.Random(seed)
    words = ["red", "sea", "moon", "yes", "no", "tree"]
    return [{"prompt": rng.choice(PROMPTS),
             "chosen": " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 5))),
             "rejected": " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 5))),
             "weight": rng.choice([0.5, 1.0, 2.0])} for _ in range(n)]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tokenizer):
    """A saved tiny Llama (the policy's start and default reference) and a second one."""
    root = tmp_path_factory.mktemp("refreview")
    for name, seed in (("llama", 7), ("other", 8)):
        tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    write_jsonl(root / "prefs.jsonl", preference_rows())
    return root


def oracle_logps(model, pair):
    """(chosen, rejected) summed log π in float64, each sequence on its own."""
    return tuple(float(reference_token_logps(model, pair.prompt_ids, ids)[0].sum())
                 for ids in (pair.chosen_ids, pair.rejected_ids))


# ------------------------------------------------------------------ the objective's forward


def oracle_token_logps(model, pair, ld_alpha=None):
    """(chosen, rejected) summed log π in float64; with LD-DPO's α the tokens past the
    shorter completion's length count α times (Liu et al. 2024, arXiv:2409.06411, Eq. 7)."""
    chosen, rejected = (reference_token_logps(model, pair.prompt_ids, ids)[0]
                        for ids in (pair.chosen_ids, pair.rejected_ids))
    if ld_alpha is None:
        return float(chosen.sum()), float(rejected.sum())
    shared = min(len(chosen), len(rejected))
    return tuple(float(x[:shared].sum() + ld_alpha * x[shared:].sum())
                 for x in (chosen, rejected))


def _log_sigmoid(h):
    return -math.log1p(math.exp(-h)) if h > 0 else h - math.log1p(math.exp(h))


CASES = {  # name: (config overrides, oracle loss of (beta, chosen logratio, rejected, pair))
    "sigmoid": ({}, lambda b, u, v, p: -_log_sigmoid(b * (u - v))),
    "sigmoid-padded": ({"shared_prompt": False}, lambda b, u, v, p: -_log_sigmoid(b * (u - v))),
    "sigmoid-packed": ({"padding_free": True}, lambda b, u, v, p: -_log_sigmoid(b * (u - v))),
    "ld-dpo": ({"ld_alpha": 0.3}, lambda b, u, v, p: -_log_sigmoid(b * (u - v))),
    # IPO on per-token means, as TRL 1.x: (u/|y_w| − v/|y_l| − 1/(2β))²
    "ipo": ({"loss_type": ["ipo"]}, lambda b, u, v, p: (u / len(p.chosen_ids)
                                                        - v / len(p.rejected_ids)
                                                        - 1 / (2 * b)) ** 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_sums_equal_a_float64_dpo_oracle_and_add_across_micro_batches(
        root, tokenizer, case):
    """Oracle, per pair i (β = 0.5, w_i the weight column; sigmoid shown):
    h_i = β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))],
    L_i = −w_i log σ(h_i); rewards β(log π − log π_ref); accuracy 1[chosen reward > rejected].
    The forward's sums over 12 pairs in one micro-batch, and over micro-batches of 5, 4 and 3
    added, equal Σ of the oracle's terms (the policy and the reference both under LD-DPO's α
    where it is set, as TRL computes both)."""
    from dpokit.objectives import DPOObjective

    overrides, loss_of = CASES[case]
    config = dpo_config(root, **overrides)
    policy_model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=3)
    ref_model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=4)
    objective = DPOObjective(config, tokenizer, Reference("model", model=ref_model,
                                                          ld_alpha=config.ld_alpha))
    pairs = objective.load(config.data, None, progress=False)
    assert all(p.weight is not None for p in pairs)
    beta = config.beta
    expected = {"loss": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0,
                "rewards/margins": 0.0, "rewards/accuracies": 0.0, "logps/chosen": 0.0,
                "logps/rejected": 0.0, "count": float(len(pairs))}
    for pair in pairs:
        pc, pr = oracle_token_logps(policy_model, pair, config.ld_alpha)
        rc, rr = oracle_token_logps(ref_model, pair, config.ld_alpha)
        chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
        expected["loss"] += pair.weight * loss_of(beta, pc - rc, pr - rr, pair)
        expected["rewards/chosen"] += chosen_reward
        expected["rewards/rejected"] += rejected_reward
        expected["rewards/margins"] += chosen_reward - rejected_reward
        expected["rewards/accuracies"] += float(chosen_reward > rejected_reward)
        expected["logps/chosen"] += pc
        expected["logps/rejected"] += pr
    policy = objective.policy(policy_model)
    for split in ([12], [5, 4, 3]):
        totals, start = dict.fromkeys(objective.metric_keys, 0.0), 0
        for size in split:
            indices = list(range(start, start + size))
            out = objective.forward(policy, objective.collate([pairs[i] for i in indices],
                                                              indices))
            assert float(out.loss_sum.detach()) == pytest.approx(float(out.sums["loss"]),
                                                                 abs=1e-9)
            for key in totals:
                totals[key] += float(out.sums[key])
            start += size
        for key, value in expected.items():
            assert totals[key] == pytest.approx(value, abs=ATOL * len(pairs)), (split, key)
        # the wrapper trains (a fresh module): TRL's input tokens, a pair's prompt twice
        assert totals["num_tokens"] == sum(2 * len(p.prompt_ids) + len(p.chosen_ids)
                                           + len(p.rejected_ids) for p in pairs)
        assert objective.means(totals)["loss"] == pytest.approx(expected["loss"] / len(pairs),
                                                                abs=ATOL)


def test_precomputed_rows_are_looked_up_by_index_in_any_order(root, tokenizer):
    """The table's row i is pair i's float64 oracle, and a batch of rows in shuffled order
    (as the loop draws them) gets each of its own rows back, not the table's first ones."""
    rows = preference_rows()
    pairs = tokenized_pairs(rows, tokenizer)
    ref_model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=4)
    table = compute_reference_table(Reference("model", model=ref_model), pairs, batch_size=3,
                                    pad_token_id=tokenizer.pad_token_id, layout="shared",
                                    device=torch.device("cpu"))
    oracle = torch.tensor([oracle_logps(ref_model, p) for p in pairs], dtype=torch.float64)
    torch.testing.assert_close(table.double(), oracle, rtol=0, atol=ATOL)
    order = [7, 2, 11, 0, 5]
    batch = collate_pairs([pairs[i] for i in order], "shared",
                          pad_token_id=tokenizer.pad_token_id)
    batch.extras["indices"] = torch.tensor(order)
    chosen, rejected = Reference("precomputed", table=table).logps(batch)
    torch.testing.assert_close(torch.stack([chosen, rejected], 1).double(), oracle[order],
                               rtol=0, atol=ATOL)


# ------------------------------------------------------------------ adapters, eval mode


def test_adapters_off_equals_a_separate_frozen_base_in_any_mode(root, tokenizer):
    """LoRA (dropout 0.5, nonzero B so the adapters matter) on a GPT-2 with dropout, the policy
    in training mode: the adapters-off reference equals a frozen eval-mode copy of the base to
    float32 rounding, and the policy is left in the mode it was in."""
    from peft import LoraConfig, get_peft_model

    base = tiny_causal_lm("gpt2", vocab_size=len(tokenizer), seed=5)
    frozen = tiny_causal_lm("gpt2", vocab_size=len(tokenizer), seed=5)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                             target_modules=["c_attn"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    policy.train()
    pairs = tokenized_pairs(preference_rows(6), tokenizer)
    batch = collate_pairs(pairs, "padded", pad_token_id=tokenizer.pad_token_id)
    adapters = Reference("adapters", model=policy).logps(batch)
    assert policy.training and all(m.training for m in policy.modules())
    separate = Reference("model", model=frozen).logps(batch)
    oracle = torch.tensor([oracle_logps(frozen, p) for p in pairs], dtype=torch.float64)
    for a, s, column in zip(adapters, separate, oracle.T, strict=True):
        torch.testing.assert_close(a, s, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.double(), column, rtol=0, atol=ATOL)
    with policy.disable_adapter():  # the adapters really are on outside the reference
        pass
    on = policy.eval()(input_ids=batch.input_ids[:1]).logits
    off = frozen(input_ids=batch.input_ids[:1]).logits
    assert not torch.allclose(on, off, atol=1e-3)


# ------------------------------------------------------------------ TR-DPO


def test_tr_dpo_soft_update_at_the_right_steps():
    """ref ← α·θ + (1 − α)·ref at steps 3, 6 of sync_steps 3 (α 0.25), nothing in between,
    each checked against the formula in float64; only then is the reference a moving one."""
    policy = tiny_causal_lm("llama", vocab_size=64, seed=1)
    ref_model = tiny_causal_lm("llama", vocab_size=64, seed=2)
    reference = Reference("model", model=ref_model, sync_steps=3, sync_alpha=0.25)
    assert reference.moving_model is ref_model
    assert Reference("model", model=ref_model).moving_model is None
    expected = {n: p.detach().double().clone() for n, p in ref_model.named_parameters()}
    theta = {n: p.detach().double() for n, p in policy.named_parameters()}
    for step in range(1, 8):
        reference.after_step(policy, step)
        if step % 3 == 0:
            expected = {n: 0.25 * theta[n] + 0.75 * v for n, v in expected.items()}
        for name, p in ref_model.named_parameters():
            torch.testing.assert_close(p.double(), expected[name], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ the on-disk cache


def _copy_model(root, name, tmp_path):
    target = tmp_path / name
    shutil.copytree(root / "llama", target)
    return target


def test_a_model_code_file_is_part_of_the_weights_digest(root, tmp_path):
    """With trust_remote_code a model directory's own ``modeling_*.py`` computes the
    log-probs: editing it must change the digest the reference cache is keyed by (it did
    not: only weight and JSON files were hashed)."""
    model = _copy_model(root, "code", tmp_path)
    (model / "modeling_tiny.py").write_text("SCALE = 1.0\n")
    before = hash_directory(model)
    (model / "modeling_tiny.py").write_text("SCALE = 2.0\n")
    assert hash_directory(model) != before
    (model / "modeling_tiny.py").unlink()
    assert hash_directory(model) != before


def _reference_table(config):
    """What training's setup gives: the precomputed table and the cache entries it wrote."""
    from dpokit.models import load_tokenizer
    from dpokit.runtime import setup_runtime
    from dpokit.train.setup import setup_reference

    runtime = setup_runtime("cpu", config.compute_dtype)
    tokenizer = load_tokenizer(config.model)
    items = config.objective(tokenizer).load(config.data, None, progress=False)
    cache = config.cache_dir
    before = ({p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
              if cache.exists() else {})
    reference = setup_reference(config, runtime, items, tokenizer.pad_token_id, progress=False)
    after = {p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert all(after[p] == t for p, t in before.items())  # an entry is never rewritten
    return reference.table, items, set(after) - set(before)


def _fresh_table(config, items):
    """The oracle for a cache entry: the same pass on a freshly loaded reference, no cache."""
    from dpokit.models import load_causal_lm, load_tokenizer
    from dpokit.runtime import setup_runtime

    runtime = setup_runtime("cpu", config.compute_dtype)
    model = load_causal_lm(config.ref_model or config.model, dtype=config.dtype)
    reference = Reference("model", model=model, chunk_size=config.chunk_size,
                          ld_alpha=config.ld_alpha, autocast=runtime.autocast,
                          unpadded=config.unpadded)
    return compute_reference_table(reference, items, batch_size=5, layout=config.layout,
                                   pad_token_id=load_tokenizer(config.model).pad_token_id,
                                   device=torch.device("cpu"))


def _rewrite_in_place(directory, seed):
    """Save other weights over the model files of ``directory`` (same names)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    with torch.no_grad():
        torch.manual_seed(seed)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory)


NUMBERS = {  # each changes the reference log-probs: a new entry with the fresh pass's table
    "ref_model": {"ref_model": "{other}"},
    "max_length": {"max_length": 12},
    "truncation": {"max_length": 12, "truncation_mode": "keep_end"},
    "dtype": {"dtype": "bfloat16"},
    "autocast": {"bf16": True},
    "ld_alpha": {"ld_alpha": 0.5},
}
ROUNDING = {  # the same numbers up to float rounding: still a new entry, as promised
    "chunk_size": {"chunk_size": 3},
    "padded": {"shared_prompt": False},
    "packed": {"padding_free": True},
    "unpadded": {"unpadded": False},
}
NEUTRAL = {  # nothing the reference computes: the entry is reused, unchanged
    "beta": {"beta": 0.1},
    "loss": {"loss_type": ["ipo"]},
    "batch": {"batch_size": 2, "precompute_ref_batch_size": 3, "gradient_accumulation_steps": 2},
    "seed": {"seed": 3, "learning_rate": 1e-2},
    "run": {"output_dir": "{runs}/another"},
}


@pytest.mark.parametrize("change", [*NUMBERS, *ROUNDING, *NEUTRAL])
def test_the_cache_is_recomputed_exactly_when_the_numbers_can_change(root, tmp_path, change):
    """Build the entry, change one thing, build again: a change to what the reference computes
    is a new entry equal to a fresh pass without any cache (and, for NUMBERS, not the old
    table); anything else reads the old entry back."""
    runs = tmp_path / "runs"
    common = {"output_dir": str(runs / "run"), "data": str(root / "prefs.jsonl")}
    first, _, written = _reference_table(dpo_config(root, **common))
    assert len(written) == 1
    overrides = {k: v.format(other=root / "other", runs=runs) if isinstance(v, str) else v
                 for k, v in {**NUMBERS, **ROUNDING, **NEUTRAL}[change].items()}
    config = dpo_config(root, **{**common, **overrides})
    second, items, written = _reference_table(config)
    if change in NEUTRAL:
        assert not written and torch.equal(second, first)
        return
    assert len(written) == 1
    torch.testing.assert_close(second, _fresh_table(config, items), rtol=0, atol=1e-6)
    if change in NUMBERS:
        assert second.shape != first.shape or (second - first).abs().max() > 1e-3


@pytest.mark.parametrize("what", ["weights", "adapter base", "data", "pairing"])
def test_the_cache_sees_weights_rewritten_in_place_and_new_pairs(root, tokenizer, tmp_path,
                                                                  what):
    """The same names, other contents: a model file saved over in place (the reference's own,
    or the base of a PEFT adapter used as ref_model), one changed data row, and the same
    scored completions paired another way (k-completion pairing). Each is a new entry equal to
    a fresh pass, and not the old table."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.helpers import k_completion_rows

    model = _copy_model(root, "ref", tmp_path)
    overrides = {"output_dir": str(tmp_path / "runs" / "run"), "ref_model": str(model)}
    if what == "adapter base":
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model, local_files_only=True),
                              LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        peft.save_pretrained(tmp_path / "adapter")
        settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert settings["base_model_name_or_path"] == str(model)
        overrides["ref_model"] = str(tmp_path / "adapter")
    data = tmp_path / "prefs.jsonl"
    rows = k_completion_rows(6) if what == "pairing" else preference_rows()
    write_jsonl(data, rows)
    overrides["data"] = str(data)
    first, _, written = _reference_table(dpo_config(root, **overrides))
    assert len(written) == 1
    if what in ("weights", "adapter base"):
        _rewrite_in_place(model, seed=9)
    elif what == "data":
        rows[4] = {**rows[4], "chosen": rows[4]["chosen"] + " sea"}
        write_jsonl(data, rows)
    else:
        overrides["pairs_from_scores"] = "best_vs_each"
    config = dpo_config(root, **overrides)
    second, items, written = _reference_table(config)
    assert len(written) == 1
    torch.testing.assert_close(second, _fresh_table(config, items), rtol=0, atol=1e-6)
    assert second.shape != first.shape or (second - first).abs().max() > 1e-3


def test_the_cache_key_covers_the_reference_pass_code(monkeypatch):
    """The table is computed by this module's own pass (LD-DPO's unshared pairs, the batches,
    the float32 rows), so a release that fixes it must not read an earlier release's table:
    its source is in the code digest (it was not: only logps/attention/collate were)."""
    import dpokit.objectives.reference as reference

    before = reference.logps_code_digest()
    original = type(reference.Path("x")).read_bytes

    def edited(self):
        data = original(self)
        return data + b"# a fix" if self.name == "reference.py" else data

    monkeypatch.setattr(type(reference.Path("x")), "read_bytes", edited)
    assert reference.logps_code_digest() != before


def test_the_cache_key_names_the_device(root, tmp_path, monkeypatch):
    """A table computed on one device type was read back on another (CPU SDPA per segment
    against CUDA's FlexAttention and its rounding): the key's settings now hold the device
    type, so a CUDA run computes its own entry."""
    import dpokit.train.setup as setup

    seen = []
    original = setup.cache_key

    def recording(hashed, part, settings):
        seen.append(dict(settings))
        return original(hashed, part, settings)

    monkeypatch.setattr(setup, "cache_key", recording)
    _reference_table(dpo_config(root, output_dir=str(tmp_path / "run"),
                                data=str(root / "prefs.jsonl")))
    assert seen and all(s["device"] == "cpu" for s in seen)
    key = original("w", [], seen[0])
    assert original("w", [], {**seen[0], "device": "cuda"}) != key
