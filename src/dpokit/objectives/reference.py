"""The reference policy π_ref, five ways, behind one interface: ``Reference.logps(batch)``.

1. ``model``: a frozen copy of the initial policy (or ``ref_model``), run without gradients;
2. ``precomputed``: one pass before training, cached on disk (``<output_dir>/../.dpokit_cache``)
   under a hash of the reference weights, the token ids and the settings that change the numbers
   — a second run on the same data skips the pass, and no reference model stays in memory;
3. ``adapters``: with LoRA, the policy itself with its adapters disabled (no second copy);
4. ``none``: reference-free losses (SimPO) load nothing;
5. TR-DPO: mode ``model`` plus :meth:`Reference.sync`, ref ← α·θ + (1 − α)·ref every
   ``ref_model_sync_steps`` steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from dpokit.atomic import atomic_path
from dpokit.data import PairBatch, TokenizedPair, collate_pairs
from dpokit.logps import sequence_logps, unwrap_model

log = logging.getLogger("dpokit.train")


class Reference:
    """Reference log-probs ``(chosen, rejected)`` for a batch of pairs, or None (mode ``none``)."""

    def __init__(self, mode: str, *, model: nn.Module | None = None,
                 table: Tensor | None = None, chunk_size: int = 1024,
                 ld_alpha: float | None = None, autocast=contextlib.nullcontext,
                 unpadded: bool = True, sync_steps: int | None = None,
                 sync_alpha: float = 0.6):
        """``mode`` is none, model, adapters or precomputed; ``sync_steps`` turns on TR-DPO."""
        if mode not in ("none", "model", "adapters", "precomputed"):
            raise ValueError(f"unknown reference mode {mode!r}")
        if sync_steps is not None and mode != "model":
            raise ValueError("only a reference model of its own can be synced (TR-DPO)")
        self.mode, self.model, self.table = mode, model, table
        self.chunk_size, self.ld_alpha, self.autocast = chunk_size, ld_alpha, autocast
        self.unpadded = unpadded
        self.sync_steps, self.sync_alpha = sync_steps, sync_alpha

    @property
    def moving_model(self) -> nn.Module | None:
        """The reference weights that change during training (TR-DPO), for checkpoints."""
        return self.model if self.sync_steps else None

    def after_step(self, policy: nn.Module, step: int) -> None:
        """TR-DPO: every ``sync_steps`` optimizer steps, :meth:`sync` towards the policy."""
        if self.sync_steps and step % self.sync_steps == 0:
            self.sync(policy, self.sync_alpha)

    @torch.no_grad()
    def logps(self, batch: PairBatch) -> tuple[Tensor, Tensor] | None:
        """``(chosen, rejected)`` summed log π_ref, each ``(B,)``, detached; None in mode none.

        ``precomputed`` looks the rows up by ``batch.extras["indices"]`` (positions in the
        table); the model modes run a no-grad forward in eval mode (no dropout)."""
        if self.mode == "none":
            return None
        if self.mode == "precomputed":
            rows = self.table[batch.extras["indices"].cpu()]
            if not bool(torch.isfinite(rows).all()):  # a row the reference pass skipped
                raise RuntimeError("a precomputed reference row was never computed")
            rows = rows.to(batch.input_ids.device)
            return rows[:, 0], rows[:, 1]
        model = unwrap_model(self.model) if self.mode == "model" else self.model
        adapters_off = (model.disable_adapter() if self.mode == "adapters"
                        else contextlib.nullcontext())
        was_training = model.training
        model.eval()  # the reference never sees dropout, whichever way it is provided
        try:
            with adapters_off, self.autocast():
                out = sequence_logps(model, batch, chunk_size=self.chunk_size,
                                     ld_alpha=self.ld_alpha, unpadded=self.unpadded)
        finally:
            model.train(was_training)
        return out.chosen_logps.detach(), out.rejected_logps.detach()

    @torch.no_grad()
    def sync(self, policy: nn.Module, alpha: float) -> None:
        """TR-DPO soft update: ref ← α·θ + (1 − α)·ref, parameter by parameter."""
        policy_params = dict(unwrap_model(policy).named_parameters())
        for name, ref_param in unwrap_model(self.model).named_parameters():
            update = policy_params[name].detach()
            if hasattr(update, "full_tensor"):  # FSDP2 shard: gather (every rank calls sync)
                update = update.full_tensor()
            update = update.to(ref_param)
            ref_param.mul_(1.0 - alpha).add_(update, alpha=alpha)


def hash_directory(path: str | Path, memo_dir: str | Path | None = None) -> str:
    """SHA-256 over a model directory's weight, config and code files (each file's name and the
    SHA-256 of its bytes) — a hub name's cached snapshot; for a PEFT adapter, its base's files
    too (the weights are both). Code: with ``trust_remote_code`` the directory's own
    ``modeling_*.py`` computes the log-probs, so an edit to it is a new reference.
    ``memo_dir`` remembers each large file's digest by its identity on the file system
    (:func:`dpokit.digests.file_sha256`), so a later start does not read the weights again."""
    from dpokit.digests import file_sha256
    from dpokit.hub import locate
    from dpokit.models import adapter_base

    digest = hashlib.sha256(b"files-v2\0")
    path = locate(path)
    base = adapter_base(path)
    if base is not None:
        digest.update(hash_directory(base, memo_dir).encode())
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix in (".safetensors", ".bin", ".json", ".pt", ".py"):
            digest.update(f"{file.name}\0{file_sha256(file, memo_dir)}\0".encode())
    return digest.hexdigest()


def logps_code_digest() -> str:
    """A digest of what computes the log-probs — the source of :mod:`dpokit.logps`,
    :mod:`dpokit.attention` (and its FlexAttention path), :mod:`dpokit.data.collate` and this
    module (the table's own pass: its batches, LD-DPO's pairs, the float32 rows), and the
    versions of torch and transformers — for the reference cache's settings: a release that
    changes how log-probs are computed (a fix) computes the table again."""
    from importlib.metadata import PackageNotFoundError, version

    import dpokit

    root = Path(dpokit.__file__).parent
    digest = hashlib.sha256()
    for name in ("logps.py", "attention.py", "attention_flex.py", "data/collate.py",
                 "objectives/reference.py"):
        digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    for package in ("torch", "transformers"):
        try:
            digest.update(f"{package}={version(package)}\0".encode())
        except PackageNotFoundError:
            digest.update(f"{package}=none\0".encode())
    return digest.hexdigest()[:16]


def cache_key(weights_hash: str, pairs: Sequence[TokenizedPair], settings: dict) -> str:
    """Key of a reference log-prob cache: weights, every token id (the content digest of every
    pair's prompt, chosen and rejected ids, with their lengths: :mod:`dpokit.data.store`, read
    from an item store rather than recomputed), and the settings."""
    from dpokit.data.store import content_digest

    digest = hashlib.sha256(weights_hash.encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(content_digest(pairs, fields=("prompt_ids", "chosen_ids",
                                                "rejected_ids")).encode())
    return digest.hexdigest()[:32]


@torch.no_grad()
def compute_reference_table(reference: Reference, pairs: Sequence[TokenizedPair], *,
                            batch_size: int, pad_token_id: int, layout: str,
                            device: torch.device, rank: int = 0, world_size: int = 1,
                            progress: bool = False,
                            rows: Sequence[int] | None = None) -> Tensor:
    """``(N, 2)`` reference log-probs of the pairs at ``rows`` (None: every pair; the others are
    NaN, never read); ranks split the work, then all-reduce. The pairs of one prompt's k
    completions go through together (``batch_size`` then counts prompts), as in training.

    A batch that runs out of memory is retried at half the size, and the rest of the pass goes
    on at that size (logged): a row's log-probs do not depend on its batch (tested), so the
    table is the same. Out of memory at one unit a batch is raised, with that unit's pairs as
    its ``dpokit_items``."""
    from dpokit.data.batching import group_ids, unit_spans, units_of

    table = torch.zeros(len(pairs), 2, dtype=torch.float32)
    rows = list(range(len(pairs))) if rows is None else list(rows)
    groups = group_ids(pairs)
    mine = units_of(rows, groups if unit_spans(groups) else None)[rank::world_size]
    bar = tqdm(total=sum(map(len, mine)), unit="pair", desc="reference log-probs",
               disable=not progress)
    try:
        _fill_table(table, mine, pairs, reference, batch_size=batch_size,
                    pad_token_id=pad_token_id, layout=layout, device=device, bar=bar)
        failure = None
    except Exception as error:  # said by this rank once every rank knows (below)
        failure = error
    finally:
        bar.close()
    if world_size > 1:
        import torch.distributed as dist

        # one rank's failure stops every rank here, each with a line, not in the all-reduce
        failed = torch.tensor([float(rank + 1 if failure is not None else 0)], device=device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failure is None and failed.item():
            from dpokit.errors import DpokitError

            raise DpokitError(f"the reference pass failed on rank {int(failed.item()) - 1} "
                              f"(its message is above)")
        if failure is None:
            table = table.to(device)
            dist.all_reduce(table)  # each row was filled by exactly one rank
            table = table.cpu()
    if failure is not None:
        raise failure
    if len(rows) < len(pairs):
        unused = torch.ones(len(pairs), dtype=torch.bool)
        unused[rows] = False
        table[unused] = float("nan")
    return table


def _fill_table(table: Tensor, mine: list[list[int]], pairs: Sequence[TokenizedPair],
                reference: Reference, *, batch_size: int, pad_token_id: int, layout: str,
                device: torch.device, bar: Any) -> None:
    """:func:`compute_reference_table`'s pass over this rank's units ``mine``, into
    ``table``."""
    from dpokit.memory import is_out_of_memory, release_cached

    position, size = 0, batch_size
    while position < len(mine):
        units = mine[position:position + size]
        chunk = [i for unit in units for i in unit]
        items = [pairs[i] for i in chunk]
        if reference.ld_alpha is not None:  # LD-DPO weighs a completion by its partner
            items = [replace(p, group=-1) if p.group >= 0 else p for p in items]
        try:
            batch = collate_pairs(items, layout, pad_token_id=pad_token_id).to(device)
            chosen, rejected = reference.logps(batch)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            if len(units) == 1:
                error.dpokit_items = items  # the caller's one line names them
                raise
            size = len(units) // 2
        else:
            table[chunk, 0] = chosen.float().cpu()
            table[chunk, 1] = rejected.float().cpu()
            bar.update(len(chunk))
            position += len(units)
            continue
        batch = chosen = rejected = None  # (the failed batch's tensors, freed before retrying)
        release_cached(device)
        log.warning("reference log-probs: out of memory on %s at %d %s a batch; going on at %d "
                    "(the same log-probs: a row's do not depend on its batch)", device,
                    len(units), "prompts" if len(chunk) > len(units) else "pairs", size)


def read_table(cache_file: Path, rows: int, used: Sequence[int] | None = None) -> Tensor | None:
    """The cached ``(rows, 2)`` reference table, or None when there is none yet — or when the
    entry is unreadable, of the wrong shape or not finite at the ``used`` rows (None: all):
    then it is removed (with a warning naming it) so that it is rebuilt."""
    if not cache_file.is_file():
        return None
    try:
        table = load_file(str(cache_file))["ref_logps"]
        ok = tuple(table.shape) == (rows, 2) and bool(torch.isfinite(
            table if used is None else table[list(used)]).all())
        problem = None if ok else f"shape {tuple(table.shape)} or non-finite values"
    except Exception as error:  # a truncated or foreign file: safetensors raises its own types
        problem = f"{type(error).__name__}: {error}"
    if problem is None:
        return table
    log.warning("reference cache entry %s is corrupt (%s); removed, recomputing it",
                cache_file, problem)
    cache_file.unlink(missing_ok=True)
    return None


def write_table(cache_file: Path, table: Tensor) -> None:
    """Store a reference table atomically (temporary file, then rename)."""
    with atomic_path(cache_file) as tmp:
        save_file({"ref_logps": table.contiguous()}, str(tmp))
