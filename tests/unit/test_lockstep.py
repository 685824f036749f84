"""Lock-step calls: barriers in order, errors and diverging control flow unwind every thread."""

import threading

import pytest
import torch

from prunetune import lockstep
from prunetune.lockstep import Lockstep, LockstepError


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
