"""How much memory a run may still take on its device, and whether an error is running out of it.

:func:`available_bytes` answers before the memory is needed (the trainer's automatic choice of
activation recomputation reads it); :func:`is_out_of_memory` recognises the failure afterwards,
so the trainer can stop with one line that says what to change instead of an allocator's
traceback:

- CUDA: the driver's free memory plus what PyTorch's caching allocator holds unused;
- CPU (Linux): the host's share — the least of ``MemAvailable`` (``/proc/meminfo``) and the
  headroom of this process's memory cgroup and each of its ancestors (limit minus usage, the
  reclaimable file cache not counted as used; v2's ``memory.max`` and ``memory.high``, past
  which the kernel throttles the cgroup; v1's ``memory.limit_in_bytes``), divided among the
  ranks on this host — and this process's own limits: address space (``RLIMIT_AS``) minus its
  virtual size, data segment (``RLIMIT_DATA``, ``ulimit -d``, which counts the allocator's
  private mappings) minus its data size;
- anything else (MPS, another OS): unknown (``None``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_UNLIMITED = 1 << 60  # cgroup v1 writes a page-rounded 2⁶³ for "no limit"
_CGROUPS = {"v2": ("", ("memory.max", "memory.high"), "memory.current", "inactive_file"),
            "v1": ("memory", ("memory.limit_in_bytes",), "memory.usage_in_bytes",
                   "total_inactive_file")}
"""Per cgroup version: the mount under /sys/fs/cgroup, the limits (the least binds), usage and
``memory.stat``'s reclaimable-file-cache key."""

OUT_OF_MEMORY_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
                        MemoryError)
"""CUDA's allocator error (``torch.OutOfMemoryError``; ``torch.cuda.`` before PyTorch 2.5) and
Python's."""

OUT_OF_MEMORY_MARKS = ("can't allocate memory", "out of memory", "not enough memory",
                       "ALLOC_FAILED")
"""Messages of allocation failures that are not ``torch.OutOfMemoryError``: the CPU allocator's
``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory: you tried to allocate …"), MPS's
("MPS backend out of memory"), cuBLAS's and cuDNN's (``CUBLAS_STATUS_ALLOC_FAILED``)."""


def available_bytes(device: torch.device, *, local_ranks: int = 1) -> int | None:
    """Bytes this process may still allocate on ``device`` (see the module doc); ``None`` where
    that is unknown. ``local_ranks``: processes sharing the host's memory (CPU only)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type != "cpu":
        return None
    host = host_available_bytes()
    limits = [] if host is None else [host // max(1, local_ranks)]
    own = address_space_headroom()
    if own is not None:
        limits.append(own)
    return min(limits) if limits else None


def host_available_bytes(root: Path = Path("/")) -> int | None:
    """The host memory processes here may still take (Linux; ``None`` elsewhere): the least of
    ``MemAvailable`` and the cgroup headroom (:func:`cgroup_headroom`). ``root`` stands for
    ``/`` (tests point it at a fake ``proc``/``sys`` tree)."""
    limits = []
    meminfo = _read_fields(root / "proc" / "meminfo")
    if "MemAvailable" in meminfo:
        limits.append(meminfo["MemAvailable"] * 1024)  # kB
    cgroup = cgroup_headroom(root)
    if cgroup is not None:
        limits.append(cgroup)
    return min(limits) if limits else None


def cgroup_headroom(root: Path = Path("/")) -> int | None:
    """The least ``limit − (usage − reclaimable file cache)`` over this process's memory cgroup
    (``/proc/self/cgroup``) and its ancestors up to the mount's root, v2 or v1; without
    ``/proc/self/cgroup``, the mount's root alone. None when no level has a limit."""
    try:
        lines = (root / "proc" / "self" / "cgroup").read_text().splitlines()
    except OSError:
        lines = []
    paths = {}
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        version = "v2" if controllers == "" else "v1" if "memory" in controllers.split(",") \
            else None
        if version is not None:
            paths[version] = path.strip("/")
    headrooms = []
    for version, (mount, limit_names, usage_name, cache_key) in _CGROUPS.items():
        base = root / "sys" / "fs" / "cgroup" / mount
        path = Path(paths.get(version, ""))
        for level in [path, *path.parents]:
            directory = base / level
            limits = [_read_int(directory / name) for name in limit_names]
            limit = min((n for n in limits if n is not None), default=None)
            usage = _read_int(directory / usage_name)
            if limit is None or usage is None or limit >= _UNLIMITED:
                continue
            cache = _read_fields(directory / "memory.stat", separator=" ").get(cache_key, 0)
            headrooms.append(max(0, limit - max(0, usage - cache)))
    return min(headrooms) if headrooms else None


def address_space_headroom() -> int | None:
    """The least of ``RLIMIT_AS`` minus this process's virtual size (``VmSize``) and
    ``RLIMIT_DATA`` minus its data size (``VmData``: heap and private writable mappings, where
    PyTorch's CPU allocator takes its memory); None without either limit."""
    import resource

    status = _read_fields(Path("/proc/self/status"))
    headrooms = []
    for limit, used in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft, _ = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY and used in status:
            headrooms.append(max(0, soft - status[used] * 1024))
    return min(headrooms) if headrooms else None


MALLOC_MMAP_THRESHOLD = 32 << 20
"""glibc ``M_MMAP_THRESHOLD`` set by :func:`tune_allocator`: blocks below it come from the heap
(the most glibc allows: 32 MiB on 64-bit)."""
MALLOC_TRIM_THRESHOLD = 256 << 20
"""glibc ``M_TRIM_THRESHOLD`` set by :func:`tune_allocator`: free memory at the heap's top
kept for the next allocations up to this much."""
_TUNED: list[bool] = []


def tune_allocator() -> bool:
    """Keep the CPU's tensor-sized blocks in glibc's heap between uses: a fixed mmap threshold
    of :data:`MALLOC_MMAP_THRESHOLD` and a trim threshold of :data:`MALLOC_TRIM_THRESHOLD`
    (``mallopt``). By default glibc serves blocks of one to a few MB with fresh ``mmap``s
    while its dynamic threshold adapts, and every such block is zero-filled by the kernel on
    first touch — a forward pass's activations each time: the reference pass runs ~10% faster
    and a training step ~2% (benchmarks/README, twelfth session), at the same peak memory.
    Once a process, on Linux with glibc; not where the user set glibc's malloc tunables
    (``GLIBC_TUNABLES``, ``MALLOC_*_`` variables: theirs stand), nor with
    ``DPOKIT_MALLOC_TUNING=0``. True when it set them."""
    if _TUNED:
        return _TUNED[0]
    import platform

    environ = os.environ
    chosen = ("glibc.malloc" in environ.get("GLIBC_TUNABLES", "")
              or any(k.startswith("MALLOC_") and k.endswith("_") for k in environ)
              or environ.get("DPOKIT_MALLOC_TUNING", "1") == "0")
    ok = False
    if not chosen and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        import ctypes

        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            m_mmap_threshold, m_trim_threshold = -3, -1  # glibc's <malloc.h>
            ok = bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)
                      and mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))
        except (AttributeError, OSError):
            ok = False
    _TUNED.append(ok)
    return ok


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA's ``torch.OutOfMemoryError``, the CPU
    allocator's or MPS's ``RuntimeError``)."""
    if isinstance(error, OUT_OF_MEMORY_ERRORS):
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


def error_line(error: BaseException) -> str:
    """The first line of ``error``'s message (at most 200 characters; its type's name when it
    has none), for a one-line report."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def release_cached(device: torch.device) -> None:
    """Free what a failed allocation's attempt left behind: unreachable tensors (a cycle through
    the failed frames) and, on CUDA, the caching allocator's unused blocks."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def _read_fields(path: Path, separator: str = ":") -> dict[str, int]:
    """``Key:   123 kB`` lines (``/proc/meminfo``, ``/proc/self/status``; ``separator=" "``:
    ``memory.stat``'s ``key 123``) as ``{key: 123}``."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(separator)
        number = value.split()[0] if value.split() else ""
        if number.isdigit():
            fields[key.strip()] = int(number)
    return fields
