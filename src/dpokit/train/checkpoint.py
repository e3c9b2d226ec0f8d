"""Checkpoints that survive crashes: ``output_dir/checkpoint-STEP/``.

Each holds the trainable parameters (``trainable.safetensors``), the optimizer and scheduler
states, the random generator states, the trainer state (step and data position, as JSON) and,
for TR-DPO, the moving reference weights. It is written into a hidden temporary directory and
renamed into place, so a crash mid-save leaves no partial checkpoint; ``save_total_limit`` prunes
the oldest. Everything is read back with ``safetensors`` or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpokit.atomic import replace, temporary_sibling
from dpokit.errors import DpokitError

PREFIX = "checkpoint-"


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
                    barrier: Callable[[], None] = lambda: None) -> Path:
    """Write ``checkpoint-STEP`` atomically and prune old ones; returns its path.

    Called on every rank. ``sharded`` (FSDP) writes model and optimizer with
    ``torch.distributed.checkpoint`` — each rank its own shard — instead of one file from rank 0;
    every rank stores its own random generator state.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step}"
    tmp = temporary_sibling(final, shared=True)  # one name on every rank
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state},
                 checkpoint_id=str(tmp / "sharded"))
    torch.save(rng, tmp / f"rng_{rank}.pt")
    if rank == 0:
        if not sharded:
            save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if ref_model is not None:
            save_file(_all_state(ref_model), str(tmp / "reference.safetensors"))
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2),
                                                encoding="utf-8")
    barrier()
    if rank == 0:
        replace(tmp, final)
        if save_total_limit is not None:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.glob(f"{PREFIX}*") if p.is_dir()
             and p.name[len(PREFIX):].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: a path, the latest in ``output_dir`` for ``auto``, or None."""
    if resume is None:
        return None
    if resume == "auto":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise DpokitError(f"resume: {path} is not a dpokit checkpoint (no trainer_state.json)")
    return path


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
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device,
                                             weights_only=True))
    if ref_model is not None and (path / "reference.safetensors").is_file():
        with torch.no_grad():
            ref_params = dict(ref_model.named_parameters())
            for name, tensor in load_file(str(path / "reference.safetensors")).items():
                ref_params[name].copy_(tensor.to(ref_params[name].device))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng_{rank}.pt"
    if not rng_file.is_file():
        raise DpokitError(f"{path} has no random state for rank {rank}; resume with the same "
                          f"number of processes it was written with")
    rng = torch.load(rng_file, weights_only=True)
    trainer_state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    return trainer_state, rng


def _load_trainable(path: Path, model: nn.Module) -> None:
    """Copy ``trainable.safetensors`` into ``model``; a mismatch is a user error."""
    state = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in state]
    unknown = [name for name in state if name not in params]
    if missing or unknown:
        raise DpokitError(f"{path}: checkpoint does not match the model (missing "
                          f"{missing[:3]}, unexpected {unknown[:3]})")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device))
