"""What is optimised: objectives (SFT, DPO) behind one interface, their reference, their config.

    objective = DPOObjective(config, tokenizer, reference)
    out = objective.forward(objective.policy(model), objective.collate(items, indices))
    out.loss_sum.backward()                    # training; evaluation stops at forward

Modules: :mod:`~dpokit.objectives.base` (the :class:`Objective` interface, :class:`MetricSums`),
:mod:`~dpokit.objectives.dpo`, :mod:`~dpokit.objectives.sft`,
:mod:`~dpokit.objectives.reference` (π_ref five ways), :mod:`~dpokit.objectives.config` (the
model, data and loss concerns every command's config is built from).
"""

from typing import TYPE_CHECKING

from dpokit._lazy import lazy_exports

if TYPE_CHECKING:  # the names, for readers and linters; imported on first use
    from dpokit.objectives.base import LogpsModule, MetricSums, Objective, Output
    from dpokit.objectives.dpo import DPOObjective
    from dpokit.objectives.reference import Reference
    from dpokit.objectives.sft import SFTObjective

_EXPORTS = {
    "LogpsModule": "base",
    "MetricSums": "base",
    "Objective": "base",
    "Output": "base",
    "DPOObjective": "dpo",
    "Reference": "reference",
    "SFTObjective": "sft",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["DPOObjective", "LogpsModule", "MetricSums", "Objective", "Output", "Reference",
           "SFTObjective"]
