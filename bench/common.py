"""Shared benchmark plumbing: timing, peak memory in a fresh process, table printing."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch


def time_call(
    fn: Callable[[], object],
    device: str,
    warmup: int = 1,
    iters: int = 3,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median time of ``fn`` in seconds, after ``warmup`` untimed calls.

    ``clock`` is wall time by default; ``time.process_time`` (CPU time of this process)
    is steadier on a CPU shared with other work.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = clock()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    return sorted(times)[len(times) // 2]


def peak_memory_mib(fn: Callable[[], object], device: str, *, warmup: int = 0) -> float:
    """Peak memory that one call of ``fn`` adds above what is held before it, in MiB.

    ``warmup`` untimed calls come first: a first call also faults in code pages of the
    libraries it runs (100+ MiB for a first backward) and fills caches, which is not the
    model's memory; but it also allocates state that persists (optimizer), so it is opt-in.
    CUDA: the allocator's peak. CPU: the growth of the process's peak resident set during
    the call (the kernel's peak is reset first, so an earlier peak cannot hide it). It
    follows live tensor memory only in a fresh process that called
    ``map_large_buffers_separately`` before building anything.
    """
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    if _reset_peak_rss():
        base = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
    else:  # an upper bound: the warm-up's peak may exceed the call's
        base = _status_kib("VmRSS")
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0.0, (peak - base) / 1024)


def map_large_buffers_separately() -> None:
    """Make glibc map each buffer over 64 KiB on its own and unmap it once freed.

    Then a process's resident set follows its live tensors; with glibc's default, freed
    buffers stay in the heap for reuse and fragmentation inflates CPU peaks (20-80% here).
    Allocation gets slower (about 30% on a UNet step): call ``reuse_heap`` before timing.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 2**10)


def reuse_heap() -> None:
    """Undo ``map_large_buffers_separately``: the heap thresholds glibc's own tuning reaches."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def _glibc() -> ctypes.CDLL | None:
    """glibc, for malloc_trim and mallopt; None on other C libraries."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set (VmHWM) to the current one; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB; max RSS where absent."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_worker(script: str, args: Sequence[str]) -> dict:
    """Run ``script --worker args...`` in a fresh interpreter; it prints one JSON line."""
    out = subprocess.run(
        [sys.executable, script, "--worker", *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], columns: Sequence[str]) -> None:
    """Print rows as an aligned plain-text table."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def machine_line(threads: Sequence[int] | None = None) -> str:
    """The machine a table's figures come from: CPU model, ISA, threads, PyTorch, load."""
    from model.weights.calibration import cpu_model

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu_model()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"threads {list(threads) if threads else torch.get_num_threads()}, "
        f"PyTorch {torch.__version__}; load average {load}"
    )


def devices() -> list[str]:
    """CPU, and CUDA when present."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def summary(doc: str | None) -> str:
    """A script docstring's first paragraph on one line (``--help``'s description)."""
    return " ".join((doc or "").split("\n\n")[0].split())
