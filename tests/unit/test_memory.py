"""track_peak_memory: a block's own peak, not what earlier work left resident."""

import gc
import sys

import pytest
import torch

from prunetune.memory import track_peak_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-block CPU peaks need Linux's clear_refs")

MB = 2**20


def _filled(mb: int) -> torch.Tensor:
    return torch.ones(mb * MB // 4)  # float32, every page written (torch.empty would stay unresident)


def _trim() -> None:
    """Hand freed heap back to the OS, so earlier tests' leftovers are not reused silently inside the block."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def test_cpu_increase_counts_memory_allocated_inside_the_block():
    _trim()
    with track_peak_memory("cpu") as peak:
        block = _filled(200)
        del block
    assert peak.kind == "rss"
    assert peak.increase_mb >= 190
    assert peak.block_mb == peak.increase_mb
    assert peak.peak_mb >= peak.baseline_mb + 190  # peak_mb stays the absolute process peak


def test_cpu_increase_excludes_memory_freed_before_the_block():
    earlier = _filled(300)
    del earlier
    gc.collect()
    with track_peak_memory("cpu") as peak:
        small = _filled(1)
        del small
    assert peak.increase_mb < 50, peak


def test_cpu_increase_excludes_memory_already_resident():
    resident = _filled(300)
    with track_peak_memory("cpu") as peak:
        small = _filled(1)
        del small
    assert peak.increase_mb < 50, peak
    assert peak.peak_mb >= 300  # the absolute peak does count it
    del resident


def test_nested_blocks_keep_the_outer_peak():
    _trim()
    with track_peak_memory("cpu") as outer:
        before_inner = _filled(200)
        del before_inner
        with track_peak_memory("cpu") as inner:  # resets the kernel's counter
            small = _filled(1)
            del small
    assert inner.increase_mb < 50, inner
    assert outer.increase_mb >= 190, outer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_is_the_blocks_own():
    kept = torch.ones(64 * MB // 4, device="cuda")
    with track_peak_memory("cuda") as peak:
        block = torch.ones(128 * MB // 4, device="cuda")
        del block
    assert peak.kind == "cuda_allocated"
    assert peak.baseline_mb >= 64 and peak.increase_mb >= 127
    assert peak.block_mb == peak.peak_mb >= 64 + 127
    del kept
