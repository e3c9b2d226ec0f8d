"""The model card of a finished run: ``output_dir/final/README.md``.

    card = model_card(config, read_records(output_dir), steps, argv=cli_argv())

Hugging Face model-card front matter (``library_name``, ``base_model``, ``tags``: what the Hub
and ``huggingface_hub.ModelCard`` read), then what was trained on what — base model, data and
split, objective (for DPO its losses and β), offline or online, steps — the last training and
evaluation metrics of ``metrics.jsonl``, the dpokit version and the command that trains it again
from the run's ``config.yaml``. :func:`model_card` is a pure function of its arguments; the
helpers beside it read the run directory and the process.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpokit.errors import DpokitError
from dpokit.train.config import DPOConfig, SFTConfig, TrainConfig

TRAIN_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
                 "rewards/rejected", "nll_per_token", "reward/mean", "kl_to_ref")
"""The training metrics a card shows, those a record has, in this order."""


def model_card(config: TrainConfig, records: Sequence[dict[str, Any]], steps: int, *,
               version: str | None = None, argv: Sequence[str] | None = None,
               world_size: int = 1) -> str:
    """The ``README.md`` of ``final/`` for a run of ``config`` that took ``steps`` optimizer
    steps and logged ``records`` (``metrics.jsonl``, oldest first).

    ``version``: dpokit's (default: the installed one); ``argv``: the command line that started
    the run, when it was the dpokit CLI (:func:`cli_argv`); ``world_size``: its processes (the
    reproducing command uses as many, since they set the global batch)."""
    from huggingface_hub import ModelCardData

    version = version or dpokit_version()
    preference = isinstance(config, DPOConfig)
    tags = ["dpokit", "dpo" if preference else "sft", *(["lora"] if config.lora else [])]
    base = _base_model(config.model)
    # the Hub takes repository ids here, so a local directory (or a revision) is no base_model
    # or dataset of the front matter, as TRL leaves out a local base; the table names it
    data = ModelCardData(library_name="peft" if config.lora else "transformers",
                         base_model=_hub_base(config.model),
                         datasets=_hub_ids([config.data]),
                         pipeline_tag="text-generation", tags=tags)
    split = f" (split `{config.split}`)" if config.split else ""
    started = "" if base == config.model else f" (started from the adapter `{config.model}`)"
    rows = [("Base model", f"`{base}`{started}"), ("Data", f"`{config.data}`{split}"),
            ("Objective", _objective(config)), ("Training", _regime(config)),
            ("Steps", str(steps)), ("Weights", _weights(config)), ("dpokit", version)]
    lines = [f"---\n{data.to_yaml()}\n---", "",
             f"# {Path(config.output_dir).name or config.output_dir}", "",
             f"{'DPO' if preference else 'SFT'} of `{config.model}`, trained with dpokit "
             f"{version}.", "",
             "| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), ""]
    lines += _metrics_section(records)
    lines += ["## Reproduce", "", "```bash", _reproduce(config, world_size), "```", "",
              "`config.yaml` is the run's resolved config; to train beside this run rather than "
              "replace it, add `--output-dir NEW_DIR`."]
    if argv:
        lines += ["", "This run was started with:", "", "```bash", shlex.join(argv), "```"]
    return "\n".join(lines) + "\n"


def _objective(config: TrainConfig) -> str:
    """``SFT: …``, or the DPO-family losses (their weights), β and the reference."""
    if not isinstance(config, DPOConfig):
        return _sft_objective(config)
    losses = ", ".join(f"`{name}`" for name in config.loss_type)
    if config.loss_weights is not None:
        losses += f" (weights {', '.join(str(w) for w in config.loss_weights)})"
    terms = _loss_settings(config)
    if terms:
        losses += f" with {', '.join(terms)}"
    if not config.needs_reference:
        reference = "no reference"
    elif config.sync_ref_model:
        reference = (f"TR-DPO reference (α = {config.ref_model_mixup_alpha} every "
                     f"{config.ref_model_sync_steps} steps)")
    elif config.ref_model:
        reference = f"reference `{config.ref_model}`"
    elif _base_model(config.model) != config.model:
        reference = f"reference: `{config.model}` (base + that adapter, frozen)"
    else:
        reference = ("reference: the base model" + (" (adapters off)" if config.lora else ""))
    return f"DPO family: loss_type {losses}, β = {config.beta}, {reference}"


def _sft_objective(config: TrainConfig) -> str:
    """Which tokens SFT trains on and how their NLL is averaged, as the config sets them."""
    if getattr(config, "assistant_only_loss", False):
        tokens = "the conversation's assistant message"
    elif getattr(config, "completion_only_loss", True) is None:
        tokens = ("TRL's rule: the completion of prompt-completion rows, every token of "
                  "messages and text rows")
    elif getattr(config, "completion_only_loss", True):
        tokens = "the completion (prompt masked; of a text row, every token)"
    else:
        tokens = "every token, prompt included (completion_only_loss false)"
    mean = ("summed over the batch's trained tokens / their number"
            if getattr(config, "loss_normalization", "example") == "token"
            else "each example's per-token mean, averaged over examples")
    return f"SFT: negative log-likelihood of {tokens}; {mean}"


def _loss_settings(config: DPOConfig) -> list[str]:
    """What else sets the loss: the hyper-parameters its losses read (``label_smoothing``,
    ``simpo_gamma``, …) set away from their defaults, an RPO NLL term, LD-DPO, WPO weighting,
    an f-divergence other than the reverse KL — as ``key = value``, the config's keys."""
    from dpokit.losses import LOSSES

    read = {parameter.name: parameter.default for name in config.loss_type if name in LOSSES
            for parameter in LOSSES[name].hyper_parameters}
    terms = [f"{name} = {getattr(config, name)}" for name, default in read.items()
             if getattr(config, name) != default]
    if config.rpo_alpha is not None:
        terms.append(f"rpo_alpha = {config.rpo_alpha} (NLL of the chosen completion)")
    if config.ld_alpha is not None:
        terms.append(f"ld_alpha = {config.ld_alpha}")
    if config.use_weighting:
        terms.append("use_weighting (WPO)")
    if config.f_divergence_type != "reverse_kl":
        terms.append(f"f_divergence_type = {config.f_divergence_type}"
                     + (f" (α = {config.f_alpha_divergence_coef})"
                        if config.f_divergence_type == "alpha_divergence" else ""))
    return terms


def _regime(config: TrainConfig) -> str:
    """Offline (the data's pairs or completions) or online (the policy's own, scored)."""
    if isinstance(config, DPOConfig) and config.online:
        label = config.label + (f" (τ = {config.label_temperature})"
                                if config.label_temperature != 1 and config.label != "hard"
                                else "")
        penalty = ("" if config.missing_eos_penalty is None
                   else f", missing_eos_penalty = {config.missing_eos_penalty}")
        return (f"online: each step the policy completes the prompts ({config.num_generations} "
                f"per prompt), reward `{config.reward}` scores them{penalty}, labels {label}")
    return "offline: the data's " + ("preference pairs" if isinstance(config, DPOConfig)
                                     else "completions")


def _weights(config: TrainConfig) -> str:
    """Full fine-tune, or the LoRA adapter's shape."""
    if not config.lora:
        return "full fine-tune"
    targets = (", ".join(config.lora_target_modules) if config.lora_target_modules is not None
               else "peft's default for the model family")
    merged = "; merged model in `merged/`" if config.merge_lora else ""
    return (f"LoRA adapter (r = {config.lora_r}, α = {config.lora_alpha}, "
            f"modules {targets}){merged}")


def _metrics_section(records: Sequence[dict[str, Any]]) -> list[str]:
    """Tables of the last training record with a loss and the last evaluation record."""
    train = next((r for r in reversed(records) if "loss" in r), None)
    evaluation = next((r for r in reversed(records) if any(k.startswith("eval/") for k in r)),
                      None)
    if train is None and evaluation is None:
        return []
    lines = ["## Final metrics", ""]
    if train is not None:
        shown = [(key, train[key]) for key in TRAIN_METRICS if key in train]
        lines += [f"Training, the last logged step ({train['step']}):", "", *_table(shown)]
        if train.get("skipped_steps"):
            lines += [f"Steps skipped by the divergence guard (a non-finite loss or gradient "
                      f"norm): {train['skipped_steps']}.", ""]
    if evaluation is not None:
        shown = [(key, value) for key, value in evaluation.items() if key.startswith("eval/")]
        lines += [f"Evaluation at step {evaluation['step']}:", "", *_table(shown)]
    return lines


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| metric | value |", "|---|---|",
            *(f"| {key} | {format_number(value)} |" for key, value in rows), ""]


def format_number(value: Any) -> str:
    """A metric as the card shows it: floats to 6 significant digits, null (a non-finite value
    in ``metrics.jsonl``) as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _reproduce(config: TrainConfig, world_size: int) -> str:
    """``dpokit train|sft --config OUTPUT_DIR/config.yaml`` (under torchrun with its ranks)."""
    command = "sft" if isinstance(config, SFTConfig) else "train"
    launcher = (f"torchrun --nproc-per-node {world_size} -m dpokit" if world_size > 1
                else "dpokit")
    path = Path(config.output_dir) / "config.yaml"
    return f"{launcher} {command} --config {shlex.quote(str(path))}"


def dpokit_version() -> str:
    """The installed dpokit's version (``dpokit.__version__`` when run from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dpokit")
    except PackageNotFoundError:
        import dpokit

        return getattr(dpokit, "__version__", "unknown")


def cli_argv(argv: Sequence[str] | None = None) -> list[str] | None:
    """``argv`` (default ``sys.argv``) as a command line when it is the dpokit CLI — the
    ``dpokit`` script, or ``python -m dpokit`` (torchrun's too) — else None (a library call)."""
    argv = sys.argv if argv is None else argv
    if not argv:
        return None
    program = Path(argv[0])
    if program.name == "dpokit":
        return ["dpokit", *argv[1:]]
    if program.name == "__main__.py" and program.parent.name == "dpokit":
        return ["python", "-m", "dpokit", *argv[1:]]
    return None


def read_records(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``output_dir/metrics.jsonl`` (none if it is missing; a line that is not
    a JSON object, cut short by a crash, is left out)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _hub_ids(names: Sequence[str | None]) -> list[str] | None:
    """The Hub repository ids (``Org/Name``, without ``@revision``) of ``names`` that are
    hub names and no local path, or None when there are none."""
    from dpokit.hub import parse_name

    ids = []
    for name in names:
        parsed = None if name is None or Path(name).exists() else parse_name(name)
        if parsed is not None and parsed.repo_id not in ids:
            ids.append(parsed.repo_id)
    return ids or None


def _hub_base(model: str) -> str | None:
    """The Hub id of ``model``'s base: its own, or that of the base a PEFT adapter names
    (``base_model_name_or_path``); None when it is a local directory."""
    from dpokit.models import read_adapter_config

    try:
        settings = read_adapter_config(model)
    except DpokitError:
        settings = None
    base = settings.get("base_model_name_or_path") if settings else model
    if not isinstance(base, str) or not base:
        return None
    ids = _hub_ids([base])
    return ids[0] if ids else None


def _base_model(model: str) -> str:
    """The base model of ``model``: itself, or the base a PEFT adapter directory names."""
    from dpokit.models import adapter_base

    try:
        base = adapter_base(model)
    except DpokitError:  # the card names the model as given
        return model
    return model if base is None else str(base)
