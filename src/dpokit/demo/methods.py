"""The training methods the demo compares, as the settings of an ordinary ``dpokit train`` run.

Offline methods learn from the preference file sampled once from π_ref; on-policy ones generate
their pairs from the policy being trained and label them with the task's reward
(:mod:`dpokit.demo.reward`). Every method gets the same π_ref (the SFT model), β, batch, learning
rate and the same number of labelled pairs (docs/theory.md §6 says what each should do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    online: bool
    settings: dict[str, Any] = field(default_factory=dict)
    """``DPOConfig`` keys beyond the shared ones (loss, labels, anchors)."""


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dpo", "offline DPO on pairs from π_ref (the lecture's method)", False),
    Method("online-soft", "on-policy DPO, soft Bradley–Terry labels p = σ(r₁ − r₂)", True,
           {"label": "soft", "loss_type": ["sigmoid_soft"]}),
    Method("rpo", "offline DPO + α·NLL(y_w), α = 1 (RPO)", False, {"rpo_alpha": 1.0}),
    Method("dpop", "offline DPO-Positive, λ = 50", False, {"loss_type": ["dpop"]}),
    Method("online-hard", "on-policy DPO, hard labels (the higher reward wins: TRL's rule)",
           True, {"label": "hard", "loss_type": ["sigmoid"]}),
)}
"""Every method by name: the two the demo always runs first, then the ones ``methods`` adds."""

ALWAYS = ("dpo", "online-soft")
DEFAULT = "online-soft"
"""The method whose policy the report's top-level numbers describe (and the bar judges)."""
