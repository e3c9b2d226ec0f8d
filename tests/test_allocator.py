"""dpokit.memory.tune_allocator: glibc keeps tensor-sized blocks in its heap (a fixed mmap
threshold), observed through glibc's own counters in a fresh process."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")

PROBE = r"""
import ctypes, sys
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
from dpokit.memory import tune_allocator
tuned = tune_allocator()
before = libc.mallinfo2().hblks
block = libc.malloc(4 << 20)   # a 4 MiB block: above glibc's first mmap threshold (128 KiB)
print(tuned, libc.mallinfo2().hblks - before)
"""


def _probe(**env):
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    tuned, mapped = done.stdout.split()
    return tuned == "True", int(mapped)


def test_a_tuned_process_takes_a_tensor_sized_block_from_its_heap():
    assert _probe() == (True, 0)  # no fresh mmap (zero-filled by the kernel at first touch)


@pytest.mark.parametrize("env", [{"DPOKIT_MALLOC_TUNING": "0"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                 {"MALLOC_TRIM_THRESHOLD_": "134217728"}])
def test_the_users_own_malloc_settings_and_the_opt_out_are_left_alone(env):
    assert _probe(**env) == (False, 1)  # glibc's default: the block is mmapped
