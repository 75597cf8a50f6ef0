"""The cost of one edit: CPU time per frame and the peak memory it adds."""

from __future__ import annotations

import ctypes
import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def unmap_freed_buffers() -> None:
    """Have glibc map every buffer over 64 KiB on its own and unmap it once freed, so the
    resident set follows live tensors (otherwise freed buffers stay in the heap and a peak
    measured from the resident set misses or inflates an edit's). A no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 2**10)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measured(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, dict]:
    """``fn()`` and its cost: ``seconds`` (process CPU time on the CPU, which a machine shared
    with other work disturbs less than wall time; wall time on CUDA) and ``peak_mib``, the
    peak memory above what was held before (CUDA: the allocator's peak; CPU: the growth of
    the resident set's high-water mark, reset first through ``/proc/self/clear_refs``; NaN
    where the kernel offers neither)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return out, {
            "seconds": seconds,
            "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
        }
    try:
        CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident set
        reset = True
    except OSError:
        reset = False
    base = _status_kib("VmRSS")
    start = time.process_time()
    out = fn()
    seconds = time.process_time() - start
    peak = _status_kib("VmHWM") if reset else None
    mib = (peak - base) / 1024 if peak is not None and base is not None else float("nan")
    return out, {"seconds": seconds, "peak_mib": max(0.0, mib)}
