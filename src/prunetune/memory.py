"""Peak memory of a stage: accelerator memory on CUDA, resident set size on CPU.

On Linux the process's peak RSS (VmHWM) can be reset by writing 5 to
/proc/self/clear_refs, so each stage reports its own peak rather than the process's.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from dataclasses import dataclass

import torch


def _read_vmhwm_kb() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_vmhwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """Filled in when the :func:`track_peak_memory` block ends."""

    device: str = "cpu"
    peak_mb: float = 0.0
    kind: str = "rss"  # rss (CPU resident set) or cuda_allocated


@contextlib.contextmanager
def track_peak_memory(device: str | torch.device | None = None):
    """Measure the peak memory used inside the block (MB)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    result = PeakMemory(device=str(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result.kind = "cuda_allocated"
        try:
            yield result
        finally:
            torch.cuda.synchronize(device)
            result.peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        return
    _reset_vmhwm()
    try:
        yield result
    finally:
        peak_kb = _read_vmhwm_kb()
        if peak_kb is None:  # not Linux: the process-wide peak is the best available
            rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak_kb = rusage // 1024 if sys.platform == "darwin" else rusage
        result.peak_mb = peak_kb / 1024
