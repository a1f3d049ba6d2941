"""How dncut's worker processes run: allocator environment, heap trims, threads.

One module holds the process policy of every worker, training and evaluation alike:

    worker_env()            environment of the Ray Train workers (``RunConfig.worker_runtime_env``)
    release_freed_memory()  glibc ``malloc_trim(0)``: the Train loop calls it after every report
    retain_freed_memory()   glibc ``mallopt``: evaluation actors keep freed heap for the next batch
    set_threads(n)          torch's intra-op threads for a worker that owns ``n`` CPUs

The measurements behind each rule are in ``docs/operations.md`` ("Memory").
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

import torch

WORKER_ENV = {"MIMALLOC_PURGE_DELAY": "0"}
"""Environment of the Ray Train workers. ``MIMALLOC_PURGE_DELAY=0`` (mimalloc's ``purge_delay``
option, ms): the mimalloc allocator inside pyarrow (Arrow's default pool, used by Ray Train's
checkpoint uploads) returns freed pages to the kernel at once instead of after a delay, so the
worker's private memory does not step up at checkpoints (``docs/operations.md``). Builds whose
mimalloc lacks the option ignore it."""


def worker_env() -> dict[str, str]:
    """``WORKER_ENV`` merged with the user's choices.

    A variable set in the job's own ``runtime_env`` (which the Train workers inherit) is left out;
    one set in the driver's environment (a Ray Jobs entrypoint, a shell) is passed on as set.

    Returns:
        Variables for ``RunConfig(worker_runtime_env={"env_vars": ...})``.
    """
    import ray

    job = (ray.get_runtime_context().runtime_env.get("env_vars") or {}) if ray.is_initialized() else {}
    return {k: os.environ.get(k, v) for k, v in WORKER_ENV.items() if k not in job}


@functools.cache
def glibc():
    """The C library when it is glibc (Linux), else ``None`` (musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def release_freed_memory() -> bool:
    """Hand the free chunks glibc keeps inside its arenas back to the kernel (``malloc_trim(0)``,
    ``man 3 malloc_trim``). Called by the Train loop after every report.

    Returns:
        False where the C library is not glibc (nothing is done).
    """
    libc = glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def retain_freed_memory(mmap_mb: int = 32, trim_mb: int = 256) -> bool:
    """Keep freed heap in this process instead of returning it to the kernel (glibc ``mallopt``).

    The batched NCut allocates a few (B, n, n) float buffers per call (4-9 MB at B = 16, n = 260);
    with glibc's defaults they are mmap-ed and trimmed, then page-faulted back in on every batch.
    Blocks below ``mmap_mb`` MiB come from the heap (``M_MMAP_THRESHOLD``) and up to ``trim_mb``
    MiB of free heap is kept (``M_TRIM_THRESHOLD``). Evaluation actors call it once at start-up.

    Returns:
        False where glibc's ``mallopt`` is not available or refuses a setting.
    """
    libc = glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, mmap_mb << 20)) and bool(libc.mallopt(m_trim_threshold, trim_mb << 20))


def set_threads(cpus: float) -> int:
    """Torch intra-op threads for a worker that owns ``cpus`` logical CPUs (at least one).

    Returns:
        The thread count set.
    """
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    return threads
