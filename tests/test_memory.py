"""dpokit.memory: the memory a run may still take, and recognising running out of it."""

from pathlib import Path

import pytest
import torch

from dpokit.memory import (
    available_bytes,
    host_available_bytes,
    is_out_of_memory,
    local_ranks,
    requested_bytes,
    shortage,
)


def fake_root(tmp_path, meminfo=None, cgroup=None):
    """A ``/``-like tree: ``proc/meminfo`` and the cgroup files given (name → text)."""
    (tmp_path / "proc").mkdir(parents=True)
    if meminfo is not None:
        (tmp_path / "proc" / "meminfo").write_text(meminfo)
    for name, text in (cgroup or {}).items():
        path = tmp_path / "sys" / "fs" / "cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


MEMINFO = "MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"


def test_meminfo_alone(tmp_path):
    assert host_available_bytes(fake_root(tmp_path, MEMINFO)) == 20_000_000 * 1024


def test_a_cgroup_limit_below_the_host_wins(tmp_path):
    root = fake_root(tmp_path, MEMINFO, {"memory.max": "8000000000\n",
                                         "memory.current": "3000000000\n"})
    assert host_available_bytes(root) == 5_000_000_000


def test_an_unlimited_cgroup_is_ignored(tmp_path):
    v2 = fake_root(tmp_path / "v2", MEMINFO, {"memory.max": "max\n", "memory.current": "5\n"})
    assert host_available_bytes(v2) == 20_000_000 * 1024
    v1 = fake_root(tmp_path / "v1", MEMINFO, {
        "memory/memory.limit_in_bytes": "9223372036854771712\n",
        "memory/memory.usage_in_bytes": "3000000000\n"})
    assert host_available_bytes(v1) == 20_000_000 * 1024
    v1_limited = fake_root(tmp_path / "v1l", MEMINFO, {
        "memory/memory.limit_in_bytes": "4000000000\n",
        "memory/memory.usage_in_bytes": "3000000000\n"})
    assert host_available_bytes(v1_limited) == 1_000_000_000


def test_nothing_readable_is_unknown(tmp_path):
    assert host_available_bytes(fake_root(tmp_path)) is None


def test_this_machine_reports_a_plausible_amount():
    """Here (Linux): at most MemTotal, and more than nothing."""
    available = available_bytes(torch.device("cpu"))
    lines = Path("/proc/meminfo").read_text().splitlines()
    total = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("MemTotal"))
    assert 0 < available <= total
    assert available_bytes(torch.device("cpu"), local_ranks=2) == pytest.approx(
        available / 2, rel=0.2)  # the ranks of one host share it (re-read: it moves a little)
    assert available_bytes(torch.device("meta")) is None


def test_the_address_space_limit_counts(tmp_path):
    """Under RLIMIT_AS (as the benchmark caps its runs) the headroom is the limit minus the
    virtual size — checked in a child process, the limit is not undone."""
    import subprocess
    import sys

    code = ("import resource, torch\n"
            "from dpokit.memory import host_available_bytes\n"
            "size = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
            "if l.startswith('VmSize'))\n"
            "resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20), resource.RLIM_INFINITY))\n"
            "print(host_available_bytes())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert 0 < int(out) <= 256 << 20


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 8589934592 bytes. Error code 12"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_the_cpu_allocator_failure_is_what_we_recognise():
    """The real message, under an address-space limit in a child process."""
    import subprocess
    import sys

    code = ("import resource, torch\n"
            "from dpokit.memory import is_out_of_memory\n"
            "resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.RLIM_INFINITY))\n"
            "try:\n    torch.empty(16 << 30, dtype=torch.uint8)\n"
            "except BaseException as error:\n    print(is_out_of_memory(error))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "True"


def test_local_ranks(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert local_ranks() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_ranks() == 4


def test_the_failed_allocation_size_is_read_from_the_message():
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                       "8589934592 bytes. Error code 12 (Cannot allocate memory)")
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a "
                                  "total capacity of 139.81 GiB of which 1.02 GiB is free.")
    assert requested_bytes(cpu) == 8 << 30
    assert requested_bytes(cuda) == 3 << 29
    assert requested_bytes(torch.OutOfMemoryError("Tried to allocate 20.00 MiB")) == 20 << 20
    assert requested_bytes(MemoryError()) is None
    assert shortage(cuda) == " (it asked for 1.50 GiB more)"
    assert shortage(MemoryError()) == ""
