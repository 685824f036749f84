"""Lock-step calls: barriers in order, errors and diverging control flow unwind every thread."""

import os
import threading
import time

import pytest
import torch

from prunetune.calibrate import lockstep
from prunetune.calibrate.lockstep import Lockstep, LockstepError


def live_workers():
    return [t for t in threading.enumerate() if t.name.startswith("prunetune-lockstep")]


def test_every_call_reaches_the_barrier_before_any_continues():
    log = []

    def call(i):
        log.append(("a", i))
        lockstep.pause("x")
        log.append(("b", i))
        lockstep.pause("y")
        return i * 10

    results = Lockstep([lambda i=i: call(i) for i in range(3)], lambda tag: log.append(tag)).run()
    assert results == [0, 10, 20]
    assert log == [("a", 0), ("a", 1), ("a", 2), "x", ("b", 0), ("b", 1), ("b", 2), "y"]
    assert not live_workers()


def test_an_error_in_one_call_is_raised_and_the_others_unwound():
    finished = []

    def call(i):
        lockstep.pause("x")
        if i == 1:
            raise ValueError("bad batch 1")
        lockstep.pause("y")
        finished.append(i)

    with pytest.raises(ValueError, match="bad batch 1"):
        Lockstep([lambda i=i: call(i) for i in range(3)], lambda tag: None).run()
    assert finished == [] and not live_workers()


@pytest.mark.parametrize("second", ["other tag", "no pause"])
def test_diverging_calls_are_refused(second):
    def call(i):
        if i == 0:
            lockstep.pause("x")
        elif second == "other tag":
            lockstep.pause("y")

    with pytest.raises(LockstepError, match="control flow depends on the data"):
        Lockstep([lambda i=i: call(i) for i in range(2)], lambda tag: None).run()
    assert not live_workers()


def test_grad_mode_is_carried_into_the_calls():
    with torch.no_grad():
        seen = Lockstep([torch.is_grad_enabled, torch.is_grad_enabled], lambda tag: None).run()
    assert seen == [False, False]
    assert Lockstep([torch.is_grad_enabled], lambda tag: None).run() == [True]


def test_pause_outside_a_call_is_an_error():
    with pytest.raises(RuntimeError, match="outside"):
        lockstep.pause("x")


# -- thread-local state, timeouts, thread count -------------------------------------------------

def torch_state():
    return (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_inference_mode_enabled(),
            torch.is_grad_enabled(), torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype)


def test_autocast_and_inference_mode_are_carried_into_the_calls():
    def call():
        before = torch_state()
        lockstep.pause("x")  # and still in place after a pause
        return before, torch_state()

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        expected = torch_state()
        seen = Lockstep([call, call], lambda tag: None).run()
    assert expected == (True, torch.bfloat16, True, False, torch.bfloat16)
    assert seen == [(expected, expected)] * 2
    assert Lockstep([torch_state], lambda tag: None).run() == [torch_state()]  # and nothing when the caller has none


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_is_carried_into_the_calls():
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        seen = Lockstep([torch.cuda.current_stream] * 2, lambda tag: None).run()
    assert seen == [stream, stream]


def test_torch_modes_cannot_be_carried_and_are_refused():
    from prunetune.errors import UsageError

    with torch.device("cpu"), pytest.raises(UsageError, match="function/dispatch mode"):
        Lockstep([lambda: None], lambda tag: None)


def test_a_call_that_never_reaches_the_barrier_times_out():
    from prunetune.calibrate.lockstep import LockstepTimeout

    release, finished = threading.Event(), []

    def call(i):
        lockstep.pause("x")
        if i == 1:
            release.wait()  # waits for something no other call can do while this one runs
        lockstep.pause("y")
        finished.append(i)

    start = time.monotonic()
    with pytest.raises(LockstepTimeout, match="call 1 of 3 ran for over 0.5 s after pausing at 'x'"):
        Lockstep([lambda i=i: call(i) for i in range(3)], lambda tag: None, timeout=0.5).run()
    assert time.monotonic() - start < 5
    assert [t.name for t in live_workers()] == ["prunetune-lockstep-1"]  # the others were unwound
    release.set()  # the stuck call wakes up, finds its run abandoned and unwinds
    deadline = time.monotonic() + 10
    while live_workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not live_workers() and finished == []


def live_thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_calls_share_a_bounded_number_of_threads():
    """Each thread that runs a parallel op gets its own OpenMP team: calls x threads unless bounded."""
    calls, threads = 8, 2
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.ones(1 << 20).sum()  # the caller's own team exists before counting
        baseline = live_thread_count()

        def call():
            torch.ones(1 << 20).sum()  # parallel in ATen: starts this thread's team
            torch.mm(torch.ones(256, 256), torch.ones(256, 256))
            lockstep.pause("x")
            return torch.get_num_threads(), live_thread_count()

        seen = Lockstep([call] * calls, lambda tag: None, thread_budget=calls).run()
        assert {n for n, _ in seen} == {1}  # a budget of 8 threads for 8 calls: one each
        assert max(count for _, count in seen) <= baseline + calls  # the calls' threads, and no team of their own
        # within the budget every call keeps the caller's thread count
        assert {n for n, _ in Lockstep([call] * 2, lambda tag: None, thread_budget=calls).run()} == {threads}
        # the caller's count, and the process-wide default a new thread starts from, are restored
        assert torch.get_num_threads() == threads
        fresh = []
        thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert fresh == [threads]
    finally:
        torch.set_num_threads(previous)
