"""The training loop of ``dpokit sft`` and ``dpokit train``, read top to bottom in ``train()``.

    python -m dpokit train --config dpo.yaml                         # one process
    torchrun --nproc-per-node 4 -m dpokit train --config dpo.yaml    # DDP (FSDP with --fsdp)

setup (:func:`~dpokit.train.setup.setup_run`: data, reference, model, optimizer, resume) →
steps → log / probe / evaluate / save → final save. Every optimizer step takes one global batch of
``batch_size × gradient_accumulation_steps × world_size`` examples (a seeded permutation per
epoch, so the position in the data is just the step number; an epoch's last batch holds the
rest — kept, as transformers' default ``dataloader_drop_last: false``); each rank backpropagates
SUM(losses) × world_size / |global batch| per micro-batch, so accumulation and ranks give the
gradient of the mean over the global batch, exactly. The objective (SFT, DPO, …) is whatever the
config says; the loop only calls its methods.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dpokit.atomic import atomic_path
from dpokit.config import config_yaml
from dpokit.data import epoch_batches, micro_batches
from dpokit.data.batching import units_of
from dpokit.errors import DpokitError
from dpokit.evaluate import EvaluationOutOfMemory, evaluate
from dpokit.logps import unwrap_model
from dpokit.memory import error_line, is_out_of_memory, release_cached, shortage, tune_allocator
from dpokit.models import load_causal_lm, merge_adapter, nonfinite_parameter
from dpokit.runtime import rng_state, setup_runtime, shutdown_runtime
from dpokit.train.checkpoint import list_checkpoints, save_checkpoint
from dpokit.train.config import DPOConfig, SFTConfig, TrainConfig
from dpokit.train.modelcard import cli_argv, model_card, read_records
from dpokit.train.recompute import supports_recompute, training_state_bytes
from dpokit.train.rundir import claim
from dpokit.train.setup import Run, preflight, setup_run

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


last_stop_signal: int | None = None
"""The signal that stopped the last :func:`train` call early (None: it ran to the end); the CLI
exits with 128 + it (143 for SIGTERM, 130 for SIGINT), so a scheduler sees the interruption."""


def train(config: TrainConfig, *, progress: bool = True, probe: Probe | None = None) -> Path:
    """Run SFT (``SFTConfig``) or DPO (``DPOConfig``); return the final model directory, or the
    checkpoint written when SIGINT/SIGTERM stopped the run early."""
    global last_stop_signal
    last_stop_signal = None
    tune_allocator()  # before the first tensor-sized allocation (dpokit.memory)
    runtime = setup_runtime(config.device, config.compute_dtype, timeout_s=config.ddp_timeout)
    run, lock, failed = None, None, False
    try:
        preflight(config, runtime)
        lock = claim(config.output_dir, runtime)  # a second run on this directory is refused
        run = setup_run(config, runtime, progress=progress)
        with _stop_on_signal() as stop:  # from the first step: a signal in setup stops it
            while run.step < run.total_steps:
                train_step(run)
                saved = after_step(run, probe)
                # asked after the step's log, evaluation and save, not before them: a signal
                # that came while they ran stops here too (its checkpoint is the one just
                # saved, or saved now), not after one more step and another checkpoint
                if runtime.all_reduce_sum(torch.tensor(float(stop.requested))).item() > 0:
                    if not saved:
                        save(run)
                    if runtime.is_main:
                        log.warning("stopped by signal after step %d; checkpoint saved — "
                                    "resume with --resume auto", run.step)
                    # a rank that got no signal itself stops as if it had had SIGTERM
                    last_stop_signal = stop.signum or signal.SIGTERM
                    return run.output_dir / f"checkpoint-{run.step}"
        run.metrics.bar.close()
        return finish(run)
    except BaseException as error:
        failed = True  # (not sys.exc_info() in finally: a caller's handled exception shows)
        if isinstance(error, Exception) and is_out_of_memory(error):  # not in a step's work
            raise _out_of_memory_between_steps(run, runtime, error) from None
        raise
    finally:
        if run is not None and run.metrics is not None:
            run.metrics.close(failed=failed)
        if lock is not None:
            lock.release()
        # The DDP wrapper's reducer holds the process group: free it (and every other object
        # of the run) before the group is destroyed, not when this frame is released after
        # it — CI saw a rank hang there, in the destructor, after its last step.
        run = None
        if runtime.distributed:
            gc.collect()
        shutdown_runtime(runtime)


def train_step(run: Run) -> None:
    """One optimizer step over the next global batch: forward + backward per micro-batch,
    unscale, clip, step, schedule; the metric sums go into ``run.window``."""
    config, runtime, objective = run.config, run.runtime, run.objective
    epoch, index = divmod(run.step, run.steps_per_epoch)
    if epoch not in run.epoch_order:
        run.epoch_order = {epoch: epoch_batches(len(run.train_items), run.global_batch,
                                                seed=config.seed, epoch=epoch,
                                                spans=run.train_spans)}
    global_indices = run.epoch_order[epoch][index]
    # the loss is the global batch's mean: DDP averages the ranks' gradients, hence × world
    scale = runtime.world_size / objective.units([run.train_items[j] for j in global_indices])
    while True:
        try:
            sums, loss = _accumulate(run, global_indices, scale)
            break
        except _SmallerMicroBatches as smaller:
            size, units = smaller.args
        # the failed attempt's partial gradients go; the step restarts at half the size
        run.optimizer.zero_grad(set_to_none=True)
        release_cached(runtime.device)
        log.warning("step %d: out of memory at %d %s a micro-batch; going on at %d (gradient "
                    "accumulation: the same step)", run.step + 1, size, units, run.micro_batch)
    try:
        run.scaler.unscale_(run.optimizer)
        run.grad_norm = _clip(run.model, config.max_grad_norm)
        if _finite_step(run, loss):
            run.scaler.step(run.optimizer)
            for step_sums in sums:
                run.window.add(step_sums)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        raise _optimizer_out_of_memory(run, error) from None
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
    run.scaler.update()
    # the rate this step used, logged as transformers logs it ("get learning rate before
    # update"), not the next step's: warmup's first step is 0, a linear decay's last is not
    run.learning_rate = run.scheduler.get_last_lr()[0]
    # float16 loss scaling skips the update of a step whose gradients overflowed (its scale
    # then backs off); the schedule waits for it, as transformers' optimizer_step_was_skipped
    if scale is None or run.scaler.get_scale() >= scale:
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    objective.after_step(run.model, run.step)


class _SmallerMicroBatches(Exception):
    """A micro-batch ran out of memory where smaller ones give the same step (args: the size
    that failed and its unit's name)."""


def _accumulate(run: Run, global_indices: list[int], scale: float) -> tuple[list, torch.Tensor]:
    """Forward + backward of this rank's micro-batches of ``run.micro_batch`` units of the
    global batch (each loss sum × ``scale``): the micro-batches' metric sums and their loss
    sum. Out of memory: :class:`_SmallerMicroBatches` with ``run.micro_batch`` halved where that
    gives the same step (:func:`_can_split`), else the one-line error."""
    objective, runtime = run.objective, run.runtime
    micro = micro_batches(global_indices, run.micro_batch, runtime.rank, runtime.world_size,
                          run.train_groups)
    sums, loss = [], torch.zeros((), dtype=torch.float64, device=runtime.device)
    for i, (indices, weight) in enumerate(micro):
        raw = [run.train_items[j] for j in indices]
        try:
            with runtime.autocast():  # on-policy samples too: in the precision trained on
                items = objective.prepare(run.model, raw, indices, run.step)
                batch = objective.collate(items, indices).to(runtime.device)
                with _no_sync(run.policy, i < len(micro) - 1):
                    out = objective.forward(run.policy, batch)
            run.scaler.scale(out.loss_sum * (scale * weight)).backward()
        except Exception as error:
            if _unused_parameters(error):
                raise DpokitError(
                    f"step {run.step + 1}: some trained parameters get no gradient from the "
                    f"loss (DDP found them unreduced); set ddp_find_unused_parameters: true, or "
                    f"freeze them") from None
            if not is_out_of_memory(error):
                raise
            if _can_split(run, len(units_of(indices, run.train_groups))):
                failed, run.micro_batch = run.micro_batch, run.micro_batch // 2
                raise _SmallerMicroBatches(failed, objective.unit) from None
            raise _out_of_memory(run, raw, error) from None
        if weight:
            sums.append(out.sums)
            loss += out.loss_sum.detach().double()
    return sums, loss


def _unused_parameters(error: Exception) -> bool:
    """Whether ``error`` is DDP's: a parameter left without a gradient in the last step."""
    return isinstance(error, RuntimeError) and (
        "Expected to have finished reduction in the prior iteration" in str(error))


def _can_split(run: Run, units: int | None = None) -> bool:
    """Whether halving the micro-batches after running out of memory gives the same step: more
    than one unit a micro-batch (and in the one that failed, ``units``: a short last one of a
    single unit would fail again at any size), one process (ranks would run different numbers
    of forwards: FSDP's gathers and DDP's reductions must match), offline data (on-policy
    generation draws from the RNG) with a loss of per-example terms
    (:attr:`Objective.splittable`: not ``aot`` or ``sft``, which couple the micro-batch) and no
    dropout (its masks are drawn per forward)."""
    return (run.micro_batch > 1 and (units is None or units > 1)
            and not run.runtime.distributed and run.config.disable_dropout
            and run.objective.splittable)


def _out_of_memory(run: Run, items: list, error: Exception) -> DpokitError:
    """The one-line error of a micro-batch that did not fit: where, how big, what to change."""
    advice = ["lower batch_size (raise gradient_accumulation_steps to keep the batch)",
              "max_length"]
    if _can_recompute_more(run):
        advice.insert(0, "set gradient_checkpointing: true (whole layers recomputed, "
                         "least activation memory)")
    return DpokitError(
        f"step {run.step + 1}: out of memory on {run.runtime.device}{shortage(error)} in a "
        f"micro-batch of {run.objective.describe(items, f'recomputation {run.recompute}')}: "
        + ", or ".join(advice)
        + f"; {_last_checkpoint(run)}")


def _optimizer_out_of_memory(run: Run, error: Exception) -> DpokitError:
    """The one-line error of an optimizer step that did not fit (AdamW's moments are allocated
    at the first step)."""
    moments = training_state_bytes(run.model, lora=False) / 2
    return DpokitError(
        f"step {run.step + 1}: out of memory on {run.runtime.device}{shortage(error)} in the "
        f"optimizer step (AdamW's two moments of the trained weights: ~{moments / 2**30:.2f} "
        f"GiB): train fewer weights (lora: true), shard them across GPUs (fsdp: true under "
        f"torchrun) or train in bfloat16 (dtype: bfloat16); {_last_checkpoint(run)}")


def _out_of_memory_between_steps(run: Run | None, runtime, error: Exception) -> DpokitError:
    """The one-line error of running out of memory outside a step (setup, evaluation, …)."""
    reason = error_line(error)
    if run is None:
        return DpokitError(
            f"setup: out of memory on {runtime.device} ({reason}): the weights may not fit — "
            f"load them in bfloat16 (dtype: bfloat16) or train adapters (lora: true)")
    advice = "lower batch_size, per_device_eval_batch_size or max_length"
    if _can_recompute_more(run):
        advice += ", or set gradient_checkpointing: true"
    return DpokitError(f"after step {run.step}: out of memory on {runtime.device} ({reason}); "
                       f"{advice}; {_last_checkpoint(run)}")


def _can_recompute_more(run: Run) -> bool:
    """Whether ``gradient_checkpointing: true`` would keep less than this run does."""
    return run.recompute != "full" and supports_recompute(run.model)


def _last_checkpoint(run: Run) -> str:
    saved = list_checkpoints(run.output_dir)
    return f"the last checkpoint, {saved[-1]}, is intact" if saved else "no checkpoint saved"


def _finite_step(run: Run, loss: torch.Tensor) -> bool:
    """The divergence guard: whether this step's loss (and, without fp16 loss scaling, which
    skips such steps itself, its gradient norm) is finite on every rank — one all-reduced flag
    per step. A non-finite step is skipped (no update, its metrics not logged) and counted;
    ``max_nonfinite_steps`` of them in a row stop the run with a one-line error, the last
    checkpoint untouched."""
    bad = not math.isfinite(float(loss))
    if not run.scaler.is_enabled():
        bad = bad or not math.isfinite(run.grad_norm)
    if run.runtime.all_reduce_sum(torch.tensor(float(bad))).item() == 0:
        run.nonfinite_in_row = 0
        return True
    run.skipped_steps += 1
    run.nonfinite_in_row += 1
    step = run.step + 1
    if run.runtime.is_main:
        log.warning("step %d: non-finite loss (%s) or gradient norm (%s); step skipped (%d in a "
                    "row, %d in all)", step, float(loss), run.grad_norm, run.nonfinite_in_row,
                    run.skipped_steps)
    if run.nonfinite_in_row >= run.config.max_nonfinite_steps:
        raise DpokitError(
            f"step {step}: the loss or gradient norm was not finite for {run.nonfinite_in_row} "
            f"steps in a row (loss {float(loss)}, grad_norm {run.grad_norm}): training diverged "
            f"and stopped; {_last_checkpoint(run)}. Lower learning_rate, set max_grad_norm, or "
            f"check the data and the reference")
    return False


def after_step(run: Run, probe: Probe | None) -> bool:
    """The named steps between optimizer steps: log, probe, evaluate, checkpoint. Returns
    whether it checkpointed this step."""
    config, step = run.config, run.step
    if step % config.logging_steps == 0 or step == run.total_steps:
        log_window(run)
    if probe is not None and (step % probe.every == 0 or step == run.total_steps):
        run_probe(run, probe)
    if run.eval_items and config.evaluates_at(step, run.steps_per_epoch):
        evaluate_run(run)
    saves = config.saves_at(step, run.steps_per_epoch)
    if saves:
        save(run)
    run.metrics.bar.update(1)
    return saves


def log_window(run: Run) -> None:
    """Reduce the metric sums since the last log over ranks, write one record, start anew."""
    seconds = time.perf_counter() - run.window_start
    sums = run.window.reduce(run.runtime.all_reduce_sum)
    objective = run.objective
    means = objective.means(sums) if sums["count"] > 0 else {}  # empty: every step skipped
    record = {"step": run.step, "epoch": round(run.step / run.steps_per_epoch, 4),
              **means, "learning_rate": run.learning_rate,
              "grad_norm": run.grad_norm,
              f"{objective.unit}_per_second": sums["count"] / seconds,
              "skipped_steps": run.skipped_steps}
    run.metrics.write(record)
    if means:
        run.metrics.bar.set_postfix(loss=f"{record['loss']:.4f}", **objective.postfix(record))
    run.window.zero_()
    run.window_start = time.perf_counter()


def evaluate_run(run: Run) -> dict:
    """The objective over the evaluation data (no backward), logged as ``eval/…``."""
    try:
        result = evaluate(run.objective, run.policy, run.eval_items,
                          batch_size=run.eval_batch or run.config.eval_batch_size,
                          runtime=run.runtime, offset=len(run.train_items), model=run.model,
                          step=run.step)
    except EvaluationOutOfMemory as error:
        raise DpokitError(f"after step {run.step}: {error}; {_last_checkpoint(run)}") from None
    run.eval_batch = result.batch_size  # halved when a batch ran out of memory
    record = {"step": run.step, **{f"eval/{k}": v for k, v in result.metrics.items()}}
    run.metrics.write(record)
    if run.config.eval_generate and run.runtime.is_main:
        run.metrics.write_samples(run.step, sample_eval_prompts(run))
    return record


def sample_eval_prompts(run: Run) -> list[dict]:
    """Completions of the first ``eval_generate`` eval prompts by the current policy (rank 0,
    the unwrapped model — with LoRA its adapters on — seeded by the step, so a resumed run
    draws the same), each with its ``reward`` when the run has one."""
    from dpokit.data.prompts import Prompt
    from dpokit.generation import completion_records, generate_completions
    from dpokit.rewards import score_groups

    tokenizer = run.tokenizer
    items = run.eval_items[:run.config.eval_generate]
    prompts = [item if isinstance(item, Prompt) else
               Prompt(tokenizer.decode(item.prompt_ids, skip_special_tokens=True),
                      list(item.prompt_ids), item.source, item.row) for item in items]
    with run.runtime.autocast():
        completions = generate_completions(run.model, tokenizer, prompts,
                                           seed=run.config.seed + run.step, **run.config.sampling)
    records = completion_records(prompts, completions)
    if run.sample_reward is not None:
        try:  # after step run.step, not in step run.step + 1
            rewards = score_groups(run.sample_reward, run.config.reward,
                                   [p.prompt for p in prompts], completions, step=0,
                                   device=run.runtime.device,
                                   rows=[p.where for p in prompts],
                                   columns=[p.columns for p in prompts], global_step=run.step)
        except DpokitError as error:
            raise DpokitError(f"eval_generate samples after step {run.step}: {error}") from None
        for record, value in zip(records, rewards, strict=True):
            record["reward"] = value
    return records


@torch.no_grad()
def run_probe(run: Run, probe: Probe) -> None:
    """Call ``probe.fn`` on the bare model in eval mode; log its numbers as ``probe/…``."""
    inner = unwrap_model(run.model)
    was_training = inner.training
    inner.eval()
    values = probe.fn(inner, run.step)
    inner.train(was_training)
    run.metrics.write({"step": run.step, **{f"probe/{k}": v for k, v in values.items()}})


def save(run: Run) -> None:
    """Checkpoint ``run`` (every rank takes part: FSDP shards, per-rank RNG states). The unlogged
    metric sums are stored too, so a resumed run logs the same numbers."""
    runtime = run.runtime
    state = {"global_step": run.step, "epoch": run.step / run.steps_per_epoch,
             "total_steps": run.total_steps, "steps_per_epoch": run.steps_per_epoch,
             "world_size": runtime.world_size,
             "grad_scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
             "metric_window": run.window.state_dict(runtime.all_reduce_sum),
             "skipped_steps": run.skipped_steps, "nonfinite_in_row": run.nonfinite_in_row,
             "fingerprint": run.fingerprint}
    check_finite_weights(run, f"step {run.step}: checkpoint not saved")
    save_checkpoint(run.output_dir, run.step, model=run.checkpoint_model,
                    optimizer=run.optimizer, scheduler=run.scheduler, trainer_state=state,
                    rng=rng_state(), ref_model=run.objective.moving_weights,
                    save_total_limit=run.config.save_total_limit, sharded=run.sharded,
                    rank=runtime.rank, barrier=runtime.barrier, agree=runtime.all_ok,
                    files={"config.yaml": config_yaml(run.config)}, tokenizer=run.tokenizer)


def finish(run: Run) -> Path:
    """Final evaluation (unless the last step had one) and the final model, Hugging Face format
    loadable without dpokit; with LoRA the adapter (and, with ``merge_lora``, the merged model);
    a model card ``README.md`` (:mod:`dpokit.train.modelcard`)."""
    config, runtime = run.config, run.runtime
    if (run.eval_items and config.eval_strategy != "no"
            and not config.evaluates_at(run.step, run.steps_per_epoch)
            and not _evaluated_already(run)):
        evaluate_run(run)
    state_dict = None
    if run.sharded:  # gather the full weights on every rank, save on rank 0
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(
            run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = run.output_dir / "final"
    check_finite_weights(run, f"step {run.step}: final/ not saved")
    if runtime.is_main:
        with atomic_path(final, directory=True, shared=True) as tmp:  # a stale one is cleared
            run.model.save_pretrained(tmp, state_dict=state_dict)
            run.tokenizer.save_pretrained(tmp)
            if config.lora and config.merge_lora:
                # sharded: merging the shards would need every rank (rank 0 alone hung in
                # its all-gather) — the adapter just saved, onto its base, here instead
                merged = (load_causal_lm(tmp, dtype=config.dtype,
                                         trust_remote_code=config.trust_remote_code)
                          if run.sharded else merge_adapter(run.model))  # tied heads too
                merged.save_pretrained(tmp / "merged")
                run.tokenizer.save_pretrained(tmp / "merged")
            (tmp / "README.md").write_text(run_model_card(run), encoding="utf-8")
    runtime.barrier()
    return final


def _evaluated_already(run: Run) -> bool:
    """Whether ``metrics.jsonl`` holds an evaluation at this step already: a run resumed from
    its last checkpoint after its final evaluation was logged (a crash while ``final/`` was
    written, a finished job requeued) — the same weights, not evaluated and logged twice.
    One answer on every rank (rank 0's: it writes the records)."""
    logged = run.runtime.is_main and any(
        record.get("step") == run.step and any(key.startswith("eval/") for key in record)
        for record in read_records(run.output_dir))
    return not run.runtime.all_ok(not logged)


def run_model_card(run: Run) -> str:
    """The model card of ``run``: its config, its ``metrics.jsonl`` records, the steps taken,
    the processes it ran on, and the command line when it was started by the dpokit CLI."""
    return model_card(run.config, read_records(run.output_dir), run.step,
                      argv=cli_argv(), world_size=run.runtime.world_size)


def check_finite_weights(run: Run, what: str) -> None:
    """Refuse to write non-finite weights: a one-line error (on every rank) naming the
    parameter; nothing is written and earlier checkpoints stay as they are."""
    bad = nonfinite_parameter(run.model)
    if run.runtime.all_reduce_sum(torch.tensor(float(bad is not None))).item() > 0:
        raise DpokitError(f"{what}: the weights are not finite"
                          + (f" (parameter {bad})" if bad else " (on another rank)")
                          + "; training diverged. Lower learning_rate or set max_grad_norm")


def _no_sync(policy: nn.Module, skip: bool):
    """DDP's ``no_sync`` for micro-batches before the last one of a step."""
    if skip and hasattr(policy, "no_sync"):
        return policy.no_sync()
    return contextlib.nullcontext()


def _clip(model: nn.Module, max_norm: float | None) -> float:
    """Clip the gradient norm (``inf`` = measure only); the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        raise DpokitError("no parameter received a gradient (is anything trainable?)")
    max_norm = max_norm if max_norm else float("inf")
    if hasattr(params[0].grad, "full_tensor"):  # FSDP2: DTensors, clipped as PyTorch does
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm).full_tensor())
    # clip_grad_norm_ multiplies every gradient by min(1, max_norm / (norm + 1e-6)) even when
    # that is exactly 1 (a whole pass over the gradients a step for nothing): the same
    # coefficient, and the multiplication only where it changes something (NaN included)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if not bool(max_norm / (norm + 1e-6) >= 1.0):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


class _StopRequest:
    """Set when SIGINT/SIGTERM arrived during training."""

    requested = False
    signum: int | None = None


@contextlib.contextmanager
def _stop_on_signal() -> Iterator[_StopRequest]:
    """While inside, SIGINT/SIGTERM only set ``requested``: the loop finishes the step, saves a
    checkpoint and stops. The previous handlers come back on exit, even after an error."""
    stop = _StopRequest()
    previous = {}

    def handle(signum, frame) -> None:
        """Note the signal; the loop acts on it after the step."""
        stop.requested = True
        stop.signum = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not in the main thread: no handlers
            previous[sig] = signal.signal(sig, handle)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)


__all__ = ["DPOConfig", "Probe", "SFTConfig", "train"]
