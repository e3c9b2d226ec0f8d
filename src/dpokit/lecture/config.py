"""Configs of the lecture's commands: ``OptimalConfig``, ``PartitionConfig``, ``FiguresConfig``.

    dpokit optimal --config table.yaml --beta 2        # YAML keys = field names = flags
    dpokit partition --beta 1,0.1 --samples 100,1000
    dpokit figures --out out/figures

Each field is a YAML key and a flag (``space_vocab`` is ``--space-vocab``), with its default and
help; the old flag spellings (``-b``, ``--beta``, ``-o``, ``--outcome``, ``--reward``,
``--ref-prob``, ``--out``) are aliases. List fields take ``a,b``, a YAML list or the flag repeated.
``validate()`` rejects impossible values, naming the key, before anything is computed.

Torch-free, so each command's ``--help`` imports neither torch nor matplotlib: the checks that
need :mod:`dpokit.lecture.outcomes` or :mod:`dpokit.lecture.partition` (torch code) import them
in ``validate()``, which the command runs before its function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpokit.config import Config, field
from dpokit.errors import DpokitError, check_beta

GPT2_VOCAB_SIZE = 50257
"""GPT-2's vocabulary size: the growth table's default V."""


def _check_betas(betas: list[float]) -> None:
    if not betas:
        raise DpokitError("betas must hold at least one β")
    for beta in betas:
        check_beta(beta)


def _check_rate(rate: float | None) -> None:
    if rate is not None and not (rate > 0 and math.isfinite(rate)):
        raise DpokitError(f"rate must be a finite number > 0, got {rate}")


@dataclass(kw_only=True)
class OptimalConfig(Config):
    """``dpokit optimal``: π* of an outcome table (default: the lecture's worked example)."""

    betas: list[float] = field(default_factory=lambda: [1.0], aliases=("--beta", "-b"),
                               help="β > 0; several give a sweep (one π* column per β).")
    outcomes: list[str] = field(
        default_factory=list, aliases=("--outcome", "-o"),
        help="Outcomes of the prompt as NAME:REF_PROB:REWARD, e.g. 'cats:0.8:1' (replaces the "
             "worked example).")
    csv: str | None = field(None, help="CSV with header name,ref_prob,reward (replaces the "
                                       "worked example).")
    rewards: list[str] = field(default_factory=list, aliases=("--reward",),
                               help="Reward overrides as NAME=VALUE, e.g. 'cats=2.5'.")
    ref_probs: list[str] = field(default_factory=list, aliases=("--ref-prob",),
                                 help="π_ref overrides as NAME=VALUE, e.g. 'cats=0.5'.")
    normalize: bool = field(False, help="Rescale π_ref to sum to 1 instead of requiring it.")
    prompt: str | None = field(None, help="Prompt text shown in the title (null: the worked "
                                          "example's prompt; none for other tables).")
    json: bool = field(False, help="Print JSON instead of tables.")

    def validate(self) -> None:
        """β > 0, one source of outcomes, and well-formed outcome and override specs."""
        from dpokit.lecture.outcomes import parse_assignment, parse_outcome

        super().validate()
        _check_betas(self.betas)
        if self.outcomes and self.csv is not None:
            raise DpokitError("give outcomes or csv, not both")
        for spec in self.outcomes:
            parse_outcome(spec)
        for key in ("rewards", "ref_probs"):
            for spec in getattr(self, key):
                parse_assignment(spec, key)


@dataclass(kw_only=True)
class PartitionConfig(Config):
    """``dpokit partition``: V^T growth of Z's terms, exact log Z beside Monte-Carlo estimates."""

    vocab_size: int = field(GPT2_VOCAB_SIZE, help="V for the growth table (GPT-2's).")
    max_length: int = field(8, help="Largest T in the growth table.")
    rate: float | None = field(None, help="Sequences/s to time enumeration at (null: measured "
                                          "here with a bigram scorer).")
    space_vocab: int = field(6, help="V of the small built-in space.")
    space_length: int = field(5, help="T of the small built-in space.")
    betas: list[float] = field(default_factory=lambda: [5.0, 1.0, 0.3, 0.1],
                               aliases=("--beta", "-b"),
                               help="β values of the exact and Monte-Carlo studies.")
    samples: list[int] = field(default_factory=lambda: [10, 100, 1000, 10000],
                               help="Monte-Carlo sample sizes n (each ≥ 2).")
    repeats: int = field(20, help="Independent estimates per (β, n).")
    seed: int = field(0, help="Random seed of the built-in space and the samples.")
    json: bool = field(False, help="Print JSON instead of tables.")

    def validate(self) -> None:
        """Sizes ≥ 1, β > 0, every sample size ≥ 2, a given rate > 0; then the sizes the
        command can do (:mod:`dpokit.lecture.partition`'s limits), before anything is built:
        growth-table counts below 10^300, the space ≤ 2^24 sequences, and the space and each
        Monte-Carlo batch within 2 GiB. (The β range needs the space's rewards: it is checked
        when the space is built.)"""
        from dpokit.lecture.partition import check_growth, check_monte_carlo, check_space

        super().validate()
        for key in ("vocab_size", "max_length", "space_vocab", "space_length", "repeats"):
            if getattr(self, key) < 1:
                raise DpokitError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        _check_betas(self.betas)
        if not self.samples:
            raise DpokitError("samples must hold at least one sample size")
        if any(n < 2 for n in self.samples):
            raise DpokitError(f"samples must all be ≥ 2, got {self.samples}")
        _check_rate(self.rate)
        check_growth(self.vocab_size, self.max_length, self.rate)
        check_space(self.space_vocab, self.space_length)
        check_monte_carlo(self.space_vocab, self.space_length, self.samples, self.repeats)


@dataclass(kw_only=True)
class FiguresConfig(Config):
    """``dpokit figures``: the lecture's figures, computed and written as PNGs."""

    out_dir: str = field("out/figures", aliases=("--out",),
                         help="Directory to write the PNGs into.")
    rate: float | None = field(None, help="Sequences/s for the enumeration-time axis (null: "
                                          "measured here with a bigram scorer).")

    def validate(self) -> None:
        """A given rate > 0."""
        super().validate()
        _check_rate(self.rate)
