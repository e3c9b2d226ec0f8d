"""Everything a run needs before its first step, built once into a :class:`Run`.

Order matters for memory: the data is read first, then a reference of its own is set up (and,
by default, its log-probs computed, cached and the model freed) before the policy loads, so the
two models never sit in memory together; with LoRA the reference is the policy with its adapters
off, set up after it. Then recomputation, LoRA, the DDP/FSDP wrapper, AdamW, the schedule, and —
when resuming — the checkpoint's weights, optimizer, schedule, RNG and unlogged metric sums.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpokit import memory
from dpokit.config import config_to_dict, write_config
from dpokit.data import rows_used
from dpokit.data.batching import Spans, group_ids, num_units, unit_spans
from dpokit.errors import DpokitError
from dpokit.logps import unwrap_model
from dpokit.models import (
    adapter_base,
    check_positions,
    group_rows_needed,
    load_adapter,
    load_causal_lm,
    load_tokenizer,
    nonfinite_parameter,
    position_limits,
    weights_dtype,
)
from dpokit.objectives import MetricSums, Objective, Reference
from dpokit.objectives.reference import (
    cache_key,
    compute_reference_table,
    hash_directory,
    logps_code_digest,
    read_table,
    write_table,
)
from dpokit.runtime import Runtime, seed_everything, set_rng_state
from dpokit.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    resolve_resume,
    set_aside_later,
)
from dpokit.train.config import TrainConfig
from dpokit.train.fingerprint import (
    ITEMS_DIGEST,
    check_length,
    check_same_run,
    legacy_items_identity,
    run_fingerprint,
)
from dpokit.train.recompute import (
    MEMORY_SHARE,
    auto_selective,
    enable_recompute,
    fit_memory,
    freed_bytes,
    kept_bytes,
    lm_head_scratch_bytes,
    supports_recompute,
    training_state_bytes,
)
from dpokit.train.records import MetricsLog, start_fresh, truncate_metrics
from dpokit.train.rundir import check_fresh, on_main
from dpokit.train.trackers import resolve_report_to, start_trackers

log = logging.getLogger("dpokit.train")


def _sample_reward(config: TrainConfig, objective: Objective) -> Any:
    """What scores ``eval_generate`` samples: the objective's reward, or ``reward`` loaded."""
    from dpokit.rewards import load_reward

    if not config.eval_generate or not config.reward:
        return None
    return objective.reward_fn or load_reward(config.reward)


@dataclass
class Run:
    """The state of one training run: what the loop reads and updates, in one place."""

    config: TrainConfig
    runtime: Runtime
    objective: Objective
    tokenizer: Any
    train_items: list
    eval_items: list
    model: nn.Module
    """The bare (possibly PEFT-wrapped) model: what is saved and clipped."""
    policy: nn.Module
    """``objective.policy(model)``, wrapped in DDP/FSDP under torchrun: what ``forward`` calls."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    window: MetricSums
    """Metric sums since the last log line (checkpointed, so a resume logs the same numbers)."""
    metrics: MetricsLog | None = None
    step: int = 0
    """Optimizer steps taken (the position in the data: batches follow from it)."""
    grad_norm: float = 0.0
    """Of the last step, before clipping."""
    learning_rate: float = 0.0
    """The rate the last step used (the scheduler has stepped past it): what is logged."""
    skipped_steps: int = 0
    """Steps skipped by the divergence guard (non-finite loss or gradient norm), in all."""
    nonfinite_in_row: int = 0
    """Non-finite steps since the last finite one."""
    sample_reward: Any = None
    """The reward of ``eval_generate`` samples (the objective's, or ``config.reward``'s)."""
    fingerprint: dict = field(default_factory=dict)
    """What determines the run (:mod:`dpokit.train.fingerprint`), stored in checkpoints."""
    window_start: float = field(default_factory=time.perf_counter)
    epoch_order: dict[int, list[list[int]]] = field(default_factory=dict)
    """The global batches of the current epoch."""
    recompute: str = "none"
    """The activation recomputation of the run: none, selective or full (:func:`plan_memory`)."""
    micro_batch: int = 1
    """Units (examples, or k-completion groups) a micro-batch: ``batch_size``, or less where the
    memory plan (:func:`plan_memory`) or the loop (when one runs out of memory) halved it and
    smaller ones give the same step."""
    eval_batch: int = 0
    """Units an evaluation batch: 0 until the first evaluation (then ``eval_batch_size``, or
    less where one ran out of memory and was halved)."""
    train_groups: Any = None
    """:func:`dpokit.data.batching.group_ids` of the training data, None without groups."""
    train_spans: Any = None
    """Its batching units (:func:`dpokit.data.batching.unit_spans`), None without groups."""

    @property
    def output_dir(self) -> Path:
        """The run directory."""
        return Path(self.config.output_dir)

    @property
    def sharded(self) -> bool:
        """FSDP under torchrun: checkpoints are written per rank."""
        return self.config.fsdp and self.runtime.distributed

    @property
    def checkpoint_model(self) -> nn.Module:
        """What checkpoints save: the FSDP module when sharded, else the bare model."""
        return self.policy if self.sharded else self.model


def setup_run(config: TrainConfig, runtime: Runtime, *, progress: bool) -> Run:
    """Run directory, data, reference, policy, optimisation and (when resuming) its state.

    Everything that can refuse the run — the directory (an earlier run in it, a corrupt
    checkpoint), the data, a resume of a different run — is checked before any weights load,
    and ``config.yaml`` is written only once the run is accepted."""
    output_dir = Path(config.output_dir)
    limits = position_limits(config)
    checkpoint = _decide(runtime, config)
    seed_everything(config.seed)

    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    objective = config.objective(tokenizer)
    bar = None if progress else False  # a tokenisation bar on a terminal, unless quiet
    train_items = objective.load(config.data, config.split, progress=bar)
    eval_items = (objective.load(config.eval_data, config.eval_split, progress=bar)
                  if config.eval_data else [])
    items = train_items + eval_items
    check_positions(items, limits, config.max_new_tokens, getattr(config, "layout", "padded"))
    global_batch = config.batch_size * config.gradient_accumulation_steps * runtime.world_size
    groups = group_ids(train_items)  # k completions per prompt: a prompt's pairs batch together
    spans = unit_spans(groups)
    steps_per_epoch = math.ceil(num_units(len(train_items), spans) / global_batch)
    total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * steps_per_epoch))
    fingerprint = run_fingerprint(config, train_items, autocast=runtime.dtype)
    start = 0
    if checkpoint is not None:
        start = check_resumable(checkpoint, config, runtime, fingerprint, steps_per_epoch,
                                total_steps, items=train_items)
    used = rows_used(len(train_items), global_batch, seed=config.seed, total_steps=total_steps,
                     start_step=start, spans=spans)  # the rows of the steps still to come
    on_main(runtime, lambda: write_config(config, output_dir / "config.yaml"))

    # A reference of its own is set up (and by default run and freed) before the policy loads;
    # with LoRA and no ref_model the reference is the policy with its adapters off — but not
    # when the model is an adapter: adapters off would be its base, not the model it starts from.
    base = adapter_base(config.model)
    adapters = (objective.needs_reference and config.lora and config.ref_model is None
                and base is None)
    shared: dict[str, nn.Module] = {}  # the reference pass's model, when it is the policy's
    if objective.needs_reference and not adapters:
        objective.reference = setup_reference(config, runtime, items, tokenizer.pad_token_id,
                                              progress=progress, rows=used,
                                              train_rows=len(train_items),
                                              share=shared if base is None else None)
    model = shared.pop("model", None) or load_causal_lm(
        base or config.model, dtype=config.dtype, device=runtime.device,
        trust_remote_code=config.trust_remote_code)
    recompute, micro_batch = plan_memory(config, model, objective, train_items, runtime,
                                         spans=spans, lora=config.lora or base is not None)
    enable_recompute(model, recompute)
    if base is not None:  # the adapter trains on, with its own r, alpha and targets
        model = load_adapter(model, config.model, trainable=True)
    elif config.lora:
        model = add_lora(model, config)
    disable_dropout(model, config)
    model.train()
    if adapters:
        objective.reference = setup_reference(config, runtime, items, tokenizer.pad_token_id,
                                              progress=progress, policy=model, rows=used,
                                              train_rows=len(train_items))

    policy = wrap(objective.policy(model), config, runtime)  # FSDP shards: optimizer after
    optimizer = build_optimizer(model, config, runtime)
    run = Run(config=config, runtime=runtime, objective=objective, tokenizer=tokenizer,
              train_items=train_items, eval_items=eval_items, model=model,
              policy=policy, optimizer=optimizer,
              scheduler=build_scheduler(optimizer, config, total_steps),
              # float16 on a GPU needs loss scaling against gradient underflow; else a no-op.
              scaler=torch.amp.GradScaler(runtime.device.type,
                                          enabled=runtime.dtype == "float16"),
              steps_per_epoch=steps_per_epoch, total_steps=total_steps,
              train_groups=None if spans is None else groups, train_spans=spans,
              global_batch=global_batch, window=MetricSums(objective.metric_keys),
              sample_reward=_sample_reward(config, objective), fingerprint=fingerprint,
              recompute=recompute, micro_batch=micro_batch)
    resume(run, checkpoint)
    trackers = start_trackers(
        resolve_report_to(config.report_to), output_dir, config=config_to_dict(config),
        run_name=config.run_name or output_dir.resolve().name,
        project=config.project) if runtime.is_main else []
    run.metrics = MetricsLog(output_dir, enabled=runtime.is_main, total_steps=total_steps,
                             step=run.step, progress=progress, trackers=trackers)
    run.window_start = time.perf_counter()
    return run


def preflight(config: TrainConfig, runtime: Runtime) -> None:
    """What can refuse the run before anything is written, even the run directory: flags the
    process layout contradicts, and ``max_length`` against the models' positions."""
    if config.fsdp and not runtime.distributed:
        raise DpokitError("fsdp shards the model over the processes of torchrun; this is one "
                          "process — run it under torchrun --nproc-per-node N, or drop fsdp")
    position_limits(config)
    check_precision(config)
    resolve_report_to(config.report_to)  # a tracker that is not installed


def check_precision(config: TrainConfig) -> None:
    """A full fine-tune in float16 weights is refused (its AdamW updates underflow, and loss
    scaling cannot unscale float16 gradients); in bfloat16 weights it is TRL's meaning of
    ``dtype: bfloat16``, said once with the float32-master alternative."""
    if config.lora or adapter_base(config.model) is not None:
        return  # the trained weights are the adapter's: float32 (peft upcasts them)
    dtype = weights_dtype(config.model, config.dtype)
    if dtype == "float16":
        raise DpokitError(f"dtype {config.dtype} loads {config.model} in float16 and a full "
                          f"fine-tune would train float16 weights (updates underflow, loss "
                          f"scaling cannot unscale them); use dtype: bfloat16, or dtype: float32 "
                          f"with fp16: true, or lora: true")
    if dtype == "bfloat16":
        log.warning("dtype %s: the weights train in bfloat16 (as TRL with dtype: bfloat16); "
                    "updates below bfloat16's resolution are lost — for float32 weights with "
                    "bfloat16 compute use dtype: float32 with bf16: true", config.dtype)


def _decide(runtime: Runtime, config: TrainConfig) -> Path | None:
    """The verified checkpoint to resume (every rank verifies its share of the files, so all
    agree), or None after rank 0 made sure a fresh run may use the directory."""
    output_dir = Path(config.output_dir)
    checkpoint = resolve_resume(config.resume, output_dir, rank=runtime.rank,
                                world_size=runtime.world_size, agree=runtime.all_ok)

    def directory() -> None:
        if checkpoint is None:
            check_fresh(output_dir, overwrite=config.overwrite,
                        resumable=bool(list_checkpoints(output_dir)),
                        redoable=config.resume == "auto")
            start_fresh(output_dir)
        elif checkpoint.resolve().parent != output_dir.resolve():
            # resuming another directory's checkpoint into this one: it must be fresh
            check_fresh(output_dir, overwrite=False, resumable=False)
            start_fresh(output_dir)

    on_main(runtime, directory)
    return checkpoint


def check_resumable(checkpoint: Path, config: TrainConfig, runtime: Runtime, fingerprint: dict,
                    steps_per_epoch: int, total_steps: int, *, items: Any = None) -> int:
    """The checks a resume passes before any weights load: the same processes and batches,
    the same run (fingerprint), a length the schedule allows. Returns the checkpoint's step.
    ``items``: the training items, for a checkpoint whose data digest is an older dpokit's."""
    state = read_trainer_state(checkpoint)
    recorded = state.get("fingerprint") or {}
    if items is not None and not str(recorded.get("data", ITEMS_DIGEST)).startswith(ITEMS_DIGEST):
        fingerprint = {**fingerprint, "data": legacy_items_identity(items)}

    def same(key: str, value: int) -> None:
        if state.get(key, value) != value:
            raise DpokitError(f"resume: {checkpoint} was written with {key}={state[key]}, "
                              f"this run has {value}; resume with the same number of "
                              f"processes, batch_size and gradient_accumulation_steps")

    # the process count first, then the run (its fingerprint names a changed data set or batch
    # setting), then the epoch's length they imply
    same("world_size", runtime.world_size)
    check_same_run(checkpoint, state.get("fingerprint"), fingerprint)
    same("steps_per_epoch", steps_per_epoch)
    check_length(checkpoint, state, config, total_steps)
    return state["global_step"]


def resume(run: Run, checkpoint: Path | None) -> None:
    """Restore ``checkpoint`` (verified by :func:`check_resumable`) into ``run``."""
    runtime, output_dir = run.runtime, run.output_dir
    if checkpoint is None:
        return
    state, rng = load_checkpoint(checkpoint, model=run.checkpoint_model, optimizer=run.optimizer,
                                 scheduler=run.scheduler, ref_model=run.objective.moving_weights,
                                 sharded=run.sharded, rank=runtime.rank)
    run.step = state["global_step"]
    run.skipped_steps = state.get("skipped_steps", 0)
    run.nonfinite_in_row = state.get("nonfinite_in_row", 0)
    bad = nonfinite_parameter(run.model)  # this rank's shard under FSDP: every rank decides
    if not runtime.all_ok(bad is None):
        which = f"parameter {bad}" if bad is not None else "another rank's shard: its line above"
        raise DpokitError(f"resume: {checkpoint} holds non-finite weights ({which}); it is "
                          f"corrupt — resume from an earlier checkpoint")
    if state.get("metric_window") is not None:
        run.window.load_state_dict(state["metric_window"], holds_sums=runtime.is_main)
    set_rng_state(rng)
    if state.get("grad_scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(state["grad_scaler"])
    if runtime.is_main:
        # the later checkpoints go aside only now: a checkpoint that fails to load (non-finite
        # weights, another model, out of memory) leaves them where --resume auto finds them
        if checkpoint.resolve().parent == output_dir.resolve():
            set_aside_later(output_dir, run.step)
        truncate_metrics(output_dir, run.step)
        log.warning("resumed from %s at step %d", checkpoint, run.step)


def plan_memory(config: TrainConfig, model: nn.Module, objective: Objective,
                items: list, runtime: Runtime, *, spans: Spans | None = None,
                lora: bool) -> tuple[str, int]:
    """The run's recomputation — ``full``, ``selective`` or ``none`` — and its micro-batch (units
    a forward), for a model already on its device.

    A micro-batch is ``batch_size`` units: items, or a prompt's k-completion pairs (``spans``,
    :func:`~dpokit.data.batching.unit_spans`). A null ``selective_checkpointing`` decides from
    time: on when it frees enough activations of a mean micro-batch
    (:func:`~dpokit.train.recompute.auto_selective`, against the trained weights' state; none
    with ``lora``: LoRA or an adapter trains on). A null ``gradient_checkpointing`` then decides
    from memory: the optimizer state still to allocate plus the activations and the LM head's
    scratch of the longest possible micro-batch (:func:`micro_batch_tokens`) must fit in
    :data:`~dpokit.train.recompute.MEMORY_SHARE` of the memory available on the device
    (:func:`~dpokit.memory.available_bytes`), else it recomputes more — selective (unless turned
    off), then whole layers (:func:`~dpokit.train.recompute.fit_memory`). When even the leanest
    allowed mode would not fit, the micro-batch is halved until it does (or is one unit) where
    gradient accumulation then gives the same step — offline data, no dropout, no loss that
    couples the micro-batch (:attr:`~dpokit.objectives.Objective.splittable`); every rank
    decides from the same all-reduced memory, so this holds under torchrun too. The numbers
    are the same in every mode and at every micro-batch; the log says what was chosen and
    why."""
    if config.gradient_checkpointing:
        return "full", config.batch_size
    selective = config.selective_checkpointing
    supported = supports_recompute(model)
    if selective is None and not supported:
        selective = False
    weights = next(model.parameters()).element_size()
    size = 2 if config.compute_dtype != "float32" else weights
    layout, flat = run_layout(config, model)
    pairs = len(items) > 0 and hasattr(items[0], "chosen_ids")
    if pairs and layout == "padded" and not flat:  # two rows a pair, each padded
        per_item = padded_pair_rows(items)
    else:
        per_item = item_tokens(objective, items)
    whole_rows = spans is not None and layout == "shared" and pairs
    if whole_rows:  # a group is one row: its prompt once, each distinct completion once
        per_item = group_rows_needed(items, np.asarray(per_item, dtype=np.int64))
    padded = not flat and layout != "packed"
    mean_tokens, largest_tokens = micro_batch_tokens(per_item, spans, config.batch_size,
                                                     padded=padded, whole_rows=whole_rows)
    state = training_state_bytes(model, lora=lora)
    if selective is None:
        freed = freed_bytes(model.config, mean_tokens, size, residual_bytes=weights)
        selective = auto_selective(freed, state)
        log.info("selective recomputation %s (auto: it would free ~%.0f MiB per micro-batch; "
                 "the trained weights' state is ~%.0f MiB)", "on" if selective else "off",
                 freed / 2**20, state / 2**20)
    preferred = "selective" if selective else "none"
    if not supported or not largest_tokens:
        return preferred, config.batch_size
    shards = runtime.world_size if config.fsdp else 1
    available = memory.available_bytes(runtime.device, local_ranks=memory.local_ranks())
    if available is not None and runtime.distributed:  # every rank decides the same
        available = int(runtime.all_reduce_min(torch.tensor(float(available),
                                                            dtype=torch.float64)).item())
    if available is not None and shards > 1:  # each rank's whole copy is sharded after this
        available += state // 4 * (shards - 1) // shards
    to_come = state * 3 // 4 // shards  # gradients and two AdamW moments; the weights are in

    def need(mode: str, tokens: int = largest_tokens) -> float:
        scratch = lm_head_scratch_bytes(model.config, tokens, config.chunk_size)
        return to_come + scratch + kept_bytes(model.config, tokens, size, mode,
                                              residual_bytes=weights)

    allowed = set() if config.gradient_checkpointing is False else {"full"}
    if config.selective_checkpointing is not False:
        allowed.add("selective")
    mode = fit_memory(preferred, allowed, need, available)
    if available is None:
        return mode, config.batch_size
    budget = MEMORY_SHARE * available
    micro, tokens = config.batch_size, largest_tokens
    splittable = config.disable_dropout and objective.splittable
    while need(mode, tokens) > budget and micro > 1 and splittable:
        micro //= 2
        tokens = micro_batch_tokens(per_item, spans, micro, padded=padded,
                                    whole_rows=whole_rows)[1]
    if not runtime.is_main:
        return mode, micro
    where = (f"the longest micro-batch's activations and LM-head scratch "
             f"(~{_gib(need(preferred) - to_come)}) and the optimizer state still to allocate "
             f"(~{_gib(to_come)}) against "
             f"{MEMORY_SHARE:.0%} of the {_gib(available)} available on {runtime.device}")
    if mode != preferred:
        keeps = ("gradient_checkpointing: false" if preferred == "selective" else
                 "gradient_checkpointing: false with selective_checkpointing: false")
        log.warning("recomputation %s instead of %s (auto, for memory: %s; now ~%s; %s keeps "
                    "%s)", mode, preferred, where, _gib(need(mode)), keeps, preferred)
    if micro < config.batch_size:
        log.warning("micro-batches of %d %s instead of batch_size %d (auto, for memory: "
                    "recomputation %s would need ~%s; now ~%s): gradient accumulation gives "
                    "the same step", micro, objective.unit, config.batch_size, mode,
                    _gib(need(mode)), _gib(need(mode, tokens)))
    if need(mode, tokens) > budget:
        log.warning("this run may not fit in memory (recomputation %s%s: ~%s needed, %s "
                    "available on %s); lower batch_size (raise gradient_accumulation_steps to "
                    "keep the batch) or max_length%s", mode,
                    f", micro-batches of {micro}" if micro < config.batch_size else "",
                    _gib(need(mode, tokens)), _gib(available), runtime.device,
                    "" if mode == "full" else ", or set gradient_checkpointing: true")
    return mode, micro


def run_layout(config: TrainConfig, model: nn.Module) -> tuple[str, bool]:
    """The layout the batches of ``model`` run in and whether the decoder sees only their real
    tokens — what :func:`dpokit.logps.completion_logps` does, not what the config asks for: a
    ``packed``/``shared`` batch of a family it has not checked runs padded
    (:func:`~dpokit.logps.takes_layout`), and ``unpadded`` flattens only the SDPA models of
    :data:`~dpokit.attention.UNPADDED_MODEL_TYPES` (switched here as the first forward would)."""
    from dpokit.attention import enable_segment_attention
    from dpokit.logps import takes_layout

    base = unwrap_model(model)
    layout = getattr(config, "layout", None) or ("packed" if getattr(config, "padding_free",
                                                                      False) else "padded")
    if layout != "padded" and not takes_layout(base, layout):
        layout = "padded"
    flat = bool(getattr(config, "unpadded", False)) and enable_segment_attention(base)
    return layout, flat


def padded_pair_rows(items: Sequence) -> np.ndarray:
    """Tokens of each pair in the padded layout: two rows (prompt + chosen, prompt +
    rejected), both padded to the longer, ``2 · (p + max(c, r))`` — from the stored lengths
    for an item store."""
    from dpokit.data.store import lengths

    completions = np.maximum(lengths(items, "chosen_ids"), lengths(items, "rejected_ids"))
    return 2 * (lengths(items, "prompt_ids") + completions)


def micro_batch_tokens(per_item: Sequence[int], spans: Spans | None, batch_size: int, *,
                       padded: bool, whole_rows: bool = False) -> tuple[float, int]:
    """(mean, largest possible) tokens of a micro-batch of ``batch_size`` units — items, or a
    prompt's group of pairs (``spans``). A unit's tokens are its items' sum, or with
    ``whole_rows`` (each item's value is already its group's whole row,
    :func:`~dpokit.models.group_rows_needed`) that row's. The largest: the ``batch_size``
    longest units together in the unpadded layout; ``batch_size`` × the longest when every row
    is padded to it."""
    per_unit = np.asarray(per_item, dtype=np.int64)
    if spans is not None and len(per_unit):
        starts = [start for start, _ in spans]
        per_unit = (np.maximum if whole_rows else np.add).reduceat(per_unit, starts)
    if not len(per_unit):
        return 0.0, 0
    mean = batch_size * float(per_unit.mean())
    if padded:
        return mean, batch_size * int(per_unit.max())
    k = min(batch_size, len(per_unit))
    return mean, int(np.partition(per_unit, len(per_unit) - k)[len(per_unit) - k:].sum())


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def item_tokens(objective: Objective, items: Any) -> Sequence[int]:
    """``objective.tokens(item)`` of every item; for an item store, from its stored lengths
    without building the items: ``tokens`` is affine in the lengths of the token-id fields (a
    pair's prompt once or twice and its completions; an SFT prompt and completion), so its
    coefficients are read off items whose fields hold 0 or 1 token, and checked on the first,
    last and longest items (any other ``tokens`` is counted item by item)."""
    import dataclasses

    from dpokit.data.store import ItemChain, ItemStore, field_kinds, lengths

    if not isinstance(items, ItemStore | ItemChain) or not len(items):
        return [objective.tokens(item) for item in items]
    names = [n for n, kind in field_kinds(type(items[0])).items() if kind == "ids"]
    empty = dataclasses.replace(items[0], **{n: [] for n in names})
    try:
        base = objective.tokens(empty)
        predicted = base + sum((objective.tokens(dataclasses.replace(empty, **{n: [0]})) - base)
                               * lengths(items, n) for n in names)
    except Exception:  # a tokens() that needs real items
        return [objective.tokens(item) for item in items]
    for i in {0, len(items) - 1, int(predicted.argmax())}:
        if objective.tokens(items[i]) != predicted[i]:
            return [objective.tokens(item) for item in items]
    return predicted


def disable_dropout(model: nn.Module, config: TrainConfig) -> None:
    """With ``disable_dropout``, every dropout of the policy (LoRA's included) gets p = 0, so a
    training forward equals an eval-mode one.

    TRL 1.16's ``disable_dropout_in_model`` (trl/trainer/utils.py:194-197), applied by
    DPOTrainer after PEFT wrapping (trl/trainer/dpo_trainer.py:664, 932-935), sets ``p = 0`` on
    every ``nn.Dropout`` — peft's ``lora_dropout`` modules included. Beyond it, float dropout
    attributes are zeroed too (Llama and Qwen attention read ``self.attention_dropout``, a float,
    which TRL leaves active). The reference needs nothing: it always runs in eval mode."""
    if not config.disable_dropout:
        return
    if config.lora and config.lora_dropout:
        log.warning("lora_dropout %s is off under disable_dropout (as in TRL); set "
                    "disable_dropout: false to train with it", config.lora_dropout)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def add_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    """``model`` with LoRA adapters (peft) on ``lora_target_modules``; only they train."""
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, task_type="CAUSAL_LM",
                      target_modules="all-linear" if targets == ["all-linear"] else targets)
    try:
        return get_peft_model(model, lora)
    except ValueError as error:  # e.g. target modules not found in the model
        raise DpokitError(f"lora: {str(error).splitlines()[0]}") from None


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of ``model``'s buffers (rotary frequencies and the like: small)."""
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers()}


def setup_reference(config: Any, runtime: Runtime, items: list, pad_token_id: int, *,
                    progress: bool, policy: nn.Module | None = None,
                    rows: list[int] | None = None, train_rows: int = 0,
                    share: dict[str, nn.Module] | None = None) -> Reference:
    """π_ref for a DPO config: the policy with adapters off (LoRA, ``policy`` given), or a
    model of its own (a PEFT adapter: its base with it merged) — by default run once over
    ``items`` into a cached table and freed. The model of its own is loaded only when a table
    is computed (a cached one needs no weights).
    ``rows``: the training rows (of the first ``train_rows`` items) the run uses, when not all
    of them (a short ``max_steps``); the evaluation items after them are always computed.
    ``share``: where the reference is the model the policy starts from (no ``ref_model`` of
    another directory), the model loaded for the pass is left in ``share["model"]`` instead of
    freed, for the policy to start from — one load of the weights, not two (the same tensors:
    a forward without gradients changes no parameter; a model whose buffers the pass changed,
    dynamic rotary scaling, is freed and loaded again).

    The cache lives beside the run directory (``../.dpokit_cache``), keyed by the reference
    weights, every token id and the settings that change the numbers.
    """
    common = {"chunk_size": config.chunk_size, "ld_alpha": config.ld_alpha,
              "autocast": runtime.autocast, "unpadded": config.unpadded}
    if policy is not None:
        reference = Reference("adapters", model=policy, **common)
        ref_dir = config.model
    else:
        ref_dir = config.ref_model or config.model
        sync = config.ref_model_sync_steps if config.sync_ref_model else None
        reference = Reference("model", sync_steps=sync, sync_alpha=config.ref_model_mixup_alpha,
                              **common)
    if policy is None and share is not None and config.precompute and ref_dir == config.model:
        keep = share
    else:
        keep = None
    loaded: dict[str, torch.Tensor] = {}  # the buffers as loaded, when the model may be kept

    def load_reference() -> None:
        if reference.model is not None:
            return
        reference.model = load_causal_lm(ref_dir, dtype=config.dtype, device=runtime.device,
                                         trust_remote_code=config.trust_remote_code,
                                         what="reference model")
        if keep is not None:
            loaded.update(_buffers(reference.model))
        else:
            reference.model.requires_grad_(False)

    if not config.precompute:
        load_reference()
        return reference
    settings = {"ld_alpha": config.ld_alpha, "dtype": weights_dtype(ref_dir, config.dtype),
                "autocast": runtime.dtype,
                # another device rounds differently (and on a GPU runs other attention kernels)
                "device": runtime.device.type,
                "layout": config.layout, "chunk_size": config.chunk_size,
                "unpadded": config.unpadded, "mode": reference.mode, "code": logps_code_digest()}
    train_rows = train_rows or len(items)
    cache_dir = config.cache_dir
    hashed = hash_directory(ref_dir, cache_dir / "digests")
    # the training rows and the evaluation rows are two entries: changing eval_data (or its
    # split) does not recompute the training rows' pass
    parts = [("training", items[:train_rows], rows), ("evaluation", items[train_rows:], None)]
    tables = []
    for what, part, used in parts:
        if not part:
            continue
        part_settings = dict(settings)
        if used is not None and len(used) < len(part):
            part_settings["rows"] = hashlib.sha256(json.dumps(list(used)).encode()).hexdigest()[:16]
            log.info("reference pass over the %d of %d %s examples this run uses", len(used),
                     len(part), what)
        else:
            used = None
        cache_file = cache_dir / f"{cache_key(hashed, part, part_settings)}.safetensors"
        table = read_table(cache_file, len(part), used)
        # one decision for every rank (another job may write the file between their reads):
        # the pass is a collective
        cached = runtime.all_ok(table is not None)
        if not cached:
            load_reference()
            batch_size = config.precompute_ref_batch_size or 2 * config.batch_size
            try:
                table = compute_reference_table(
                    reference, part, batch_size=batch_size, pad_token_id=pad_token_id,
                    layout=config.layout, device=runtime.device, rank=runtime.rank,
                    world_size=runtime.world_size, progress=progress and runtime.is_main,
                    rows=used)
            except Exception as error:
                if not memory.is_out_of_memory(error):
                    raise
                unit, which = "example", ""
                failed = getattr(error, "dpokit_items", None)
                if failed:
                    first = failed[0]
                    unit = "prompt's pairs" if len(failed) > 1 else "example"
                    tokens = sum(len(x.prompt_ids) + len(x.chosen_ids) + len(x.rejected_ids)
                                 for x in failed)
                    where = (f"{first.source}, row {first.row}" if getattr(first, "source", "")
                             else f"{what} example")
                    which = f": {where}, {len(failed)} pair(s), {tokens} tokens"
                raise DpokitError(
                    f"reference pass over the {what} examples: out of memory on "
                    f"{runtime.device}{memory.shortage(error)} even at one {unit} a batch "
                    f"(halved from precompute_ref_batch_size {batch_size}{which}): the "
                    f"reference model with one {unit}'s activations does not fit — lower "
                    f"max_length, or load the weights in bfloat16 (dtype: bfloat16)") from None
            computed = table if used is None else table[list(used)]
            if not bool(torch.isfinite(computed).all()):
                bad = int((~torch.isfinite(computed)).any(-1).nonzero()[0])
                row = bad if used is None else list(used)[bad]
                raise DpokitError(f"reference log-probs are not finite ({what} example "
                                  f"{row + 1} of {len(part)}); the reference model {ref_dir} "
                                  f"is broken")
            on_main(runtime, functools.partial(_store_table, cache_file, table))
        log.info("reference log-probs of the %s examples %s %s", what,
                 "loaded from" if cached else "computed into", cache_file)
        tables.append(table)
    table = torch.cat(tables)
    if reference.mode == "model" and reference.model is not None:
        model, reference.model = reference.model, None  # never kept as a reference in training
        after = _buffers(model)
        if keep is not None and after.keys() == loaded.keys() and all(
                torch.equal(after[name], loaded[name]) for name in after):
            keep["model"] = model  # the policy starts from it (setup_run)
        del model
        gc.collect()
    return Reference("precomputed", table=table, **common)


def _store_table(cache_file: Path, table: torch.Tensor) -> None:
    """Cache a reference table; one that cannot be written (a full disk, a file where the
    cache directory should be) only warns: the run has its table."""
    try:
        write_table(cache_file, table)
    except DpokitError as error:
        log.warning("could not cache the reference log-probs (%s); training on them without "
                    "caching them", error)


def fsdp_mixed_precision(config: TrainConfig) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for ``bf16: true`` on float32 weights: the shards stay
    float32 (the optimizer's master weights), each layer is all-gathered and computed in
    bfloat16 — half the gather traffic and memory of autocast around float32 shards — and
    gradients are reduce-scattered in float32 (PyTorch's FSDP2 docs, ``fully_shard(mp_policy=
    MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))``). None
    otherwise: float32 runs, weights loaded in bf16 (already half), and fp16 (its GradScaler
    unscales float32 gradients under autocast)."""
    if not (config.bf16 and config.dtype == "float32"):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def wrap(module: nn.Module, config: TrainConfig, runtime: Runtime) -> nn.Module:
    """DDP (or FSDP2 with ``fsdp``) under torchrun; the bare module in one process."""
    if not runtime.distributed:
        return module
    if config.fsdp:
        from torch.distributed.fsdp import fully_shard

        policy = fsdp_mixed_precision(config)
        extra = {} if policy is None else {"mp_policy": policy}
        decoder = unwrap_model(module.model).get_decoder()
        for layer in getattr(decoder, "layers", getattr(decoder, "h", [])):
            fully_shard(layer, **extra)
        fully_shard(module, **extra)
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # gradients as views into DDP's all-reduce buckets: no second copy of every gradient
    return DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True,
                                   find_unused_parameters=bool(config.ddp_find_unused_parameters))


NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                     r"_norm(?:$|\.)")
"""transformers 5's ``Trainer.get_decay_parameter_names`` patterns (lower-cased names)."""


def build_optimizer(model: nn.Module, config: TrainConfig,
                    runtime: Runtime) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights — transformers' Trainer's rule
    (``Trainer.get_decay_parameter_names``: parameters of ``nn.LayerNorm`` modules and names
    matching :data:`NO_DECAY_PATTERNS`), so a TRL user's ``weight_decay`` decays the same
    tensors (a rule by dimension decayed Cohere's 2-D q/k norms).

    The fused kernel on CPU and CUDA (one pass over the parameters instead of a dozen
    ``foreach`` passes with parameter-sized temporaries: 6 ms against 41 ms per step for the
    benchmark's 26 M parameters on 2 CPU threads); ``foreach`` for FSDP's sharded tensors."""
    from transformers.trainer_pt_utils import get_parameter_names

    decayed = set(get_parameter_names(model, [nn.LayerNorm], list(NO_DECAY_PATTERNS)))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if n in decayed]
    no_decay = [p for n, p in named if n not in decayed]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = runtime.device.type in ("cuda", "cpu") and not config.fsdp
    return torch.optim.AdamW(groups, lr=config.learning_rate,
                             betas=(config.adam_beta1, config.adam_beta2),
                             eps=config.adam_epsilon, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Linear warmup, then constant, linear or cosine decay (``transformers.get_scheduler``)."""
    from transformers import get_scheduler

    warmup = config.warmup(total_steps)
    name = {"constant": "constant_with_warmup", "linear": "linear",
            "cosine": "cosine"}[config.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)
