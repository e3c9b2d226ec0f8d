"""Findings of this session's loss review outside the losses package: a weight column with a
loss that sorts the batch, TRL's label_smoothing on sigmoid, rpo_alpha at config load."""

from __future__ import annotations

import json
import math

import pytest

from dpokit.config import load_config
from dpokit.errors import DpokitError
from dpokit.train.config import DPOConfig
from dpokit.trl_config import translate


def _config(workdir, tmp_path, **overrides):
    values = {"model": str(workdir / "llama"), "data": str(workdir / "prefs.jsonl"),
              "output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 1,
              "save_steps": None, "max_length": 64, **overrides}
    return load_config(DPOConfig, None, {k: v if isinstance(v, str) else json.dumps(v)
                                         for k, v in values.items()})


@pytest.mark.parametrize("loss", ["aot", "aot_unpaired"])
def test_weight_column_with_a_sorting_loss_is_refused(workdir, tmp_path, loss):
    """aot sorts the batch's log-ratios: term i is no pair's, so weighting it by pair i's weight
    is silently wrong (TRL refuses use_weighting with it; a data weight is the same mistake)."""
    from dpokit.train.loop import train

    rows = [json.loads(line) for line in (workdir / "prefs.jsonl").read_text().splitlines()]
    data = tmp_path / "weighted.jsonl"
    data.write_text("".join(json.dumps({**r, "weight": 0.5 + i % 2}) + "\n"
                            for i, r in enumerate(rows)))
    config = _config(workdir, tmp_path, data=str(data), loss_type=[loss])
    with pytest.raises(DpokitError, match=r"sorts the batch.*'weight'"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "final").exists()


def test_weight_column_with_other_losses_still_trains(workdir, tmp_path):
    from dpokit.train.loop import train

    rows = [json.loads(line) for line in (workdir / "prefs.jsonl").read_text().splitlines()]
    data = tmp_path / "weighted.jsonl"
    data.write_text("".join(json.dumps({**r, "weight": 2.0}) + "\n" for r in rows))
    final = train(_config(workdir, tmp_path, data=str(data), loss_type=["sigmoid"]),
                  progress=False)
    assert final.exists()


@pytest.mark.parametrize("values", [
    {"label_smoothing": 0.1},
    {"label_smoothing": 0.1, "loss_type": "sigmoid"},
    {"label_smoothing": 0.1, "loss_type": ["sigmoid", "robust"]},
])
def test_trl_label_smoothing_on_sigmoid_is_refused(values):
    """TRL 1.16's sigmoid ignores label_smoothing; dpokit's applies it (cDPO): a TRL file
    would silently train another loss than TRL's."""
    with pytest.raises(DpokitError, match=r"label_smoothing.*sigmoid"):
        translate(values, source="trl.yaml")


@pytest.mark.parametrize("values", [
    {"label_smoothing": 0.0},
    {"label_smoothing": 0.1, "loss_type": "robust"},
    {"label_smoothing": 1e-3, "loss_type": ["exo_pair"]},
])
def test_trl_label_smoothing_where_trl_reads_it_is_kept(values):
    assert translate(values, source="trl.yaml").values["label_smoothing"] == \
        values["label_smoothing"]


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -0.5])
def test_rpo_alpha_not_finite_is_refused_at_load(workdir, tmp_path, alpha):
    with pytest.raises(DpokitError, match="rpo_alpha must be a finite number"):
        _config(workdir, tmp_path, rpo_alpha=alpha).validate()


def test_generates_wrote_line_is_one_line_whatever_the_paths_length(monkeypatch, capsys,
                                                                    tmp_path):
    """As train's done: line — piped stdout is 120 columns: a long --output was folded."""
    import dpokit.evaluate
    from tests.helpers import run_cli

    deep = tmp_path.joinpath(*[f"experiment-{i:02d}-beta0.1-lr5e-7" for i in range(6)])
    deep.mkdir(parents=True)
    output = deep / "completions.jsonl"
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    monkeypatch.setattr(dpokit.evaluate, "run_generate", lambda config: [{"eos": True}])
    code, out, err = run_cli(capsys, "generate", "--model", str(tmp_path), "--data", str(data),
                             "--output", str(output))
    assert code == 0, err
    assert out.count("\n") == 1 and str(output) in out


def test_inverse_cdf_draws_follow_the_law_and_skip_zeros():
    """The outside sampler's draws: frequencies within 4.5σ of each probability, never an index
    of probability 0 (also at the ends of the table)."""
    import torch

    from dpokit.demo.measure import _inverse_cdf_draws

    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0], dtype=torch.float64)
    n = 40000
    draws = torch.tensor(_inverse_cdf_draws(probs, n, seed=3))
    counts = torch.bincount(draws, minlength=len(probs)).double()
    assert counts[probs == 0].sum() == 0
    sigma = (n * probs * (1 - probs)).sqrt()
    assert bool(((counts - n * probs).abs() <= 4.5 * sigma + 1e-9).all())


def test_the_outside_sampler_takes_a_real_vocabulary():
    """The deviation table has Σ_t |words|^t · V entries: 16 words, 2 positions and a
    65,536-token vocabulary make 17.9 M, past torch.multinomial's 2²⁴ (it raised a traceback);
    drawn now, every sample outside S."""
    from dpokit.demo.measure import sample_outside
    from dpokit.fixtures import tiny_causal_lm

    vocab, eos = 65536, 0
    model = tiny_causal_lm("llama", vocab_size=vocab, hidden_size=8, num_layers=1, num_heads=1,
                           max_positions=16, seed=0)
    words = list(range(1, 17))
    assert (1 + 16 + 256) * vocab > 2 ** 24
    drawn = sample_outside(model, [5, 6], words, 2, eos, num_samples=64, max_new_tokens=3,
                           seed=1)
    assert len(drawn.completions) == 64
    for c in drawn.completions:
        in_space = len(c) == 3 and c[0] in words and c[1] in words and c[2] == eos
        assert not in_space
    assert math.isfinite(drawn.log_mass) and drawn.log_mass < 0


@pytest.mark.parametrize("offset", [0.0, 1e-18])
def test_demo_measure_refuses_a_reward_that_makes_pi_star_the_reference(offset):
    """A constant reward: π* = π_ref, KL(π_ref‖π*) = 0 (or ~1e-17 by rounding) — the closed
    fraction is undefined; it was a ZeroDivisionError or a garbage −1e16."""
    import torch

    from dpokit.demo.measure import measure

    ref = torch.log_softmax(torch.tensor([[0.1, 0.7, -0.3, 0.0]], dtype=torch.float64), -1)
    rewards = torch.full((1, 4), 2.0, dtype=torch.float64)
    rewards[0, 0] += offset
    policy = torch.log_softmax(torch.tensor([[0.5, 0.2, 0.1, 0.0]], dtype=torch.float64), -1)
    with pytest.raises(DpokitError, match="constant where π_ref has mass"):
        measure(policy, ref, rewards, 1.0)


def test_a_signal_that_stops_a_demo_training_stops_the_demo(monkeypatch, capsys, tmp_path):
    """The loop stops at a step boundary on SIGTERM and returns its checkpoint; the demo used
    that partly trained model and went on to report on it (exit 0). Now it stops: 128 + the
    signal, one line, no report."""
    import signal

    from dpokit.train import loop
    from tests.helpers import run_cli

    calls = []

    def stopped(config, **kwargs):
        calls.append(config.output_dir)
        loop.last_stop_signal = signal.SIGTERM
        return tmp_path / "checkpoint-3"

    monkeypatch.setattr(loop, "train", stopped)
    code, out, err = run_cli(capsys, "demo", "--quick", "--out", str(tmp_path / "demo"))
    assert code == 128 + signal.SIGTERM, (out, err)
    assert len(calls) == 1 and "stopped: stopped by signal" in out
    assert not (tmp_path / "demo" / "report.json").exists()


def test_a_second_demo_on_the_same_directory_is_refused(tmp_path):
    """The demo removes its own runs under --out and rewrites them: two at once deleted each
    other's models (seen: 'model directory not found: …/sft/final'). The directory is locked."""
    from dpokit.demo.config import DemoConfig
    from dpokit.demo.run import run_demo
    from dpokit.train.rundir import RunLock

    out = tmp_path / "demo"
    held = RunLock.acquire(out)
    (out / "sft").mkdir()
    try:
        with pytest.raises(DpokitError, match="in use by another run"):
            run_demo(DemoConfig(quick=True, out_dir=str(out)), report=lambda line: None)
        assert (out / "sft").is_dir()  # nothing of the running demo's removed
    finally:
        held.release()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "cohere_qk_norm"])
def test_weight_decay_groups_are_transformers_trainers(kind):
    """The decayed tensors are exactly those of transformers' Trainer (a TRL user's
    weight_decay): Cohere's q/k norms (2-D: heads × head_dim) were decayed by a rule on ndim."""
    import types

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer

    from dpokit.fixtures import tiny_causal_lm
    from dpokit.train.setup import build_optimizer

    if kind == "cohere_qk_norm":
        config = AutoConfig.for_model("cohere", vocab_size=64, hidden_size=32,
                                      intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      use_qk_norm=True)
        model = AutoModelForCausalLM.from_config(config)
        assert model.model.layers[0].self_attn.q_norm.weight.ndim == 2
    else:
        model = tiny_causal_lm(kind, vocab_size=64, seed=0)
    settings = types.SimpleNamespace(weight_decay=0.1, fsdp=False, learning_rate=1e-3,
                                     adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)
    optimizer = build_optimizer(model, settings, types.SimpleNamespace(
        device=torch.device("cpu")))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0
               for p in g["params"]}
    expected = set(Trainer.get_decay_parameter_names(None, model)) & set(names.values())
    assert decayed == expected
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)


_LD_ROWS = [
    {"prompt": "the cat sat", "chosen": " on the mat and the red sea", "rejected": " no"},
    {"prompt": "why", "chosen": " blue", "rejected": " green sea far away"},
    {"prompt": "a bird", "chosen": " sings a song at dawn", "rejected": " flies"},
]


@pytest.mark.parametrize("extra", [["--loss-type", "sigmoid,sft"], ["--rpo-alpha", "0.5"]])
def test_nll_terms_read_plain_logps_under_ld_alpha(tokenizer, tmp_path, capsys, extra):
    """LD-DPO weighs a completion's tokens past its partner's length by α in the preference
    term; TRL's sft term (and RPO, its NLL) reads the plain per-token log-probs. dpokit's read
    the weighted sums. Oracle: float64 per-token log-probs of each sequence alone."""
    import torch

    from dpokit.data import load_preference_pairs
    from tests.helpers import run_cli, save_policy_and_ref, write_jsonl

    policy, ref = save_policy_and_ref(tmp_path, tokenizer)
    policy, ref = policy.double().eval(), ref.double().eval()
    data = write_jsonl(tmp_path / "prefs.jsonl", _LD_ROWS)
    alpha, beta = 0.3, 0.5

    @torch.no_grad()
    def token_logps(model, prompt, completion):
        ids = torch.tensor([list(prompt) + list(completion)])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
        return logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None])[:, 0]

    sig, nll_tokens, plain_chosen, rpo = [], 0, 0.0, []
    for p in load_preference_pairs(data, tokenizer):
        nc, nr = len(p.chosen_ids), len(p.rejected_ids)

        def weighted(values, n, other):
            w = torch.where(torch.arange(n) < min(n, other), 1.0, alpha).double()
            return float((values * w).sum())

        pc = token_logps(policy, p.prompt_ids, p.chosen_ids)
        pr = token_logps(policy, p.prompt_ids, p.rejected_ids)
        rc = token_logps(ref, p.prompt_ids, p.chosen_ids)
        rr = token_logps(ref, p.prompt_ids, p.rejected_ids)
        z = beta * ((weighted(pc, nc, nr) - weighted(rc, nc, nr))
                    - (weighted(pr, nr, nc) - weighted(rr, nr, nc)))
        sig.append(math.log1p(math.exp(-z)))
        plain_chosen += float(pc.sum())
        nll_tokens += nc
        rpo.append(-float(pc.sum()) / nc)
    n = len(sig)
    if "sft" in extra[1]:
        want = sum(sig) / n - plain_chosen / nll_tokens
    else:
        want = sum(sig) / n + 0.5 * sum(rpo) / n
    code, out, err = run_cli(capsys, "eval", "--model", str(tmp_path / "policy"),
                             "--ref-model", str(tmp_path / "ref"), "--data", str(data),
                             "--beta", str(beta), "--ld-alpha", str(alpha), "--batch-size", "8",
                             "--json", *extra)
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(want, abs=5e-5, rel=2e-6)


def test_merge_lora_on_a_tied_head_writes_the_trained_model(workdir):
    """merge_lora's final/merged/ of a LoRA on GPT-2's tied lm_head: peft merged into the one
    matrix both ends share (logits ~7 off); it is the adapter's model now."""
    import copy

    import torch

    from dpokit.models import load_causal_lm
    from dpokit.train.loop import Probe, train
    from tests.train.test_trainer import config

    held = {}

    def grab(model, step):
        held["policy"] = copy.deepcopy(model)
        return {}

    final = train(config(workdir, "followup-tied-merge", model=str(workdir / "gpt2"),
                         max_steps=2, lora=True, lora_r=4, learning_rate=5e-2, merge_lora=True,
                         lora_target_modules=["c_attn", "lm_head"]),
                  progress=False, probe=Probe(every=1, fn=grab))
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        want = held["policy"].eval()(input_ids=ids).logits
        got = load_causal_lm(final / "merged").eval()(input_ids=ids).logits
    # merged vs unmerged: float32 rounding (the bug was ~7 off)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_generation_ends_at_the_models_end_tokens_too():
    """TRL's online trainer stops at the tokenizer's EOS and at the model's
    generation_config.eos_token_id (a chat model's end of turn and end of text); dpokit went on
    past the model's. Exact law on a 6-id model: a completion ends at id 2 or id 3, and every
    outcome's frequency is within 4.5σ of its probability by enumeration."""
    import torch
    from transformers import GenerationConfig

    from dpokit.data.prompts import Prompt
    from dpokit.fixtures import tiny_causal_lm
    from dpokit.generation import end_token_ids, generate_completions

    class Ids:
        eos_token_id, pad_token_id = 2, 0

        def decode(self, ids, skip_special_tokens=True):
            return ""

    model = tiny_causal_lm("llama", vocab_size=6, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
    model.generation_config = GenerationConfig(eos_token_id=[3, 2])
    assert end_token_ids(model, Ids()) == [2, 3]
    prompt = [1, 4, 5]
    exact = {}
    with torch.no_grad():
        first = model(input_ids=torch.tensor([prompt])).logits[0, -1].double().softmax(-1)
        for a in range(6):
            if a in (2, 3):
                exact[(a,)] = float(first[a])
                continue
            second = model(input_ids=torch.tensor([[*prompt, a]])).logits[0, -1].double()
            for b, q in enumerate(second.softmax(-1).tolist()):
                exact[(a, b)] = float(first[a]) * q
    n = 4000
    (group,) = generate_completions(model, Ids(), [Prompt("", prompt)], num_generations=n,
                                    max_new_tokens=2, seed=2, batch_size=n)
    counts = {}
    for c in group:
        counts[tuple(c.ids)] = counts.get(tuple(c.ids), 0) + 1
        assert c.eos == (c.ids[-1] in (2, 3))
    assert all(outcome in exact for outcome in counts)
    for outcome, p in exact.items():
        assert abs(counts.get(outcome, 0) - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)) + 1.0
    (alone,) = generate_completions(model, Ids(), [Prompt("", prompt)], num_generations=50,
                                    max_new_tokens=2, seed=2, batch_size=50, stop_token_ids=[2])
    assert all(c.ids[0] != 3 or len(c.ids) == 2 for c in alone)  # 3 no longer ends one


def test_an_eval_generate_reward_failure_names_the_evaluation(workdir, tmp_path):
    """eval_generate samples are scored after step N; a failing reward said 'at step N + 1', a
    step that never ran. Now 'eval_generate samples after step N' and the prompt's row."""
    from dpokit.train.loop import train
    from tests.train.test_trainer import config

    reward = tmp_path / "reward.py"
    reward.write_text("def score(prompts, completions, **kw):\n"
                      "    return [float('nan')] * len(prompts)\n")
    with pytest.raises(DpokitError) as error:
        train(config(workdir, str(tmp_path / "run"), eval_data=str(workdir / "prefs.jsonl"),
                     eval_steps=2, eval_generate=2, max_new_tokens=3, max_steps=2,
                     reward=f"{reward}:score"), progress=False)
    message = str(error.value)
    assert "eval_generate samples after step 2" in message and "at step 3" not in message
    assert "prefs.jsonl, row 1" in message


@pytest.mark.parametrize(("key", "value", "match"), [
    ("lora_target_modules", "[]", "lora_target_modules is empty"),
    ("output_dir", "", "output_dir is empty"),
    ("output_dir", "  ", "output_dir is empty"),
])
def test_empty_values_are_refused(key, value, match):
    """An empty target list adapted no layer; an empty output_dir wrote the run into the
    working directory (found by the CLI review)."""
    values = {"model": "m", "data": "d", "lora": "true", key: value}
    with pytest.raises(DpokitError, match=match):
        load_config(DPOConfig, None, values).validate()


def test_a_step_float16_scaling_skips_does_not_advance_the_schedule(workdir, tmp_path,
                                                                    monkeypatch):
    """GradScaler skips the optimizer step of an overflowing float16 step (and halves its
    scale); transformers then leaves the scheduler alone. dpokit stepped it, so the schedule
    ran ahead by every skipped step. A stand-in scaler (float16 needs a GPU) skips step 2."""
    import torch

    from dpokit.train.loop import train
    from tests.helpers import read_metrics
    from tests.train.test_trainer import config

    class Scaler:
        def __init__(self, *args, **kwargs):
            self.calls, self._scale = 0, 1024.0

        def is_enabled(self):
            return True

        def scale(self, loss):
            return loss

        def unscale_(self, optimizer):
            pass

        def step(self, optimizer):
            self.calls += 1
            self.skipped = self.calls == 2
            if not self.skipped:
                optimizer.step()

        def update(self):
            if self.skipped:
                self._scale /= 2

        def get_scale(self):
            return self._scale

        def state_dict(self):
            return {"scale": self._scale}

    monkeypatch.setattr(torch.amp, "GradScaler", Scaler)
    lr = 1e-3
    final = train(config(workdir, str(tmp_path / "run"), max_steps=4, lr_scheduler="linear",
                         learning_rate=lr, warmup_steps=0), progress=False)
    logged = [record["learning_rate"] for record in read_metrics(final.parent)
              if "learning_rate" in record]
    assert logged == pytest.approx([lr, 0.75 * lr, 0.75 * lr, 0.5 * lr], rel=1e-9)
