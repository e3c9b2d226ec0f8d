"""The training loop of ``dpokit sft`` and ``dpokit train`` — one function, top to bottom.

    python -m dpokit train --config dpo.yaml                         # one process
    torchrun --nproc-per-node 4 -m dpokit train --config dpo.yaml    # DDP (FSDP with --fsdp)

setup (runtime, data, model, reference, optimizer, resume) → steps → final save. Every optimizer
step takes one global batch of ``batch_size × gradient_accumulation_steps × world_size`` examples
(a seeded permutation per epoch, so the position in the data is just the step number); each rank
backpropagates SUM(losses) × world_size / |global batch| per micro-batch, so accumulation and
ranks give the gradient of the mean over the global batch, exactly.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpokit.config import write_config
from dpokit.data import epoch_batches, shard_for_rank
from dpokit.errors import DpokitError
from dpokit.logps import unwrap_model
from dpokit.losses import metric_means, needs_reference
from dpokit.models import load_causal_lm, load_tokenizer
from dpokit.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from dpokit.train.config import DPOConfig, SFTConfig, TrainConfig
from dpokit.train.objectives import DPOObjective, LogpsModule, SFTObjective, metric_names
from dpokit.train.recompute import (
    AUTO_MIN_FREED_BYTES,
    enable_recompute,
    freed_bytes,
    supports_recompute,
)
from dpokit.train.reference import (
    Reference,
    cache_key,
    compute_reference_table,
    hash_directory,
    read_table,
    write_table,
)
from dpokit.train.runtime import (
    Runtime,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_runtime,
    shutdown_runtime,
)

log = logging.getLogger("dpokit.train")


@dataclass(frozen=True)
class Probe:
    """A measurement of the policy every ``every`` optimizer steps (and after the last one).

    ``fn(model, step)`` gets the bare ``transformers`` model (eval mode, no gradients) on every
    rank and returns a dict of numbers, which rank 0 appends to ``metrics.jsonl`` under
    ``probe/…`` keys. The demo uses it to measure KL(π_θ‖π*) exactly during training.
    """

    every: int
    fn: Callable[[nn.Module, int], dict]


def train(config: TrainConfig, *, progress: bool = True, probe: Probe | None = None) -> Path:
    """Run SFT (``SFTConfig``) or DPO (``DPOConfig``); return the final model directory."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    runtime = setup_runtime(config.device, config.dtype)
    try:
        return _train(config, runtime, progress=progress, probe=probe)
    finally:
        for sig, handler in handlers.items():  # even when training raised
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        shutdown_runtime(runtime)


def _train(config: TrainConfig, runtime: Runtime, *, progress: bool,
           probe: Probe | None = None) -> Path:
    # ------------------------------------------------------------------ setup: run directory
    output_dir = Path(config.output_dir)
    if runtime.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_config(config, output_dir / "config.yaml")
    runtime.barrier()
    seed_everything(config.seed)

    # ------------------------------------------------------------------ setup: data
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    is_dpo = isinstance(config, DPOConfig)
    train_items, eval_items = _load_data(config, tokenizer, is_dpo)

    # ------------------------------------------------------------------ setup: reference
    # A reference of its own is set up (and, by default, its pass run and freed) before the
    # policy is loaded, so the two models never sit in memory together.
    reference = None
    if is_dpo and not (config.lora and config.ref_model is None):
        reference = _setup_reference(config, None, train_items + eval_items, tokenizer,
                                     runtime, progress)

    # ------------------------------------------------------------------ setup: policy
    model = load_causal_lm(config.model, dtype="float32", device=runtime.device,
                           trust_remote_code=config.trust_remote_code)
    enable_recompute(model, _recompute_mode(config, model, train_items, is_dpo))
    if config.lora:
        model = _add_lora(model, config)
    model.train()

    if is_dpo and reference is None:  # LoRA: the reference is this model, adapters off
        reference = _setup_reference(config, model, train_items + eval_items, tokenizer,
                                     runtime, progress)
    objective = (DPOObjective(config, reference, tokenizer.pad_token_id) if is_dpo
                 else SFTObjective(config, tokenizer.pad_token_id))
    policy = _wrap(LogpsModule(model, chunk_size=config.chunk_size,
                               ld_alpha=getattr(config, "ld_alpha", None),
                               wpo=getattr(config, "use_weighting", False),
                               unpadded=config.unpadded), config, runtime)

    # ------------------------------------------------------------------ setup: optimisation
    global_batch = config.batch_size * config.gradient_accumulation_steps * runtime.world_size
    steps_per_epoch = math.ceil(len(train_items) / global_batch)
    total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * steps_per_epoch))
    optimizer = _optimizer(model, config, runtime)
    # float16 on a GPU needs loss scaling against gradient underflow; a no-op otherwise.
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == "float16")
    scheduler = _scheduler(optimizer, config, total_steps)
    step = 0
    checkpoint = resolve_resume(config.resume, output_dir)
    ref_weights = reference.model if reference is not None and config.sync_ref_model else None
    if checkpoint is None and list_checkpoints(output_dir):
        raise DpokitError(f"{output_dir} holds checkpoints of an earlier run; resume it with "
                          f"--resume auto, or choose another --output-dir")
    if checkpoint is None and runtime.is_main:
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run, a fresh log
    keys = metric_names(objective)
    window = torch.zeros(len(keys) + 1, dtype=torch.float64)  # metric sums + loss sum
    if checkpoint is not None:
        state, rng = load_checkpoint(checkpoint, model=policy if _sharded(config, runtime)
                                     else model, optimizer=optimizer, scheduler=scheduler,
                                     ref_model=ref_weights, sharded=_sharded(config, runtime),
                                     rank=runtime.rank)
        for key, value in (("world_size", runtime.world_size),
                           ("steps_per_epoch", steps_per_epoch)):
            if state.get(key, value) != value:
                raise DpokitError(f"resume: {checkpoint} was written with {key}={state[key]}, "
                                  f"this run has {value}; resume with the same number of "
                                  f"processes, batch_size and gradient_accumulation_steps")
        step = state["global_step"]
        window = torch.tensor(state.get("metric_window", window.tolist()), dtype=torch.float64)
        set_rng_state(rng)
        if state.get("grad_scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["grad_scaler"])
        if runtime.is_main:
            _truncate_metrics(output_dir / "metrics.jsonl", step)
            log.warning("resumed from %s at step %d", checkpoint, step)

    # ------------------------------------------------------------------ the loop
    stop = _StopFlag()
    writer = _tensorboard(output_dir) if runtime.is_main else None
    window_start, epoch_cache = time.perf_counter(), {}
    bar = _progress_bar(total_steps, step, runtime.is_main and progress)
    while step < total_steps:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache = {epoch: epoch_batches(len(train_items), global_batch, seed=config.seed,
                                                epoch=epoch)}
        global_indices = epoch_cache[epoch][index]
        micro = _micro_batches(global_indices, config.batch_size, runtime)
        scale = runtime.world_size / len(global_indices)
        step_sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
        for i, (indices, weight) in enumerate(micro):
            batch = objective.collate([train_items[j] for j in indices], indices)
            batch = batch.to(runtime.device)
            sync = i == len(micro) - 1
            with _no_sync(policy, not sync), runtime.autocast():
                loss_sum, sums = objective(policy, batch)
            scaler.scale(loss_sum * (scale * weight)).backward()
            if weight:
                step_sums += torch.stack([*(sums[k].double().cpu() for k in keys),
                                          loss_sum.detach().double().cpu()])
        scaler.unscale_(optimizer)
        grad_norm = _clip(model, config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window += step_sums
        if is_dpo and config.sync_ref_model and step % config.ref_model_sync_steps == 0:
            reference.sync(model, config.ref_model_mixup_alpha)

        if step % config.logging_steps == 0 or step == total_steps:
            record = _metrics_record(runtime.all_reduce_sum(window).cpu(), keys, step,
                                     step / steps_per_epoch, scheduler.get_last_lr()[0],
                                     grad_norm, time.perf_counter() - window_start)
            if runtime.is_main:
                _log_metrics(output_dir / "metrics.jsonl", record, writer)
                bar.set_postfix(loss=f"{record['loss']:.4f}", **_postfix(record))
            window.zero_()
            window_start = time.perf_counter()
        if probe is not None and (step % probe.every == 0 or step == total_steps):
            _run_probe(probe, model, step, output_dir, runtime, writer)
        if config.eval_steps and eval_items and step % config.eval_steps == 0:
            _evaluate(policy, objective, eval_items, keys, config, runtime, step, output_dir,
                      writer, offset=len(train_items))
        stopping = runtime.all_reduce_sum(torch.tensor(float(stop.requested))).item() > 0
        if (config.save_steps and step % config.save_steps == 0) or stopping:
            _save(output_dir, step, policy if _sharded(config, runtime) else model, optimizer,
                  scheduler, ref_weights, config, runtime, steps_per_epoch, total_steps,
                  scaler.state_dict() if scaler.is_enabled() else None, window.tolist())
        bar.update(1)
        if stopping:
            if runtime.is_main:
                log.warning("stopped by signal after step %d; checkpoint saved — resume with "
                            "--resume auto", step)
            bar.close()
            stop.restore()
            if writer is not None:
                writer.close()
            return output_dir / f"checkpoint-{step}"
    bar.close()
    stop.restore()

    # ------------------------------------------------------------------ final evaluation, save
    if eval_items and (not config.eval_steps or step % config.eval_steps != 0):
        _evaluate(policy, objective, eval_items, keys, config, runtime, step, output_dir, writer,
                  offset=len(train_items))
    final = output_dir / "final"
    state_dict = None
    if config.fsdp and runtime.distributed:  # gather the full weights on every rank, save on 0
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if runtime.is_main:
        _save_final(model, tokenizer, final, config, state_dict)
    runtime.barrier()
    if writer is not None:
        writer.close()
    return final


# ---------------------------------------------------------------------------- setup helpers


def _load_data(config: TrainConfig, tokenizer: Any, is_dpo: bool) -> tuple[list, list]:
    settings = config.tokenize_settings
    if is_dpo:
        from dpokit.data import load_preference_pairs

        def load(path, split):
            return load_preference_pairs(path, tokenizer, settings=settings,
                                         columns=config.columns, split=split)
    else:
        from dpokit.data.sft import load_sft_sequences

        def load(path, split):
            return load_sft_sequences(path, tokenizer, settings=settings,
                                      prompt_column=config.prompt_column,
                                      completion_column=config.completion_column,
                                      messages_column=config.messages_column, split=split)
    train_items = load(config.data, config.split)
    eval_items = load(config.eval_data, config.eval_split) if config.eval_data else []
    return train_items, eval_items


def _recompute_mode(config: TrainConfig, model: nn.Module, items: list, is_dpo: bool) -> str:
    """``full``, ``selective`` or ``none``; a null ``selective_checkpointing`` decides from the
    model's shape and the mean tokens of a micro-batch (:func:`freed_bytes`)."""
    if config.gradient_checkpointing:
        return "full"
    selective = config.selective_checkpointing
    if selective is None and not supports_recompute(model):
        selective = False
    if selective is None:
        if is_dpo:
            prompt_rows = 1 if config.layout == "shared" else 2
            lengths = [prompt_rows * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                       for p in items]
        else:
            lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in items]
        tokens = config.batch_size * sum(lengths) / max(1, len(lengths))
        freed = freed_bytes(model.config, tokens, 4 if config.dtype == "float32" else 2)
        selective = freed >= AUTO_MIN_FREED_BYTES
        log.info("selective recomputation %s (auto: it frees ~%.0f MiB per micro-batch)",
                 "on" if selective else "off", freed / 2**20)
    return "selective" if selective else "none"


def _add_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, task_type="CAUSAL_LM",
                      target_modules="all-linear" if targets == ["all-linear"] else targets)
    try:
        return get_peft_model(model, lora)
    except ValueError as error:  # e.g. target modules not found in the model
        raise DpokitError(f"lora: {str(error).splitlines()[0]}") from None


def _setup_reference(config: DPOConfig, model: nn.Module | None, pairs: list, tokenizer: Any,
                     runtime: Runtime, progress: bool) -> Reference:
    common = {"chunk_size": config.chunk_size, "ld_alpha": config.ld_alpha,
              "autocast": runtime.autocast, "unpadded": config.unpadded}
    if not needs_reference(config.loss_type):
        return Reference("none", **common)
    if config.lora and config.ref_model is None:
        reference = Reference("adapters", model=model, **common)
        ref_dir = config.model
    else:
        ref_dir = config.ref_model or config.model
        ref_model = load_causal_lm(ref_dir, dtype="float32", device=runtime.device,
                                   trust_remote_code=config.trust_remote_code,
                                   what="reference model")
        ref_model.requires_grad_(False)
        reference = Reference("model", model=ref_model, **common)
    if not config.precompute:
        return reference
    settings = {"ld_alpha": config.ld_alpha, "dtype": config.dtype,
                "layout": config.layout, "chunk_size": config.chunk_size,
                "unpadded": config.unpadded, "mode": reference.mode}
    key = cache_key(hash_directory(ref_dir), pairs, settings)
    cache_file = Path(config.output_dir).resolve().parent / ".dpokit_cache" / f"{key}.safetensors"

    table = read_table(cache_file)
    cached = table is not None
    if table is None:
        table = compute_reference_table(
            reference, pairs, batch_size=2 * config.batch_size,
            pad_token_id=tokenizer.pad_token_id, layout=config.layout,
            device=runtime.device, rank=runtime.rank, world_size=runtime.world_size,
            progress=progress and runtime.is_main)
        if runtime.is_main:
            write_table(cache_file, table)
    runtime.barrier()
    log.info("reference log-probs %s %s", "loaded from" if cached else "computed into",
             cache_file)
    if reference.mode == "model":
        del reference.model  # never kept in memory during training
        gc.collect()
    return Reference("precomputed", table=table, **common)


def _wrap(module: nn.Module, config: TrainConfig, runtime: Runtime) -> nn.Module:
    """DDP (or FSDP2 with ``fsdp``) under torchrun; the bare module in one process."""
    if not runtime.distributed:
        return module
    if config.fsdp:
        from torch.distributed.fsdp import fully_shard

        decoder = unwrap_model(module.model).get_decoder()
        for layer in getattr(decoder, "layers", getattr(decoder, "h", [])):
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def _optimizer(model: nn.Module, config: TrainConfig, runtime: Runtime) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (tensors with fewer than 2 dims).

    The fused kernel on CPU and CUDA (one pass over the parameters instead of a dozen
    ``foreach`` passes with parameter-sized temporaries: 6 ms against 41 ms per step for the
    benchmark's 26 M parameters on 2 CPU threads); ``foreach`` for FSDP's sharded tensors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = runtime.device.type in ("cuda", "cpu") and not config.fsdp
    return torch.optim.AdamW(groups, lr=config.learning_rate,
                             betas=(config.adam_beta1, config.adam_beta2),
                             eps=config.adam_epsilon, fused=fused or None)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup", "linear": "linear",
            "cosine": "cosine"}[config.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


# ------------------------------------------------------------------------------ step helpers


def _micro_batches(global_indices: list[int], batch_size: int,
                   runtime: Runtime) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of a global batch, as ``(indices, weight)``.

    Every rank gets the same number: ranks whose share is shorter add zero-weight repeats of one
    example, so FSDP's and DDP's collectives (one per forward and backward) stay matched.
    """
    mine = shard_for_rank(global_indices, runtime.rank, runtime.world_size)
    largest = math.ceil(len(global_indices) / runtime.world_size)
    count = max(1, math.ceil(largest / batch_size))
    micro = [(mine[i:i + batch_size], 1.0) for i in range(0, len(mine), batch_size)]
    filler = (mine or global_indices)[:1]
    return micro + [(filler, 0.0)] * (count - len(micro))


def _no_sync(policy: nn.Module, skip: bool):
    """DDP's ``no_sync`` for micro-batches before the last one of a step."""
    if skip and hasattr(policy, "no_sync"):
        return policy.no_sync()
    return contextlib.nullcontext()


def _clip(model: nn.Module, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        raise DpokitError("no parameter received a gradient (is anything trainable?)")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def _metrics_record(window: torch.Tensor, keys: tuple[str, ...], step: int, epoch: float,
                    learning_rate: float, grad_norm: float, seconds: float) -> dict:
    sums = dict(zip(keys, window[:-1].tolist(), strict=True))
    count = sums["count"]
    record = {"step": step, "epoch": round(epoch, 4), "loss": window[-1].item() / count,
              "learning_rate": learning_rate, "grad_norm": grad_norm}
    if "tokens" in sums:  # SFT
        record["nll_per_token"] = sums["nll_tokens"] / max(sums["tokens"], 1.0)
        record["examples_per_second"] = count / seconds
    else:
        record.update(metric_means(sums))
        record["pairs_per_second"] = count / seconds
    return record


def _postfix(record: dict) -> dict:
    if "rewards/accuracies" in record:
        return {"acc": f"{record['rewards/accuracies']:.2f}",
                "pairs/s": f"{record['pairs_per_second']:.1f}"}
    return {"ex/s": f"{record['examples_per_second']:.1f}"}


@torch.no_grad()
def _evaluate(policy, objective, items, keys, config, runtime, step, output_dir, writer, *,
              offset: int = 0) -> dict:
    """Loss and metrics over all evaluation examples (sharded by rank, reduced as sums).

    ``offset`` is where the evaluation pairs start in the reference table (after the training
    pairs). Every rank runs the same number of batches, padding with zero-weight ones, so that
    DDP and FSDP collectives stay in step.
    """
    policy.eval()
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
    for indices, weight in _micro_batches(list(range(len(items))), config.batch_size, runtime):
        batch = objective.collate([items[i] for i in indices],
                                  [offset + i for i in indices]).to(runtime.device)
        with runtime.autocast():
            loss_sum, part = objective(policy, batch)
        if weight:
            sums += torch.stack([*(part[k].double().cpu() for k in keys),
                                 loss_sum.double().cpu()])
    policy.train()
    sums = runtime.all_reduce_sum(sums).cpu()
    values = dict(zip(keys, sums[:-1].tolist(), strict=True))
    record = {"step": step, "eval/loss": sums[-1].item() / values["count"]}
    if "tokens" not in values:
        record.update({f"eval/{k}": v for k, v in metric_means(values).items()})
    if runtime.is_main:
        _log_metrics(output_dir / "metrics.jsonl", record, writer)
    return record


@torch.no_grad()
def _run_probe(probe: Probe, model: nn.Module, step: int, output_dir: Path, runtime: Runtime,
               writer) -> None:
    inner = unwrap_model(model)
    was_training = inner.training
    inner.eval()
    values = probe.fn(inner, step)
    inner.train(was_training)
    if runtime.is_main:
        record = {"step": step, **{f"probe/{k}": v for k, v in values.items()}}
        _log_metrics(output_dir / "metrics.jsonl", record, writer)


def _log_metrics(path: Path, record: dict, writer) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    if writer is not None:
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                writer.add_scalar(key if "/" in key else f"train/{key}", value, record["step"])


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop metric lines logged past the checkpoint (they will be redone)."""
    if not path.is_file():
        return
    def keep(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a crash
            return False

    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if keep(line)]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def _tensorboard(output_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(output_dir / "tensorboard"))


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="training", disable=not enabled)


def _save(output_dir, step, model, optimizer, scheduler, ref_weights, config, runtime,
          steps_per_epoch, total_steps, scaler_state=None, metric_window=None) -> None:
    """Every rank takes part: FSDP checkpoints are sharded, each rank keeps its RNG state.
    The unlogged metric sums are stored too, so a resumed run logs the same numbers."""
    state = {"global_step": step, "epoch": step / steps_per_epoch, "total_steps": total_steps,
             "steps_per_epoch": steps_per_epoch, "world_size": runtime.world_size,
             "grad_scaler": scaler_state, "metric_window": metric_window}
    save_checkpoint(output_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                    trainer_state=state, rng=rng_state(), ref_model=ref_weights,
                    save_total_limit=config.save_total_limit, sharded=_sharded(config, runtime),
                    rank=runtime.rank, barrier=runtime.barrier)


def _sharded(config: TrainConfig, runtime: Runtime) -> bool:
    return config.fsdp and runtime.distributed


def _save_final(model: nn.Module, tokenizer: Any, final: Path, config: TrainConfig,
                state_dict: dict | None = None) -> None:
    """Hugging Face format, loadable without dpokit; with LoRA the adapter (and merged model)."""
    import shutil

    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if config.lora and config.merge_lora:
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        merged.save_pretrained(tmp / "merged")
        tokenizer.save_pretrained(tmp / "merged")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


class _StopFlag:
    """SIGINT/SIGTERM finish the current step, save a checkpoint and stop."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread: no handlers
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


__all__ = ["Probe", "SFTConfig", "train"]
