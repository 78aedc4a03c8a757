"""What one piece of work cost this process: its own peak memory, wall and CPU seconds.

Why VmHWM and not ru_maxrss: both are the process's resident high-water mark, but only VmHWM
(/proc/self/status) can be reset: writing `5` to /proc/self/clear_refs sets it back to the current
resident size (Linux). ru_maxrss also keeps the largest mark of exited threads and of the image
before exec, so after a reset it can still report an earlier trial's peak. The arena resets before
each trial, so a trial's peak is the process's resident size at its start (imports, the arena's shared
data: what a standalone `sftlab train` holds too) plus what the trial itself added on top.

Where the reset is not possible (not Linux, no permission), the figure is the process-wide peak since
start and says so (`scope`: "process" instead of "trial"). On a GPU the CUDA allocator's peak
(torch.cuda.max_memory_allocated) is reset alongside, and reported as its own figure.
"""

from __future__ import annotations

import ctypes
import resource
import sys
import time
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float:
    """The process's resident high-water mark in MB (2**20 bytes): VmHWM where readable, else ru_maxrss."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == "darwin" else kib / 1024  # macOS reports bytes, Linux KiB


def reset_peak_rss() -> bool:
    """Set the resident high-water mark back to the current resident size; False where this cannot be done."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Hand freed heap pages back to the kernel (glibc malloc_trim), so that they stop counting as resident
    and the next trial's baseline is what is still in use, not what an earlier trial left cached."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim, or no way to


def _cuda():
    torch = sys.modules.get("torch")  # never import torch just to measure
    return torch if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None


class Meter:
    """Measures one piece of work: `start()` resets the peaks, `stop()` returns what it cost.

    stop() -> {"peak_mem_mb": resident peak (MB), "peak_scope": "trial" | "process", "start_mem_mb": resident
    size at start (the baseline inside the peak; None where unreadable), "wall_s", "cpu_s"
    (user + system seconds of every thread of this process), and "peak_gpu_mb" when CUDA was in use}."""

    def start(self) -> "Meter":
        self.scope = "trial" if reset_peak_rss() else "process"
        cuda = _cuda()
        if cuda is not None:
            cuda.cuda.reset_peak_memory_stats()
        self.start_mb = _status_mb("VmRSS")
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def stop(self) -> dict:
        out = {"peak_mem_mb": round(peak_rss_mb(), 1), "peak_scope": self.scope,
               "start_mem_mb": None if self.start_mb is None else round(self.start_mb, 1),
               "wall_s": round(time.perf_counter() - self.t0, 2), "cpu_s": round(time.process_time() - self.cpu0, 2)}
        cuda = _cuda()
        if cuda is not None:
            out["peak_gpu_mb"] = round(cuda.cuda.max_memory_allocated() / 2**20, 1)
        return out
