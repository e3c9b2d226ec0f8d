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

import numpy as np
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
    owns_group: bool = False
    """Whether :func:`setup_runtime` started the process group (then :func:`shutdown_runtime`
    destroys it; a group the caller started is the caller's to destroy)."""

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


def _env_int(name: str, default: int) -> int:
    """An integer variable of ``torchrun``'s environment, or a line naming it."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise DpokitError(f"environment variable {name}={text!r} is not a whole number (torchrun "
                          f"sets it; unset it to run one process)") from None


def setup_runtime(device: str = "auto", dtype: str = "float32", *,
                  timeout_s: float = 1800.0) -> Runtime:
    """Read ``torchrun``'s environment, start the process group, pick the device.
    ``timeout_s``: how long a collective waits for the other ranks before it raises (a rank
    that hangs stops the run instead of holding every other rank forever)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
    distributed = world_size > 1
    # (a rank ≥ 1 of a one-process run would write nothing: no config, metrics or model)
    if world_size < 1 or not 0 <= rank < world_size or (
            distributed and not 0 <= local_rank < local_world):
        raise DpokitError(f"torchrun environment: RANK={rank}, LOCAL_RANK={local_rank} do not fit "
                          f"WORLD_SIZE={world_size}, LOCAL_WORLD_SIZE={local_world}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DpokitError(f"device={device!r} but CUDA is not available on this machine")
        index = torch.device(device).index
        if distributed and index is not None:  # each process takes its LOCAL_RANK's GPU
            raise DpokitError(f"device={device!r} names one GPU, but torchrun runs {world_size} "
                              f"processes, each on the GPU of its LOCAL_RANK; use device cuda")
        index = local_rank if distributed else (index or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise DpokitError(
                f"device cuda:{index}" + (f" (LOCAL_RANK {local_rank})" if distributed else "")
                + f" does not exist: this machine shows {count} GPU(s)"
                + (" — start at most that many processes per node (--nproc-per-node)"
                   if distributed else ""))
        torch_device = torch.device("cuda", index)
        torch.cuda.set_device(torch_device)
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise DpokitError(f"bf16 needs a GPU with bfloat16 support; "
                              f"{torch.cuda.get_device_name(torch_device)} has none — use fp16")
    elif device == "mps":
        if not torch.backends.mps.is_available():
            raise DpokitError("device='mps' but MPS is not available on this machine")
        if distributed:
            raise DpokitError("device mps under torchrun: no process-group backend reduces MPS "
                              "tensors; run one process, or use device cpu")
        torch_device = torch.device("mps")
    else:
        torch_device = torch.device(device)
    if dtype == "float16" and torch_device.type != "cuda":
        log.warning("float16 autocast needs a GPU; computing in float32 on %s", torch_device)
        dtype = "float32"
    owns_group = False
    if distributed and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                    device_id=torch_device if torch_device.type == "cuda" else None)
        except (ValueError, dist.DistError) as error:  # a launcher's missing or wrong settings
            where = ", ".join(f"{name}={os.environ.get(name, '(unset)')}"
                              for name in ("MASTER_ADDR", "MASTER_PORT"))
            first = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise DpokitError(f"rank {rank}: the process group of WORLD_SIZE={world_size} did "
                              f"not start ({where}): {first}; launch with torchrun") from None
        owns_group = True
    return Runtime(rank, world_size, local_rank, torch_device, dtype, owns_group)


def shutdown_runtime(runtime: Runtime) -> None:
    """Destroy the process group :func:`setup_runtime` started (once; a group the caller had
    started before is left to the caller)."""
    if runtime.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices) — the same on every rank,
    so every rank builds the same initial weights (LoRA's, FSDP's shards)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Random generator states to store in a checkpoint (weights_only-loadable)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": list(internal), "python_version": version, "python_gauss": gauss,
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s states (a checkpoint of an older dpokit has no NumPy state;
    of a machine with more GPUs, the states of the GPUs this one has)."""
    random.setstate((state["python_version"], tuple(state["python"]),
                     state.get("python_gauss")))
    if "numpy" in state:
        saved = state["numpy"]
        np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32),
                             saved["pos"], saved["has_gauss"], saved["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
