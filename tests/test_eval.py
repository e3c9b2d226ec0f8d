"""`dpokit eval` on a saved tiny model: numbers from the slow float64 reference and the DPO
formula by hand; errors as one line with exit status 2."""

import json
import math

import pytest

from tests.helpers import reference_token_logps, save_policy_and_ref, write_jsonl
from tests.helpers import run_cli as run

ROWS = [
    {"prompt": "the cat sat", "chosen": " on the mat.", "rejected": " under the tree!"},
    {"prompt": "what color is the sky?", "chosen": " blue", "rejected": " green sea"},
    {"prompt": "why", "chosen": " the sun is red", "rejected": " no"},
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("eval")
    policy, ref = save_policy_and_ref(root, tokenizer)
    data = root / "prefs.jsonl"
    write_jsonl(data, ROWS)
    return root, policy, ref




def expected_logps(model, tokenizer, row):
    prompt = tokenizer(row["prompt"])["input_ids"]
    result = []
    for key in ("chosen", "rejected"):
        full = tokenizer(row["prompt"] + row[key] + "</s>")["input_ids"]
        assert full[:len(prompt)] == prompt
        result.append(float(reference_token_logps(model, prompt, full[len(prompt):])[0].sum()))
    return result


def test_eval_with_reference_matches_formula(saved, tokenizer, capsys, tmp_path):
    root, policy, ref = saved
    out_file = tmp_path / "per_example.jsonl"
    code, out, _ = run(capsys, "eval", "--model", str(root / "policy"), "--ref-model",
                       str(root / "ref"), "--data", str(root / "prefs.jsonl"), "--beta", "0.5",
                       "--batch-size", "2", "--per-example", str(out_file), "--json")
    assert code == 0
    summary = json.loads(out)
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert summary["num_pairs"] == 3 and len(records) == 3
    losses, margins, accuracies = [], [], []
    for row, record in zip(ROWS, records, strict=True):
        chosen, rejected = expected_logps(policy, tokenizer, row)
        ref_chosen, ref_rejected = expected_logps(ref, tokenizer, row)
        assert record["chosen_logps"] == pytest.approx(chosen, abs=1e-5)
        assert record["rejected_logps"] == pytest.approx(rejected, abs=1e-5)
        assert record["ref_chosen_logps"] == pytest.approx(ref_chosen, abs=1e-5)
        h = (chosen - ref_chosen) - (rejected - ref_rejected)
        # sigmoid DPO: −log σ(βh) = log(1 + e^{−βh})
        assert record["loss"] == pytest.approx(math.log1p(math.exp(-0.5 * h)), abs=1e-5)
        assert record["chosen_reward"] == pytest.approx(0.5 * (chosen - ref_chosen), abs=1e-5)
        assert record["chosen_tokens"] == len(tokenizer(row["chosen"] + "</s>")["input_ids"]) - 1
        losses.append(record["loss"])
        margins.append(0.5 * h)
        accuracies.append(float(h > 0))
    assert summary["loss"] == pytest.approx(sum(losses) / 3, abs=1e-6)
    assert summary["rewards/margins"] == pytest.approx(sum(margins) / 3, abs=1e-5)
    assert summary["rewards/accuracies"] == pytest.approx(sum(accuracies) / 3)


def test_eval_without_reference_reports_logps_only(saved, capsys):
    root, _, _ = saved
    code, out, _ = run(capsys, "eval", "--model", str(root / "policy"), "--data",
                       str(root / "prefs.jsonl"), "--json", "--padding-free")
    assert code == 0
    summary = json.loads(out)
    assert set(summary) == {"num_pairs", "logps/chosen", "logps/rejected"}
    code, out, _ = run(capsys, "eval", "--model", str(root / "policy"), "--data",
                       str(root / "prefs.jsonl"))
    assert code == 0 and "log-probs only" in out


def test_packed_and_padded_agree(saved, capsys):
    root, _, _ = saved
    results = []
    for extra in ([], ["--padding-free"], ["--shared-prompt"]):
        code, out, _ = run(capsys, "eval", "--model", str(root / "policy"), "--ref-model",
                           str(root / "ref"), "--data", str(root / "prefs.jsonl"), "--json",
                           *extra)
        assert code == 0
        results.append(json.loads(out))
    for other in results[1:]:
        for key, value in results[0].items():
            assert other[key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "/nonexistent/model"], "model directory not found: /nonexistent/model"),
    (["--data", "/nonexistent/prefs.jsonl"], "data not found: /nonexistent/prefs.jsonl"),
    (["--loss-type", "magic"], "unknown loss"),
    (["--beta", "0"], "beta must be a finite number > 0"),
])
def test_eval_errors_are_one_line(saved, capsys, args, message):
    root, _, _ = saved
    base = {"--model": str(root / "policy"), "--data": str(root / "prefs.jsonl")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = ["eval"] + [x for pair in base.items() for x in pair]
    code, out, err = run(capsys, *argv)
    assert out == ""
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert message in err.lower() or message in err


def test_bad_row_is_named(saved, capsys, tmp_path):
    root, _, _ = saved
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    code, _, err = run(capsys, "eval", "--model", str(root / "policy"), "--data", str(bad))
    assert code == 2
    assert f"{bad}, row 2, field 'rejected': missing" in err and err.count("\n") == 1


@pytest.mark.parametrize("extra", [
    {},
    {"ld_alpha": 0.5},
    {"use_weighting": True},
    {"loss_type": ["ipo"]},
    {"padding_free": True},
    {"shared_prompt": False, "rpo_alpha": 0.3},
])
def test_eval_loss_equals_the_loss_logged_at_training_step_1(saved, capsys, tmp_path, extra):
    """`dpokit eval` and a training step run one objective: with the whole data set as one
    batch, the eval loss (and metrics) on the initial model equal what step 1 logs — per-row
    weights, ld_alpha, WPO, rpo_alpha and every layout included. Tolerance 1e-5 (float32)."""
    from dpokit.config import load_config
    from dpokit.train.config import DPOConfig
    from dpokit.train.loop import train

    root, _, _ = saved
    data = tmp_path / "weighted.jsonl"
    weights = [0.5, 2.0, 1.25]
    data.write_text("".join(json.dumps({**r, "weight": w}) + "\n"
                            for r, w in zip(ROWS, weights, strict=True)))
    common = {"model": str(root / "policy"), "ref_model": str(root / "ref"), "data": str(data),
              "beta": 0.5, **extra}
    config = load_config(DPOConfig, None, {k: v if isinstance(v, str) else json.dumps(v)
                                           for k, v in {**common, "batch_size": 3,
                                                        "max_steps": 1, "logging_steps": 1,
                                                        "save_steps": None,
                                                        "output_dir": str(tmp_path / "run")}
                                           .items()})
    train(config, progress=False)
    (step_1,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl")
                 .read_text().splitlines() if '"loss"' in line]
    flags = []
    for key, value in common.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + key.replace("_", "-"))
        else:
            flags += [flag, ",".join(value) if isinstance(value, list) else str(value)]
    code, out, err = run(capsys, "eval", *flags, "--batch-size", "2", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["num_pairs"] == 3
    for key in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert summary[key] == pytest.approx(step_1[key], abs=1e-5), key
    flags[flags.index(str(data))] = str(root / "prefs.jsonl")  # the same rows, no weights
    unweighted = json.loads(run(capsys, "eval", *flags, "--json")[1])["loss"]
    assert abs(unweighted - summary["loss"]) > 1e-3  # the weights are really applied


def test_margin_column_feeds_odpo(saved, tokenizer, capsys, tmp_path):
    """The data's margin m reaches the loss: odpo's per-pair loss is −log σ(βh − α·m)
    (ODPO, Amini et al. 2024) with h from the float64 reference log-probs; tolerance 1e-5."""
    root, policy, ref = saved
    data = tmp_path / "margins.jsonl"
    margins = [0.0, 1.5, -2.0]
    data.write_text("".join(json.dumps({**r, "margin": m}) + "\n"
                            for r, m in zip(ROWS, margins, strict=True)))
    out_file = tmp_path / "per_example.jsonl"
    code, _, err = run(capsys, "eval", "--model", str(root / "policy"), "--ref-model",
                       str(root / "ref"), "--data", str(data), "--beta", "0.5", "--loss-type",
                       "odpo", "--odpo-alpha", "0.4", "--per-example", str(out_file), "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    for row, m, record in zip(ROWS, margins, records, strict=True):
        chosen, rejected = expected_logps(policy, tokenizer, row)
        ref_chosen, ref_rejected = expected_logps(ref, tokenizer, row)
        h = (chosen - ref_chosen) - (rejected - ref_rejected)
        z = 0.5 * h - 0.4 * m
        assert record["loss"] == pytest.approx(math.log1p(math.exp(-z)), abs=1e-5)
    code, _, err = run(capsys, "eval", "--model", str(root / "policy"), "--ref-model",
                       str(root / "ref"), "--data", str(root / "prefs.jsonl"), "--loss-type",
                       "odpo")
    assert code == 2 and "margin" in err and err.count("\n") == 1


def test_eval_reads_the_same_keys_from_yaml(saved, capsys, tmp_path):
    """`dpokit eval --config` takes the keys of its flags (train's names); flags override."""
    root, _, _ = saved
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {root / 'policy'}\nref_model: {root / 'ref'}\n"
                   f"data: {root / 'prefs.jsonl'}\nbeta: 2.0\nloss_type: [hinge]\n")
    from_yaml = json.loads(run(capsys, "eval", "--config", str(cfg), "--beta", "0.5",
                               "--json")[1])
    from_flags = json.loads(run(capsys, "eval", "--model", str(root / "policy"), "--ref-model",
                                str(root / "ref"), "--data", str(root / "prefs.jsonl"),
                                "--beta", "0.5", "--loss-type", "hinge", "--json")[1])
    assert from_yaml == pytest.approx(from_flags, abs=1e-7)
    cfg.write_text(cfg.read_text() + "learning_rate: 1.0e-6\n")
    code, _, err = run(capsys, "eval", "--config", str(cfg))
    assert code == 2 and "unknown key 'learning_rate'" in err and err.count("\n") == 1


def test_label_prob_column_feeds_sigmoid_soft(saved, tokenizer, capsys, tmp_path):
    """Soft Bradley–Terry labels from the data: sigmoid_soft's per-pair loss is
    −p log σ(βh) − (1−p) log σ(−βh) with h from the float64 reference log-probs (1e-5); a
    probability outside [0, 1] is a one-line error naming the file, row and column."""
    root, policy, ref = saved
    data = tmp_path / "soft.jsonl"
    probs = [0.9, 0.5, 0.2]
    write_jsonl(data, [{**r, "agree": p} for r, p in zip(ROWS, probs, strict=True)])
    out_file = tmp_path / "per_example.jsonl"
    code, _, err = run(capsys, "eval", "--model", str(root / "policy"), "--ref-model",
                       str(root / "ref"), "--data", str(data), "--beta", "0.5", "--loss-type",
                       "sigmoid_soft", "--label-prob-column", "agree", "--per-example",
                       str(out_file), "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    for row, p, record in zip(ROWS, probs, records, strict=True):
        chosen, rejected = expected_logps(policy, tokenizer, row)
        ref_chosen, ref_rejected = expected_logps(ref, tokenizer, row)
        z = 0.5 * ((chosen - ref_chosen) - (rejected - ref_rejected))
        expected = p * math.log1p(math.exp(-z)) + (1 - p) * math.log1p(math.exp(z))
        assert record["loss"] == pytest.approx(expected, abs=1e-5)
    write_jsonl(data, [{**ROWS[0], "agree": 0.5}, {**ROWS[1], "agree": 1.5}])
    code, _, err = run(capsys, "eval", "--model", str(root / "policy"), "--ref-model",
                       str(root / "ref"), "--data", str(data), "--loss-type", "sigmoid_soft",
                       "--label-prob-column", "agree")
    assert code == 2 and err.count("\n") == 1
    assert f"{data}, row 2, field 'agree': expected a probability in [0, 1]" in err
