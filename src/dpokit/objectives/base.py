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
The one sum that outlives a logging window is ``num_tokens`` (:data:`CUMULATIVE_KEYS`): the input
tokens trained on since the start of the run, which a resumed run continues.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
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


NUM_TOKENS = "num_tokens"
"""TRL's ``num_tokens``: input tokens (prompt and completion of every sequence, no padding)
trained on so far. Counted by ``forward`` in training mode only, as TRL counts it."""
CUMULATIVE_KEYS = frozenset({NUM_TOKENS})
"""Sums that run over the whole run instead of a logging window (:meth:`MetricSums.zero_` keeps
them; checkpoints carry them)."""


class MetricSums:
    """Running float64 sums of an objective's metrics, in a fixed key order for ``all_reduce``.

    Keys of :data:`CUMULATIVE_KEYS` are not reset by :meth:`zero_`: each :meth:`reduce` moves
    the ranks' new counts into :attr:`totals`, which is the same on every rank, so a checkpoint
    written by rank 0 restores the whole run's count on every rank."""

    def __init__(self, keys: Sequence[str]):
        """Zero sums for ``keys``."""
        self.keys = tuple(keys)
        self.values = torch.zeros(len(self.keys), dtype=torch.float64)
        """This rank's sums since the last :meth:`zero_` (cumulative keys: since the last
        :meth:`reduce`)."""
        self.cumulative = torch.tensor([k in CUMULATIVE_KEYS for k in self.keys])
        self.totals = torch.zeros(len(self.keys), dtype=torch.float64)
        """Cumulative keys: their sums over every rank, up to the last :meth:`reduce`."""

    def add(self, sums: Mapping[str, Tensor]) -> None:
        """Add one micro-batch's sums (keys as :attr:`keys`)."""
        self.values += torch.stack([sums[k].detach().double().cpu() for k in self.keys])

    def reduce(self, all_reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """``{key: sum over every rank}`` (``all_reduce_sum`` is ``Runtime.all_reduce_sum``);
        cumulative keys: over every rank since the start of the run."""
        reduced = all_reduce_sum(self.values).cpu().clone()
        self.totals += torch.where(self.cumulative, reduced, 0.0)
        self.values[self.cumulative] = 0.0  # counted into totals, on every rank alike
        reduced[self.cumulative] = self.totals[self.cumulative]
        return dict(zip(self.keys, reduced.tolist(), strict=True))

    def zero_(self) -> None:
        """Start a new window (cumulative keys go on counting)."""
        self.values[~self.cumulative] = 0.0

    def state_dict(self, all_reduce_sum: Callable[[Tensor], Tensor] | None = None
                   ) -> dict[str, float]:
        """The unlogged sums — over every rank with ``all_reduce_sum`` (a collective: every
        rank calls it) — and the cumulative totals (``"<key>:total"``), for a checkpoint: a
        resumed run logs the same numbers."""
        values = self.values if all_reduce_sum is None else all_reduce_sum(self.values).cpu()
        state = dict(zip(self.keys, values.tolist(), strict=True))
        state.update({f"{key}:total": float(self.totals[i]) for i, key in enumerate(self.keys)
                      if key in CUMULATIVE_KEYS})
        return state

    def load_state_dict(self, state: Mapping[str, float] | Sequence[float], *,
                        holds_sums: bool = True) -> None:
        """Restore :meth:`state_dict` (or the positional list older checkpoints hold; keys an
        older checkpoint lacks start at 0). The unlogged sums are every rank's together, so
        only one rank takes them (``holds_sums``; the others start at 0), and the next
        :meth:`reduce` gives the same numbers as the run that saved them."""
        if isinstance(state, Mapping):
            values = [state.get(k, 0.0) for k in self.keys]
            totals = [state.get(f"{k}:total", 0.0) for k in self.keys]
        else:
            values, totals = list(state), [0.0] * len(self.keys)
        if not holds_sums:
            values = [0.0] * len(self.keys)
        self.values = torch.tensor(values, dtype=torch.float64)
        self.totals = torch.tensor(totals, dtype=torch.float64)


class LogpsModule(nn.Module):
    """The policy as one module whose ``forward`` returns completion log-probs.

    Wrapping this (not the bare LM) in DDP or FSDP makes every log-prob computation go through
    the wrapper's ``forward``, so gradient synchronisation and parameter gathering happen even
    though :func:`~dpokit.logps.completion_logps` calls the decoder and the LM head separately.
    ``forward(batch)`` returns ``(logps, tokens, wpo, stats, plain)``: ``(num_sequences,)``
    each but ``stats``, ``(num_sequences, 3)`` the per-sequence sums of the mean logit, the
    entropy and the argmax hits (:attr:`~dpokit.logps.CompletionLogps.entropy`); ``wpo`` and
    ``stats`` are zeros unless asked for; ``plain`` the log-probs without LD-DPO's weights
    (``logps`` itself without ``ld_alpha``).
    """

    def __init__(self, model: nn.Module, *, chunk_size: int, ld_alpha: float | None = None,
                 wpo: bool = False, unpadded: bool = True, token_stats: bool = False):
        """Wrap ``model`` with the options of :func:`~dpokit.logps.completion_logps`."""
        super().__init__()
        self.model = model
        self.chunk_size, self.ld_alpha, self.wpo = chunk_size, ld_alpha, wpo
        self.unpadded, self.token_stats = unpadded, token_stats

    def forward(self, batch: PairBatch) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(logps, tokens, wpo, stats, plain)`` of every sequence of ``batch``."""
        out = completion_logps(self.model, batch, chunk_size=self.chunk_size, wpo=self.wpo,
                               unpadded=self.unpadded, token_stats=self.token_stats,
                               ld_alpha=self.ld_alpha if batch.num_pairs else None)
        wpo = out.wpo if out.wpo is not None else torch.zeros_like(out.logps)
        stats = (torch.stack([out.mean_logits, out.entropy, out.top1], dim=-1)
                 if self.token_stats else out.logps.detach().new_zeros(len(out.logps), 3))
        return out.logps, out.tokens, wpo, stats, (out.logps if out.plain is None else out.plain)


def count(batch_size: int, like: Tensor) -> Tensor:
    """The 0-dim float64 ``count`` sum of a micro-batch of ``batch_size`` examples."""
    return torch.tensor(float(batch_size), dtype=torch.float64, device=like.device)


def num_tokens(policy: nn.Module, batch: PairBatch, like: Tensor) -> Tensor:
    """The 0-dim float64 :data:`NUM_TOKENS` sum of a micro-batch: its input tokens
    (``batch.extras["input_tokens"]``, set by ``collate``) while ``policy`` trains, 0 in
    evaluation — TRL 1.16 counts ``attention_mask.sum()`` only ``if mode == "train"``
    (trl/trainer/dpo_trainer.py:1549-1551)."""
    if not policy.training:
        return torch.zeros((), dtype=torch.float64, device=like.device)
    return batch.extras["input_tokens"].to(like.device).double().sum()


def input_tokens(lengths: Iterable[int]) -> Tensor:
    """``batch.extras["input_tokens"]``: per example, the tokens of its sequences as TRL's
    collators lay them out (prompt and completion of each; a pair's prompt twice, whatever
    dpokit's layout), so ``num_tokens`` does not depend on the layout."""
    return torch.tensor(list(lengths), dtype=torch.long)


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

    def units(self, items: Sequence[Any]) -> float:
        """What the loss sums of a global batch of ``items`` are divided by (the loss is
        their mean): the number of examples (SFT's ``loss_normalization: token``: tokens)."""
        return float(len(items))

    def describe(self, items: Sequence[Any], note: str = "") -> str:
        """``items`` for an error line: how many, their tokens, and where the longest is —
        ``4 pairs, 212 tokens (the longest, prefs.jsonl, row 7, 64)``; ``note`` goes inside the
        parentheses after a semicolon."""
        tokens = [self.tokens(item) for item in items]
        if not tokens:
            return f"0 {self.unit}"
        longest = items[max(range(len(items)), key=tokens.__getitem__)]
        where = (f"{longest.source}, row {longest.row}" if getattr(longest, "source", "")
                 else "one item")
        note = f"; {note}" if note else ""
        return f"{len(items)} {self.unit}, {sum(tokens)} tokens (the longest, {where}, " \
               f"{max(tokens)}{note})"

    @property
    def splittable(self) -> bool:
        """Whether a micro-batch may be cut into smaller ones with the same loss and metric sums:
        offline data (:meth:`prepare` returns the loaded items as they are: no generation, no
        random draws) whose loss is a sum of per-example terms (not a loss that couples the
        micro-batch, as DPO's ``aot`` and ``sft`` terms do)."""
        return type(self).prepare is Objective.prepare

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
