"""Shared benchmark plumbing: timing, peak memory in a fresh process, table printing."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch


def time_call(fn: Callable[[], object], device: str, warmup: int = 1, iters: int = 3) -> float:
    """Median wall time of ``fn`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_memory_mib(fn: Callable[[], object], device: str) -> float:
    """Peak memory that one call of ``fn`` adds above what is held before it, in MiB.

    CUDA: the allocator's peak. CPU: the growth of the process's maximum resident set,
    so call this once per fresh process, before any other large allocation.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _current_rss_kib()
    fn()
    return max(0.0, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)


def _current_rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
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


def devices() -> list[str]:
    """CPU, and CUDA when present."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
