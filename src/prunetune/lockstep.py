"""Several calls run in lock step: one thread each, one thread running at a time.

A call may :func:`pause` (from any depth, e.g. inside a module's forward hook). Once every
unfinished call has paused at the same tag, ``on_barrier(tag)`` runs in the caller's thread
and the calls resume, one after the other, in order. This is what lets the calibration
driver prune a layer *between* the point where every calibration batch has produced the
layer's input and the point where the first batch multiplies by its weights, while still
running the block batch by batch (see :func:`prunetune.calibrate.prune_sequentially` with
``true_sequential``): only the activations alive at the pause point are kept for all
batches, not a whole-batch forward's temporaries.

The calls never run concurrently, so they need no locks of their own. Grad mode and the
current CUDA device (thread-local in PyTorch) are carried over from the caller.
"""

from __future__ import annotations

import threading
from typing import Callable, Hashable

import torch

_current = threading.local()


class LockstepError(RuntimeError):
    """The calls did not reach the same pauses (data-dependent control flow)."""


class _Aborted(BaseException):
    """Unwinds a paused call when the run is abandoned (not an Exception: user code must not catch it)."""


class _Call:
    def __init__(self, index: int, fn: Callable[[], object], run: "Lockstep"):
        self.fn = fn
        self.run = run
        self.resume = threading.Semaphore(0)
        self.yielded = threading.Semaphore(0)
        self.result = None
        self.error: BaseException | None = None
        self.done = False
        self.tag: Hashable | None = None
        self.thread = threading.Thread(target=self._main, name=f"prunetune-lockstep-{index}", daemon=True)

    def _main(self) -> None:
        self.resume.acquire()
        _current.call = self
        try:
            if self.run.aborted:
                raise _Aborted
            if self.run.cuda_device is not None:
                torch.cuda.set_device(self.run.cuda_device)
            with torch.set_grad_enabled(self.run.grad_enabled):
                self.result = self.fn()
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            self.error = error
        finally:
            self.done = True
            _current.call = None
            self.yielded.release()

    def step(self) -> None:
        """Let this call run until it pauses or finishes."""
        self.resume.release()
        self.yielded.acquire()


class Lockstep:
    """Run ``calls`` in lock step; ``on_barrier(tag)`` between pauses.

    Args:
        calls: zero-argument callables.
        on_barrier: called once per barrier, with the tag every call paused at.
    """

    def __init__(self, calls: list[Callable[[], object]], on_barrier: Callable[[Hashable], None]):
        self.calls = [_Call(i, fn, self) for i, fn in enumerate(calls)]
        self.on_barrier = on_barrier
        self.aborted = False
        self.grad_enabled = torch.is_grad_enabled()
        self.cuda_device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def run(self) -> list[object]:
        """Run every call to completion; returns their results in order.

        Raises:
            The first error a call raised (the others are unwound first), or
            :class:`LockstepError` if the calls paused at different tags or some finished
            while others paused.
        """
        for call in self.calls:
            call.thread.start()
        try:
            while True:
                for call in self.calls:
                    if not call.done:
                        call.step()
                failed = next((c.error for c in self.calls if c.error is not None and not isinstance(c.error, _Aborted)), None)
                if failed is not None:
                    raise failed
                paused = [c for c in self.calls if not c.done]
                if not paused:
                    return [c.result for c in self.calls]
                tags = {c.tag for c in paused}
                if len(paused) != len(self.calls) or len(tags) != 1:
                    raise LockstepError(
                        f"the calls paused at different points ({len(self.calls) - len(paused)} finished, "
                        f"pauses: {sorted(map(repr, tags))}); their control flow depends on the data")
                self.on_barrier(tags.pop())
        finally:
            self._close()

    def _close(self) -> None:
        """Unwind calls still paused (after an error), join every thread, trim the arenas."""
        self.aborted = True
        for call in self.calls:
            while not call.done:
                call.step()
            call.thread.join()
        _trim_thread_arenas()


def _trim_thread_arenas() -> None:
    """Give back to the OS the CPU memory freed in the worker threads' malloc arenas.

    glibc serves each thread from its own arena and keeps what is freed there; after a
    CPU block forward in lock step that retained memory would outgrow the activations
    themselves. ``malloc_trim(0)`` releases it (a no-op elsewhere than glibc).
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None  # libc's malloc_trim once looked up; False where there is none


def pause(tag: Hashable) -> None:
    """Wait, inside a lockstep call, until every call has reached ``tag`` and the barrier ran.

    Raises:
        RuntimeError: when called outside a :class:`Lockstep` call.
    """
    call: _Call | None = getattr(_current, "call", None)
    if call is None:
        raise RuntimeError("lockstep.pause() called outside a Lockstep call")
    call.tag = tag
    call.yielded.release()
    call.resume.acquire()
    if call.run.aborted:
        raise _Aborted
