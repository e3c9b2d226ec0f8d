"""Up-front checks (issue 12): what the config, the model's config.json and the data can tell is
checked before any weights load — max_length and every row against the model's positions,
flags that need torchrun or LoRA — and the reference pass covers only the rows the run uses."""

import json

import pytest
import torch

from dpokit.data import epoch_batches, rows_used
from dpokit.fixtures import tiny_causal_lm
from dpokit.train.loop import train
from tests.helpers import run_cli, write_jsonl
from tests.train.test_rundir import cli_args, one_error
from tests.train.test_trainer import config


@pytest.fixture(scope="module")
def short_models(workdir, tmp_path_factory):
    """The tiny GPT-2 and Llama with 32 positions (their tokenizer copied in)."""
    root = tmp_path_factory.mktemp("short")
    tokenizer_files = [p for p in (workdir / "llama").iterdir() if "token" in p.name]
    for kind in ("gpt2", "llama"):
        model = tiny_causal_lm(kind, vocab_size=512, seed=3, max_positions=32)
        model.save_pretrained(root / kind)
        for file in tokenizer_files:
            (root / kind / file.name).write_bytes(file.read_bytes())
    return root


def _no_weights_loaded(monkeypatch):
    """Make loading any weights fail loudly: the check must come first."""
    import dpokit.train.setup as setup

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr(setup, "load_causal_lm", refuse)


@pytest.mark.parametrize(("kind", "key"), [("gpt2", "n_positions"),
                                           ("llama", "max_position_embeddings")])
def test_max_length_past_the_positions_is_refused_before_loading(
        workdir, short_models, tmp_path, capsys, monkeypatch, kind, key):
    _no_weights_loaded(monkeypatch)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *cli_args(workdir, out, "--max-steps", "1"), "--model",
                           str(short_models / kind), "--max-length", "64")
    line = one_error(code, err)
    assert "max_length 64" in line and f"{key} = 32" in line and str(short_models / kind) in line
    assert not (out / "config.yaml").exists()


def test_a_row_past_the_positions_is_named(workdir, short_models, tmp_path, capsys,
                                           monkeypatch):
    """max_length null (no truncation): the row that does not fit is named, before loading."""
    _no_weights_loaded(monkeypatch)
    rows = [{"prompt": "a bird", "chosen": " yes", "rejected": " no"}] * 3
    rows.append({"prompt": "a bird " * 20, "chosen": " yes good answer", "rejected": " no"})
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    code, _, err = run_cli(capsys, *cli_args(workdir, tmp_path / "run", "--max-steps", "1"),
                           "--model", str(short_models / "llama"), "--max-length", "null",
                           "--data", str(data))
    line = one_error(code, err)
    assert f"{data}, row 4" in line and "max_position_embeddings = 32" in line


def test_online_prompt_and_new_tokens_past_the_positions(workdir, short_models, tmp_path, capsys,
                                                        monkeypatch):
    _no_weights_loaded(monkeypatch)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a bird"}] * 4)
    reward = tmp_path / "reward.py"
    reward.write_text("def score(prompts, completions, **kw):\n    return [0.0] * len(prompts)\n")
    code, _, err = run_cli(capsys, *cli_args(workdir, tmp_path / "run", "--max-steps", "1"),
                           "--model", str(short_models / "llama"), "--max-length", "null",
                           "--data", str(prompts), "--online", "--reward", f"{reward}:score",
                           "--loss-type", "sigmoid", "--label", "hard", "--max-new-tokens", "40")
    line = one_error(code, err)
    assert f"{prompts}, row 1" in line and "max_new_tokens" in line


def test_fsdp_without_torchrun_is_refused(workdir, tmp_path, capsys, monkeypatch):
    _no_weights_loaded(monkeypatch)
    code, _, err = run_cli(capsys, *cli_args(workdir, tmp_path / "run", "--max-steps", "1",
                                             "--fsdp"))
    assert "torchrun" in one_error(code, err) and not (tmp_path / "run").exists()


def test_merge_lora_without_lora_is_refused(workdir, tmp_path, capsys):
    code, _, err = run_cli(capsys, *cli_args(workdir, tmp_path / "run", "--max-steps", "1",
                                             "--merge-lora"))
    assert "merge_lora" in one_error(code, err) and not (tmp_path / "run").exists()


def test_an_invalid_loss_option_is_refused_before_anything(workdir, tmp_path, capsys,
                                                          monkeypatch):
    _no_weights_loaded(monkeypatch)
    code, _, err = run_cli(capsys, *cli_args(workdir, tmp_path / "run", "--max-steps", "1",
                                             "--loss-type", "ipo", "--label-smoothing", "0.1"))
    line = one_error(code, err)
    assert "label_smoothing" in line and "ipo" in line and not (tmp_path / "run").exists()


# ------------------------------------------------------------- reference over rows used


@pytest.mark.parametrize(("n", "batch", "steps"), [(48, 8, 1), (48, 8, 3), (50, 8, 6),
                                                   (50, 8, 7), (5, 8, 1)])
def test_rows_used_are_the_rows_of_the_first_batches(n, batch, steps):
    """Oracle: the union of the batches the loop will draw (epoch_batches per epoch)."""
    per_epoch = -(-n // batch)
    drawn = set()
    for step in range(steps):
        epoch, index = divmod(step, per_epoch)
        drawn.update(epoch_batches(n, batch, seed=3, epoch=epoch)[index])
    assert rows_used(n, batch, seed=3, total_steps=steps) == sorted(drawn)


def test_the_reference_pass_covers_only_the_rows_used(workdir, tmp_path, monkeypatch):
    """max_steps 2 of batch 4 over 48 rows: the reference pass gets exactly the 8 rows those
    steps draw, and the run's losses equal those of a run with a live reference (every row
    available)."""
    import dpokit.train.setup as setup

    asked = []
    original = setup.compute_reference_table

    def recording(*args, rows=None, **kwargs):
        asked.append(rows)
        return original(*args, rows=rows, **kwargs)

    monkeypatch.setattr(setup, "compute_reference_table", recording)
    short = train(config(workdir, str(tmp_path / "short"), max_steps=2, batch_size=4),
                  progress=False).parent
    assert asked == [rows_used(48, 4, seed=42, total_steps=2)] and len(asked[0]) == 8
    full = train(config(workdir, str(tmp_path / "full"), max_steps=2, batch_size=4,
                        precompute_ref_logps=False), progress=False).parent
    short_metrics = [json.loads(x) for x in (short / "metrics.jsonl").read_text().splitlines()]
    full_metrics = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(short_metrics) == 2
    for a, b in zip(short_metrics, full_metrics, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_reference_table_rows_not_used_are_never_read(workdir, tmp_path):
    """The table computed for a subset: used rows equal the full table's, the rest are NaN,
    and looking one of those up is an error, not a NaN loss."""
    from dpokit.data import PairBatch  # noqa: F401  (the lookup's input type)
    from dpokit.models import load_causal_lm, load_tokenizer
    from dpokit.objectives.reference import Reference, compute_reference_table
    from tests.helpers import tokenized_pairs

    tokenizer = load_tokenizer(workdir / "llama")
    rows = [json.loads(x) for x in (workdir / "prefs.jsonl").read_text().splitlines()][:10]
    pairs = tokenized_pairs(rows, tokenizer)
    model = load_causal_lm(workdir / "llama")
    reference = Reference("model", model=model)
    common = {"batch_size": 4, "pad_token_id": tokenizer.pad_token_id, "layout": "padded",
              "device": torch.device("cpu")}
    full = compute_reference_table(reference, pairs, **common)
    subset = compute_reference_table(reference, pairs, rows=[1, 4, 7], **common)
    assert torch.equal(subset[[1, 4, 7]], full[[1, 4, 7]])
    assert torch.isnan(subset[[0, 2, 3, 5, 6, 8, 9]]).all()
    from dpokit.data import collate_pairs

    precomputed = Reference("precomputed", table=subset)
    batch = collate_pairs([pairs[1], pairs[2]], "padded", pad_token_id=tokenizer.pad_token_id)
    batch.extras["indices"] = torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match="never computed"):
        precomputed.logps(batch)


@pytest.mark.parametrize("damage", ["truncated", "bad header"])
def test_a_corrupt_model_file_is_one_line_naming_it(workdir, tmp_path, capsys, damage):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(workdir / "llama", model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated"
                        else b"\xff" * 8 + data[8:])
    code, _, err = run_cli(capsys, *cli_args(workdir, tmp_path / "run", "--max-steps", "1"),
                           "--model", str(model))
    line = one_error(code, err)
    assert str(model) in line and "model.safetensors" in line and "corrupt" in line


def test_eval_checks_positions_before_loading(workdir, short_models, capsys, monkeypatch):
    import dpokit.models

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr(dpokit.models, "load_causal_lm", refuse)
    code, _, err = run_cli(capsys, "eval", "--model", str(short_models / "gpt2"), "--data",
                           str(workdir / "prefs.jsonl"), "--max-length", "64")
    assert "n_positions = 32" in one_error(code, err)


@pytest.mark.parametrize(("n", "batch", "start", "steps"), [(48, 8, 2, 4), (50, 8, 5, 9),
                                                            (50, 8, 6, 8), (50, 8, 0, 14)])
def test_rows_used_from_a_resume_step(n, batch, start, steps):
    per_epoch = -(-n // batch)
    drawn = set()
    for step in range(start, steps):
        epoch, index = divmod(step, per_epoch)
        drawn.update(epoch_batches(n, batch, seed=5, epoch=epoch)[index])
    assert rows_used(n, batch, seed=5, total_steps=steps, start_step=start) == sorted(drawn)


def test_rope_scaling_extends_the_positions(tmp_path):
    """Qwen2.5 with YaRN factor 4 keeps max_position_embeddings 32768 but takes 131072."""
    from dpokit.models import position_limit

    model = tmp_path / "m"
    model.mkdir()
    config = {"model_type": "qwen2", "max_position_embeddings": 32768,
              "rope_scaling": {"type": "yarn", "factor": 4.0,
                               "original_max_position_embeddings": 32768}}
    (model / "config.json").write_text(json.dumps(config))
    assert position_limit(model) == (131072, "max_position_embeddings")
    config["rope_scaling"] = None
    (model / "config.json").write_text(json.dumps(config))
    assert position_limit(model) == (32768, "max_position_embeddings")


def tiny_gpt_neo(tokenizer, path):
    """A 2-layer GPT-Neo of 24 positions (global + local attention) saved with ``tokenizer`` at
    ``path``: (model, path)."""
    from transformers import AutoModelForCausalLM, GPTNeoConfig

    neo = AutoModelForCausalLM.from_config(GPTNeoConfig(
        vocab_size=len(tokenizer), max_position_embeddings=24, hidden_size=32, num_layers=2,
        num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    neo.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return neo, path


def test_gpt_neo_runs_a_shared_row_past_its_positions_padded(workdir, tmp_path, capsys,
                                                              tokenizer):
    """GPT-Neo slices a causal-mask buffer of max_position_embeddings by the row's length, so a
    shared-prompt row p + c + r past its positions failed mid-forward (and its local layers keep
    their window out of the 4D mask): it is not in LAYOUT_MODEL_TYPES, so its shared batches run
    padded — a pair that fits by positions (p + max(c, r)) trains in the default layout, with
    the log-probs of each sequence alone."""
    from dpokit.data import collate_padded, collate_shared, load_preference_pairs
    from dpokit.logps import completion_logps

    neo, path = tiny_gpt_neo(tokenizer, tmp_path / "neo")
    rows = [{"prompt": "the cat sat on", "chosen": " the mat and the red sea today",
             "rejected": " a tree by the moon over there"}] * 4
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    tokenized = load_preference_pairs(data, tokenizer)[:1]
    (pair,) = tokenized
    p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    assert p + max(c, r) <= 24 < p + c + r, (p, c, r)
    shared = completion_logps(neo.eval(), collate_shared(tokenized, pad_token_id=0))
    padded = completion_logps(neo.eval(), collate_padded(tokenized, pad_token_id=0))
    assert torch.allclose(shared.logps, padded.logps, atol=1e-5)
    args = ["train", "--model", str(path), "--data", str(data), "--max-length", "24",
            "--batch-size", "2", "--max-steps", "1", "--output-dir", str(tmp_path / "out")]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err[-2000:]


def test_gpt_neo_runs_a_groups_row_past_its_positions_padded(workdir, tmp_path, capsys,
                                                             tokenizer):
    """k completions of one prompt share one row [x, y_1, …, y_k]; past GPT-Neo's positions as
    one row, each pair fitting as rows of its own: the group runs padded and trains."""
    from dpokit.data import ColumnMap, collate_padded, collate_shared, load_preference_pairs
    from dpokit.logps import completion_logps

    neo, path = tiny_gpt_neo(tokenizer, tmp_path / "neo")
    rows = [{"prompt": "the cat sat", "completions": [" the mat and the red sea",
                                                       " a tree by the moon over",
                                                       " the red moon over"],
             "scores": [3, 2, 1]}] * 2
    data = write_jsonl(tmp_path / "groups.jsonl", rows)
    pairs = load_preference_pairs(data, tokenizer, columns=ColumnMap(pairs_from_scores="all"))
    group = [pair for pair in pairs if pair.group == pairs[0].group]
    assert len(group) == 3
    p = len(group[0].prompt_ids)
    distinct = {tuple(ids) for pair in group for ids in (pair.chosen_ids, pair.rejected_ids)}
    whole = p + sum(map(len, distinct))
    assert max(p + len(x.chosen_ids) + len(x.rejected_ids) for x in group) <= 24 < whole
    shared = completion_logps(neo.eval(), collate_shared(group, pad_token_id=0))
    padded = completion_logps(neo.eval(), collate_padded(group, pad_token_id=0))
    assert torch.allclose(shared.logps, padded.logps, atol=1e-5)
    args = ["train", "--model", str(path), "--data", str(data), "--pairs-from-scores", "all",
            "--max-length", "24", "--batch-size", "1", "--max-steps", "1",
            "--output-dir", str(tmp_path / "out")]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err[-2000:]

