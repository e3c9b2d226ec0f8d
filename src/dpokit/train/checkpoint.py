"""Checkpoints that survive crashes: ``output_dir/checkpoint-STEP/``.

Each holds the trainable parameters (``trainable.safetensors``), the optimizer and scheduler
states, the random generator states, the trainer state (step and data position, as JSON) and,
for TR-DPO, the moving reference weights. It is written into a hidden temporary directory and
renamed into place, so a crash mid-save leaves no partial checkpoint; ``save_total_limit`` prunes
the oldest. Everything is read back with ``safetensors`` or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpokit.errors import DpokitError

PREFIX = "checkpoint-"


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu").contiguous()
            for name, p in model.named_parameters() if p.requires_grad}


def _all_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters()}


def save_checkpoint(output_dir: str | Path, step: int, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, trainer_state: dict,
                    rng: dict, ref_model: nn.Module | None = None,
                    save_total_limit: int | None = None) -> Path:
    """Write ``checkpoint-STEP`` atomically and prune old ones; returns its path."""
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".{PREFIX}{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
    if ref_model is not None:
        save_file(_all_state(ref_model), str(tmp / "reference.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2),
                                            encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if save_total_limit is not None:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
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
                    scheduler: Any, ref_model: nn.Module | None = None) -> tuple[dict, dict]:
    """Restore weights, optimizer and scheduler in place; return (trainer state, rng state)."""
    path = Path(path)
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
        if ref_model is not None and (path / "reference.safetensors").is_file():
            ref_params = dict(ref_model.named_parameters())
            for name, tensor in load_file(str(path / "reference.safetensors")).items():
                ref_params[name].copy_(tensor.to(ref_params[name].device))
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device,
                                         weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    trainer_state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    return trainer_state, rng
