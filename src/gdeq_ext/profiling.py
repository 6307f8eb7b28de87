"""Measuring memory and host synchronizations: the one implementation the training loop and the benchmarks share.

* CPU memory on Linux: the process's resident set (``/proc/self/statm``) and its high-water mark VmHWM
  (``/proc/self/status``), which ``/proc/self/clear_refs`` ("5") resets to the current size (Linux >= 4.0), so a
  peak read afterwards belongs to what ran in between. It counts everything resident: Python, torch, data, and
  memory the allocator keeps from earlier work.
* CUDA memory: the caching allocator's peak of tensor memory (``torch.cuda.max_memory_allocated``).
* Host synchronizations: what ``torch.cuda.set_sync_debug_mode("warn")`` reports during a call.
"""

from __future__ import annotations

import math
import os
import resource
import warnings

import torch

__all__ = ["PeakMemory", "count_syncs", "current_rss_bytes", "peak_rss_bytes", "reset_peak_rss"]


def current_rss_bytes() -> int:
    """Resident set size of this process now, bytes (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the resident-set high-water mark (VmHWM) to the current size (Linux >= 4.0; OSError elsewhere)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_bytes() -> int:
    """VmHWM of this process, bytes (Linux), else ``ru_maxrss`` (the peak since the process started)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of a stretch of work in MiB on ``device``: ``reset()`` before, ``read_mib()`` after.

    CUDA: the allocator's peak (tensors only). CPU: the process's peak resident memory in between (VmHWM); NaN
    where the high-water mark cannot be reset (not Linux, or /proc not writable).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.available = True

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            reset_peak_rss()
        except OSError:
            self.available = False

    def read_mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if not self.available:
            return math.nan
        return peak_rss_bytes() / 2**20


def count_syncs(fn) -> int:
    """Host synchronizations torch reports during ``fn()`` (``set_sync_debug_mode("warn")``; CUDA only)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)
