"""Peak memory of a block of work: accelerator memory on CUDA, resident set size on CPU.

Usage::

    with track_peak_memory(device) as peak:
        prune(model, tokenizer, config)
    print(peak.peak_mb, peak.increase_mb, peak.kind)

On CUDA the allocator's peak counter is reset when the block starts, so ``peak_mb`` is the
block's own peak of allocated memory (weights already on the device included: the block needs
them). On CPU the only peak the kernel keeps is the process's resident set (VmHWM, reset by
writing 5 to /proc/self/clear_refs): it includes everything resident when the block starts
-- earlier stages' leftovers, heap the allocator kept -- so its absolute value depends on
what ran before. ``increase_mb`` (peak above the resident set at the block's start) is the
figure to compare between blocks there; :attr:`PeakMemory.block_mb` picks the right one.

Blocks may nest: an inner block resets the counters, so before doing so it hands the peak
reached so far to every enclosing block.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from dataclasses import dataclass

import torch

CUDA_ALLOCATED = "cuda_allocated"
RSS = "rss"


def _read_status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
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


def _rss_mb() -> float:
    kb = _read_status_kb("VmRSS")
    if kb is None:  # not Linux: the process-wide peak is the best available
        kb = _maxrss_kb()
    return kb / 1024


def _maxrss_kb() -> int:
    rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rusage // 1024 if sys.platform == "darwin" else rusage


def _rss_peak_mb() -> float:
    """The process's peak RSS since the last reset (since start where it cannot be reset)."""
    kb = _read_status_kb("VmHWM")
    return (kb if kb is not None else _maxrss_kb()) / 1024


@dataclass
class PeakMemory:
    """Filled in when the :func:`track_peak_memory` block ends (MB = 2**20 bytes).

    Attributes:
        device: where the memory was measured.
        peak_mb: the highest memory in use during the block, absolute: CUDA allocated memory,
            or on CPU the process's resident set (which counts what was resident before).
        kind: ``cuda_allocated`` or ``rss``.
        baseline_mb: the same measure when the block started.
    """

    device: str = "cpu"
    peak_mb: float = 0.0
    kind: str = RSS
    baseline_mb: float = 0.0

    @property
    def increase_mb(self) -> float:
        """How far the peak rose above the memory in use when the block started."""
        return max(0.0, self.peak_mb - self.baseline_mb)

    @property
    def block_mb(self) -> float:
        """The figure to report for the block: CUDA peak allocated; CPU RSS increase."""
        return self.peak_mb if self.kind == CUDA_ALLOCATED else self.increase_mb

    def _credit(self, peak_mb: float) -> None:
        self.peak_mb = max(self.peak_mb, peak_mb)


# The blocks open right now, outermost first: an inner block credits them before it resets
# the counters. Emptied as blocks end; nothing outlives a call.
_OPEN: list[PeakMemory] = []


@contextlib.contextmanager
def track_peak_memory(device: str | torch.device | None = None):
    """Measure the memory used inside the block; yields a :class:`PeakMemory`."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = device.type == "cuda"
    if cuda and device.index is None:  # one name per device, so nested blocks recognise each other
        device = torch.device("cuda", torch.cuda.current_device())
    result = PeakMemory(device=str(device))
    if cuda:
        result.kind = CUDA_ALLOCATED
        torch.cuda.synchronize(device)
        so_far = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        so_far = _rss_peak_mb()
    for outer in _OPEN:
        if outer.kind == result.kind and outer.device == result.device:
            outer._credit(so_far)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        result.baseline_mb = torch.cuda.memory_allocated(device) / 2**20
    else:
        _reset_vmhwm()
        result.baseline_mb = _rss_mb()
    _OPEN.append(result)
    try:
        yield result
    finally:
        _OPEN.remove(result)
        if cuda:
            torch.cuda.synchronize(device)
            result._credit(torch.cuda.max_memory_allocated(device) / 2**20)
        else:
            result._credit(_rss_peak_mb())
        for outer in _OPEN:  # the counters were reset inside: carry this block's peak outwards
            if outer.kind == result.kind and outer.device == result.device:
                outer._credit(result.peak_mb)
