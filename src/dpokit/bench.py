"""DPO speed and memory, dpokit against TRL's DPOTrainer, side by side (``dpokit bench``).

    dpokit bench --models tiny,small --steps 20 --repeats 2     # needs `pip install '.[bench]'`
    python benchmarks/bench_dpo.py --models tiny --steps 5      # the same

Fixtures are built from nothing into ``--workdir``: a byte-level BPE tokenizer trained on a
synthetic corpus (asked for 2,048 tokens; the corpus yields 420), 1,024 synthetic preference rows
(prompts ~41 tokens, completions ~54), and randomly initialised Llama models from configs ("tiny":
hidden 128, 2 layers; "small": hidden 512, 8 layers, 8 heads, MLP 1408). Every (framework, setting)
runs in its own process — same model, rows, batch, learning rate, β, max_length and threads —
alternating frameworks and repeating, and reports s/step (median of the steady-state steps),
pairs/s, tokens/s, the fraction of the measured fp32 matmul peak, peak RSS, and end-to-end seconds
for one epoch over 320 pairs from a cold start (data preparation and any reference pass included).
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dpokit.config import Config, field
from dpokit.errors import DpokitError

MODELS = {
    "tiny": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 352},
    "small": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 1408},
    # For a lent GPU (--device cuda --dtype bfloat16): a 0.45 B Llama shape (head dim 64).
    "0.5b": {"hidden_size": 1280, "num_layers": 24, "num_heads": 20, "intermediate_size": 3584},
}
SETTINGS = {
    # name: (dpokit overrides, TRL DPOConfig overrides). dpokit's defaults are the shared-prompt
    # layout, the unpadded decoder, selective recomputation and a cached reference; the other
    # settings pin them to isolate each effect. "No checkpointing" switches off selective
    # recomputation too, and the automatic whole-layer recomputation when memory is short.
    "default": ({}, {"gradient_checkpointing": True}),
    "no_ckpt": ({"shared_prompt": False, "precompute_ref_logps": False,
                 "selective_checkpointing": False, "gradient_checkpointing": False},
                {"gradient_checkpointing": False}),
    "no_ckpt_precompute": ({"shared_prompt": False, "precompute_ref_logps": True,
                            "selective_checkpointing": False, "gradient_checkpointing": False},
                           {"gradient_checkpointing": False, "precompute_ref_log_probs": True}),
    # TRL 1.16 has no padding-free path: padding_free=True warns and falls back to padding
    # (DPOTrainer.__init__), so its row is TRL's padded no_ckpt, not a packed TRL run.
    "padding_free": ({"padding_free": True, "precompute_ref_logps": False,
                      "selective_checkpointing": False, "gradient_checkpointing": False},
                     {"gradient_checkpointing": False, "padding_free": True}),
    # dpokit's shared-prompt layout has no TRL counterpart: TRL runs its nearest setting.
    "shared_prompt": ({"shared_prompt": True, "precompute_ref_logps": False},
                      {"gradient_checkpointing": False}),
    "shared_prompt_precompute": ({"shared_prompt": True, "precompute_ref_logps": True},
                                 {"gradient_checkpointing": False,
                                  "precompute_ref_log_probs": True}),
    # dpokit-only ablations of the default (run with --frameworks dpokit): one switch each.
    "default_padded": ({"unpadded": False}, {"gradient_checkpointing": True}),
    # (the recomputation ablations pin whole-layer recomputation off: one switch each even when
    # memory is short)
    "default_no_recompute": ({"selective_checkpointing": False, "gradient_checkpointing": False},
                             {"gradient_checkpointing": True}),
    "default_recompute": ({"selective_checkpointing": True, "gradient_checkpointing": False},
                          {"gradient_checkpointing": True}),
    "default_full_recompute": ({"gradient_checkpointing": True},
                               {"gradient_checkpointing": True}),
    # On-policy DPO against TRL's experimental OnlineDPOTrainer (dpokit.bench_online). TRL's
    # default turns gradient checkpointing on, which also turns the KV cache of its generation
    # off; online_no_ckpt is its fastest setting.
    "online": ({}, {}),
    "online_no_ckpt": ({"selective_checkpointing": False, "gradient_checkpointing": False},
                       {"gradient_checkpointing": False}),
}
BATCH, MAX_LENGTH, LR, BETA, THREADS = 8, 256, 1e-6, 0.1, 2


@dataclass(kw_only=True)
class BenchConfig(Config):
    """What ``dpokit bench`` runs (flags and YAML keys)."""

    workdir: str = field("out/bench", help="Where the fixtures (tokenizer, rows, models) and "
                                           "runs go.")
    models: list[str] = field(default_factory=lambda: ["tiny", "small"],
                              help=f"Model shapes: {', '.join(MODELS)} (0.5b for a GPU).")
    settings: list[str] = field(
        default_factory=lambda: ["default", "no_ckpt_precompute"],
        help=f"Settings: {', '.join(SETTINGS)} (default_* are dpokit-only ablations).")
    steps: int = field(20, help="Steps per run (≥ 4).")
    repeats: int = field(2, help="Runs per framework (alternating).")
    frameworks: list[str] = field(default_factory=lambda: ["dpokit", "trl"],
                                  help="dpokit and/or trl (TRL needs `pip install '.[bench]'`).")
    end_to_end: bool = field(True, help="Also time one cold-start epoch over 320 pairs "
                                                  "(`repeats` runs, frameworks alternating).")
    device: Literal["cpu", "cuda"] = field(
        "cpu", help="cuda: the GPU benchmark (e.g. --models 0.5b --dtype bfloat16).")
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        "float32", help="Load dtype of both frameworks' weights (bfloat16: pure bf16).")
    bf16: bool = field(False, help="bfloat16 autocast in both frameworks.")
    fp16: bool = field(False, help="float16 autocast in both frameworks (a GPU).")

    @property
    def precision(self) -> dict[str, Any]:
        """The dpokit keys of the benchmark's precision (TRL gets the same)."""
        return {"dtype": self.dtype, "bf16": self.bf16, "fp16": self.fp16}
    json: str | None = field(None, help="Also write the rows as JSON here.")
    context_lengths: list[int] | None = field(
        None, help="Long contexts instead: per length L (e.g. 512,2048,4096,8192), the small "
                   "model with L positions on pairs of ~L tokens (long prompts), batch 2.")
    memory_limit_gb: float | None = field(
        None, help="CPU runs: each run's address-space limit in GB (RLIMIT_AS); a run that "
                   "needs more is a row 'out of memory' instead of the kernel's OOM killer "
                   "taking the machine. Default: 90% of the machine's memory.")

    def validate(self) -> None:
        """Known names, enough steps, TRL and CUDA present when asked for."""
        import importlib.util

        super().validate()
        for key, known in (("models", MODELS), ("settings", SETTINGS),
                           ("frameworks", ("dpokit", "trl"))):
            unknown = [v for v in getattr(self, key) if v not in known]
            if unknown:
                raise DpokitError(f"{key}: unknown {', '.join(unknown)} "
                                  f"(known: {', '.join(known)})")
        if "trl" in self.frameworks and importlib.util.find_spec("trl") is None:
            raise DpokitError("TRL is not installed; `pip install '.[bench]'` or "
                              "--frameworks dpokit")
        if self.steps < 4 or self.repeats < 1:
            raise DpokitError("steps must be ≥ 4 and repeats ≥ 1")
        if self.memory_limit_gb is not None and self.memory_limit_gb <= 0:
            raise DpokitError("memory_limit_gb must be > 0")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise DpokitError("device cuda: no CUDA device is available")


@dataclass(frozen=True)
class Fixture:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "prefs.jsonl"

    @property
    def shape(self) -> dict[str, int]:
        """Batch size and max_length of this fixture's runs (a long-context fixture has its
        own, in ``shape.json``)."""
        file = self.root / "shape.json"
        if file.is_file():
            return json.loads(file.read_text())
        return {"batch": BATCH, "max_length": MAX_LENGTH}

    @property
    def data_320(self) -> Path:
        return self.root / "prefs320.jsonl"

    def model(self, name: str) -> Path:
        return self.root / name


def build_fixtures(root: str | Path, models: list[str], *, rows: int = 1024,
                   seed: int = 0) -> Fixture:
    """Tokenizer, preference rows and models, built once into ``root`` (reused when present).

    Each model directory and each rows file is written to a temporary sibling and renamed
    into place, so an interrupted build leaves no half-written fixture that a later run would
    take as complete."""
    from dpokit.atomic import atomic_path, write_text
    from dpokit.fixtures import WORDS, build_tokenizer, synthetic_corpus, tiny_causal_lm

    fixture = Fixture(Path(root))
    fixture.root.mkdir(parents=True, exist_ok=True)
    tokenizer = None
    for name in models:
        if (fixture.model(name) / "config.json").is_file():
            continue
        tokenizer = tokenizer or build_tokenizer(synthetic_corpus(4000, seed=seed),
                                                 vocab_size=2048)
        model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=seed,
                               max_positions=MAX_LENGTH, **MODELS[name])
        with atomic_path(fixture.model(name), directory=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    if not (fixture.data.is_file() and fixture.data_320.is_file()):
        rng = random.Random(seed)

        def text(n: int) -> str:
            return " ".join(rng.choice(WORDS) for _ in range(n))

        lines = [json.dumps({"prompt": text(rng.randint(30, 50)) + "?",
                             "chosen": " " + text(rng.randint(40, 66)) + ".",
                             "rejected": " " + text(rng.randint(40, 66)) + "!"})
                 for _ in range(rows)]
        write_text(fixture.data_320, "\n".join(lines[:320]) + "\n")
        write_text(fixture.data, "\n".join(lines) + "\n")  # last: its presence means both
    return fixture


LONG_BATCH = 2
"""Pairs per step of the long-context benchmark."""


def build_long_fixture(root: str | Path, length: int, *, pairs: int, seed: int = 0) -> Fixture:
    """The long-context fixture of ``length`` tokens under ``root/long-<length>``: the small
    model with ``length`` positions (its weights: Llama's positions are rotary, no table),
    ``pairs`` preference rows whose prompt fills the length but for two ~54-token completions
    (as the short fixture's), ``shape.json`` with batch 2 and max_length = ``length``."""
    from transformers import AutoTokenizer

    from dpokit.atomic import atomic_path, write_text
    from dpokit.fixtures import WORDS

    base = build_fixtures(root, ["small"])
    fixture = Fixture(Path(root) / f"long-{length}")
    model = fixture.model("small")
    if not (model / "config.json").is_file():
        # (a temporary directory renamed into place: a copy cut short, with the base model's
        # 256 positions in its config.json, must not be taken for the long model later)
        with atomic_path(model, directory=True) as tmp:
            for file in base.model("small").iterdir():
                (tmp / file.name).write_bytes(file.read_bytes())
            config = json.loads((tmp / "config.json").read_text())
            config["max_position_embeddings"] = length
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if not (fixture.data.is_file() and (fixture.root / "shape.json").is_file()):
        tokenizer = AutoTokenizer.from_pretrained(model)
        rng = random.Random(seed)

        def text(n: int) -> str:
            return " ".join(rng.choice(WORDS) for _ in range(n))

        per_word = len(tokenizer(text(2000))["input_ids"]) / 2000
        lines = []
        for _ in range(pairs):
            chosen, rejected = " " + text(rng.randint(40, 66)) + ".", " " + text(
                rng.randint(40, 66)) + "!"
            room = length - 2 - max(len(tokenizer(c)["input_ids"]) for c in (chosen, rejected))
            words = int(room / per_word * 0.97)
            prompt = text(words) + "?"
            while len(tokenizer(prompt + chosen)["input_ids"]) + 1 > length or len(
                    tokenizer(prompt + rejected)["input_ids"]) + 1 > length:
                words -= 10
                prompt = text(words) + "?"
            lines.append(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}))
        # shape.json first: rows without it would run at the short fixture's batch 8 and
        # max_length 256, truncating every long pair
        write_text(fixture.root / "shape.json",
                   json.dumps({"batch": LONG_BATCH, "max_length": length}))
        write_text(fixture.data, "\n".join(lines) + "\n")
    return fixture


def compute_dtype(precision: dict[str, Any]) -> str:
    """What the matmuls of a run with ``precision`` (dtype, bf16, fp16) compute in."""
    return ("bfloat16" if precision["bf16"] else "float16" if precision["fp16"]
            else precision["dtype"])


def matmul_peak_gflops(size: int | None = None, seconds: float = 1.0, *, device: str = "cpu",
                       dtype: str = "float32") -> float:
    """Measured matmul throughput of ``device`` in ``dtype`` (CPU: the benchmark's threads)."""
    import torch

    torch.set_num_threads(THREADS)
    size = size or (1024 if device == "cpu" else 8192)
    kind = getattr(torch, dtype)
    a = torch.randn(size, size, device=device, dtype=kind)
    b = torch.randn(size, size, device=device, dtype=kind)
    a @ b
    if device != "cpu":  # the warm-up (cuBLAS set-up included) done before the clock starts
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device != "cpu":
            torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


# ----------------------------------------------------------------------- one run per process


def step_end_stamp(device: str) -> float:
    """The time a step ended: on a GPU once its queued kernels have run (both frameworks'
    stamps wait for them, so neither's step is timed at its launch)."""
    if device != "cpu":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def framework_modules(framework: str, setting: str) -> list[str]:
    """What ``run_one`` imports before it reads the start RSS, the same for both frameworks:
    transformers' model and tokenizer classes (both load the model through them) and the
    framework's trainer module. ``import trl`` alone is lazy (it loads neither transformers nor
    DPOTrainer): TRL's start was ~210 MB lower than dpokit's for want of its imports."""
    common = ["transformers.models.auto.modeling_auto",
              "transformers.models.auto.tokenization_auto"]
    if framework == "dpokit":
        return [*common, "dpokit.train.loop"]
    return [*common, "trl.experimental.online_dpo" if setting.startswith("online")
            else "trl.trainer.dpo_trainer"]


def timed_dpokit_run(fixture: Fixture, **settings: Any) -> list[float]:
    """Step-end timestamps of one ``dpokit train`` run of ``DPOConfig(**settings)`` in a fresh
    run directory under the fixture (so a fresh reference cache too: an end-to-end measurement
    includes the reference pass), removed afterwards."""
    import shutil
    import tempfile

    from dpokit.train.config import DPOConfig
    from dpokit.train.loop import Probe, train

    stamps: list[float] = []
    device = settings.get("device", "cpu")
    run_root = Path(tempfile.mkdtemp(prefix="run-", dir=fixture.root))
    # report_to none: TRL's runs get report_to=[] (no tracker); dpokit's null default would
    # import TensorBoard and write its events inside the end-to-end time
    config = DPOConfig(output_dir=str(run_root / "dpokit"), save_steps=None,
                       logging_steps=10**9, lr_scheduler="constant", report_to=["none"],
                       **settings)
    try:
        train(config, progress=False, probe=Probe(1, lambda m, s: stamps.append(
            step_end_stamp(device)) or {}))
    finally:
        shutil.rmtree(run_root, ignore_errors=True)
    return stamps


def _run_dpokit(fixture: Fixture, model: str, setting: str, steps: int, data: Path,
                epochs: float | None, device: str, precision: dict) -> list[float]:
    return timed_dpokit_run(
        fixture, model=str(fixture.model(model)), data=str(data), device=device, **precision,
        batch_size=fixture.shape["batch"], learning_rate=LR, beta=BETA,
        max_length=fixture.shape["max_length"],
        max_steps=None if epochs else steps, num_epochs=epochs or 1.0, **SETTINGS[setting][0])


def trl_inputs(fixture: Fixture, model: str, data: Path, dtype: str = "float32",
               device: str = "cpu") -> tuple[Any, Any, Any, Any, list]:
    """What a TRL trainer of the benchmark takes: tokenizer, policy, dataset, a callback that
    stamps each step's end, and the list it stamps into."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(step_end_stamp(device))

    tokenizer = AutoTokenizer.from_pretrained(fixture.model(model))
    policy = AutoModelForCausalLM.from_pretrained(fixture.model(model), dtype=dtype)
    dataset = datasets.load_dataset("json", data_files=str(data), split="train")
    return tokenizer, policy, dataset, Stamp(), stamps


def _run_trl(fixture: Fixture, model: str, setting: str, steps: int, data: Path,
             epochs: float | None, device: str, precision: dict) -> list[float]:
    from trl import DPOConfig, DPOTrainer

    tokenizer, policy, dataset, stamp, stamps = trl_inputs(fixture, model, data,
                                                           precision["dtype"], device)
    args = DPOConfig(output_dir=str(fixture.root / "runs" / f"trl-{model}-{setting}"),
                     per_device_train_batch_size=fixture.shape["batch"], learning_rate=LR,
                     beta=BETA, max_length=fixture.shape["max_length"],
                     max_steps=-1 if epochs else steps,
                     num_train_epochs=epochs or 1.0, lr_scheduler_type="constant",
                     save_strategy="no", report_to=[], logging_steps=10**9,
                     use_cpu=device == "cpu",
                     # TRL defaults to bf16 autocast; both run the benchmark's precision
                     bf16=precision["bf16"], fp16=precision["fp16"],
                     dataloader_num_workers=0, **SETTINGS[setting][1])
    DPOTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer,
               callbacks=[stamp]).train()
    return stamps


def run_one(framework: str, fixture_dir: str, model: str, setting: str, steps: int,
            end_to_end: bool, device: str = "cpu",
            precision: dict | None = None) -> dict[str, Any]:
    """One measurement in this process (``dpokit bench`` calls it in a fresh subprocess)."""
    import torch

    precision = precision or {"dtype": "float32", "bf16": False, "fp16": False}
    started = time.perf_counter()
    torch.set_num_threads(THREADS)
    # the baseline: the memory of the framework's imports, before any model or data
    for module in framework_modules(framework, setting):
        importlib.import_module(module)
    start_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fixture = Fixture(Path(fixture_dir))
    if setting.startswith("online"):
        from dpokit import bench_online

        runner = bench_online.run_dpokit if framework == "dpokit" else bench_online.run_trl
        stamps = runner(fixture, model, steps, batch=BATCH, lr=LR, beta=BETA,
                        max_length=MAX_LENGTH, device=device, precision=precision,
                        overrides=SETTINGS[setting][framework == "trl"])
    else:
        runner = _run_dpokit if framework == "dpokit" else _run_trl
        data = fixture.data_320 if end_to_end else fixture.data
        stamps = runner(fixture, model, setting, steps, data, 1.0 if end_to_end else None,
                        device, precision)
    expected = None if end_to_end and not setting.startswith("online") else steps
    result = {"framework": framework, "model": model, "setting": setting,
              "seconds_per_step": steady_seconds_per_step(stamps, expected),
              "steps": len(stamps),
              "wall_seconds": time.perf_counter() - started,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "start_rss_mb": start_rss_mb}
    if device != "cpu":
        result["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


WARMUP_GAPS = 2
"""Step gaps left out of s/step: the first step has no gap (setup ends where), the next two
are warm-up (first-touch of activations and optimizer state). The same for both frameworks."""


def steady_seconds_per_step(stamps: list[float], expected: int | None = None) -> float:
    """The median gap between consecutive step-end ``stamps`` after :data:`WARMUP_GAPS`.

    ``expected``: the steps the run was asked for (None: an epoch, any count). Fewer than 4
    stamps leave no steady gap, and a count other than ``expected`` means the two frameworks
    did not run the same steps: either is a ``DpokitError`` (the s/step was NaN, written into
    the rows as a number, and a short run was compared with a full one)."""
    if expected is not None and len(stamps) != expected:
        raise DpokitError(f"the run ended after {len(stamps)} steps of the {expected} asked")
    gaps = [b - a for a, b in itertools.pairwise(stamps)][WARMUP_GAPS:]
    if not gaps:
        raise DpokitError(f"the run ended after {len(stamps)} steps: s/step needs ≥ "
                          f"{WARMUP_GAPS + 2} (the first {WARMUP_GAPS + 1} are warm-up)")
    return statistics.median(gaps)


# ------------------------------------------------------------------------------- the driver


def _tokens_per_pair(fixture: Fixture, model: str) -> float:
    from dpokit.data import TokenizeSettings, load_preference_pairs
    from dpokit.models import load_tokenizer

    pairs = load_preference_pairs(fixture.data, load_tokenizer(fixture.model(model)),
                                  settings=TokenizeSettings(max_length=fixture.shape["max_length"]))
    return sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
               for p in pairs) / len(pairs)


def _param_counts(fixture: Fixture, model: str) -> tuple[int, int]:
    """(all parameters — a row's ``params``, tied weights once — and N of the FLOP count, the
    parameters a token's forward multiplies by: all but the input embedding, a table lookup;
    the LM head's matrix counts, also when tied), from the model's config on the meta device
    (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(fixture.model(model))
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in lm.parameters())  # (parameters() yields a tied one once)
    embedding, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    lookup_only = 0 if head is embedding else embedding.numel()
    return total, total - lookup_only


def help_seconds(repeats: int = 5) -> float:
    """Median wall time of ``dpokit --help`` in a fresh process (start-up: the interpreter, the
    CLI's imports and the listing), over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dpokit", "--help"], capture_output=True,
                       check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_memory_gb() -> float:
    """The machine's physical memory in GB (2³⁰ bytes)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _limit_memory(limit_gb: float | None):
    """A ``preexec_fn`` capping the child's address space at ``limit_gb`` (None: no cap)."""
    if limit_gb is None:
        return None
    limit = int(limit_gb * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return cap


def _run_error(stderr: str, returncode: int, limit_gb: float | None) -> str:
    """One line for a run that failed: out of memory (the address-space cap or the kernel's
    OOM killer) named as such, otherwise the last line of its stderr."""
    lines = stderr.strip().splitlines()
    if "can't allocate memory" in stderr or "out of memory" in stderr.lower():
        asked = re.search(r"allocate (\d+) bytes", stderr)  # the allocator's own message
        said = re.search(r"asked for ([\d.]+) GiB more", stderr)  # dpokit's one line
        gb = int(asked[1]) / 2**30 if asked else float(said[1]) if said else None
        more = f"; it asked for {gb:.1f} GB more" if gb is not None else ""
        cap = f" past the {limit_gb:.1f} GB limit of a run" if limit_gb else ""
        return f"out of memory{cap}{more}"
    if returncode == -9:
        return "killed (SIGKILL: the kernel's OOM killer, most likely)"
    return lines[-1] if lines else f"exit status {returncode}"


def _subprocess(args: list[str], memory_limit_gb: float | None = None) -> dict:
    """One ``python -m dpokit.bench ARGS`` in a fresh process, its address space capped at
    ``memory_limit_gb`` (CPU runs only: CUDA reserves far more address space than it uses).
    An end-to-end run gets an empty
    ``datasets`` cache of its own: TRL keeps its tokenised data *and* its precomputed
    reference log-probs there (keyed by the data and the weights), so a second TRL run would
    skip both — as dpokit's would with its ``.dpokit_cache``, which every run here gets fresh."""
    import shutil
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
    # every run, not only an end-to-end one: a step-timed TRL run read the user's datasets
    # cache, warm from the run before (the long-context rows' wall_seconds, a TRL reference
    # pass skipped) and filled it with every fixture's tables
    cache = tempfile.mkdtemp(prefix="hf-datasets-")
    env["HF_DATASETS_CACHE"] = cache
    on_gpu = "--device" in args and args[args.index("--device") + 1] != "cpu"
    limit = None if on_gpu else memory_limit_gb
    try:
        done = subprocess.run([sys.executable, "-m", "dpokit.bench", *args],
                              capture_output=True, text=True, env=env, check=False,
                              preexec_fn=_limit_memory(limit))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if done.returncode != 0:
        return {"error": _run_error(done.stderr, done.returncode, limit)}
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if not (isinstance(result, dict) and math.isfinite(result["seconds_per_step"])):
            raise ValueError(result)
    except (IndexError, ValueError, KeyError, TypeError):
        return {"error": "the run exited 0 without a result line on its stdout"}
    switched = switched_mode(done.stderr)
    if switched:  # the memory rule recomputed more than the setting's default: say so
        result["recompute"] = switched
    return result


def switched_mode(log_text: str) -> str | None:
    """The recomputation the trainer's memory rule switched to, read from its log (None: no
    switch)."""
    found = re.search(r"recomputation (\w+) instead of \w+ \(auto, for memory", log_text)
    return found[1] if found else None


def _alternating_runs(frameworks: list[str], repeats: int, args: list[str],
                      memory_limit_gb: float | None = None) -> dict[str, list[dict]]:
    """``repeats`` rounds of one fresh ``run`` process per framework, in turn (so that a slow
    spell of the machine falls on every framework): each framework's results."""
    results: dict[str, list[dict]] = {f: [] for f in frameworks}
    for _ in range(repeats):
        for framework in frameworks:
            results[framework].append(_subprocess(["run", framework, *args],
                                                  memory_limit_gb))
    return results


def benchmark(workdir: str | Path, *, models: list[str], settings: list[str], steps: int,
              repeats: int, frameworks: list[str], end_to_end: bool = True,
              device: str = "cpu", precision: dict | None = None,
              memory_limit_gb: float | None = None, report=print,
              written=lambda rows: None) -> list[dict]:
    """Alternate frameworks, repeat, and return one summary row per (model, setting, framework).

    ``device="cuda"`` with ``dtype: bfloat16`` is the GPU benchmark (one GPU per process).
    ``written(rows)`` gets the rows so far after each one (``--json`` keeps them as they come:
    an interrupted benchmark keeps what it measured)."""
    precision = precision or {"dtype": "float32", "bf16": False, "fp16": False}
    dtype = compute_dtype(precision)
    fixture = build_fixtures(workdir, models)
    startup = help_seconds()
    report(f"dpokit --help: {startup:.3f} s (median of 5 fresh processes)")
    rows = [{"framework": "dpokit", "model": "-", "setting": "cli_help",
             "wall_seconds": startup}]
    written(rows)
    peak = matmul_peak_gflops(device=device, dtype=dtype)
    where = ["--device", device, "--dtype", precision["dtype"],
             *(["--bf16"] if precision["bf16"] else []), *(["--fp16"] if precision["fp16"] else [])]
    for model in models:
        (params, flop_params), tokens = (_param_counts(fixture, model),
                                         _tokens_per_pair(fixture, model))
        for setting in settings:
            results = _alternating_runs(frameworks, repeats,
                                        [str(fixture.root), model, setting, str(steps), *where],
                                        memory_limit_gb)
            # one cold epoch each, frameworks alternating too (a single run swung ±30% on a
            # shared machine): the median of ``repeats``
            e2e_runs = (_alternating_runs(frameworks, repeats, [
                str(fixture.root), model, setting, str(steps), "--end-to-end", *where],
                memory_limit_gb)
                if end_to_end and not setting.startswith("online") else {})
            for framework, runs in results.items():
                good = [r for r in runs if "error" not in r]
                if not good:
                    rows.append({"framework": framework, "model": model, "setting": setting,
                                 "error": runs[0]["error"]})
                    written(rows)
                    continue
                spp = statistics.median(r["seconds_per_step"] for r in good)
                if setting.startswith("online"):  # a step's work depends on the generations
                    row = {"framework": framework, "model": model, "setting": setting,
                           "params": params, "seconds_per_step": spp,
                           "pairs_per_second": BATCH / spp,
                           "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
                           "device": device, **precision}
                    rows.append(row)
                    written(rows)
                    report(_format_row(row))
                    continue
                flops = step_flops(framework, setting, flop_params, tokens, BATCH)
                row = {"framework": framework, "model": model, "setting": setting,
                       "params": params, "flop_params": flop_params, "tokens_per_pair": tokens,
                       "seconds_per_step": spp, "pairs_per_second": BATCH / spp,
                       "tokens_per_second": BATCH * tokens / spp,
                       "peak_fraction": flops / spp / (peak * 1e9),
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
                       "start_rss_mb": statistics.median(r["start_rss_mb"] for r in good),
                       "matmul_peak_gflops": peak, "device": device, **precision}
                row.update(_recompute_switch(good))
                if device != "cpu":
                    row["peak_device_mb"] = max(r["peak_device_mb"] for r in good)
                if end_to_end:
                    walls = [r["wall_seconds"] for r in e2e_runs[framework] if "error" not in r]
                    row["end_to_end_seconds"] = statistics.median(walls) if walls else None
                    row["end_to_end_runs"] = walls
                rows.append(row)
                written(rows)
                report(_format_row(row))
    return rows


def reference_cached(framework: str, setting: str) -> bool:
    """Whether the run's reference log-probs are computed once before training (no reference
    forward in a step): the setting's overrides, else the framework's default (dpokit caches,
    TRL 1.16 does not)."""
    dpokit_side, trl_side = SETTINGS[setting]
    if framework == "dpokit":
        return dpokit_side.get("precompute_ref_logps", True)
    return trl_side.get("precompute_ref_log_probs", False)


def step_flops(framework: str, setting: str, n: int, tokens_per_pair: float,
               batch: int) -> float:
    """The FLOP lower bound of one step: 6·N per trained token (the prompt once per pair) +
    2·N per reference token when the reference runs every step, ``batch`` pairs."""
    per_pair = 6 * n * tokens_per_pair
    if not reference_cached(framework, setting):
        per_pair += 2 * n * tokens_per_pair
    return per_pair * batch


def long_context_benchmark(workdir: str | Path, *, lengths: list[int], settings: list[str],
                           steps: int, repeats: int, frameworks: list[str],
                           memory_limit_gb: float | None = None, report=print,
                           written=lambda rows: None) -> list[dict]:
    """s/step and peak RSS at each context length (:func:`build_long_fixture`: the small
    model, batch 2, ``steps × 2`` pairs so that TRL's precomputed reference covers only the
    rows trained on, as dpokit's does), frameworks alternating. A run that fails (TRL out of
    memory, say) is a row with its error."""
    rows = []
    for length in lengths:
        fixture = build_long_fixture(workdir, length, pairs=steps * LONG_BATCH)
        tokens = _tokens_per_pair(fixture, "small")
        for setting in settings:
            results = _alternating_runs(frameworks, repeats,
                                        [str(fixture.root), "small", setting, str(steps)],
                                        memory_limit_gb)
            for framework, runs in results.items():
                good = [r for r in runs if "error" not in r]
                row = {"framework": framework, "model": f"small@{length}", "setting": setting,
                       "context_length": length, "tokens_per_pair": tokens}
                if not good:
                    row["error"] = runs[0]["error"]
                else:
                    spp = statistics.median(r["seconds_per_step"] for r in good)
                    row.update(seconds_per_step=spp, pairs_per_second=LONG_BATCH / spp,
                               tokens_per_second=LONG_BATCH * tokens / spp,
                               peak_rss_mb=max(r["peak_rss_mb"] for r in good),
                               start_rss_mb=statistics.median(r["start_rss_mb"] for r in good),
                               wall_seconds=statistics.median(r["wall_seconds"] for r in good))
                    row.update(_recompute_switch(good))
                rows.append(row)
                written(rows)
                report(_format_long_row(row))
    return rows


def _recompute_switch(runs: list[dict]) -> dict:
    """``{"recompute": mode}`` when the memory rule switched these runs to more recomputation
    (read from their log), else ``{}``."""
    modes = sorted({r["recompute"] for r in runs if "recompute" in r})
    return {"recompute": ",".join(modes)} if modes else {}


def _auto_note(row: dict) -> str:
    return f"  (auto for memory: {row['recompute']} recomputation)" if "recompute" in row else ""


def _format_long_row(row: dict) -> str:
    head = (f"{row['framework']:7} {row['context_length']:>5} tokens "
            f"(~{row['tokens_per_pair']:.0f}/pair) {row['setting']:20}")
    if "error" in row:
        return f"{head} error: {row['error']}"
    return (f"{head} {row['seconds_per_step']:.2f} s/step  {row['peak_rss_mb']:.0f} MB  "
            f"({row['wall_seconds']:.0f} s in all){_auto_note(row)}")


def _format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['framework']:7} {row['model']:6} {row['setting']:20} error: {row['error']}"
    e2e = row.get("end_to_end_seconds")
    if row["setting"].startswith("online"):
        return (f"{row['framework']:7} {row['model']:6} {row['setting']:20} "
                f"{row['seconds_per_step']:.3f} s/step  {row['pairs_per_second']:.2f} pairs/s  "
                f"{row['peak_rss_mb']:.0f} MB")
    return (f"{row['framework']:7} {row['model']:6} {row['setting']:20} "
            f"{row['seconds_per_step']:.3f} s/step  {row['pairs_per_second']:.2f} pairs/s  "
            f"{row['tokens_per_second']:.0f} tok/s  {row['peak_fraction']:.0%} of peak  "
            f"{row['peak_rss_mb']:.0f} MB"
            + (f" (GPU {row['peak_device_mb']:.0f} MB)" if "peak_device_mb" in row else "")
            + (f"  e2e {e2e:.1f} s" if e2e else "") + _auto_note(row))


def main(argv: list[str]) -> None:
    """``python -m dpokit.bench run FRAMEWORK FIXTURE MODEL SETTING STEPS [--end-to-end]
    [--device D] [--dtype T] [--bf16] [--fp16]``."""
    if argv[:1] == ["run"]:
        framework, fixture_dir, model, setting, steps = argv[1:6]

        def option(name: str, default: str) -> str:
            return argv[argv.index(name) + 1] if name in argv else default

        try:
            result = run_one(framework, fixture_dir, model, setting, int(steps),
                             "--end-to-end" in argv, option("--device", "cpu"),
                             {"dtype": option("--dtype", "float32"), "bf16": "--bf16" in argv,
                              "fp16": "--fp16" in argv})
        except DpokitError as error:  # one line (the row's error), exit 2, no traceback
            print(f"dpokit: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        print(json.dumps(result, allow_nan=False))
        return
    raise SystemExit("usage: python -m dpokit.bench run FRAMEWORK FIXTURE MODEL SETTING STEPS")


if __name__ == "__main__":
    main(sys.argv[1:])
