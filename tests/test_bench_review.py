"""Review of ``dpokit.bench``: the aggregation (s/step, FLOPs, rows) against closed forms with
fake runs, the settings tables against both frameworks' configs, what a child run imports and
reads before it measures, and that a short run is an error row, never a NaN number."""

import dataclasses
import json
import math
import subprocess
from pathlib import Path

import pytest

from dpokit import bench
from dpokit.errors import DpokitError

TRL_PYTHON = Path("/tmp/bv/bin/python")


def test_steady_seconds_per_step_is_the_median_after_the_warmup_gaps():
    """Oracle: stamps with known gaps 1, 2, 3, 10, 20, 30 → gaps after the first two are
    3, 10, 20, 30, median 15."""
    stamps = [0.0, 1.0, 3.0, 6.0, 16.0, 36.0, 66.0]
    assert bench.steady_seconds_per_step(stamps, expected=7) == 15.0
    assert bench.steady_seconds_per_step(stamps) == 15.0


def test_too_few_steps_is_an_error_not_nan():
    """Old code: 3 stamps gave seconds_per_step NaN, written into the rows (exit 0)."""
    with pytest.raises(DpokitError, match="ended after 3 steps"):
        bench.steady_seconds_per_step([0.0, 1.0, 2.0])
    with pytest.raises(DpokitError, match="3 steps of the 20 asked"):
        bench.steady_seconds_per_step([0.0, 1.0, 2.0], expected=20)
    with pytest.raises(DpokitError, match="5 steps of the 4 asked"):
        bench.steady_seconds_per_step([0.0, 1.0, 2.0, 3.0, 4.0], expected=4)


def test_a_short_child_run_exits_2_with_one_line(monkeypatch, capsys, tmp_path):
    """``python -m dpokit.bench run ...`` whose run stops after 3 steps: one line on stderr,
    exit 2, nothing on stdout (old code printed ``"seconds_per_step": NaN`` and exited 0)."""
    monkeypatch.setattr(bench, "framework_modules", lambda framework, setting: [], raising=False)
    monkeypatch.setattr(bench, "_run_dpokit", lambda *a, **k: [0.0, 1.0, 2.0])
    with pytest.raises(SystemExit) as exit_:
        bench.main(["run", "dpokit", str(tmp_path), "tiny", "default", "4"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert err.strip().splitlines() == ["dpokit: error: the run ended after 3 steps of the 4 asked"]


class _Done:
    def __init__(self, returncode, stdout="", stderr=""):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def test_every_run_gets_a_fresh_datasets_cache(monkeypatch):
    """Old code: only ``--end-to-end`` runs got their own HF_DATASETS_CACHE; a step-timed TRL
    run read (and filled) the user's cache, warm from the run before."""
    seen = []

    def fake_run(cmd, env, **kwargs):
        cache = Path(env["HF_DATASETS_CACHE"])
        seen.append((cache, cache.is_dir() and not any(cache.iterdir())))
        (cache / "json").mkdir()  # what TRL's load_dataset would leave
        return _Done(0, "noise\n" + json.dumps({"seconds_per_step": 0.5}) + "\n")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    for args in (["run", "trl", "f", "tiny", "default", "20"],
                 ["run", "trl", "f", "tiny", "default", "20", "--end-to-end"]):
        assert bench._subprocess(args) == {"seconds_per_step": 0.5}
    assert [fresh for _, fresh in seen] == [True, True]
    assert seen[0][0] != seen[1][0] and not any(c.exists() for c, _ in seen)  # removed after


@pytest.mark.parametrize("stdout", ["", '{"seconds_per_step": NaN}\n', "not json\n"])
def test_a_run_without_a_finite_result_is_an_error_row(monkeypatch, stdout):
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: _Done(0, stdout))
    assert "error" in bench._subprocess(["run", "dpokit", "f", "tiny", "default", "4"])


def test_a_child_error_line_becomes_the_row_error(monkeypatch):
    line = "dpokit: error: the run ended after 3 steps of the 4 asked"
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: _Done(2, "", line + "\n"))
    assert bench._subprocess(["run", "dpokit", "f", "tiny", "default", "4"]) == {"error": line}


def _save_config(root: Path, tied: bool) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tied)
    config.save_pretrained(root / "m")
    return root


@pytest.mark.parametrize("tied", [False, True])
def test_flop_params_leave_out_the_input_embedding_only(tmp_path, tied):
    """Oracle: the instantiated model's own weights, counted by name. The input embedding is
    a lookup (no FLOPs); the LM head is a matmul, also when tied. Old code counted the
    embedding too (6·N over-stated by 1/8 on the tiny model, 31% at a 2,048 vocab)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fixture = bench.Fixture(_save_config(tmp_path, tied))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "m"))
    weights = dict(model.named_parameters())  # (a tied weight once)
    total = sum(w.numel() for w in weights.values())
    embed = weights["model.embed_tokens.weight"].numel()
    assert bench._param_counts(fixture, "m") == (total, total if tied else total - embed)
    assert ("lm_head.weight" in weights) is not tied  # the oracle saw the tie as configured


def _fake_benchmark(monkeypatch, tmp_path, settings, frameworks, spp=0.5):
    monkeypatch.setattr(bench, "build_fixtures", lambda workdir, models: bench.Fixture(tmp_path))
    monkeypatch.setattr(bench, "help_seconds", lambda: 0.05)
    monkeypatch.setattr(bench, "matmul_peak_gflops", lambda **kw: 100.0)
    monkeypatch.setattr(bench, "_param_counts", lambda fixture, model: (1000, 800))
    monkeypatch.setattr(bench, "_tokens_per_pair", lambda fixture, model: 10.0)

    def runs(frameworks, repeats, args, memory_limit_gb=None):
        wall = 7.0 if "--end-to-end" in args else 99.0
        return {f: [{"seconds_per_step": spp * (1 + i), "peak_rss_mb": 100.0 + i,
                     "start_rss_mb": 50.0, "wall_seconds": wall + i} for i in range(3)]
                for f in frameworks}

    monkeypatch.setattr(bench, "_alternating_runs", runs)
    return bench.benchmark(tmp_path, models=["tiny"], settings=settings, steps=20, repeats=3,
                           frameworks=frameworks, report=lambda line: None)


def test_rows_follow_the_closed_form(monkeypatch, tmp_path):
    """Per row: s/step the median of the runs' (0.5, 1.0, 1.5 → 1.0), pairs/s 8 / 1.0, peak
    fraction = (6·N·T [+ 2·N·T when the reference runs each step])·8 / s / peak with N the
    FLOP parameters (800, not the 1,000 of all weights), e2e the median of the e2e walls."""
    rows = _fake_benchmark(monkeypatch, tmp_path, ["default", "no_ckpt_precompute", "no_ckpt"],
                           ["dpokit", "trl"])[1:]
    by = {(r["framework"], r["setting"]): r for r in rows}
    cached = {("dpokit", "default"): True, ("trl", "default"): False,
              ("dpokit", "no_ckpt_precompute"): True, ("trl", "no_ckpt_precompute"): True,
              ("dpokit", "no_ckpt"): False, ("trl", "no_ckpt"): False}
    for key, is_cached in cached.items():
        row = by[key]
        flops = (6 * 800 * 10 + (0 if is_cached else 2 * 800 * 10)) * 8
        assert row["seconds_per_step"] == 1.0 and row["pairs_per_second"] == 8.0
        assert math.isclose(row["peak_fraction"], flops / 1.0 / 100e9, rel_tol=1e-12), key
        assert row["params"] == 1000 and row["flop_params"] == 800
        assert row["peak_rss_mb"] == 102.0 and row["end_to_end_seconds"] == 8.0
        assert row["end_to_end_runs"] == [7.0, 8.0, 9.0]


def test_reference_cached_matches_each_frameworks_config():
    """dpokit's side against its own DPOConfig(**overrides).precompute (the resolved null)."""
    from dpokit.train.config import DPOConfig

    for name, (ours, theirs) in bench.SETTINGS.items():
        if name.startswith("online"):
            continue
        config = DPOConfig(model="m", data="d", output_dir="o", **ours)
        assert bench.reference_cached("dpokit", name) == config.precompute, name
        assert bench.reference_cached("trl", name) == theirs.get("precompute_ref_log_probs",
                                                                 False), name


def test_dpokit_overrides_are_config_fields():
    from dpokit.train.config import DPOConfig

    known = {f.name for f in dataclasses.fields(DPOConfig)}
    for name, (ours, _) in bench.SETTINGS.items():
        assert set(ours) <= known, name


def test_framework_modules_load_the_trainers():
    """``import trl`` alone is lazy (no DPOTrainer, no transformers): TRL's start RSS was read
    before its trainer's imports (old code), ~210 MB below dpokit's."""
    assert "trl.trainer.dpo_trainer" in bench.framework_modules("trl", "default")
    assert "trl.experimental.online_dpo" in bench.framework_modules("trl", "online")
    ours, theirs = (bench.framework_modules(f, "default") for f in ("dpokit", "trl"))
    assert "dpokit.train.loop" in ours and ours[:-1] == theirs[:-1]  # the same common imports


def test_run_one_imports_the_framework_modules_before_the_start_rss(monkeypatch, tmp_path):
    imported = []
    monkeypatch.setattr(bench.importlib, "import_module", imported.append)
    monkeypatch.setattr(bench, "_run_trl", lambda *a, **k: [0.0, 1.0, 2.0, 3.0, 4.0])
    result = bench.run_one("trl", str(tmp_path), "tiny", "default", 5, False)
    assert imported == bench.framework_modules("trl", "default")
    assert result["seconds_per_step"] == 1.0 and result["steps"] == 5


def test_dpokit_runs_report_to_no_tracker(monkeypatch, tmp_path):
    """TRL runs with report_to=[]; dpokit's null default (TensorBoard when installed) set up a
    writer inside the end-to-end time (old code)."""
    import dpokit.train.loop as loop

    seen = {}

    def fake_train(config, progress, probe):
        seen["report_to"] = config.report_to
        for step in range(1, 5):
            probe.fn(None, step)

    monkeypatch.setattr(loop, "train", fake_train)
    stamps = bench.timed_dpokit_run(bench.Fixture(tmp_path), model="m", data="d")
    assert seen["report_to"] == ["none"] and len(stamps) == 4 and stamps == sorted(stamps)


def test_an_interrupted_fixture_build_leaves_no_model_behind(monkeypatch, tmp_path):
    """Old code saved the model straight into ``root/tiny``: interrupted before the tokenizer
    was written, ``config.json`` was there and every later build reused the broken fixture."""
    import dpokit.fixtures as fixtures

    real = fixtures.build_tokenizer

    def broken(*args, **kwargs):
        tokenizer = real(*args, **kwargs)

        def fail(*a, **k):
            raise KeyboardInterrupt

        tokenizer.save_pretrained = fail
        return tokenizer

    monkeypatch.setattr(fixtures, "synthetic_corpus", lambda n, seed: ["a b c d"] * 20)
    monkeypatch.setattr(fixtures, "build_tokenizer", broken)
    with pytest.raises(KeyboardInterrupt):
        bench.build_fixtures(tmp_path, ["tiny"])
    assert not (tmp_path / "tiny").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.skipif(not TRL_PYTHON.exists(), reason="no TRL 1.16 environment at /tmp/bv")
def test_trl_sides_against_trl_dpoconfig():
    """Against TRL 1.16's own DPOConfig (in its environment): every TRL override is a field;
    "default" overrides nothing but to TRL's defaults; "no_ckpt_precompute" turns
    checkpointing off and precompute on; LR and β are TRL's defaults (so equal by name)."""
    tables = {name: theirs for name, (_, theirs) in bench.SETTINGS.items()
              if not name.startswith("online")}
    code = ("import json, sys, dataclasses\nfrom trl import DPOConfig\n"
            "d = {f.name: f.default for f in dataclasses.fields(DPOConfig)}\n"
            "print(json.dumps({k: d[k] for k in sys.argv[1:]}))")
    keys = sorted({k for t in tables.values() for k in t} | {"learning_rate", "beta", "bf16"})
    done = subprocess.run([str(TRL_PYTHON), "-c", code, *keys], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    defaults = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(defaults[k] == v for k, v in tables["default"].items())
    assert tables["no_ckpt_precompute"] == {"gradient_checkpointing": False,
                                            "precompute_ref_log_probs": True}
    assert defaults["gradient_checkpointing"] is True
    assert defaults["precompute_ref_log_probs"] is False
    assert (defaults["learning_rate"], defaults["beta"]) == (bench.LR, bench.BETA)
    assert defaults["bf16"] is None  # TRL's bf16 autocast default, which bench switches off


@pytest.mark.skipif(not TRL_PYTHON.exists(), reason="no TRL 1.16 environment at /tmp/bv")
def test_import_trl_alone_is_lazy():
    """The premise of framework_modules: ``import trl`` loads no transformers and no
    DPOTrainer; importing the listed modules does."""
    code = ("import sys, importlib, trl\n"
            "before = 'trl.trainer.dpo_trainer' in sys.modules or 'transformers' in sys.modules\n"
            f"for m in {bench.framework_modules('trl', 'default')!r}: importlib.import_module(m)\n"
            "print(before, 'trl.trainer.dpo_trainer' in sys.modules)")
    done = subprocess.run([str(TRL_PYTHON), "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]

