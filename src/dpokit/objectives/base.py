"""The interface every training objective implements, and the sums its metrics reduce through.

An :class:`Objective` is what one step optimises — SFT's NLL, a DPO-family loss, and (next)
on-policy DPO. It owns everything that differs between them: how its examples are read
(``load``), batched (``collate``) and scored (``forward``), which metrics it reports and how they
become means (``metric_keys``, ``means``), and which reference it needs (``needs_reference``,
``after_step``). The training loop and the evaluator only call these methods; neither asks which
objective it runs. Evaluation is ``forward`` without backward.

``forward`` returns SUMS over the examples of a micro-batch (never means): the loop backpropagates
``loss_sum × world_size / |global batch|`` and adds the metric sums into a :class:`MetricSums`,
which is reduced over ranks and divided once — so micro-batching and ranks never change a number.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dpokit.data import PairBatch
from dpokit.logps import completion_logps


@dataclass
class Output:
    """What :meth:`Objective.forward` returns for one micro-batch of B examples."""

    loss_sum: Tensor
    """0-dim: Σ of the per-example losses (with grad; the loop scales and backpropagates it)."""
    sums: dict[str, Tensor]
    """0-dim float64 sums for every key of :attr:`Objective.metric_keys`, detached."""
    examples: dict[str, Tensor] = field(default_factory=dict)
    """``(B,)`` per-example values (log-probs, rewards, loss …), detached, for per-example
    reports (``dpokit eval --per-example``)."""


class MetricSums:
    """Running float64 sums of an objective's metrics, in a fixed key order for ``all_reduce``."""

    def __init__(self, keys: Sequence[str]):
        """Zero sums for ``keys``."""
        self.keys = tuple(keys)
        self.values = torch.zeros(len(self.keys), dtype=torch.float64)

    def add(self, sums: Mapping[str, Tensor]) -> None:
        """Add one micro-batch's sums (keys as :attr:`keys`)."""
        self.values += torch.stack([sums[k].detach().double().cpu() for k in self.keys])

    def reduce(self, all_reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """``{key: sum over every rank}`` (``all_reduce_sum`` is ``Runtime.all_reduce_sum``)."""
        return dict(zip(self.keys, all_reduce_sum(self.values).cpu().tolist(), strict=True))

    def zero_(self) -> None:
        """Start a new window."""
        self.values.zero_()

    def state_dict(self) -> dict[str, float]:
        """The unlogged sums, for a checkpoint (a resumed run logs the same numbers)."""
        return dict(zip(self.keys, self.values.tolist(), strict=True))

    def load_state_dict(self, state: Mapping[str, float] | Sequence[float]) -> None:
        """Restore :meth:`state_dict` (or the positional list older checkpoints hold)."""
        values = [state[k] for k in self.keys] if isinstance(state, Mapping) else list(state)
        self.values = torch.tensor(values, dtype=torch.float64)


class LogpsModule(nn.Module):
    """The policy as one module whose ``forward`` returns completion log-probs.

    Wrapping this (not the bare LM) in DDP or FSDP makes every log-prob computation go through
    the wrapper's ``forward``, so gradient synchronisation and parameter gathering happen even
    though :func:`~dpokit.logps.completion_logps` calls the decoder and the LM head separately.
    ``forward(batch)`` returns ``(logps, tokens, wpo)``, each ``(num_sequences,)``; ``wpo`` is
    zeros unless the WPO statistic was asked for.
    """

    def __init__(self, model: nn.Module, *, chunk_size: int, ld_alpha: float | None = None,
                 wpo: bool = False, unpadded: bool = True):
        """Wrap ``model`` with the options of :func:`~dpokit.logps.completion_logps`."""
        super().__init__()
        self.model = model
        self.chunk_size, self.ld_alpha, self.wpo = chunk_size, ld_alpha, wpo
        self.unpadded = unpadded

    def forward(self, batch: PairBatch) -> tuple[Tensor, Tensor, Tensor]:
        """``(logps, tokens, wpo)`` of every sequence of ``batch``."""
        out = completion_logps(self.model, batch, chunk_size=self.chunk_size, wpo=self.wpo,
                               unpadded=self.unpadded,
                               ld_alpha=self.ld_alpha if batch.num_pairs else None)
        wpo = out.wpo if out.wpo is not None else torch.zeros_like(out.logps)
        return out.logps, out.tokens, wpo


def count(batch_size: int, like: Tensor) -> Tensor:
    """The 0-dim float64 ``count`` sum of a micro-batch of ``batch_size`` examples."""
    return torch.tensor(float(batch_size), dtype=torch.float64, device=like.device)


class Objective(ABC):
    """What a training step optimises; see the module docstring for the contract."""

    unit: str = "examples"
    """What one example is, for throughput (``pairs_per_second``) and progress bars."""
    needs_reference: bool = False
    """Whether :attr:`reference` must be set before training (π_ref log-probs are read)."""
    reference: Any = None
    """The :class:`~dpokit.objectives.reference.Reference`, for objectives that need one."""
    reward_fn: Any = None
    """The reward its generations are scored with (on-policy DPO), also used for the rewards of
    ``eval_generate`` samples; None when it scores nothing."""

    @property
    @abstractmethod
    def metric_keys(self) -> tuple[str, ...]:
        """Keys of :attr:`Output.sums`, including ``loss`` and ``count``."""

    @abstractmethod
    def load(self, path: str, split: str | None, *, progress: bool | None = None) -> list:
        """The tokenised examples of a data file (errors name the file, row and field);
        ``progress``: a tokenisation bar (None: on a terminal, past 2 s; False: never)."""

    @abstractmethod
    def tokens(self, item: Any) -> int:
        """Tokens the model sees for one example (for memory estimates)."""

    def prepare(self, model: nn.Module, items: Sequence[Any], indices: Sequence[int],
                step: int) -> Sequence[Any]:
        """The examples a micro-batch trains on (or is evaluated on), from the loaded ``items``
        at ``indices``: themselves for offline data; on-policy DPO generates its pairs here with
        the current (bare) ``model``."""
        return items

    @abstractmethod
    def collate(self, items: Sequence[Any], indices: Sequence[int]) -> PairBatch:
        """A model batch of ``items``; ``indices`` are their positions in the loaded data."""

    @abstractmethod
    def policy(self, model: nn.Module) -> nn.Module:
        """``model`` as the module ``forward`` calls (a :class:`LogpsModule`), to be wrapped."""

    @abstractmethod
    def forward(self, policy: nn.Module, batch: PairBatch) -> Output:
        """Score one micro-batch: the loss sum (with grad) and the metric sums."""

    @abstractmethod
    def means(self, sums: Mapping[str, float]) -> dict[str, float]:
        """The logged values (``loss`` first) from sums reduced over a window or a data set."""

    def postfix(self, record: Mapping[str, float]) -> dict[str, str]:
        """Progress-bar fields of a training record."""
        return {f"{self.unit[:2]}/s": f"{record[f'{self.unit}_per_second']:.1f}"}

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step (TR-DPO moves its reference here)."""
        if self.reference is not None:
            self.reference.after_step(model, step)

    @property
    def moving_weights(self) -> nn.Module | None:
        """Weights besides the policy that change during training and go into checkpoints."""
        return None if self.reference is None else self.reference.moving_model
