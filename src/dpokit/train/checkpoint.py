"""Checkpoints that survive crashes: ``output_dir/checkpoint-STEP/``.

Each holds the trainable parameters, the optimizer and scheduler states, the random generator
states, the trainer state (step and data position, as JSON) and, for TR-DPO, the moving reference
weights. Without FSDP it is also a Hugging Face model directory, each weight stored once:

    AutoModelForCausalLM.from_pretrained("out/checkpoint-500")         # a full fine-tune
    PeftModel.from_pretrained(base_model, "out/checkpoint-500")         # LoRA

A full fine-tune's parameters are in ``trainable.safetensors`` (by their ``named_parameters``
names, which are the state-dict keys), named by ``model.safetensors.index.json`` as the model's
one shard beside ``config.json``; LoRA's are PEFT's ``adapter_model.safetensors``, mapped back to
the parameters on resume (:func:`_adapter_names`). The tokenizer's files are there too. With FSDP
the weights are ``torch.distributed.checkpoint`` shards (``sharded/``), for resuming only.

A checkpoint is written into a hidden temporary directory and renamed into place, so a crash
mid-save leaves no partial checkpoint; ``save_total_limit`` prunes the oldest. Everything is read
back with ``safetensors`` or ``torch.load(weights_only=True)``.

``checksums.json`` holds the size and SHA-256 of every other file; resuming verifies them, and
``--resume auto`` skips a checkpoint that fails (a truncated or altered file, one missing) for the
newest one that passes, with a warning naming what it skipped.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpokit.atomic import discard, os_error_cause, replace, temporary_sibling
from dpokit.digests import file_sha256
from dpokit.errors import DpokitError

log = logging.getLogger("dpokit.train")

PREFIX = "checkpoint-"
CHECKSUMS = "checksums.json"
TRAINABLE = "trainable.safetensors"
"""The trainable parameters by name: a full fine-tune's (and every checkpoint's before the
Hugging Face layout, LoRA's included)."""
FROZEN = "frozen.safetensors"
"""Tensors of a full fine-tune that do not train (frozen parameters, persistent buffers)."""
INDEX = "model.safetensors.index.json"
"""``transformers``' shard index: which file holds each tensor of the model."""
ADAPTER = "adapter_model.safetensors"
"""PEFT's adapter weights (keys without the adapter name: ``lora_A.weight``)."""


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, on the CPU (what a checkpoint stores)."""
    return {name: p.detach().to("cpu").contiguous()
            for name, p in model.named_parameters() if p.requires_grad}


def _all_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, on the CPU (the moving TR-DPO reference)."""
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters()}


def save_checkpoint(output_dir: str | Path, step: int, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, trainer_state: dict,
                    rng: dict, ref_model: nn.Module | None = None,
                    save_total_limit: int | None = None, sharded: bool = False, rank: int = 0,
                    barrier: Callable[[], None] = lambda: None,
                    agree: Callable[[bool], bool] = lambda ok: ok,
                    files: dict[str, str] | None = None, tokenizer: Any = None) -> Path:
    """Write ``checkpoint-STEP`` atomically and prune old ones; returns its path.

    Called on every rank. ``sharded`` (FSDP) writes model and optimizer with
    ``torch.distributed.checkpoint`` — each rank its own shard — instead of one file from rank 0
    (which otherwise writes the weights as a Hugging Face model directory, with ``tokenizer``'s
    files: :func:`_write_model`); every rank stores its own random generator state; ``files``
    are extra text files (name → content, e.g. the run's ``config.yaml``) written by rank 0.
    The stages (a fresh temporary directory, the files, checksums and the rename) are separated
    by ``agree(ok)`` — True when every rank is ok — so a rank that fails stops them all instead
    of leaving them waiting. An OS error while writing (a full disk, a read-only directory)
    removes the temporary directory and is one :class:`DpokitError` naming the checkpoint, the
    cause and the newest checkpoint intact.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step}"
    tmp = temporary_sibling(final, shared=True)  # one name on every rank

    def stage(action: Callable[[], Any]) -> None:
        """``action()``, then agree with every rank that it worked; else clean up and raise."""
        failure = None
        try:
            action()
        except BaseException as error:
            failure = error
        if agree(failure is None):
            return
        if rank == 0:
            discard(tmp)
        if failure is None:
            raise DpokitError(f"cannot write checkpoint {final}: another rank failed (its "
                              f"message is above)")
        cause = os_error_cause(failure)
        if cause is None:
            raise failure
        raise _save_error(output_dir, final, cause) from None

    stage(lambda: rank == 0 and _fresh_directory(tmp))
    stage(lambda: _write_files(tmp, model=model, optimizer=optimizer, scheduler=scheduler,
                               trainer_state=trainer_state, rng=rng, ref_model=ref_model,
                               sharded=sharded, rank=rank, files=files,
                               tokenizer=tokenizer))
    stage(lambda: rank == 0 and _seal(tmp, final))
    if rank == 0 and save_total_limit is not None:
        _prune(output_dir, final, save_total_limit)
    barrier()
    return final


def _prune(output_dir: Path, final: Path, limit: int) -> None:
    """Delete the oldest complete checkpoints before ``final`` so that ``limit`` are left
    (``final`` among them). Each is first renamed out of the listing (``.checkpoint-N.pruned``):
    a crash while deleting leaves no half-deleted ``checkpoint-N`` that would still read as
    complete."""
    step = _step(final)
    older = [p for p in list_checkpoints(output_dir) if _step(p) < step]
    for old in older[:max(0, len(older) - (limit - 1))]:
        doomed = old.with_name(f".{old.name}.pruned")
        try:
            discard(doomed)
            old.rename(doomed)
        except OSError as error:  # it stays complete; the next save tries again
            log.warning("save_total_limit: cannot remove %s (%s)", old, error.strerror or error)
            continue
        discard(doomed)


def _step(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def numbered_checkpoints(output_dir: Path) -> list[Path]:
    """Every ``checkpoint-N`` directory of ``output_dir``, complete or not, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.glob(f"{PREFIX}*") if p.is_dir()
             and p.name[len(PREFIX):].isdecimal()]
    return sorted(found, key=_step)


def _fresh_directory(tmp: Path) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)


def _seal(tmp: Path, final: Path) -> None:
    """Checksums of every file, then the rename into place."""
    write_checksums(tmp)
    replace(tmp, final)


def _write_files(tmp: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, trainer_state: dict, rng: dict,
                 ref_model: nn.Module | None, sharded: bool, rank: int,
                 files: dict[str, str] | None = None, tokenizer: Any = None) -> None:
    """Every file of a checkpoint into the fresh directory ``tmp`` (this rank's share)."""
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state},
                 checkpoint_id=str(tmp / "sharded"))
    _torch_save(rng, tmp / f"rng_{rank}.pt")
    if rank == 0:
        if not sharded:
            _write_model(tmp, model, tokenizer)
            _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        if ref_model is not None:
            save_file(_all_state(ref_model), str(tmp / "reference.safetensors"))
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        # a checkpoint that says it has checksums is never read unverified (one whose
        # checksums.json was lost is not taken for an older dpokit's)
        state = {**trainer_state, "checksums": CHECKSUMS}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    elif sharded:  # each rank hashes its own shards (rank 0 hashes the rest when sealing)
        own = [p for p in (tmp / "sharded").glob(f"__{rank}_*") if p.is_file()]
        _write_rank_sums(tmp, rank, [tmp / f"rng_{rank}.pt", *own])


def _write_model(tmp: Path, model: nn.Module, tokenizer: Any) -> None:
    """The trainable parameters as a Hugging Face model directory, each weight stored once:

    - a PEFT model: its ``save_pretrained`` (``adapter_config.json``, ``adapter_model.safetensors``
      — what resume reads back, :func:`_adapter_names`);
    - a ``transformers`` model: ``trainable.safetensors`` (what resume reads) and, naming it as
      the model's shard, ``config.json`` and ``model.safetensors.index.json``
      (:func:`_write_index`);
    - any other module: ``trainable.safetensors`` alone;

    and the tokenizer's files, when given."""
    if _is_peft(model):
        model.save_pretrained(tmp)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if not trainable <= set(_adapter_names(model).values()):  # PEFT left some out:
            save_file(_trainable_state(model), str(tmp / TRAINABLE))  # resume reads these
    else:
        state = _trainable_state(model)
        save_file(state, str(tmp / TRAINABLE), metadata={"format": "pt"})  # as transformers
        if _is_transformers(model):
            _write_index(tmp, model, state)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def _write_index(tmp: Path, model: nn.Module, trained: dict[str, torch.Tensor]) -> None:
    """``config.json``, ``generation_config.json`` (and custom model code) as ``save_pretrained``
    writes them, and the shard index naming ``trainable.safetensors`` for the ``trained``
    tensors: ``from_pretrained`` then loads the checkpoint without a second copy of them.

    A tied weight (``lm_head`` = ``embed_tokens``) is one parameter, stored under its first name
    and tied again by ``from_pretrained``. Whatever else the state dict holds (a frozen
    parameter, a persistent buffer) goes to ``frozen.safetensors``, so the directory is the
    whole model."""
    if getattr(model, "_auto_class", None) is not None:  # remote code: copy it, as HF does
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, tmp, config=model.config)
    model.config.save_pretrained(tmp)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    stored = {p.data_ptr() for p in model.parameters() if p.requires_grad}
    frozen = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in stored:
            stored.add(tensor.data_ptr())
            frozen[name] = tensor.detach().to("cpu").contiguous()
    if frozen:
        save_file(frozen, str(tmp / FROZEN), metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(trained, TRAINABLE), **dict.fromkeys(frozen, FROZEN)}
    size = sum(t.numel() * t.element_size() for t in (*trained.values(), *frozen.values()))
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")


def _is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (if peft was never imported, it is not one)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _is_transformers(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel``."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _adapter_names(model: nn.Module) -> dict[str, str]:
    """Each key of PEFT's adapter file (``…q_proj.lora_A.weight``) → the name of its parameter
    in ``model`` (``…q_proj.lora_A.default.weight``). The keys are PEFT's own
    (``get_peft_model_state_dict``, what ``save_pretrained`` writes), matched to parameters by
    the tensor they hold, not by rewriting names."""
    from peft import get_peft_model_state_dict

    params = {p.data_ptr(): name for name, p in model.named_parameters()}
    return {key: params[tensor.data_ptr()]
            for key, tensor in get_peft_model_state_dict(model).items()
            if tensor.data_ptr() in params}


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file handle: a failed write then surfaces as the
    ``OSError`` (``No space left on device``), where a path gives an opaque C++ message."""
    with path.open("wb") as handle:
        torch.save(obj, handle)


def _save_error(output_dir: Path, final: Path, cause: str) -> DpokitError:
    """``cannot write checkpoint PATH: CAUSE; the previous checkpoint checkpoint-M is intact``."""
    try:
        intact = list_checkpoints(output_dir)
    except OSError:
        intact = []
    if intact:
        kept = f"; the previous checkpoint {intact[-1].name} is intact"
    else:
        kept = "; no earlier checkpoint was saved"
    return DpokitError(f"cannot write checkpoint {final}: {cause}{kept}")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    return [p for p in numbered_checkpoints(Path(output_dir))
            if (p / "trainer_state.json").is_file()]


_RANK_SUMS = ".sums-{rank}.json"
"""The checksums one rank computed of the files it wrote (merged into ``checksums.json``)."""


def _entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _write_rank_sums(directory: Path, rank: int, paths: list[Path]) -> None:
    sums = {p.relative_to(directory).as_posix(): _entry(p) for p in paths}
    (directory / _RANK_SUMS.format(rank=rank)).write_text(json.dumps(sums), encoding="utf-8")


def write_checksums(directory: Path) -> None:
    """``checksums.json``: ``{relative path: {"bytes": n, "sha256": hex}}`` of every file —
    the entries other ranks computed of their own files (FSDP shards: each rank hashes what it
    wrote, so rank 0 does not read every shard), the rest hashed here."""
    sums: dict[str, dict] = {}
    for part in sorted(directory.glob(_RANK_SUMS.format(rank="*"))):
        sums.update(json.loads(part.read_text(encoding="utf-8")))
        part.unlink()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        name = path.relative_to(directory).as_posix()
        if name not in sums:
            sums[name] = _entry(path)
    (directory / CHECKSUMS).write_text(json.dumps(dict(sorted(sums.items())), indent=1),
                                       encoding="utf-8")


def checkpoint_problem(path: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed (a file missing, truncated or altered),
    or None when its files match ``checksums.json``. With ``world_size`` > 1 this rank checks
    every ``world_size``-th file from its ``rank`` (the ranks share the reading). A checkpoint
    of an older dpokit, without checksums, is accepted with a warning (one whose
    ``trainer_state.json`` names ``checksums.json`` is not: that file was lost; nor one whose
    ``trainer_state.json`` is another trainer's, without ``steps_per_epoch``)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"trainer_state.json unreadable ({getattr(error, 'strerror', None) or error})"
    try:
        sums = json.loads((path / CHECKSUMS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not isinstance(state, dict) or "steps_per_epoch" not in state:
            return (f"not a dpokit checkpoint (no {CHECKSUMS}, and its trainer_state.json has "
                    f"no steps_per_epoch: another trainer's?)")
        if state.get("checksums") == CHECKSUMS:
            return f"{CHECKSUMS} is missing"
        if rank == 0:
            log.warning("%s has no %s (written by an older dpokit): its files are not verified",
                        path, CHECKSUMS)
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{CHECKSUMS} unreadable ({getattr(error, 'strerror', None) or error})"
    if not isinstance(sums, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int)
            and isinstance(e.get("sha256"), str) for e in sums.values()):
        return f"{CHECKSUMS} is malformed"
    for name, expected in sorted(sums.items())[rank::world_size]:
        file = path / name
        try:
            if not file.is_file():
                return f"{name} is missing"
            size = file.stat().st_size
            if size != expected["bytes"]:
                return f"{name} has {size} bytes, {expected['bytes']} were written"
            if file_sha256(file) != expected["sha256"]:
                return f"{name} does not match its checksum"
        except OSError as error:
            return f"{name} unreadable ({error.strerror or error})"
    return None


def resolve_resume(resume: str | None, output_dir: str | Path, *, rank: int = 0,
                   world_size: int = 1,
                   agree: Callable[[bool], bool] = lambda ok: ok) -> Path | None:
    """The checkpoint to resume from: a path, the newest valid one in ``output_dir`` for
    ``auto`` (None if there is none at all), or None. Each is verified first — under torchrun
    by every rank together (``agree``: whether every rank found its share of the files
    intact), so every rank returns the same answer."""
    if resume is None:
        return None

    def verified(path: Path) -> str | None:
        problem = checkpoint_problem(path, rank, world_size)
        if agree(problem is None):
            return None
        return problem or "a file failed verification on another rank (its warning is above)"

    if resume == "auto":
        checkpoints = numbered_checkpoints(Path(output_dir))
        skipped = []
        for path in reversed(checkpoints):
            if (path / "trainer_state.json").is_file():
                problem = verified(path)
            else:  # a directory every rank sees alike: no agreement needed
                problem = "trainer_state.json is missing"
            if problem is None:
                if skipped:
                    log.warning("resume auto: skipped %s; resuming from %s",
                                "; ".join(skipped), path.name)
                return path
            skipped.append(f"{path.name} ({problem})")
        if skipped:
            raise DpokitError(f"resume auto: no valid checkpoint in {output_dir}: "
                              f"{'; '.join(skipped)}")
        return None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise DpokitError(f"resume: {path} is not a dpokit checkpoint (no trainer_state.json)")
    problem = verified(path)
    if problem is not None:
        raise DpokitError(f"resume: {path} is corrupt: {problem}; resume from an earlier "
                          f"checkpoint")
    return path


def set_aside_later(output_dir: Path, step: int) -> list[Path]:
    """Rename the checkpoints of ``output_dir`` past ``step`` (a discarded future, or corrupt
    ones resume skipped) to ``checkpoint-N.discarded``, so that ``save_total_limit`` prunes
    the resumed run's own checkpoints and ``--resume auto`` never goes back to them."""
    moved = []
    for path in numbered_checkpoints(output_dir):
        if _step(path) > step:
            target = path.with_name(f"{path.name}.discarded")
            try:
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                path.rename(target)
            except OSError as error:
                raise DpokitError(f"resume: cannot set aside {path} (a checkpoint past step "
                                  f"{step}) as {target.name}: {error.strerror or error}"
                                  ) from None
            moved.append(target)
    if moved:
        log.warning("resuming at step %d: set aside the later %s", step,
                    ", ".join(p.name for p in moved))
    return moved


def read_trainer_state(path: Path) -> dict:
    """``trainer_state.json`` of a checkpoint (verified by :func:`resolve_resume`)."""
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


def _read(path: Path, what: str, read: Callable[[], Any]) -> Any:
    """``read()``, with any failure to read ``path/what`` as one line naming the file."""
    try:
        return read()
    except DpokitError:
        raise
    except Exception as error:  # safetensors, pickle, JSON and OS errors alike
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DpokitError(f"resume: cannot read {path / what}: {first}") from None


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, ref_model: nn.Module | None = None, sharded: bool = False,
                    rank: int = 0) -> tuple[dict, dict]:
    """Restore weights, optimizer and scheduler in place; return (trainer state, rng state)."""
    path = Path(path)
    if sharded != (path / "sharded").is_dir():
        raise DpokitError(f"{path} was written {'with' if not sharded else 'without'} FSDP; "
                          f"resume it with the same fsdp setting")
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(path / "sharded"))
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
    else:
        _load_trainable(path, model)
        device = next(model.parameters()).device
        optimizer_state = _read(path, "optimizer.pt", lambda: torch.load(
            path / "optimizer.pt", map_location=device, weights_only=True))
        _read(path, "optimizer.pt", lambda: optimizer.load_state_dict(optimizer_state))
    if ref_model is not None:
        if not (path / "reference.safetensors").is_file():
            raise DpokitError(f"resume: {path} has no reference.safetensors (the moving "
                              f"reference of sync_ref_model); it was not written by this run's "
                              f"settings, or the file was lost")
        reference = _read(path, "reference.safetensors",
                          lambda: load_file(str(path / "reference.safetensors")))
        _copy_into(path / "reference.safetensors", dict(ref_model.named_parameters()),
                   reference, every=True)
    scheduler_state = _read(path, "scheduler.pt",
                            lambda: torch.load(path / "scheduler.pt", weights_only=True))
    scheduler.load_state_dict(scheduler_state)
    rng_file = path / f"rng_{rank}.pt"
    if not rng_file.is_file():
        raise DpokitError(f"{path} has no random state for rank {rank}; resume with the same "
                          f"number of processes it was written with")
    rng = _read(path, rng_file.name, lambda: torch.load(rng_file, weights_only=True))
    trainer_state = _read(path, "trainer_state.json", lambda: read_trainer_state(path))
    return trainer_state, rng


def _load_trainable(path: Path, model: nn.Module) -> None:
    """Copy the checkpoint's trainable parameters into ``model``: ``trainable.safetensors``
    where there is one (a full fine-tune; a LoRA checkpoint of an earlier dpokit), else PEFT's
    adapter file with its keys mapped to the parameters. A mismatch is a user error."""
    if _is_peft(model) and not (path / TRAINABLE).is_file():
        names = _adapter_names(model)
        adapter = _read(path, ADAPTER, lambda: load_file(str(path / ADAPTER)))
        state = {names.get(key, key): tensor for key, tensor in adapter.items()}
    else:
        state = _read(path, TRAINABLE, lambda: load_file(str(path / TRAINABLE)))
    _copy_into(path, dict(model.named_parameters()), state, every=False)


def _copy_into(source: Path, params: dict[str, nn.Parameter], state: dict[str, torch.Tensor],
               *, every: bool) -> None:
    """Copy ``state`` into ``params`` once every name and shape matches: each parameter that
    trains (``every``: each parameter) has its tensor, of its shape (``copy_`` would broadcast
    a smaller one silently), and no tensor is left over. A mismatch is one line."""
    missing = [name for name, p in params.items()
               if (every or p.requires_grad) and name not in state]
    unknown = [name for name in state if name not in params]
    shapes = [f"{name} {tuple(tensor.shape)} (model {tuple(params[name].shape)})"
              for name, tensor in state.items()
              if name in params and tensor.shape != params[name].shape]
    if missing or unknown or shapes:
        found = [f"{what} {names[:3]}" for what, names in (
            ("missing", missing), ("unexpected", unknown), ("other shapes", shapes)) if names]
        raise DpokitError(f"{source}: checkpoint does not match the model "
                          f"({', '.join(found)})")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device))
