"""Review of the command line and `dpokit eval` (findings pinned here): a flag given twice with
different values is a usage error, not the last one silently; `--per-example`/`--output` never
replace an earlier result unless `--overwrite`; an evaluation whose log-probs are not finite
stops with one line naming the row (it printed NaN and exited 0); a model or reference whose
embedding has no row for the data's token ids is one line naming the row (it was an IndexError
traceback); an out-of-memory line in `dpokit eval` names eval's own key; the printed table equals
a float64 brute-force recomputation (to its 6 significant digits).

Oracle: `tests.helpers.reference_token_logps` (float64, full logits, one unpadded sequence) and
sigmoid DPO by hand, −log σ(βh) = log1p(e^{−βh}); tolerance 1e-5 relative + 1e-6 absolute (the
table prints 6 significant digits of a float32 forward)."""

import json
import math
import re

import pytest
import torch

from tests.helpers import reference_token_logps, save_policy_and_ref, write_jsonl
from tests.helpers import run_cli as run

ROWS = [
    {"prompt": "the cat sat", "chosen": " on the mat.", "rejected": " under the tree!"},
    {"prompt": "what color is the sky?", "chosen": " blue", "rejected": " green sea"},
    {"prompt": "why", "chosen": " the sun is red", "rejected": " no"},
]


def one_line(code, out, err):
    """Exit status 2, nothing on stdout, exactly one `dpokit: error:` line, no traceback."""
    lines = [line for line in err.splitlines()
             if line.strip() and not line.startswith("evaluating")]  # (the progress bar)
    assert code == 2, (code, err)
    assert out == "", out
    assert len(lines) == 1 and lines[0].startswith("dpokit: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """policy/ and ref/ (tiny Llamas), overflow/ (finite weights whose logits overflow to
    ±inf), narrow/ (a Llama with 40 embedding rows: another tokenizer's model) and the data."""
    from dpokit.fixtures import tiny_causal_lm

    root = tmp_path_factory.mktemp("cli_eval_review")
    policy, ref = save_policy_and_ref(root, tokenizer)
    overflow = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=11)
    with torch.no_grad():  # finite (float32 max 3.4e38), but h·W overflows
        overflow.lm_head.weight.copy_(torch.sign(overflow.lm_head.weight) * 3e38)
    narrow = tiny_causal_lm("llama", vocab_size=40, seed=5)
    for name, model in (("overflow", overflow), ("narrow", narrow)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    write_jsonl(root / "prefs.jsonl", ROWS)
    return root, policy, ref


def eval_argv(root, *extra, model="policy", ref="ref"):
    return ["eval", "--model", str(root / model), "--ref-model", str(root / ref), "--data",
            str(root / "prefs.jsonl"), *extra]


# ------------------------------------------------------------------ a flag given twice


def test_a_scalar_flag_given_twice_keeps_the_last_as_argparse_and_trl_do(tmp_path):
    """A later scalar flag overrides an earlier one (click's, argparse's and TRL's
    HfArgumentParser's rule, which wrapper scripts and aliases rely on): ``--beta 0.1 …
    --beta 0.2`` runs at 0.2."""
    from click.testing import CliRunner

    from dpokit.cli.options import config_command
    from dpokit.eval_config import EvalConfig

    seen = []
    command = config_command("eval", EvalConfig, seen.append, summary="")
    result = CliRunner().invoke(command, ["--model", "m", "--data", "d", "--beta", "0.1",
                                          "--beta", "0.2", "--json", "--no-json"])
    assert result.exit_code == 0, result.output
    assert (seen[0].beta, seen[0].json) == (0.2, False)


def test_a_flag_repeated_with_the_same_value_and_list_flags_still_work(tmp_path):
    """The same value twice is one value; list flags repeated are still concatenated; the
    flag wins over the YAML key; every field not given is the dataclass default, as --help
    shows it."""
    import dataclasses

    from click.testing import CliRunner

    from dpokit.cli.options import config_command
    from dpokit.config import field_defaults
    from dpokit.eval_config import EvalConfig

    seen = []
    command = config_command("eval", EvalConfig, seen.append, summary="")
    path = tmp_path / "e.yaml"
    path.write_text("beta: 0.5\nshared_prompt: false\nloss_type: [ipo]\n")
    result = CliRunner().invoke(command, [
        "--config", str(path), "--model", "m", "--data", "d", "--beta", "0.25", "--beta",
        "0.25", "--shared-prompt", "--loss-type", "sigmoid", "--loss-type", "hinge"])
    assert result.exit_code == 0, result.output
    config = seen[0]
    assert (config.beta, config.shared_prompt, config.loss_type) == (0.25, True,
                                                                     ["sigmoid", "hinge"])
    defaults = field_defaults(EvalConfig)
    given = {"model", "data", "beta", "shared_prompt", "loss_type"}
    for f in dataclasses.fields(EvalConfig):
        if f.name not in given:
            assert getattr(config, f.name) == defaults[f.name], f.name
    text = " ".join(CliRunner().invoke(command, ["--help"]).output.split())
    for name, default in defaults.items():
        assert f"[default: {default!r}]" in text.split(f"--{name.replace('_', '-')}", 1)[1], name


# ------------------------------------------------------------------ never over a result


def test_eval_per_example_is_not_written_over_an_earlier_result(saved, capsys, tmp_path):
    """Before: a second `dpokit eval --per-example scores.jsonl` replaced the first file
    without a word. Now refused before any model loads; --overwrite replaces it (atomically)."""
    root, _, _ = saved
    target = tmp_path / "scores.jsonl"
    target.write_text("earlier result\n")
    code, out, err = run(capsys, *eval_argv(root, "--per-example", str(target), "--json"))
    line = one_line(code, out, err)
    assert f"per_example {target} exists" in line and "--overwrite" in line, line
    assert target.read_text() == "earlier result\n"
    code, out, err = run(capsys, *eval_argv(root, "--per-example", str(target), "--json",
                                            "--overwrite"))
    assert code == 0, err
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["row"] for r in records] == [1, 2, 3]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left beside it


def test_generate_output_is_not_written_over_an_earlier_result(saved, capsys, tmp_path):
    root, _, _ = saved
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the cat"}])
    target = tmp_path / "samples.jsonl"
    target.write_text("earlier samples\n")
    argv = ["generate", "--model", str(root / "policy"), "--data", str(data), "--output",
            str(target), "--max-new-tokens", "3"]
    line = one_line(*run(capsys, *argv))
    assert f"output {target} exists" in line, line
    assert target.read_text() == "earlier samples\n"
    code, _, err = run(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert len(target.read_text().splitlines()) == 1


# ------------------------------------------------------------------ results that cannot be right


def test_non_finite_log_probs_stop_with_one_line_naming_the_row(saved, capsys, tmp_path):
    """Before: exit 0, a table of `nan` (and `NaN` — not JSON — with --json) and a per-example
    file of NaN. Oracle of the failure: the model's own float32 logits are not finite."""
    root, _, _ = saved
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "overflow")
    ids = torch.tensor([list(range(1, 8))])
    with torch.no_grad():
        assert not torch.isfinite(model(input_ids=ids).logits.log_softmax(-1)).all()
    target = tmp_path / "scores.jsonl"
    for extra in ([], ["--json", "--per-example", str(target)]):
        code, out, err = run(capsys, *eval_argv(root, *extra, model="overflow"))
        line = one_line(code, out, err)
        assert "non-finite" in line and f"{root / 'prefs.jsonl'}, row 1: chosen_logps = nan" \
            in line, line
    assert not target.exists()


@pytest.mark.parametrize(("model", "ref", "what"), [
    ("policy", "narrow", "ref_model"),
    ("narrow", "ref", "model"),
])
def test_a_model_of_another_vocabulary_is_one_line_naming_the_row(saved, capsys, model, ref,
                                                                  what):
    """Before: `IndexError: index out of range in self` from the embedding, a traceback (on a
    GPU a device-side assert)."""
    root, _, _ = saved
    line = one_line(*run(capsys, *eval_argv(root, model=model, ref=ref)))
    assert re.search(rf"prefs\.jsonl, row 1: token id \d+ has no embedding in {what} "
                     rf"\S*narrow \(40 rows\)", line), line


def test_eval_out_of_memory_names_evals_own_batch_key(saved, capsys, monkeypatch):
    """Before: `lower per_device_eval_batch_size` — a key `dpokit eval` does not have (its
    flag is --batch-size; the suggested one is 'No such option')."""
    import dpokit.evaluate

    root, _, _ = saved

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(dpokit.evaluate, "_evaluate_batch", out_of_memory)
    line = one_line(*run(capsys, *eval_argv(root, "--batch-size", "1")))
    assert "lower batch_size or max_length" in line, line


@pytest.mark.parametrize(("rows", "flags", "message"), [
    ([], [], "prefs.jsonl: no rows"),
    (ROWS, ["--max-length", "null"], "row 2: 10 tokens"),
])
def test_data_it_cannot_score_is_named(saved, capsys, tmp_path, rows, flags, message):
    """An empty file, and a row longer than the model's positions (8 here), name the file and
    row before any weights load."""
    root, _, _ = saved
    short = tmp_path / "short"
    short.mkdir()
    for file in (root / "policy").iterdir():
        (short / file.name).write_bytes(file.read_bytes())
    settings = json.loads((short / "config.json").read_text())
    settings["max_position_embeddings"] = 8
    (short / "config.json").write_text(json.dumps(settings))
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    model = short if rows else root / "policy"
    code, out, err = run(capsys, "eval", "--model", str(model), "--data", str(data),
                         "--no-shared-prompt", *flags)
    assert message in one_line(code, out, err)


# ------------------------------------------------------------------ the printed numbers


def test_the_printed_table_equals_a_float64_recomputation(saved, tokenizer, capsys):
    root, policy, ref = saved
    beta = 0.5
    code, out, err = run(capsys, *eval_argv(root, "--beta", str(beta), "--batch-size", "2"))
    assert code == 0, err
    table = dict(re.findall(r"│ (\S+)\s+│\s+(\S+) │", out))
    rows = []
    for row in ROWS:
        prompt = tokenizer(row["prompt"])["input_ids"]
        logps = {}
        for key in ("chosen", "rejected"):
            full = tokenizer(row["prompt"] + row[key] + "</s>")["input_ids"]
            assert full[:len(prompt)] == prompt
            for name, model in (("", policy), ("ref_", ref)):
                logps[name + key] = float(reference_token_logps(model, prompt,
                                                                full[len(prompt):])[0].sum())
        rows.append(logps)
    chosen = [beta * (r["chosen"] - r["ref_chosen"]) for r in rows]
    rejected = [beta * (r["rejected"] - r["ref_rejected"]) for r in rows]
    pairs = list(zip(chosen, rejected, strict=True))
    expected = {
        "loss": sum(math.log1p(math.exp(-(c - r))) for c, r in pairs) / 3,
        "rewards/chosen": sum(chosen) / 3,
        "rewards/rejected": sum(rejected) / 3,
        "rewards/margins": sum(c - r for c, r in pairs) / 3,
        "rewards/accuracies": sum(c > r for c, r in pairs) / 3,
        "logps/chosen": sum(r["chosen"] for r in rows) / 3,
        "logps/rejected": sum(r["rejected"] for r in rows) / 3,
    }
    for key, value in expected.items():
        assert float(table[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), key
