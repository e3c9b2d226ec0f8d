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


def fake_root(tmp_path, meminfo=None, cgroup=None, self_cgroup=None):
    """A ``/``-like tree: ``proc/meminfo``, ``proc/self/cgroup`` and the cgroup files given
    (path under ``sys/fs/cgroup`` → text)."""
    (tmp_path / "proc" / "self").mkdir(parents=True)
    if meminfo is not None:
        (tmp_path / "proc" / "meminfo").write_text(meminfo)
    if self_cgroup is not None:
        (tmp_path / "proc" / "self" / "cgroup").write_text(self_cgroup)
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


def test_the_own_cgroup_and_its_ancestors_count_and_file_cache_is_free(tmp_path):
    """v2, a job's cgroup under a slice: the slice's 6 GB limit (5 GB used, 2 GB of it
    reclaimable file cache → 3 GB headroom) binds before the job's 10 GB (4 GB used, 1 GB
    cache → 7 GB) and before the host's 20 GB; the unlimited root is ignored."""
    root = fake_root(tmp_path, MEMINFO, {
        "memory.max": "max\n", "memory.current": "9000000000\n",
        "slice/memory.max": "6000000000\n", "slice/memory.current": "5000000000\n",
        "slice/memory.stat": "anon 3000000000\ninactive_file 2000000000\n",
        "slice/job/memory.max": "10000000000\n", "slice/job/memory.current": "4000000000\n",
        "slice/job/memory.stat": "anon 3000000000\ninactive_file 1000000000\n",
    }, self_cgroup="0::/slice/job\n")
    assert host_available_bytes(root) == 3_000_000_000
    v1 = fake_root(tmp_path / "v1", MEMINFO, {
        "memory/memory.limit_in_bytes": "9223372036854771712\n",
        "memory/memory.usage_in_bytes": "1\n",
        "memory/docker/abc/memory.limit_in_bytes": "4000000000\n",
        "memory/docker/abc/memory.usage_in_bytes": "3500000000\n",
        "memory/docker/abc/memory.stat": "cache 9\ntotal_inactive_file 500000000\n",
    }, self_cgroup="12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
    assert host_available_bytes(v1) == 1_000_000_000
    # a cgroup path the mount does not show (a namespaced container): the mount's root
    hidden = fake_root(tmp_path / "hidden", MEMINFO, {
        "memory/memory.limit_in_bytes": "8000000000\n",
        "memory/memory.usage_in_bytes": "2000000000\n",
    }, self_cgroup="4:memory:/process_api/9d5b\n")
    assert host_available_bytes(hidden) == 6_000_000_000


def test_nothing_readable_is_unknown(tmp_path):
    assert host_available_bytes(fake_root(tmp_path)) is None


def test_this_machine_reports_a_plausible_amount():
    """Here (Linux): at most MemTotal, and more than nothing."""
    available = available_bytes(torch.device("cpu"))
    lines = Path("/proc/meminfo").read_text().splitlines()
    total = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("MemTotal"))
    assert 0 < available <= total
    assert available_bytes(torch.device("meta")) is None


def test_the_ranks_of_a_host_share_it_but_not_their_address_space(monkeypatch):
    import dpokit.memory as memory

    monkeypatch.setattr(memory, "host_available_bytes", lambda: 8_000)
    monkeypatch.setattr(memory, "address_space_headroom", lambda: None)
    assert available_bytes(torch.device("cpu"), local_ranks=4) == 2_000
    monkeypatch.setattr(memory, "address_space_headroom", lambda: 3_000)
    assert available_bytes(torch.device("cpu"), local_ranks=1) == 3_000
    assert available_bytes(torch.device("cpu"), local_ranks=2) == 3_000  # per process: 4,000
    assert available_bytes(torch.device("cpu"), local_ranks=4) == 2_000
    monkeypatch.setattr(memory, "host_available_bytes", lambda: None)
    assert available_bytes(torch.device("cpu"), local_ranks=4) == 3_000


LINUX = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


@LINUX
def test_the_address_space_limit_counts(tmp_path):
    """Under RLIMIT_AS (as the benchmark caps its runs) the headroom is the limit minus the
    virtual size — checked in a child process, the limit is not undone."""
    import subprocess
    import sys

    code = ("import resource, torch\n"
            "from dpokit.memory import available_bytes\n"
            "size = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
            "if l.startswith('VmSize'))\n"
            "resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20), resource.RLIM_INFINITY))\n"
            "print(available_bytes(torch.device('cpu')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert 0 < int(out) <= 256 << 20


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 8589934592 bytes. Error code 12"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                                          "`cublasCreate(handle)`"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


@LINUX
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
