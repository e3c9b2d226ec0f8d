"""`dpokit eval` on a saved tiny model: numbers from the slow float64 reference and the DPO
formula by hand; errors as one line with exit status 2."""

import json
import math

import pytest

from dpokit.fixtures import tiny_causal_lm
from tests.cli_helpers import run_cli as run
from tests.test_logps import reference_token_logps

ROWS = [
    {"prompt": "the cat sat", "chosen": " on the mat.", "rejected": " under the tree!"},
    {"prompt": "what color is the sky?", "chosen": " blue", "rejected": " green sea"},
    {"prompt": "why", "chosen": " the sun is red", "rejected": " no"},
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("eval")
    policy = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=11)
    ref = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=12)
    for name, model in (("policy", policy), ("ref", ref)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    data = root / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
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
    (["--beta", "0"], "--beta must be a finite number > 0"),
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
