"""The configs of ``dpokit eval`` and ``dpokit generate`` (:mod:`dpokit.evaluate` runs them),
apart from it so that reading their flags (``--help``) imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dpokit.config import field as field_
from dpokit.errors import DpokitError
from dpokit.objectives.config import (
    DataConfig,
    ModelConfig,
    PrecisionConfig,
    PreferenceConfig,
    SamplingConfig,
)


@dataclass(kw_only=True)
class EvalConfig(PreferenceConfig, DataConfig, ModelConfig):
    """``dpokit eval``: the same model, data and loss keys as ``dpokit train``."""

    ref_model: str | None = field_(
        None, help="Reference model directory; without it a loss that needs π_ref is not "
                   "computed and only log-probs are reported.")
    per_example: str | None = field_(None, help="Write one JSON line per pair to this file.")
    overwrite: bool = field_(False, help="Replace an existing per_example file (refused "
                                         "without).")
    json: bool = field_(False, help="Print the summary as JSON.")

    def validate(self) -> None:
        """The training keys' checks, and a per-example file that is not the data."""
        super().validate()
        if self.per_example is not None:
            check_not_input(self.per_example, "per_example", self.data)


@dataclass(kw_only=True)
class GenerateConfig(SamplingConfig, PrecisionConfig):
    """``dpokit generate``: completions of a data file's prompts from a local model."""

    model: str = field_(help="A local Hugging Face causal LM directory.")
    data: str = field_(help="Prompts: any data file dpokit reads (its prompt column; other "
                            "columns are ignored).")
    output: str = field_("samples.jsonl", help="Where the completions go (one JSON line each).")
    overwrite: bool = field_(False, help="Replace an existing output file (refused without).")
    split: str | None = field_(None, help="Split of the data (saved DatasetDict/shards).")
    prompt_column: str = field_("prompt", help="Column holding the prompt (text or messages).")
    max_prompt_length: int | None = field_(None, help="Longest prompt in tokens (keeps the end).")
    max_row_chars: int | None = field_(
        1_000_000, help="Longest prompt in characters, refused before tokenising (null: no "
                        "limit).")
    text_mode: Literal["auto", "chat", "plain"] = field_(
        "auto", help="Chat template for conversational prompts, or plain 'role: content' text.")
    num_generations: int = field_(1, help="Completions per prompt.")
    reward: str | None = field_(
        None, help="Also score each completion (a 'reward' field): module:function, "
                   "path/file.py:function (TRL's signature) or a reward-model directory.")
    seed: int = field_(0, help="Seed of the sampling (the same seed, prompts and batch_size "
                               "give the same completions).")
    batch_size: int = field_(64, help="Sequences generated together.")
    device: str = field_("auto", help="auto, cpu, cuda.")
    trust_remote_code: bool = field_(False, help="Allow model code shipped in the directory.")

    def validate(self) -> None:
        """Sampling settings, sizes and the output path."""
        super().validate()
        if self.num_generations < 1:
            raise DpokitError(f"num_generations must be ≥ 1, got {self.num_generations}")
        if self.batch_size < 1:
            raise DpokitError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise DpokitError(f"max_prompt_length must be ≥ 1 or null, got "
                              f"{self.max_prompt_length}")
        if Path(self.output).is_dir():
            raise DpokitError(f"output {self.output} is a directory; name a file")
        check_not_input(self.output, "output", self.data)


def check_not_existing(path: str, key: str, overwrite: bool) -> None:
    """Refuse to write over an earlier result unless asked: ``dpokit generate`` run twice in a
    directory would otherwise replace the first ``samples.jsonl`` without a word."""
    if not overwrite and Path(path).exists():
        raise DpokitError(f"{key} {path} exists; pass --overwrite to replace it, or name "
                          f"another file")


def check_not_input(path: str, key: str, data: str) -> None:
    """Refuse an output file that is the data file itself: writing it would replace the data
    (``dpokit generate --data samples.jsonl`` with the default ``output: samples.jsonl``)."""
    if Path(data).is_file() and Path(path).resolve() == Path(data).resolve():
        raise DpokitError(f"{key} {path} is the data file; writing it would replace the data; "
                          f"name another file")
