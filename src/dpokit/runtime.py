"""Where training runs: one process or many under ``torchrun``, device, precision, seeding.

The same code runs under ``python -m dpokit train`` and ``torchrun --nproc-per-node N -m dpokit
train``: with ``WORLD_SIZE`` > 1 in the environment (set by ``torchrun``) a process group is
created — NCCL on CUDA, gloo on CPU — and each process takes the GPU of its ``LOCAL_RANK``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dpokit.errors import DpokitError

log = logging.getLogger("dpokit.train")


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dtype: str
    """Compute precision asked for: float32, bfloat16 or float16."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16/float16 autocast where the device supports it; nothing for float32."""
        if self.dtype == "float32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.dtype == "bfloat16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (on a copy); identity in one process."""
        return self._all_reduce(tensor, "SUM")

    def all_reduce_min(self, tensor: torch.Tensor) -> torch.Tensor:
        """The minimum of a tensor over ranks (on a copy); identity in one process."""
        return self._all_reduce(tensor, "MIN")

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if not self.distributed:
            return tensor
        reduced = tensor.detach().clone().to(self.device)
        dist.all_reduce(reduced, op=getattr(dist.ReduceOp, op))
        return reduced

    def all_ok(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (one all-reduce; a barrier that carries a flag)."""
        failed = torch.tensor(float(not ok), dtype=torch.float64)
        return self.all_reduce_sum(failed).item() == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_runtime(device: str = "auto", dtype: str = "float32", *,
                  timeout_s: float = 1800.0) -> Runtime:
    """Read ``torchrun``'s environment, start the process group, pick the device.
    ``timeout_s``: how long a collective waits for the other ranks before it raises (a rank
    that hangs stops the run instead of holding every other rank forever)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DpokitError(f"device={device!r} but CUDA is not available on this machine")
        torch_device = torch.device("cuda", local_rank if world_size > 1 else
                                    (torch.device(device).index or 0))
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device(device)
    if dtype == "float16" and torch_device.type != "cuda":
        log.warning("float16 autocast needs a GPU; computing in float32 on %s", torch_device)
        dtype = "float32"
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=torch_device if torch_device.type == "cuda" else None)
    return Runtime(rank, world_size, local_rank, torch_device, dtype)


def shutdown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (all devices)."""
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Random generator states to store in a checkpoint (weights_only-loadable)."""
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), None))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
