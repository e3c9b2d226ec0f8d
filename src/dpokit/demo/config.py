"""The demo's settings, :class:`DemoConfig`: the flags of ``dpokit demo`` and its YAML keys.

    dpokit demo --help                         # every field below, with its default and help
    dpokit demo --config demo.yaml --quick     # YAML keys = field names = flags

Torch-free (the loss registry's metadata, the methods' table and the built-in rewards' names), so
``dpokit demo --help`` and ``validate()`` import neither torch nor transformers; the run itself
is :func:`dpokit.demo.run.run_demo`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpokit.config import Config, field
from dpokit.demo.methods import ALWAYS, DEFAULT, METHODS
from dpokit.errors import DpokitError, check_beta
from dpokit.losses import LOSSES, get_loss

REWARD_NAMES = ("token_score", "match", "sorted")
"""The built-in rewards, the keys of :data:`dpokit.demo.task.REWARDS` (whose functions are torch
code): named here so that the config's help and validation need no torch."""


def _reference_losses() -> list[str]:
    return [name for name, spec in LOSSES.items() if spec.needs_reference]


FULL = {"sft_samples_per_prompt": 2000, "sft_epochs": 3.0, "pairs_per_prompt": 5000,
        "dpo_epochs": 4.0, "probes": 12, "target_closed_fraction": 0.97,
        "target_sampled_in_space": 0.99}
QUICK = {"sft_samples_per_prompt": 600, "sft_epochs": 3.0, "pairs_per_prompt": 800,
         "dpo_epochs": 3.0, "probes": 6, "target_closed_fraction": 0.85,
         "target_sampled_in_space": 0.97}
"""The values of the settings left null, without and with ``quick``."""


@dataclass(kw_only=True)
class DemoConfig(Config):
    """Settings of the demo: ``dpokit demo --help`` lists them as flags, ``--config`` as YAML."""

    out_dir: str = field("out/demo", aliases=("--out",),
                         help="Directory for the run, report.json, report.md and the plots.")
    quick: bool = field(False, help="A smaller run (under a minute) with a looser bar (85%, 97%).")
    betas: list[float] = field(default_factory=lambda: [1.0], aliases=("--beta",),
                               help="β > 0; several give one DPO run per β and the frontier.")
    methods: list[str] = field(
        default_factory=list,
        help=f"Methods to run beside the two the demo always runs ({', '.join(ALWAYS)}): "
             + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()
                         if m.name not in ALWAYS) + ".")
    loss_type: str = field("sigmoid", help=f"Offline DPO's loss, one with a reference: "
                                           f"{', '.join(_reference_losses())}.")
    reward: str = field("token_score", help=f"Built-in reward: {', '.join(REWARD_NAMES)}.")
    seed: int = field(0, help="Seed of everything.")
    sft_samples_per_prompt: int | None = field(
        None, help="SFT samples per prompt from π_ref's law (null: 2000; quick: 600).")
    sft_epochs: float | None = field(None, help="SFT passes over those samples (null: 3).")
    pairs_per_prompt: int | None = field(
        None, help="Preference pairs per prompt (null: 5000; quick: 800).")
    dpo_epochs: float | None = field(
        None, help="Offline passes over the pairs (null: 4; quick: 3). On-policy methods "
                   "generate as many pairs as the file holds, one pass.")
    batch_size: int = field(64, help="Examples per batch, SFT and DPO.")
    dpo_learning_rate: float = field(3e-3, help="Peak learning rate of every method.")
    hidden_size: int = field(64, help="Width of the demo's Llama-shaped transformer.")
    num_layers: int = field(2, help="Decoder layers of the transformer.")
    probes: int | None = field(
        None, help="Exact measurements of KL(π_θ‖π*) during each run (null: 12; quick: 6).")
    r_invalid: float | None = field(
        None, help="Reward of every completion outside the task's space (wrong length, another "
                   "token, no EOS), defining π* on the model's whole output space (null: the "
                   "lowest in-space reward − 1).")
    full_space_samples: int = field(
        1000, help="Samples per prompt for the full-space measurement, ≥ 2 (plain generate "
                   "samples for the share in the space; exact samples outside it for the "
                   "estimate).")
    max_new_tokens: int = field(
        8, help="Generation limit: of those samples, and of on-policy training's pairs.")
    target_closed_fraction: float | None = field(
        None, help=f"The bar: fraction of the whole-space KL(π_ref‖π*) the {DEFAULT} policy "
                   f"must close, at least (from the high end of KL(π_θ‖π*)'s 95% interval; "
                   f"null: 0.97; quick: 0.85).")
    target_sampled_in_space: float | None = field(
        None, help=f"The bar: share of the {DEFAULT} policy's generate samples that must be "
                   f"completions of the task (null: 0.99; quick: 0.97).")

    def __post_init__(self) -> None:
        """Settings left null take :data:`FULL`'s value, or :data:`QUICK`'s with ``quick``."""
        for key, value in (QUICK if self.quick else FULL).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def validate(self) -> None:
        """Reject settings the demo cannot run, naming the key."""
        super().validate()
        if not self.betas:
            raise DpokitError("betas must hold at least one β")
        for beta in self.betas:
            check_beta(beta)
        if len({f"{b:g}" for b in self.betas}) != len(self.betas):
            raise DpokitError("betas must be distinct")
        if not get_loss(self.loss_type).needs_reference:
            raise DpokitError(f"loss_type {self.loss_type} is reference-free; the demo compares "
                              f"with π* = π_ref·exp(r/β)/Z and needs a loss with a reference")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise DpokitError(f"methods: unknown {', '.join(unknown)}; known: "
                              f"{', '.join(METHODS)}")
        if isinstance(self.reward, str) and self.reward not in REWARD_NAMES:
            raise DpokitError(f"reward must be one of {', '.join(REWARD_NAMES)}, "
                              f"got {self.reward!r}")
        for key in ("sft_samples_per_prompt", "pairs_per_prompt", "batch_size", "probes",
                    "hidden_size", "num_layers", "full_space_samples", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise DpokitError(f"{key} must be ≥ 1")
        if self.full_space_samples < 2:  # the outside term's interval needs a variance
            raise DpokitError(f"full_space_samples must be ≥ 2 (the whole-space estimate's "
                              f"interval needs a sample variance), got {self.full_space_samples}")
        if self.r_invalid is not None and not math.isfinite(self.r_invalid):
            raise DpokitError(f"r_invalid must be a finite number, got {self.r_invalid}: "
                              f"π* = π_ref·exp(r/β)/Z needs a finite reward outside the space")
        for key in ("sft_epochs", "dpo_epochs", "dpo_learning_rate"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise DpokitError(f"{key} must be a finite number > 0, got {value}")
        for key in ("target_closed_fraction", "target_sampled_in_space"):
            if not 0 < getattr(self, key) <= 1:
                raise DpokitError(f"{key} must be in (0, 1]")

    @property
    def method_names(self) -> list[str]:
        """The two methods always run, then the added ones (each once)."""
        return list(dict.fromkeys([*ALWAYS, *self.methods]))
