"""Evaluation: an objective run without backward — ``dpokit eval`` and in-training evaluation.

    result = evaluate(objective, objective.policy(model), items, batch_size=8, runtime=runtime)
    result.metrics   # objective.means(...) of sums reduced over every batch and rank

Because it is the same :meth:`~dpokit.objectives.Objective.forward` that training calls, it
applies weights, margins, ld_alpha, WPO and every layout exactly as a training step does: on the
initial model, ``dpokit eval``'s loss equals the loss training logs at step 1 when that step's
batch is the whole data set (training disables dropout by default, as TRL does). Sums and
counts are reduced over batches (and ranks), then divided once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dpokit.data import micro_batches
from dpokit.data.batching import group_ids, unit_spans, units_of
from dpokit.errors import DpokitError
from dpokit.eval_config import EvalConfig, GenerateConfig, check_not_existing
from dpokit.memory import is_out_of_memory, release_cached, shortage, tune_allocator
from dpokit.objectives import MetricSums, Objective
from dpokit.runtime import Runtime

log = logging.getLogger("dpokit.eval")


@dataclass
class Evaluation:
    """Means over the data, and (when asked) one record per example."""

    metrics: dict[str, float]
    num_examples: int
    per_example: list[dict[str, Any]] = field(default_factory=list)
    is_main: bool = True
    """Whether this process is rank 0 (the one that writes and prints under torchrun)."""
    batch_size: int = 0
    """The units a batch it ended at: the ``batch_size`` asked for, or less where a batch ran
    out of memory and was halved (the next evaluation of a training run starts there)."""


class EvaluationOutOfMemory(DpokitError):
    """A batch of one unit (or one that could not be cut) ran out of memory: the one-line
    reason, naming the batch; training adds its step and its last checkpoint."""


def _records(items: Sequence[Any], examples: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """One JSON-ready dict per item: where it came from, then every per-example value."""
    columns = {k: v.detach().cpu() for k, v in examples.items()}
    records = []
    for i, item in enumerate(items):
        record = {"source": getattr(item, "source", ""), "row": getattr(item, "row", i)}
        for key, values in columns.items():
            value = values[i]
            record[key] = int(value) if not value.is_floating_point() else float(value)
        records.append(record)
    return records


@torch.no_grad()
def evaluate(objective: Objective, policy: nn.Module, items: Sequence[Any], *, batch_size: int,
             runtime: Runtime, offset: int = 0, per_example: bool = False,
             progress: bool = False, model: nn.Module | None = None,
             step: int = 0, finite: bool = False,
             batch_key: str = "per_device_eval_batch_size") -> Evaluation:
    """Loss and metrics of ``objective`` over ``items`` (sharded by rank, reduced as sums).

    ``offset`` is where ``items`` start among the examples the reference table was computed on
    (evaluation pairs follow the training pairs). With the bare ``model``, each batch first goes
    through :meth:`~dpokit.objectives.Objective.prepare` at ``step``, so on-policy DPO evaluates
    on pairs the current policy generates for the evaluation prompts (seeded by the step and
    their positions, so a resumed run evaluates the same). Every rank runs the same number of
    batches, padding with zero-weight ones, so DDP and FSDP collectives stay in step.
    ``per_example`` keeps one record per item, in data order (gathered from every rank under
    torchrun). In one process on offline data a batch that runs out of memory is halved and
    the evaluation goes on at that size (the same sums: each example is scored on its own;
    :attr:`Evaluation.batch_size` says where it ended); at one unit, or where the ranks or
    generation would have to agree, it is :class:`EvaluationOutOfMemory`'s one line (naming
    ``batch_key``, the key that sets ``batch_size`` in the caller's config).
    ``finite``: a NaN or ±inf per-example value (a model whose logits overflow) is a one-line
    :class:`~dpokit.errors.DpokitError` naming the first such row and value, on every rank,
    instead of means that are NaN (``dpokit eval``; training logs them as null).
    """
    was_training = policy.training
    policy.eval()
    sums = MetricSums(objective.metric_keys)
    records: list[dict[str, Any]] = []
    groups = group_ids(items)  # a prompt's pairs evaluate together (k completions)
    groups = groups if unit_spans(groups) else None
    batches = micro_batches(list(range(len(items))), batch_size, runtime.rank,
                            runtime.world_size, groups)
    # one process, offline data: a batch that does not fit is halved, the sums are the same
    can_split = not runtime.distributed and objective.splittable
    bar = tqdm(total=len(items), unit=objective.unit[:-1], desc="evaluating",
               disable=not progress)
    first_bad: str | None = None  # the first non-finite per-example value, where and what
    i = 0
    try:
        while i < len(batches):
            indices, weight = batches[i]
            chunk = [items[j] for j in indices]
            try:
                out, chunk = _evaluate_batch(objective, policy, chunk, indices, offset=offset,
                                             runtime=runtime, model=model, step=step)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                units = len(units_of(indices, groups))
                if not can_split or units == 1:
                    raise EvaluationOutOfMemory(
                        f"evaluation: out of memory on {runtime.device}{shortage(error)} in a "
                        f"batch of {objective.describe(chunk)}: lower {batch_key} or "
                        f"max_length") from None
                batch_size = units // 2
                release_cached(runtime.device)
                log.warning("evaluation: out of memory at %d %s a batch; going on at %d (the "
                            "same sums)", units, objective.unit, batch_size)
                rest = [j for part, _ in batches[i:] for j in part]
                batches[i:] = micro_batches(rest, batch_size, 0, 1, groups)
                continue
            if weight:
                if finite and first_bad is None:
                    first_bad = _nonfinite(chunk, out.examples)
                sums.add(out.sums)
                if per_example:
                    records += _records(chunk, out.examples)
                bar.update(len(indices))
            i += 1
    finally:
        bar.close()
        policy.train(was_training)
    reduced = sums.reduce(runtime.all_reduce_sum)
    if finite:
        means = objective.means(reduced)
        bad_means = [k for k, v in means.items() if not math.isfinite(v)]
        if not runtime.all_ok(first_bad is None) or bad_means:  # the same answer on every rank
            where = first_bad or (f"{bad_means[0]} = {means[bad_means[0]]}"
                                  if bad_means else "another rank's share")
            raise DpokitError(f"evaluation: a non-finite value ({where}): the model's "
                              f"log-probs overflow (its weights or dtype); no result is "
                              f"written")
    if per_example and runtime.distributed:  # ranks hold contiguous shares, in rank order
        import torch.distributed as dist

        shares: list[Any] = [None] * runtime.world_size
        dist.all_gather_object(shares, records)
        records = [record for share in shares for record in share]
    return Evaluation(objective.means(reduced), int(reduced["count"]), records,
                      is_main=runtime.is_main, batch_size=batch_size)


def _nonfinite(chunk: Sequence[Any], examples: dict[str, torch.Tensor]) -> str | None:
    """``FILE, row N: KEY = VALUE`` of the first non-finite per-example value, or None."""
    found = None  # (position in the chunk, key)
    for key, values in examples.items():
        if values.is_floating_point():
            bad = (~torch.isfinite(values.detach())).nonzero()
            if len(bad) and (found is None or int(bad[0]) < found[0]):
                found = (int(bad[0]), key)
    if found is None:
        return None
    i, key = found
    item = chunk[i]
    return (f"{getattr(item, 'source', '')}, row {getattr(item, 'row', i)}: {key} = "
            f"{float(examples[key][i])}")


def check_vocabulary(items: Sequence[Any], tokenizer: Any, models: Sequence[tuple[str, Any]],
                     tokenizer_dir: str) -> None:
    """Every token id of ``items`` (and the pad id) must have a row in each model's input
    embedding: a model saved with another tokenizer would fail with an ``IndexError`` (on a GPU,
    a device-side assert). ``models``: ``(name for the message, model)``. The items are read
    only when the tokenizer can make an id past an embedding."""
    vocabulary = tokenizer.get_vocab()
    largest = max(vocabulary.values(), default=-1)
    pad = tokenizer.pad_token_id
    for what, model in models:
        size = model.get_input_embeddings().num_embeddings
        if max(largest, -1 if pad is None else pad) < size:
            continue
        for item in items:
            ids = [t for name in ("prompt_ids", "chosen_ids", "rejected_ids")
                   for t in getattr(item, name, ())]
            if ids and max(ids) >= size:
                raise DpokitError(
                    f"{item.source}, row {item.row}: token id {max(ids)} has no embedding in "
                    f"{what} ({size} rows); it was not trained with the tokenizer of "
                    f"{tokenizer_dir} ({len(vocabulary)} tokens)")
        if pad is not None and pad >= size:
            raise DpokitError(f"the pad token id {pad} of the tokenizer of {tokenizer_dir} has no "
                              f"embedding in {what} ({size} rows); it was not trained with "
                              f"that tokenizer")


def _evaluate_batch(objective: Objective, policy: nn.Module, chunk: list, indices: list[int], *,
                    offset: int, runtime: Runtime, model: nn.Module | None, step: int):
    """One batch's :class:`~dpokit.objectives.Output` and the examples it scored (on-policy:
    the pairs generated for ``chunk``)."""
    positions = [offset + j for j in indices]
    with runtime.autocast():  # on-policy samples in the precision scored in
        if model is not None:
            chunk = objective.prepare(model, chunk, positions, step)
        batch = objective.collate(chunk, positions).to(runtime.device)
        return objective.forward(policy, batch), chunk


def check_data_exists(data: str) -> None:
    """Refuse a data path that is neither a file/directory nor a cached dataset repository,
    before the runtime (and any model) is set up."""
    from dpokit.hub import locate

    if not locate(data, repo_type="dataset").exists():
        from dpokit.data.io import iter_rows

        next(iter_rows(data), None)  # raises the reader's one-line message
        raise DpokitError(f"data not found: {data}")


def run_eval(config: EvalConfig, *, progress: bool = True) -> Evaluation:
    """Load the policy (and reference), read the pairs, :func:`evaluate`, write per-example
    (one process, or every rank of ``torchrun``: rank 0 writes)."""
    from dpokit.atomic import check_writable
    from dpokit.runtime import setup_runtime, shutdown_runtime

    check_data_exists(config.data)
    if config.per_example is not None:  # refused now, not after the whole evaluation
        check_writable(config.per_example, "per_example")
        check_not_existing(config.per_example, "per_example", config.overwrite)
    tune_allocator()
    runtime = setup_runtime(config.device, config.compute_dtype)
    try:
        return _run_eval(config, runtime, progress=progress)
    finally:
        shutdown_runtime(runtime)


def _run_eval(config: EvalConfig, runtime: Runtime, *, progress: bool) -> Evaluation:
    """:func:`run_eval` once the runtime is up."""
    from dpokit.atomic import write_jsonl
    from dpokit.models import check_positions, load_causal_lm, load_tokenizer, position_limits
    from dpokit.objectives import DPOObjective, Reference

    limits = position_limits(config)  # the data and the models' positions before any weights
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    objective = DPOObjective(config, tokenizer, Reference("none"), score_only=True)
    pairs = objective.load(config.data, config.split)
    check_positions(pairs, limits, 0, config.layout)
    model = load_causal_lm(config.model, dtype=config.dtype, device=runtime.device,
                           trust_remote_code=config.trust_remote_code)
    reference = Reference("none")
    if config.ref_model is not None and config.needs_reference:
        ref_model = load_causal_lm(config.ref_model, dtype=config.dtype, device=runtime.device,
                                   trust_remote_code=config.trust_remote_code,
                                   what="reference model")
        reference = Reference("model", model=ref_model, chunk_size=config.chunk_size,
                              ld_alpha=config.ld_alpha, autocast=runtime.autocast,
                              unpadded=config.unpadded)
    objective.reference = reference
    check_vocabulary(pairs, tokenizer, [(f"model {config.model}", model)] + (
        [(f"ref_model {config.ref_model}", reference.model)] if reference.mode == "model"
        else []), str(config.model))
    model.eval()
    result = evaluate(objective, objective.policy(model), pairs, batch_size=config.batch_size,
                      runtime=runtime, per_example=config.per_example is not None,
                      progress=progress and runtime.is_main, finite=True,
                      batch_key="batch_size")
    if config.per_example is not None and runtime.is_main:
        write_jsonl(config.per_example, result.per_example)  # OS errors: one line naming it
    return result


def run_generate(config: GenerateConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Generate and write ``config.output`` atomically; returns the records written."""
    from dpokit.atomic import check_writable, write_jsonl
    from dpokit.data import TokenizeSettings
    from dpokit.data.prompts import load_prompts
    from dpokit.generation import completion_records, generate_completions
    from dpokit.models import check_positions, load_causal_lm, load_tokenizer, position_limit
    from dpokit.runtime import setup_runtime, shutdown_runtime

    check_data_exists(config.data)
    check_writable(config.output)  # refused now, not after generating everything
    check_not_existing(config.output, "output", config.overwrite)
    tune_allocator()
    runtime = setup_runtime(config.device, config.compute_dtype)
    try:
        tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        settings = TokenizeSettings(max_length=None, max_prompt_length=config.max_prompt_length,
                                    text_mode=config.text_mode,
                                    max_row_chars=config.max_row_chars)
        prompts = load_prompts(config.data, tokenizer, settings=settings,
                               prompt_column=config.prompt_column, split=config.split)
        # a prompt and max_new_tokens past the model's positions: GPT-2 would fail with an
        # IndexError, Llama run past them silently — refused before any weights load
        limit = position_limit(config.model)
        if limit is not None:
            check_positions(prompts, [(*limit, str(config.model), False)],
                            config.max_new_tokens)
        reward = None
        if config.reward:  # a typo is refused now, not after generating everything
            from dpokit.rewards import load_reward, score_groups

            reward = load_reward(config.reward)
        model = load_causal_lm(config.model, dtype=config.dtype, device=runtime.device,
                               trust_remote_code=config.trust_remote_code)
        check_vocabulary(prompts, tokenizer, [(f"model {config.model}", model)], str(config.model))
        with runtime.autocast():
            completions = generate_completions(
                model, tokenizer, prompts, num_generations=config.num_generations,
                seed=config.seed, batch_size=config.batch_size, **config.sampling)
        records = completion_records(prompts, completions)
        if reward is not None:
            values = score_groups(reward, config.reward, [p.prompt for p in prompts],
                                  completions, step=0, device=runtime.device,
                                  rows=[p.where for p in prompts],
                                  columns=[p.columns for p in prompts])
            for record, value in zip(records, values, strict=True):
                record["reward"] = value
        write_jsonl(config.output, records)  # OS errors: one line naming it
        return records
    finally:
        shutdown_runtime(runtime)
