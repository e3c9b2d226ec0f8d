"""The training loop's arithmetic against an independent float64 oracle and transformers'.

The oracle is a plain loop over the same tiny float64 model and data: each step's global batch
(the documented seeded permutation per epoch, the last partial batch kept) in ONE forward and
backward, the loss as dpokit documents it (SFT: the example mean of each completion's per-token
NLL, or with ``loss_normalization: token`` Σ NLL / Σ completion tokens of the whole batch; DPO:
the mean over the batch's pairs), the whole gradient's norm clipped to ``max_grad_norm``,
``torch.optim.AdamW`` (not fused; weight decay off for transformers' no-decay parameters: biases
and norms) and the closed-form schedules of transformers (linear warmup, then constant, linear or
cosine). dpokit runs the same steps in micro-batches of unequal size with gradient accumulation;
both are float64, so the logged numbers and the final weights agree to ~1e-9.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dpokit.config import load_config
from dpokit.train.config import DPOConfig, SFTConfig
from dpokit.train.loop import train
from tests.helpers import read_metrics

WORDS = "yes good answer the cat sat on a mat under red sea moon blue sky".split()


@pytest.fixture(scope="module")
def model64(tmp_path_factory, tokenizer):
    """A tiny GPT-2 saved in float64 (with the tokenizer): its LayerNorms compute in the
    weights' dtype (Llama's RMSNorm computes in float32 whatever the weights), and it has
    biases."""
    from dpokit.fixtures import tiny_causal_lm

    root = tmp_path_factory.mktemp("loop64")
    model = tiny_causal_lm("gpt2", vocab_size=len(tokenizer), seed=3, dtype=torch.float64)
    model.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    return root / "gpt2"


@pytest.fixture
def float64(monkeypatch):
    """dpokit loads ``dtype: auto`` models in float64 (it only knows float32/bf16/fp16 names):
    the run trains in float64, so it can be compared with the oracle to ~1e-9."""
    import dpokit.models

    original = dpokit.models.weights_dtype

    def weights_dtype(path, dtype, **kwargs):
        return "float64" if dtype == "auto" else original(path, dtype, **kwargs)

    monkeypatch.setattr(dpokit.models, "weights_dtype", weights_dtype)


def sft_rows(n):
    """Prompt/completion rows whose completions have different lengths."""
    return [{"prompt": f"question {i}:",
             "completion": " " + " ".join(WORDS[:1 + (i * 7) % 11])} for i in range(n)]


def pref_rows(n):
    return [{"prompt": f"question {i}:", "chosen": " " + " ".join(WORDS[:1 + (i * 3) % 7]),
             "rejected": " " + " ".join(WORDS[::-1][:1 + (i * 5) % 6])} for i in range(n)]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_config(cls, model, data, out, **overrides):
    values = {"model": str(model), "dtype": "auto", "data": str(data), "output_dir": str(out),
              "batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1, "save_steps": None,
              "max_length": 64, "lr_scheduler": "constant", "report_to": ["none"],
              "tokenized_cache": False}
    values.update(overrides)
    return load_config(cls, None, {k: v if isinstance(v, str) else json.dumps(v)
                                   for k, v in values.items()})


# ---------------------------------------------------------------------------- the oracle


def lr_at(step, *, lr, kind, warmup, total):
    """transformers' schedules in closed form: the learning rate of optimizer step ``step``
    (0-based)."""
    if step < warmup:
        return lr * step / max(1, warmup)
    if kind == "constant":
        return lr
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return lr * max(0.0, 1.0 - progress)
    return lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def decay_names(model):
    """transformers' Trainer.get_decay_parameter_names: no decay in LayerNorms, biases, norms."""
    from transformers.trainer_pt_utils import get_parameter_names

    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return set(get_parameter_names(model, [torch.nn.LayerNorm], patterns))


def seq_logp(model, prompt_ids, completion_ids):
    """Σ_t log π(y_t | x, y_<t) of one unpadded sequence (with grad)."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    token = logits.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return token[len(prompt_ids) - 1:].sum()


def order(n, batch, *, seed, epoch):
    """The documented data order: a permutation of ``seed``·1_000_003 + ``epoch``, cut into
    global batches, the last one partial."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [perm[i:i + batch].tolist() for i in range(0, n, batch)]


def oracle(cfg, items, loss_fn, *, total, steps_per_epoch, global_batch):
    """The plain float64 loop: per step (loss, pre-clip norm, lr used, batch size, units), and
    the final state dict."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float64,
                                                 local_files_only=True)
    model.eval()  # disable_dropout: the training forward is the eval-mode one
    decay = decay_names(model)
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, foreach=False,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    warmup = (math.ceil(cfg.warmup_steps * total) if 0 < cfg.warmup_steps < 1
              else int(cfg.warmup_steps) or math.ceil(cfg.warmup_ratio * total))
    history, epochs = [], {}
    for step in range(total):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in epochs:
            epochs = {epoch: order(len(items), global_batch, seed=cfg.seed, epoch=epoch)}
        batch = [items[i] for i in epochs[epoch][index]]
        loss, units = loss_fn(model, batch)
        optimizer.zero_grad()
        loss.backward()
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()
                              if p.grad is not None)).item()
        if cfg.max_grad_norm:
            coef = min(1.0, cfg.max_grad_norm / (norm + 1e-6))
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        rate = lr_at(step, lr=cfg.learning_rate, kind=cfg.lr_scheduler, warmup=warmup,
                     total=total)
        for group in optimizer.param_groups:
            group["lr"] = rate
        optimizer.step()
        history.append({"loss": loss.item(), "grad_norm": norm, "learning_rate": rate,
                        "size": len(batch), "units": units})
    return history, {k: v.detach() for k, v in model.state_dict().items()}


def sft_loss(token):
    def loss_fn(model, batch):
        nll = [-seq_logp(model, s.prompt_ids, s.completion_ids) for s in batch]
        lengths = [len(s.completion_ids) for s in batch]
        if token:
            return sum(nll) / sum(lengths), float(sum(lengths))
        return sum(x / n for x, n in zip(nll, lengths, strict=True)) / len(batch), len(batch)
    return loss_fn


def key(pair):
    return tuple(pair.prompt_ids), tuple(pair.chosen_ids), tuple(pair.rejected_ids)


def dpo_loss(reference, beta):
    """Sigmoid DPO, mean over the batch's pairs; ``reference(pair)`` the π_ref log-probs."""
    def loss_fn(model, batch):
        terms = []
        for pair in batch:
            ref_w, ref_l = reference[key(pair)]
            h = (seq_logp(model, pair.prompt_ids, pair.chosen_ids) - ref_w) - (
                seq_logp(model, pair.prompt_ids, pair.rejected_ids) - ref_l)
            terms.append(-torch.nn.functional.logsigmoid(beta * h))
        return sum(terms) / len(batch), len(batch)
    return loss_fn


def windows(history, total, logging_steps, key):
    """What the window of each logged step holds, by dpokit's documented rule (the window's
    pooled sums), and transformers' (the mean of the window's step losses)."""
    pooled, mean, start = {}, {}, 0
    for step in range(1, total + 1):
        if step % logging_steps == 0 or step == total:
            part = history[start:step]
            pooled[step] = (sum(h[key] * h["units"] for h in part)
                            / sum(h["units"] for h in part))
            mean[step] = sum(h[key] for h in part) / len(part)
            start = step
    return pooled, mean


def assert_weights(final, expected, atol=1e-9):
    saved = load_file(str(final / "model.safetensors"))
    for name, tensor in expected.items():
        if name in saved:
            assert saved[name].dtype == torch.float64, name
            torch.testing.assert_close(saved[name], tensor, rtol=0, atol=atol, msg=name)


def load_items(cfg, tokenizer):
    return cfg.objective(tokenizer).load(cfg.data, None, progress=False)


# ---------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("normalization", ["example", "token"])
def test_sft_steps_match_the_float64_oracle(model64, float64, tokenizer, tmp_path,
                                            normalization):
    """11 rows, batch 2 × accumulation 3 = 6: steps of 6 and 5 rows (the last partial batch
    kept: micro-batches of 2, 2, 1), 1.5 epochs = 3 steps, epoch 2 in another order; cosine with
    warmup_ratio 0.4 (ceil(0.4 × 3) = 2 warmup steps), weight decay, betas/eps, clipping at 0.5
    (every step clipped): the logged loss, pre-clip grad norm and the learning rate used, and
    the final weights, as the oracle's."""
    data = write(tmp_path / "sft.jsonl", sft_rows(11))
    cfg = make_config(SFTConfig, model64, data, tmp_path / "run", gradient_accumulation_steps=3,
                      num_epochs=1.5, lr_scheduler="cosine", warmup_ratio=0.4,
                      weight_decay=0.3, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
                      max_grad_norm=0.5, loss_normalization=normalization)
    items = load_items(cfg, tokenizer)
    assert len({len(s.completion_ids) for s in items}) > 3
    history, expected = oracle(cfg, items, sft_loss(normalization == "token"), total=3,
                               steps_per_epoch=2, global_batch=6)
    assert [h["size"] for h in history] == [6, 5, 6]
    assert all(h["grad_norm"] > 0.5 for h in history)  # clipping matters
    final = train(cfg, progress=False)
    records = [r for r in read_metrics(final.parent) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record, want in zip(records, history, strict=True):
        for key in ("loss", "grad_norm", "learning_rate"):
            assert record[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (
                record["step"], key)
    assert_weights(final, expected)


def test_dpo_steps_match_the_float64_oracle(model64, float64, tokenizer, tmp_path):
    """13 pairs, batch 3 × accumulation 2 = 6: steps of 6, 6 and 1 pairs (the last partial:
    one micro-batch of 1 — the step is the mean over ITS pairs), then epoch 2; max_steps 5 beats
    num_epochs 1; linear decay after warmup_steps 2; clipping off (max_grad_norm null: the norm
    is still measured); the reference a float64 model (a precomputed table is float32). Logged
    every 2 steps and at the end: the loss over the window's pairs pooled (README: window means
    are weighted over the whole window; transformers' mean of the step losses differs on the
    window of the 1-pair step), the grad norm of the window's last step, the rate it used."""
    data = write(tmp_path / "prefs.jsonl", pref_rows(13))
    cfg = make_config(DPOConfig, model64, data, tmp_path / "run", batch_size=3,
                      gradient_accumulation_steps=2, max_steps=5, num_epochs=1,
                      lr_scheduler="linear", warmup_steps=2, max_grad_norm=None, beta=0.5,
                      weight_decay=0.1, logging_steps=2, precompute_ref_logps=False)
    items = load_items(cfg, tokenizer)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float64,
                                               local_files_only=True).eval()
    with torch.no_grad():
        reference = {key(p): (seq_logp(ref, p.prompt_ids, p.chosen_ids).item(),
                             seq_logp(ref, p.prompt_ids, p.rejected_ids).item()) for p in items}
    history, expected = oracle(cfg, items, dpo_loss(reference, 0.5), total=5, steps_per_epoch=3,
                               global_batch=6)
    assert [h["size"] for h in history] == [6, 6, 1, 6, 6]
    final = train(cfg, progress=False)
    records = [r for r in read_metrics(final.parent) if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 5]
    pooled, mean = windows(history, 5, 2, "loss")
    assert abs(pooled[4] - mean[4]) > 1e-4  # the window holds steps of 1 and 6 pairs
    for record in records:
        step = record["step"]
        assert record["loss"] == pytest.approx(pooled[step], rel=1e-9), step
        assert record["grad_norm"] == pytest.approx(history[step - 1]["grad_norm"], rel=1e-9)
        assert record["learning_rate"] == pytest.approx(history[step - 1]["learning_rate"],
                                                        rel=1e-12, abs=1e-15)
        assert record["epoch"] == round(step / 3, 4)
    assert_weights(final, expected)


@pytest.mark.parametrize(("schedule", "warmup"), [
    ("constant", {"warmup_steps": 0.5}),   # a fraction: ceil(0.5 × 5) = 3 warmup steps
    ("linear", {"warmup_ratio": 0.3}),     # ceil(0.3 × 5) = 2, as transformers rounds it
    ("cosine", {"warmup_steps": 1}),
    ("linear", {}),
])
def test_the_logged_learning_rate_is_the_one_the_step_used(workdir, tmp_path, schedule,
                                                             warmup):
    """transformers' Trainer logs the rate of the step just taken (read "before update" of the
    scheduler): 0 at warmup's first step, lr/(T − W) at a linear decay's last — not the next
    step's rate (which dpokit logged: lr/W at step 1, exactly 0 at the end)."""
    out = tmp_path / "run"
    cfg = make_config(SFTConfig, workdir / "llama", workdir / "sft.jsonl", out, dtype="float32",
                      max_steps=5, lr_scheduler=schedule, learning_rate=1e-3, **warmup)
    train(cfg, progress=False)
    total = 5
    steps = (math.ceil(cfg.warmup_steps * total) if 0 < cfg.warmup_steps < 1
             else int(cfg.warmup_steps) or math.ceil(cfg.warmup_ratio * total))
    logged = [r["learning_rate"] for r in read_metrics(out) if "loss" in r]
    want = [lr_at(s, lr=1e-3, kind=schedule, warmup=steps, total=total) for s in range(total)]
    assert logged == pytest.approx(want, rel=1e-12, abs=1e-18)
    if steps:
        assert logged[0] == 0.0
    if schedule == "linear":
        assert logged[-1] == pytest.approx(1e-3 / (total - steps))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_weight_decay_skips_what_transformers_skips(tokenizer, kind):
    """dpokit's AdamW groups: weight decay on exactly the parameters transformers' Trainer
    decays (not biases — Qwen2's q/k/v, GPT-2's — nor LayerNorm/RMSNorm weights); AdamW's
    betas and ε as configured."""
    from dpokit.fixtures import tiny_causal_lm
    from dpokit.runtime import setup_runtime
    from dpokit.train.setup import build_optimizer

    model = tiny_causal_lm(kind, vocab_size=len(tokenizer))
    cfg = make_config(SFTConfig, "m", "d.jsonl", "o", weight_decay=0.25, adam_beta1=0.7,
                      adam_beta2=0.9, adam_epsilon=1e-5)
    optimizer = build_optimizer(model, cfg, setup_runtime("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.25
               for p in g["params"]}
    assert decayed == decay_names(model) & set(names.values())
    assert {n for g in optimizer.param_groups for n in map(lambda p: names[id(p)], g["params"])
            } == set(names.values())
    for group in optimizer.param_groups:
        assert group["betas"] == (0.7, 0.9) and group["eps"] == 1e-5


@pytest.mark.parametrize("scale, max_norm", [(1e-3, 1.0), (10.0, 1.0), (1.0, None),
                                             (1.0, 1.0 + 1e-7), (float("nan"), 1.0)])
def test_clipping_is_clip_grad_norm_bit_for_bit(scale, max_norm):
    """The loop's clipping skips clip_grad_norm_'s multiplication by a coefficient of exactly 1
    (every step where the norm is within max_norm); the gradients and the returned norm must
    be clip_grad_norm_'s to the bit whether it clips or not, at the boundary and with NaN."""
    import copy

    from dpokit.train.loop import _clip

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale
    if max_norm == 1.0 + 1e-7:  # a norm at max_norm: the coefficient's rounding decides
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        for p in model.parameters():
            p.grad /= total
    oracle = copy.deepcopy(model)
    for mine, theirs in zip(model.parameters(), oracle.parameters(), strict=True):
        theirs.grad = mine.grad.clone()  # (deepcopy leaves .grad behind)
    expected = torch.nn.utils.clip_grad_norm_(list(oracle.parameters()),
                                              max_norm if max_norm else float("inf"))
    norm = _clip(model, max_norm)
    assert norm == float(expected) or (math.isnan(norm) and math.isnan(float(expected)))
    for mine, theirs in zip(model.parameters(), oracle.parameters(), strict=True):
        assert torch.equal(mine.grad, theirs.grad) or (
            torch.isnan(mine.grad).all() and torch.isnan(theirs.grad).all())
