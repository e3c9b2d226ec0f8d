"""Evaluation and SFT metrics against a brute-force float64 oracle: every metric `dpokit eval`
(and in-training evaluation) reports equals, whatever the batch size and layout, the same
metric computed pair by pair (example by example) with a plain full-logits float64 forward of
the model over prompt + completion. Tolerances: 5e-5 absolute or 2e-6 relative (a float32
forward against float64; rewards are differences of log-probs near −100)."""

import copy
import json
import math

import pytest
import torch

from dpokit.fixtures import tiny_causal_lm
from tests.helpers import run_cli as run
from tests.helpers import save_policy_and_ref, write_jsonl

ROWS = [
    {"prompt": "the cat sat", "chosen": " on the mat.", "rejected": " under the tree!"},
    {"prompt": "what color is the sky?", "chosen": " blue", "rejected": " green sea"},
    {"prompt": "why", "chosen": " the sun is red", "rejected": " no"},
    {"prompt": "a bird", "chosen": " sings a song at dawn", "rejected": " flies"},
    {"prompt": "the dog ran", "chosen": " home", "rejected": " far away into the hills"},
]
GROUP_ROWS = [
    {"prompt": "the cat sat", "completions": [" on the mat.", " no", " under the tree!"],
     "scores": [3, 1, 2]},
    {"prompt": "why", "completions": [" the sun is red", " no"], "scores": [2, 1]},
    {"prompt": "a bird", "completions": [" sings", " flies far", " a song at dawn", " x"],
     "scores": [1, 4, 2, 0]},
]
TOL = 5e-5
REL = 2e-6


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("integrity")
    policy, ref = save_policy_and_ref(root, tokenizer)
    write_jsonl(root / "prefs.jsonl", ROWS)
    write_jsonl(root / "groups.jsonl", GROUP_ROWS)
    return root, policy.double(), ref.double()


@torch.no_grad()
def token_stats(model64, prompt_ids, completion_ids):
    """Per completion token (float64, full logits, one unpadded sequence): log π(y_t|·), the
    next-token entropy, 1.0 where y_t is the argmax, and the vocabulary-mean logit."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logits = model64(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].double()
    log_probs = logits.log_softmax(-1)
    targets = ids[0, len(prompt_ids):]
    token_logps = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    top1 = (logits.argmax(-1) == targets).double()
    return token_logps, entropy, top1, logits.mean(-1)


def oracle_pairs(policy64, ref64, pairs, *, beta, loss="sigmoid", ld_alpha=None,
                 simpo_gamma=0.5):
    """Per pair, brute force: log-probs, rewards, loss; plus the whole set's means."""
    per, tot = [], {"ent": 0.0, "tok": 0, "top1c": 0.0, "tokc": 0, "lc": 0.0, "lr": 0.0,
                    "tokr": 0}
    for p in pairs:
        c = token_stats(policy64, p.prompt_ids, p.chosen_ids)
        r = token_stats(policy64, p.prompt_ids, p.rejected_ids)
        nc, nr = len(p.chosen_ids), len(p.rejected_ids)

        def weighted(values, n, other):
            if ld_alpha is None:
                return float(values.sum())
            w = torch.where(torch.arange(n) < min(n, other), 1.0, ld_alpha).double()
            return float((values * w).sum())

        chosen, rejected = weighted(c[0], nc, nr), weighted(r[0], nr, nc)
        record = {"chosen_logps": chosen, "rejected_logps": rejected}
        if loss == "simpo":
            cr, rr = beta * chosen / nc, beta * rejected / nr
            z = cr - rr - simpo_gamma
        else:
            rc = weighted(token_stats(ref64, p.prompt_ids, p.chosen_ids)[0], nc, nr)
            rrj = weighted(token_stats(ref64, p.prompt_ids, p.rejected_ids)[0], nr, nc)
            record.update(ref_chosen_logps=rc, ref_rejected_logps=rrj)
            cr, rr = beta * (chosen - rc), beta * (rejected - rrj)
            z = cr - rr
        record.update(chosen_reward=cr, rejected_reward=rr, loss=math.log1p(math.exp(-z)))
        per.append(record)
        tot["ent"] += float(c[1].sum() + r[1].sum())
        tot["tok"] += nc + nr
        tot["top1c"] += float(c[2].sum())
        tot["tokc"] += nc
        tot["tokr"] += nr
        tot["lc"] += float(c[3].sum())
        tot["lr"] += float(r[3].sum())
    n = len(per)
    means = {
        "loss": sum(x["loss"] for x in per) / n,
        "rewards/chosen": sum(x["chosen_reward"] for x in per) / n,
        "rewards/rejected": sum(x["rejected_reward"] for x in per) / n,
        "rewards/accuracies": sum(x["chosen_reward"] > x["rejected_reward"] for x in per) / n,
        "rewards/margins": sum(x["chosen_reward"] - x["rejected_reward"] for x in per) / n,
        "logps/chosen": sum(x["chosen_logps"] for x in per) / n,
        "logps/rejected": sum(x["rejected_logps"] for x in per) / n,
        "logits/chosen": tot["lc"] / tot["tokc"],
        "logits/rejected": tot["lr"] / tot["tokr"],
        "entropy": tot["ent"] / tot["tok"],
        "mean_token_accuracy": tot["top1c"] / tot["tokc"],
    }
    return per, means


def load_pairs(path, tokenizer):
    from dpokit.data import load_preference_pairs

    return list(load_preference_pairs(path, tokenizer))


def eval_cli(capsys, tmp_path, *args):
    out_file = tmp_path / "per_example.jsonl"
    code, out, err = run(capsys, "eval", *args, "--per-example", str(out_file), "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    return json.loads(out), records


def check(summary, records, per, means, keys=None):
    assert summary["num_pairs"] == len(per) == len(records)
    for key in keys or means:
        assert summary[key] == pytest.approx(means[key], abs=TOL, rel=REL), key
    for i, (got, want) in enumerate(zip(records, per, strict=True)):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=TOL, rel=REL), (i, key)


LAYOUT_FLAGS = {"padded": ["--no-shared-prompt"], "packed": ["--padding-free"],
                "shared": ["--shared-prompt"], "padded-no-unpad": ["--no-shared-prompt",
                                                                   "--no-unpadded"]}


@pytest.mark.parametrize("layout", list(LAYOUT_FLAGS))
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_eval_metrics_match_brute_force(saved, tokenizer, capsys, tmp_path, layout,
                                        batch_size):
    root, policy, ref = saved
    per, means = oracle_pairs(policy, ref, load_pairs(root / "prefs.jsonl", tokenizer),
                              beta=0.5)
    summary, records = eval_cli(capsys, tmp_path, "--model", str(root / "policy"),
                                "--ref-model", str(root / "ref"), "--data",
                                str(root / "prefs.jsonl"), "--beta", "0.5", "--batch-size",
                                str(batch_size), *LAYOUT_FLAGS[layout])
    check(summary, records, per, means)


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_eval_groups_match_brute_force(saved, tokenizer, capsys, tmp_path, layout,
                                       batch_size):
    """k scored completions per prompt: each pair scored as if it had its own sequences."""
    root, policy, ref = saved
    pairs = load_pairs(root / "groups.jsonl", tokenizer)
    assert len(pairs) == 3
    per, means = oracle_pairs(policy, ref, pairs, beta=0.5)
    summary, records = eval_cli(capsys, tmp_path, "--model", str(root / "policy"),
                                "--ref-model", str(root / "ref"), "--data",
                                str(root / "groups.jsonl"), "--beta", "0.5", "--batch-size",
                                str(batch_size), *LAYOUT_FLAGS[layout])
    check(summary, records, per, means)


@pytest.mark.parametrize("pairs_from_scores", ["best_vs_each", "all"])
@pytest.mark.parametrize("layout", ["padded", "shared"])
def test_eval_many_pairs_per_group_match_brute_force(saved, tokenizer, capsys, tmp_path,
                                                      layout, pairs_from_scores):
    from dpokit.data import load_preference_pairs
    from dpokit.data.formats import ColumnMap

    root, policy, ref = saved
    pairs = list(load_preference_pairs(root / "groups.jsonl", tokenizer,
                                       columns=ColumnMap(pairs_from_scores=pairs_from_scores)))
    assert len(pairs) > 3
    per, means = oracle_pairs(policy, ref, pairs, beta=0.5)
    summary, records = eval_cli(capsys, tmp_path, "--model", str(root / "policy"),
                                "--ref-model", str(root / "ref"), "--data",
                                str(root / "groups.jsonl"), "--beta", "0.5", "--batch-size",
                                "2", "--pairs-from-scores", pairs_from_scores,
                                *LAYOUT_FLAGS[layout])
    check(summary, records, per, means)


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
@pytest.mark.parametrize("data", ["prefs.jsonl", "groups.jsonl"])
def test_eval_ld_alpha_matches_brute_force(saved, tokenizer, capsys, tmp_path, layout, data):
    root, policy, ref = saved
    per, means = oracle_pairs(policy, ref, load_pairs(root / data, tokenizer), beta=0.5,
                              ld_alpha=0.3)
    summary, records = eval_cli(capsys, tmp_path, "--model", str(root / "policy"),
                                "--ref-model", str(root / "ref"), "--data", str(root / data),
                                "--beta", "0.5", "--ld-alpha", "0.3", "--batch-size", "2",
                                *LAYOUT_FLAGS[layout])
    check(summary, records, per, means)


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("layout", ["padded", "shared"])
def test_eval_simpo_matches_brute_force(saved, tokenizer, capsys, tmp_path, layout, with_ref):
    """SimPO is reference-free: rewards β·log π/|y|, loss −log σ(Δr − γ); a --ref-model given
    anyway changes nothing."""
    root, policy, ref = saved
    per, means = oracle_pairs(policy, ref, load_pairs(root / "prefs.jsonl", tokenizer),
                              beta=2.0, loss="simpo", simpo_gamma=0.5)
    extra = ["--ref-model", str(root / "ref")] if with_ref else []
    summary, records = eval_cli(capsys, tmp_path, "--model", str(root / "policy"), *extra,
                                "--data", str(root / "prefs.jsonl"), "--beta", "2.0",
                                "--loss-type", "simpo", "--batch-size", "2",
                                *LAYOUT_FLAGS[layout])
    check(summary, records, per, means)


def test_eval_without_reference_logps_match_brute_force(saved, tokenizer, capsys, tmp_path):
    root, policy, ref = saved
    per, means = oracle_pairs(policy, ref, load_pairs(root / "prefs.jsonl", tokenizer), beta=0.5)
    summary, records = eval_cli(capsys, tmp_path, "--model", str(root / "policy"), "--data",
                                str(root / "prefs.jsonl"), "--batch-size", "2")
    assert set(summary) == {"num_pairs", "logps/chosen", "logps/rejected"}
    per = [{k: x[k] for k in ("chosen_logps", "rejected_logps")} for x in per]
    check(summary, records, per, means, keys=["logps/chosen", "logps/rejected"])


# ---- evaluation during training: eval/… against the final weights (the last step evaluates)


def train_config(root, out, cls=None, **overrides):
    from dpokit.config import load_config
    from dpokit.train.config import DPOConfig

    cls = cls or DPOConfig
    values = {"model": str(root / "policy"), "data": str(root / "prefs.jsonl"),
              "output_dir": str(out), "batch_size": 2, "learning_rate": 1e-3,
              "logging_steps": 1, "save_steps": None, "max_steps": 2, "beta": 0.5,
              "lr_scheduler": "constant", "max_length": 64}
    if cls.__name__ == "SFTConfig":
        values.pop("beta")
    values.update(overrides)
    return load_config(cls, None, {k: v if isinstance(v, str) else json.dumps(v)
                                   for k, v in values.items()})


def final_model(final_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(final_dir, local_files_only=True).double().eval()


def eval_records(run_dir):
    from tests.helpers import read_metrics

    return [r for r in read_metrics(run_dir) if any(k.startswith("eval/") for k in r)]


@pytest.mark.parametrize("precompute", [True, False])
@pytest.mark.parametrize(("eval_data", "extra"), [
    ("prefs.jsonl", {}),
    ("prefs.jsonl", {"shared_prompt": False, "per_device_eval_batch_size": 3}),
    ("groups.jsonl", {"padding_free": True}),
    ("groups.jsonl", {"per_device_eval_batch_size": 1}),
    ("prefs.jsonl", {"ld_alpha": 0.3}),
])
def test_training_evaluation_matches_brute_force(saved, tokenizer, tmp_path, precompute,
                                                 eval_data, extra):
    """eval/… at the last step = the oracle on final/ (the policy evaluated), with the initial
    policy as π_ref — whether π_ref is a precomputed table (its evaluation rows after the
    training rows) or a live model."""
    from dpokit.train.loop import train

    root, _, _ = saved
    # the reference is the initial policy: read it back as float64
    policy0 = final_model(root / "policy")
    cfg = train_config(root, tmp_path / "run", eval_data=str(root / eval_data),
                       precompute_ref_logps=precompute, **extra)
    final = train(cfg, progress=False)
    (record,) = eval_records(final.parent)
    assert record["step"] == 2
    _, means = oracle_pairs(final_model(final), policy0,
                            load_pairs(root / eval_data, tokenizer), beta=0.5,
                            ld_alpha=extra.get("ld_alpha"))
    for key, value in means.items():
        assert record[f"eval/{key}"] == pytest.approx(value, abs=TOL, rel=REL), key
    assert "eval/num_tokens" not in record


SFT_WORDS = "yes good answer the cat sat on a mat under red sea moon".split()
SFT_ROWS = [{"prompt": f"question {i}:", "completion": " " + " ".join(
    SFT_WORDS[:1 + (i * 5) % len(SFT_WORDS)])} for i in range(7)]
CHAT_ROWS = [{"messages": [{"role": "user", "content": r["prompt"]},
                           {"role": "assistant", "content": r["completion"].strip()}]}
             for r in SFT_ROWS]


def sft_oracle(model64, sequences, per_token):
    nll, tokens, ent, top1 = [], 0, 0.0, 0.0
    for s in sequences:
        logps, entropy, hits, _ = token_stats(model64, s.prompt_ids, s.completion_ids)
        nll.append((-float(logps.sum()), len(s.completion_ids)))
        tokens += len(s.completion_ids)
        ent += float(entropy.sum())
        top1 += float(hits.sum())
    total = sum(x for x, _ in nll)
    return {"loss": total / tokens if per_token else sum(x / n for x, n in nll) / len(nll),
            "nll_per_token": total / tokens, "entropy": ent / tokens,
            "mean_token_accuracy": top1 / tokens}


@pytest.mark.parametrize(("rows", "extra"), [
    (SFT_ROWS, {}),
    (SFT_ROWS, {"loss_normalization": "token", "per_device_eval_batch_size": 3}),
    (SFT_ROWS, {"padding_free": True, "per_device_eval_batch_size": 1}),
    (SFT_ROWS, {"completion_only_loss": False, "loss_normalization": "token"}),
    (CHAT_ROWS, {"completion_only_loss": None}),
    (CHAT_ROWS, {"assistant_only_loss": True, "per_device_eval_batch_size": 4}),
])
def test_sft_training_evaluation_matches_brute_force(saved, tokenizer, tmp_path, rows, extra):
    """SFT eval/… at the last step: the example (or token) mean NLL of final/ on the evaluation
    sequences, nll_per_token, entropy and mean_token_accuracy per completion token."""
    from dpokit.train.config import SFTConfig
    from dpokit.train.loop import train

    root, _, _ = saved
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = train_config(root, tmp_path / "run", SFTConfig, data=str(data), eval_data=str(data),
                       **extra)
    final = train(cfg, progress=False)
    (record,) = eval_records(final.parent)
    sequences = list(cfg.objective(tokenizer).load(str(data), None, progress=False))
    assert len(sequences) == len(rows)
    want = sft_oracle(final_model(final), sequences, extra.get("loss_normalization") == "token")
    for key, value in want.items():
        assert record[f"eval/{key}"] == pytest.approx(value, abs=TOL, rel=REL), key


@pytest.mark.parametrize("normalization", ["example", "token"])
def test_sft_step_one_loss_with_accumulation_matches_brute_force(saved, tokenizer, tmp_path,
                                                                 normalization):
    """Step 1's logged loss over a global batch of 2 micro-batches × 3 = the oracle mean over
    those 6 sequences on the initial model."""
    from dpokit.data import epoch_batches
    from dpokit.train.config import SFTConfig
    from dpokit.train.loop import train
    from tests.helpers import read_metrics

    root, _, _ = saved
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS * 2)
    cfg = train_config(root, tmp_path / "run", SFTConfig, data=str(data), max_steps=1,
                       batch_size=3, gradient_accumulation_steps=2,
                       loss_normalization=normalization)
    items = cfg.objective(tokenizer).load(str(data), None, progress=False)
    batch = [items[i] for i in epoch_batches(len(items), 6, seed=cfg.seed, epoch=0)[0]]
    want = sft_oracle(final_model(root / "policy"), batch, normalization == "token")
    record = read_metrics(train(cfg, progress=False).parent)[0]
    for key, value in want.items():
        assert record[key] == pytest.approx(value, abs=TOL, rel=REL), key


@pytest.fixture(scope="module")
def other_models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("kinds")
    models = {}
    for kind in ("gpt2", "qwen2"):
        for name, seed in (("policy", 21), ("ref", 22)):
            model = tiny_causal_lm(kind, vocab_size=len(tokenizer), seed=seed)
            model.save_pretrained(root / kind / name)
            tokenizer.save_pretrained(root / kind / name)
            models[kind, name] = final_model(root / kind / name)
    return root, models


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_eval_other_model_families_match_brute_force(saved, other_models, tokenizer, capsys,
                                                     tmp_path, kind, layout):
    """GPT-2 (dropout, which evaluation turns off; runs padded) and Qwen2."""
    root, _, _ = saved
    models_root, models = other_models
    per, means = oracle_pairs(models[kind, "policy"], models[kind, "ref"],
                              load_pairs(root / "groups.jsonl", tokenizer), beta=0.5)
    summary, records = eval_cli(capsys, tmp_path, "--model", str(models_root / kind / "policy"),
                                "--ref-model", str(models_root / kind / "ref"), "--data",
                                str(root / "groups.jsonl"), "--beta", "0.5", "--batch-size",
                                "2", *LAYOUT_FLAGS[layout])
    check(summary, records, per, means)


@torch.no_grad()
def wpo_statistic(model64, prompt_ids, completion_ids):
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    log_probs = model64(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].log_softmax(-1)
    targets = ids[0, len(prompt_ids):]
    token_logps = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    return float((token_logps - torch.logsumexp(2 * log_probs, -1)).mean())


@pytest.mark.parametrize("layout", ["padded", "shared"])
@pytest.mark.parametrize(("flags", "kind"), [
    (["--use-weighting"], "wpo"),
    (["--rpo-alpha", "0.3"], "rpo"),
    (["--loss-type", "sigmoid,ipo", "--loss-weights", "1.0,0.25"], "mix"),
])
def test_eval_loss_options_match_brute_force(saved, tokenizer, capsys, tmp_path, layout,
                                             flags, kind):
    """WPO (weight exp(a_w + a_l)), RPO (+ α·NLL/|y_w|) and a weighted mixture of losses, per
    pair, against the float64 oracle; the k-completion data so shared sequences are covered."""
    root, policy, ref = saved
    pairs = load_pairs(root / "groups.jsonl", tokenizer)
    per, _ = oracle_pairs(policy, ref, pairs, beta=0.5)
    summary, records = eval_cli(capsys, tmp_path, "--model", str(root / "policy"),
                                "--ref-model", str(root / "ref"), "--data",
                                str(root / "groups.jsonl"), "--beta", "0.5", "--batch-size",
                                "2", *flags, *LAYOUT_FLAGS[layout])
    losses = []
    for p, want, got in zip(pairs, per, records, strict=True):
        h = (want["chosen_logps"] - want["ref_chosen_logps"]) - (
            want["rejected_logps"] - want["ref_rejected_logps"])
        sigmoid = math.log1p(math.exp(-0.5 * h))
        if kind == "wpo":
            loss = sigmoid * math.exp(wpo_statistic(policy, p.prompt_ids, p.chosen_ids)
                                      + wpo_statistic(policy, p.prompt_ids, p.rejected_ids))
        elif kind == "rpo":
            loss = sigmoid + 0.3 * -want["chosen_logps"] / len(p.chosen_ids)
        else:
            nc, nr = len(p.chosen_ids), len(p.rejected_ids)  # IPO: per-token averaged
            m = ((want["chosen_logps"] - want["ref_chosen_logps"]) / nc
                 - (want["rejected_logps"] - want["ref_rejected_logps"]) / nr)
            loss = sigmoid + 0.25 * (m - 1 / (2 * 0.5)) ** 2
        assert got["loss"] == pytest.approx(loss, abs=TOL, rel=REL)
        losses.append(loss)
    assert summary["loss"] == pytest.approx(sum(losses) / len(losses), abs=TOL, rel=REL)


OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
       "memory: you tried to allocate 8589934592 bytes.")


def limit_forward(monkeypatch, cls, limit, size):
    original = cls.forward

    def forward(self, policy, batch):
        if size(batch) > limit:
            raise RuntimeError(OOM)
        return original(self, policy, batch)

    monkeypatch.setattr(cls, "forward", forward)


@pytest.mark.parametrize("layout", ["padded", "shared"])
def test_eval_halving_with_groups_matches_brute_force(saved, tokenizer, tmp_path, monkeypatch,
                                                      layout):
    """Out of memory above 3 pairs a forward: a batch of 3 prompts (6 pairs) is halved (to one
    prompt), the whole set still scored once, in order, as the oracle says."""
    from dpokit.evaluate import EvalConfig, run_eval
    from dpokit.objectives import DPOObjective

    root, policy, ref = saved
    from dpokit.data import load_preference_pairs
    from dpokit.data.formats import ColumnMap

    pairs = list(load_preference_pairs(root / "groups.jsonl", tokenizer,
                                       columns=ColumnMap(pairs_from_scores="best_vs_each")))
    assert len(pairs) == 6
    per, means = oracle_pairs(policy, ref, pairs, beta=0.5)
    limit_forward(monkeypatch, DPOObjective, 3, lambda batch: batch.num_pairs)
    result = run_eval(EvalConfig(model=str(root / "policy"), ref_model=str(root / "ref"),
                                 data=str(root / "groups.jsonl"), beta=0.5, batch_size=3,
                                 pairs_from_scores="best_vs_each",
                                 shared_prompt=layout == "shared",
                                 per_example=str(tmp_path / "x.jsonl")), progress=False)
    assert result.batch_size == 1
    check({"num_pairs": result.num_examples, **result.metrics}, result.per_example, per, means)


@pytest.mark.parametrize("normalization", ["example", "token"])
def test_sft_eval_halving_matches_brute_force(saved, tokenizer, tmp_path, monkeypatch,
                                              normalization):
    """SFT evaluation under a fake limit of 2 sequences a forward: 7 at 5 a batch go on at 2,
    and eval/… equal the oracle."""
    from dpokit.evaluate import evaluate
    from dpokit.models import load_causal_lm
    from dpokit.objectives import SFTObjective
    from dpokit.runtime import setup_runtime, shutdown_runtime
    from dpokit.train.config import SFTConfig

    root, _, _ = saved
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    cfg = train_config(root, tmp_path / "run", SFTConfig, data=str(data),
                       loss_normalization=normalization)
    objective = cfg.objective(tokenizer)
    items = objective.load(str(data), None, progress=False)
    want = sft_oracle(final_model(root / "policy"), list(items), normalization == "token")
    limit_forward(monkeypatch, SFTObjective, 2, lambda batch: batch.num_sequences)
    runtime = setup_runtime("cpu", "float32")
    try:
        model = load_causal_lm(str(root / "policy"), dtype="float32", device=runtime.device)
        result = evaluate(objective, objective.policy(model), items, batch_size=5,
                          runtime=runtime)
    finally:
        shutdown_runtime(runtime)
    assert result.batch_size == 2 and result.num_examples == 7
    for key, value in want.items():
        assert result.metrics[key] == pytest.approx(value, abs=TOL, rel=REL), key


def test_sft_text_mode_chat_on_plain_rows_is_refused(tokenizer, tmp_path):
    """text_mode 'chat' asks for the chat template; preference pairs and prompts refuse it on
    plain-text rows (tokenize.py: "text_mode='chat' needs conversational rows"), but SFT rows
    are silently tokenised as plain text — trained without the template that was asked for."""
    from dpokit.data import TokenizeSettings
    from dpokit.data.sft import load_sft_sequences
    from dpokit.errors import DpokitError

    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS[:2])
    with pytest.raises(DpokitError, match="text_mode='chat'"):
        load_sft_sequences(data, tokenizer, settings=TokenizeSettings(text_mode="chat"))


def test_sft_without_eos_token_is_refused(tokenizer, tmp_path):
    """Plain SFT completions end with EOS (module docstring: "EOS appended to the completion, as
    for preference data"); a tokenizer without eos_token makes preference loading refuse
    ("plain-text completions end with EOS") but SFT silently trains completions with no EOS."""
    from dpokit.data import load_preference_pairs
    from dpokit.data.sft import load_sft_sequences
    from dpokit.errors import DpokitError

    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    prefs = write_jsonl(tmp_path / "prefs.jsonl", ROWS[:2])
    with pytest.raises(DpokitError, match="eos_token"):
        load_preference_pairs(prefs, no_eos)
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS[:2])
    with pytest.raises(DpokitError, match="eos_token"):
        load_sft_sequences(data, no_eos)


def test_two_process_eval_per_example_matches_brute_force(saved, tokenizer, tmp_path):
    """`torchrun --nproc-per-node 2 -m dpokit eval`: 3 prompts (6 pairs) at 1 prompt a batch —
    one rank runs a zero-weight filler batch — sums reduced once, records gathered in data
    order, all equal the oracle."""
    from dpokit.data import load_preference_pairs
    from dpokit.data.formats import ColumnMap
    from tests.helpers import torchrun

    root, policy, ref = saved
    pairs = list(load_preference_pairs(root / "groups.jsonl", tokenizer,
                                       columns=ColumnMap(pairs_from_scores="best_vs_each")))
    per, means = oracle_pairs(policy, ref, pairs, beta=0.5)
    out_file = tmp_path / "per_example.jsonl"
    done = torchrun("-m", "dpokit", "eval", "--model", root / "policy", "--ref-model",
                    root / "ref", "--data", root / "groups.jsonl", "--beta", "0.5",
                    "--pairs-from-scores", "best_vs_each", "--batch-size", "1",
                    "--device", "cpu", "--per-example", out_file, "--json", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    check(summary, records, per, means)


def test_two_process_sft_evaluation_matches_brute_force(saved, tokenizer, tmp_path):
    """`torchrun --nproc-per-node 2 -m dpokit sft` with 7 evaluation rows at 2 a batch (one rank
    pads with a zero-weight batch) and token normalisation: eval/… = the oracle on final/."""
    from tests.helpers import torchrun

    root, _, _ = saved
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    run_dir = tmp_path / "run"
    done = torchrun("-m", "dpokit", "sft", "--model", root / "policy", "--data", data,
                    "--eval-data", data, "--per-device-eval-batch-size", "2", "--batch-size",
                    "2", "--max-steps", "2", "--loss-normalization", "token",
                    "--learning-rate", "1e-3", "--device", "cpu", "--output-dir", run_dir,
                    timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = eval_records(run_dir)
    from dpokit.data.sft import load_sft_sequences

    sequences = list(load_sft_sequences(data, tokenizer))
    want = sft_oracle(final_model(run_dir / "final"), sequences, True)
    for key, value in want.items():
        assert record[f"eval/{key}"] == pytest.approx(value, abs=TOL, rel=REL), key
