"""How much memory a run may still take on its device, and whether an error is running out of it.

:func:`available_bytes` answers before the memory is needed (the trainer's automatic choice of
activation recomputation reads it); :func:`is_out_of_memory` recognises the failure afterwards,
so the trainer can stop with one line that says what to change instead of an allocator's
traceback:

- CUDA: the driver's free memory plus what PyTorch's caching allocator holds unused;
- CPU (Linux): the least of ``MemAvailable`` (``/proc/meminfo``), the cgroup's limit minus its
  usage (a container's ``memory.max``; v1's ``memory.limit_in_bytes``) and the address-space
  limit (``RLIMIT_AS``) minus the process's virtual size; shared by the ranks on this host;
- anything else (MPS, another OS): unknown (``None``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_CGROUP_FILES = (("memory.max", "memory.current"),  # cgroup v2
                 ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))  # v1
_UNLIMITED = 1 << 60  # cgroup v1 writes a page-rounded 2⁶³ for "no limit"

OUT_OF_MEMORY_MARKS = ("can't allocate memory", "out of memory", "not enough memory")
"""Messages of allocation failures that are not ``torch.OutOfMemoryError``: the CPU allocator's
``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory: you tried to allocate …"), MPS's
("MPS backend out of memory")."""


def available_bytes(device: torch.device, *, local_ranks: int = 1) -> int | None:
    """Bytes this process may still allocate on ``device`` (see the module doc); ``None`` where
    that is unknown. ``local_ranks``: processes sharing the host's memory (CPU only)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "cpu":
        host = host_available_bytes()
        return None if host is None else host // max(1, local_ranks)
    return None


def host_available_bytes(root: Path = Path("/")) -> int | None:
    """The host memory this process may still take (Linux; ``None`` elsewhere): the least of
    ``MemAvailable``, the cgroup's headroom and the address-space limit's headroom. ``root``
    stands for ``/`` (tests point it at a fake ``proc``/``sys`` tree)."""
    limits = []
    meminfo = _read_fields(root / "proc" / "meminfo")
    if "MemAvailable" in meminfo:
        limits.append(meminfo["MemAvailable"] * 1024)  # kB
    for limit_name, usage_name in _CGROUP_FILES:
        limit = _read_int(root / "sys" / "fs" / "cgroup" / limit_name)
        usage = _read_int(root / "sys" / "fs" / "cgroup" / usage_name)
        if limit is not None and usage is not None and limit < _UNLIMITED:
            limits.append(max(0, limit - usage))
            break
    if root == Path("/"):
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        status = _read_fields(Path("/proc/self/status"))
        if soft != resource.RLIM_INFINITY and "VmSize" in status:
            limits.append(max(0, soft - status["VmSize"] * 1024))
    return min(limits) if limits else None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA's ``torch.OutOfMemoryError``, the CPU
    allocator's or MPS's ``RuntimeError``)."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and any(
        mark in str(error) for mark in OUT_OF_MEMORY_MARKS)


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def requested_bytes(error: BaseException) -> int | None:
    """The size of the allocation that failed, read from the message: the CPU allocator's "you
    tried to allocate N bytes", CUDA's "Tried to allocate 2.00 GiB"; None when it does not say."""
    text = str(error)
    found = re.search(r"allocate (\d+) bytes", text)
    if found:
        return int(found[1])
    found = re.search(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)", text)
    return int(float(found[1]) * _UNITS[found[2]]) if found else None


def shortage(error: BaseException) -> str:
    """``" (it asked for 2.00 GiB more)"`` when the error says how much, else ``""``."""
    asked = requested_bytes(error)
    return "" if asked is None else f" (it asked for {asked / 2**30:.2f} GiB more)"


def local_ranks() -> int:
    """Processes of this run on this host (torchrun's ``LOCAL_WORLD_SIZE``; 1 without it)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _read_fields(path: Path) -> dict[str, int]:
    """``Key:   123 kB`` lines (``/proc/meminfo``, ``/proc/self/status``) as ``{key: 123}``."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        number = value.split()[0] if value.split() else ""
        if number.isdigit():
            fields[key.strip()] = int(number)
    return fields
