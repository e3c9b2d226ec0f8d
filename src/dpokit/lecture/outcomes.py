"""Small discrete outcome tables: the lecture's worked example, user tables, and their π*.

An outcome table lists, for one prompt x, each completion y with π_ref(y|x) and r(x,y). Solving it
for a β gives π*, log Z, J(π*) = β log Z and KL(π* ‖ π_ref) in float64, to relative 1e-9
(:func:`dpokit.theory.optimal.solve_optimal`), or refuses a β outside the range where float64
can.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dpokit.errors import DpokitError
from dpokit.theory.optimal import MAX_ABS_REWARD, solve_optimal

if TYPE_CHECKING:
    from dpokit.lecture.config import OptimalConfig


@dataclass(frozen=True)
class Outcome:
    """One completion y of the prompt: its name, π_ref(y|x) and r(x,y)."""

    name: str
    ref_prob: float
    reward: float


WORKED_EXAMPLE_PROMPT = "this is a"
WORKED_EXAMPLE: tuple[Outcome, ...] = (
    Outcome("cats", 0.8, 1.0),
    Outcome("reward function", 0.1, 8.0),
    Outcome("dogs", 0.06, 0.5),
    Outcome("sunny day", 0.04, 0.0),
)
"""The lecture's example: π_ref(cats) = 0.8, π_ref(reward function) = 0.1, the other 0.1 spread
over two more outcomes; the reward (an LLM-topics reward model) favours ``reward function``, so
at β = 1 almost all of π*'s mass moves onto it."""

PROB_TOLERANCE = 1e-6


def validate_outcomes(outcomes: Sequence[Outcome], *, source: str = "outcomes",
                      normalize: bool = False) -> tuple[Outcome, ...]:
    """Check a table: ≥ 1 outcome, unique non-empty names, π_ref ≥ 0 summing to 1, finite rewards.

    Rewards and probabilities must also lie within ±1e300 (``MAX_ABS_REWARD``), the range the
    float64 solver takes (differences of two rewards stay finite).

    With ``normalize`` the probabilities are rescaled to sum to 1 instead of being required to
    (within ``PROB_TOLERANCE``). Raises :class:`DpokitError` naming ``source`` and the outcome.
    """
    if not outcomes:
        raise DpokitError(f"{source}: no outcomes given")
    seen: set[str] = set()
    for outcome in outcomes:
        if not outcome.name.strip():
            raise DpokitError(f"{source}: an outcome has an empty name")
        if outcome.name in seen:
            raise DpokitError(f"{source}: outcome {outcome.name!r} is listed twice")
        seen.add(outcome.name)
        if not (math.isfinite(outcome.ref_prob) and 0 <= outcome.ref_prob <= MAX_ABS_REWARD):
            raise DpokitError(f"{source}: outcome {outcome.name!r} has ref_prob "
                              f"{outcome.ref_prob!r}; probabilities must be finite and ≥ 0 "
                              f"(and ≤ {MAX_ABS_REWARD:g})")
        if not (math.isfinite(outcome.reward) and abs(outcome.reward) <= MAX_ABS_REWARD):
            raise DpokitError(f"{source}: outcome {outcome.name!r} has reward "
                              f"{outcome.reward!r}; rewards must be finite with "
                              f"|r| ≤ {MAX_ABS_REWARD:g}")
    total = math.fsum(o.ref_prob for o in outcomes)
    if total <= 0:
        raise DpokitError(f"{source}: the reference probabilities are all 0")
    if normalize:
        return tuple(Outcome(o.name, o.ref_prob / total, o.reward) for o in outcomes)
    if abs(total - 1.0) > PROB_TOLERANCE:
        raise DpokitError(f"{source}: reference probabilities sum to {total:.9g}, not 1 "
                          f"(tolerance {PROB_TOLERANCE:g}); fix them or set normalize "
                          f"(--normalize)")
    return tuple(outcomes)


def _number(text: str, where: str, field: str) -> float:
    """``text`` as a finite float, or a :class:`DpokitError` naming ``where`` and ``field``."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise DpokitError(f"{where}, field {field!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DpokitError(f"{where}, field {field!r}: {text!r} is not a finite number")
    return value


def parse_outcome(spec: str) -> Outcome:
    """Parse ``NAME:REF_PROB:REWARD`` (the name may itself contain colons)."""
    parts = spec.rsplit(":", 2)
    if len(parts) != 3:
        raise DpokitError(f"outcomes {spec!r}: expected NAME:REF_PROB:REWARD, e.g. 'cats:0.8:1'")
    name, ref_prob, reward = parts
    where = f"outcomes {spec!r}"
    return Outcome(name.strip(), _number(ref_prob, where, "ref_prob"),
                   _number(reward, where, "reward"))


def parse_assignment(spec: str, key: str) -> tuple[str, float]:
    """Parse ``NAME=VALUE`` of the override list ``key`` (``rewards`` or ``ref_probs``)."""
    name, sep, value = spec.rpartition("=")
    if not sep or not name.strip():
        raise DpokitError(f"{key} {spec!r}: expected NAME=VALUE, e.g. 'cats=2.5'")
    return name.strip(), _number(value, f"{key} {spec!r}", "value")


def read_outcomes_csv(path: str | Path) -> list[Outcome]:
    """Read a CSV with a header and columns ``name`` (or ``outcome``), ``ref_prob``, ``reward``.

    The file is UTF-8, with or without a byte-order mark (``utf-8-sig``: spreadsheet programs
    write one, and it would otherwise stick to the first column's name). Errors name the file,
    the row (1 = first data row, line 2 of the file) and the field; a value that is not a
    finite number is one of them.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            rows = list(reader)
    except OSError as error:
        raise DpokitError(f"cannot read {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise DpokitError(f"{path}: not a readable UTF-8 CSV file ({error})") from None
    name_field = "name" if "name" in fields else "outcome"
    for required in (name_field, "ref_prob", "reward"):
        if required not in fields:
            raise DpokitError(f"{path}: missing column {required!r} (found {fields or 'none'}); "
                              f"expected a header with name, ref_prob, reward")
    outcomes = []
    for index, raw in enumerate(rows, start=1):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        where = f"{path}, row {index} (line {index + 1})"
        if not row.get(name_field):
            raise DpokitError(f"{where}, field {name_field!r}: empty outcome name")
        outcomes.append(Outcome(row[name_field], _number(row.get("ref_prob"), where, "ref_prob"),
                                _number(row.get("reward"), where, "reward")))
    if not outcomes:
        raise DpokitError(f"{path}: no data rows")
    return outcomes


def apply_overrides(outcomes: Iterable[Outcome], *, rewards: Mapping[str, float] | None = None,
                    ref_probs: Mapping[str, float] | None = None) -> list[Outcome]:
    """Replace the reward or π_ref of named outcomes; an unknown name is an error."""
    outcomes = list(outcomes)
    names = {o.name for o in outcomes}
    for key, mapping in (("rewards", rewards or {}), ("ref_probs", ref_probs or {})):
        for name in mapping:
            if name not in names:
                raise DpokitError(f"{key}: unknown outcome {name!r}; "
                                  f"known outcomes: {', '.join(sorted(names))}")
    return [Outcome(o.name, (ref_probs or {}).get(o.name, o.ref_prob),
                    (rewards or {}).get(o.name, o.reward)) for o in outcomes]


def outcome_table(config: OptimalConfig) -> tuple[tuple[Outcome, ...], str | None]:
    """The validated table of ``dpokit optimal`` and the prompt of its title.

    The outcomes come from ``csv``, else ``outcomes``, else the worked example (whose prompt is
    the default title); then the ``rewards`` and ``ref_probs`` overrides apply.
    """
    prompt = config.prompt
    if config.csv is not None:
        table, source = read_outcomes_csv(config.csv), config.csv
    elif config.outcomes:
        table, source = [parse_outcome(spec) for spec in config.outcomes], "outcomes"
    else:
        table, source = list(WORKED_EXAMPLE), "worked example"
        prompt = WORKED_EXAMPLE_PROMPT if prompt is None else prompt
    table = apply_overrides(
        table,
        rewards=dict(parse_assignment(spec, "rewards") for spec in config.rewards),
        ref_probs=dict(parse_assignment(spec, "ref_probs") for spec in config.ref_probs))
    return validate_outcomes(table, source=source, normalize=config.normalize), prompt


@dataclass(frozen=True)
class OptimalSolution:
    """π* of an outcome table at one β, and the quantities of the derivation (all exact)."""

    beta: float
    outcomes: tuple[Outcome, ...]
    optimal_probs: tuple[float, ...]
    log_partition: float
    """log Z."""
    objective: float
    """J(π*) = E_π*[r] − β KL(π* ‖ π_ref), computed directly; equals β log Z."""
    expected_reward: float
    """E_π*[r]."""
    kl_optimal_ref: float
    """KL(π* ‖ π_ref)."""

    def to_json(self) -> dict:
        """The JSON object of ``dpokit optimal --json``. ``partition`` is null when Z is past
        float64's range (log Z > 709; ``log_partition`` still holds it): ``Infinity`` is not
        JSON, and a strict parser (jq, JavaScript, Go) would reject the whole document."""
        return {
            "beta": self.beta,
            "log_partition": self.log_partition,
            "partition": math.exp(self.log_partition) if self.log_partition < 709 else None,
            "objective": self.objective,
            "max_objective": self.beta * self.log_partition,
            "expected_reward": self.expected_reward,
            "kl_optimal_ref": self.kl_optimal_ref,
            "outcomes": [
                {"name": o.name, "ref_prob": o.ref_prob, "reward": o.reward, "optimal_prob": p}
                for o, p in zip(self.outcomes, self.optimal_probs, strict=True)
            ],
        }


def solve(outcomes: Sequence[Outcome], beta: float) -> OptimalSolution:
    """π* = π_ref·exp(r/β)/Z of a validated table in float64, by
    :func:`dpokit.theory.optimal.solve_optimal`: every value to relative 1e-9 (see its
    docstring for the two cancellation exceptions), π_ref normalised by its sum.

    Raises :class:`DpokitError` naming the range of β (``--beta``) this table allows when β is
    outside it: below |r_max|/1e308, log Z = r_max/β + O(1) overflows float64; above
    σ_ref(r)·1e150, KL(π*‖π_ref) ≈ Var_ref(r)/(2β²) underflows.
    """
    exact = solve_optimal(torch.tensor([o.ref_prob for o in outcomes], dtype=torch.float64),
                          torch.tensor([o.reward for o in outcomes], dtype=torch.float64), beta)
    return OptimalSolution(
        beta=float(beta),
        outcomes=tuple(outcomes),
        optimal_probs=tuple(exact.optimal_logps.exp().tolist()),
        log_partition=float(exact.log_partition),
        objective=float(exact.objective),
        expected_reward=float(exact.expected_reward),
        kl_optimal_ref=float(exact.kl_optimal_ref),
    )
