"""Several calls run in lock step: one thread each, one thread running at a time.

A call may :func:`pause` (from any depth, e.g. inside a module's forward hook). Once every
unfinished call has paused at the same tag, ``on_barrier(tag)`` runs in the caller's thread
and the calls resume, one after the other, in order. This is what lets the calibration
driver prune a layer *between* the point where every calibration batch has produced the
layer's input and the point where the first batch multiplies by its weights, while still
running the block batch by batch (:mod:`prunetune.calibrate.one_pass`): only the activations
alive at the pause point are kept for all batches, not a whole-batch forward's temporaries.

Why threads: a paused call is a suspended Python and C stack (the block's forward, inside a
hook), and only a thread of its own can hold one while another call runs (greenlets could,
but are no dependency of ours). Every call must be alive at a barrier, so there is one
thread per call. The calls never run concurrently, so they need no locks.

Threads (bounded). A thread that runs a parallel CPU op gets its own OpenMP team of
``torch.get_num_threads()`` threads that lives as long as the thread: 32 calls on 2 cores
gave 70 threads, 128 on a 16-core host would give over 2,000. So each call runs with
``min(T, max(1, thread_budget // calls))`` intra-op threads (``T``: the caller's), so the
calls' threads, their OpenMP teams included, number at most ``max(calls, thread_budget)``.
A run within the budget (calls x T <= 64 by default, e.g. 16 batches on 4 cores) keeps every
call at ``T``, exactly as the caller, with the same results; a larger one trades CPU
parallelism for a bounded thread count (on an accelerator a call's CPU threads only launch
kernels). ``torch.set_num_threads`` also stores a process-wide default, so a run that changed
it in its calls sets ``T`` back when it ends.

Thread-local state. PyTorch keeps grad mode, inference mode, autocast (enabled, dtype, cache)
and the current CUDA device and stream per thread, and a new thread starts from the
defaults. Each call runs under the caller's, as taken when the :class:`Lockstep` is made.
Torch function and dispatch modes (``with torch.device(...)``, fake tensors, ...) cannot be
carried into another thread: a run under one is refused.

Timeouts. A call that neither pauses nor finishes within ``timeout`` seconds (e.g. it waits
for something only another call would do, which cannot run until it pauses) ends the run
with :class:`LockstepTimeout`; the other calls are unwound, and the stuck thread (a daemon)
is left to finish or to end with the process. A call whose caller has gone away unwinds
itself.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from prunetune.errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 600.0  # seconds a call may run between two pauses: far above one batch's block forward
DEFAULT_THREAD_BUDGET = 64  # intra-op threads all calls may hold together
_POLL_SECONDS = 1.0  # how often a waiting call checks that its run is still alive
# device types whose autocast state is carried into the calls (those autocast knows on this build)
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla")

_current = threading.local()


class LockstepError(RuntimeError):
    """The calls did not reach the same pauses (data-dependent control flow)."""


class LockstepTimeout(RuntimeError):
    """A call neither paused nor finished within the timeout."""


class _Aborted(BaseException):
    """Unwinds a paused call when the run is abandoned (not an Exception: user code must not catch it)."""


@dataclass
class ThreadState:
    """The caller's thread-local PyTorch state that a call's forward depends on."""

    grad_enabled: bool = True
    inference_mode: bool = False
    autocast: list[tuple[str, torch.dtype]] = field(default_factory=list)  # (device type, dtype) where enabled
    autocast_cache: bool = True
    cuda_device: int | None = None
    cuda_stream: object | None = None  # torch.cuda.Stream current on cuda_device

    @classmethod
    def capture(cls) -> ThreadState:
        """The calling thread's state.

        Raises:
            UsageError: a torch function or dispatch mode is active (it cannot be carried).
        """
        modes = torch._C._len_torch_function_stack() + torch._C._len_torch_dispatch_stack()
        if modes:
            raise UsageError("Calibration batches run in lock step in their own threads, which cannot inherit the "
                             f"{modes} torch function/dispatch mode(s) active here (e.g. `with torch.device(...)`, "
                             "fake tensors). Call it outside the mode, or prune without --true_sequential.")
        state = cls(grad_enabled=torch.is_grad_enabled(), inference_mode=torch.is_inference_mode_enabled(),
                    autocast_cache=torch.is_autocast_cache_enabled())
        for device_type in _AUTOCAST_DEVICES:
            if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
                state.autocast.append((device_type, torch.get_autocast_dtype(device_type)))
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state.cuda_device = torch.cuda.current_device()
            state.cuda_stream = torch.cuda.current_stream(state.cuda_device)
        return state

    def enter(self, stack: contextlib.ExitStack) -> None:
        """Put this state in place in the current thread until ``stack`` closes."""
        if self.cuda_device is not None:
            torch.cuda.set_device(self.cuda_device)
            stack.enter_context(torch.cuda.stream(self.cuda_stream))
        if self.inference_mode:
            stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.set_grad_enabled(self.grad_enabled))
        for device_type, dtype in self.autocast:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=self.autocast_cache))


class _Call:
    def __init__(self, index: int, fn: Callable[[], object], run: Lockstep):
        self.index = index
        self.fn = fn
        self.run = run
        self.resume = threading.Semaphore(0)
        self.yielded = threading.Semaphore(0)
        self.result = None
        self.error: BaseException | None = None
        self.done = False
        self.stuck = False  # ran past the timeout: never stepped or waited for again
        self.tag: Hashable | None = None
        self.thread = threading.Thread(target=self._main, name=f"prunetune-lockstep-{index}", daemon=True)

    def _main(self) -> None:
        _current.call = self
        try:
            self.wait_for_turn()
            if self.run.threads_per_call != self.run.caller_threads:
                torch.set_num_threads(self.run.threads_per_call)  # this thread's OpenMP team
            with contextlib.ExitStack() as stack:
                self.run.state.enter(stack)
                self.result = self.fn()
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            self.error = error
        finally:
            self.done = True
            _current.call = None
            self.yielded.release()

    def wait_for_turn(self) -> None:
        """Block until the caller resumes this call; unwind if the run was abandoned or its caller is gone."""
        if self.run.aborted and self.stuck:  # woke up after the run gave up on it
            raise _Aborted
        while not self.resume.acquire(timeout=_POLL_SECONDS):
            if self.run.aborted or not self.run.caller.is_alive():
                raise _Aborted
        if self.run.aborted:
            raise _Aborted

    def step(self, timeout: float | None) -> None:
        """Let this call run until it pauses or finishes.

        Raises:
            LockstepTimeout: it did neither within ``timeout`` seconds.
        """
        self.resume.release()
        if not self.yielded.acquire(timeout=timeout):
            self.stuck = True
            where = "before its first pause" if self.tag is None else f"after pausing at {self.tag!r}"
            raise LockstepTimeout(
                f"lock-step call {self.index} of {len(self.run.calls)} ran for over {timeout:g} s {where} without "
                "pausing again or finishing. It may wait for something only another call would do, which cannot "
                "run until it pauses; its thread is left behind.")


class Lockstep:
    """Run ``calls`` in lock step; ``on_barrier(tag)`` between pauses.

    Args:
        calls: zero-argument callables.
        on_barrier: called once per barrier, in the caller's thread, with the tag every call paused at.
        timeout: seconds a call may run between two pauses (None: no limit).
        thread_budget: intra-op threads the calls may hold together (see the module docstring).

    Raises:
        UsageError: a torch function or dispatch mode is active in the caller.
    """

    def __init__(self, calls: list[Callable[[], object]], on_barrier: Callable[[Hashable], None],
                 timeout: float | None = DEFAULT_TIMEOUT, thread_budget: int = DEFAULT_THREAD_BUDGET):
        self.state = ThreadState.capture()
        self.caller = threading.current_thread()
        self.calls = [_Call(i, fn, self) for i, fn in enumerate(calls)]
        self.on_barrier = on_barrier
        self.timeout = timeout
        self.aborted = False
        self.caller_threads = torch.get_num_threads()
        self.threads_per_call = min(self.caller_threads, max(1, thread_budget // max(1, len(calls))))

    def run(self) -> list[object]:
        """Run every call to completion; returns their results in order.

        Raises:
            The first error a call raised (the others are unwound first),
            :class:`LockstepError` if the calls paused at different tags or some finished
            while others paused, :class:`LockstepTimeout` if a call ran past the timeout.
        """
        for call in self.calls:
            call.thread.start()
        try:
            while True:
                for call in self.calls:
                    if not call.done:
                        call.step(self.timeout)
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
        """Unwind calls still paused (after an error), join their threads, restore the thread count, trim the arenas."""
        self.aborted = True
        for call in self.calls:
            while not call.done and not call.stuck:
                try:
                    call.step(self.timeout)  # a paused call raises _Aborted at once
                except LockstepTimeout:
                    logger.warning("lock-step call %d did not unwind within %s s; leaving its thread behind",
                                   call.index, self.timeout)
            if not call.stuck:
                call.thread.join()
        if self.threads_per_call != self.caller_threads:
            torch.set_num_threads(self.caller_threads)  # the process-wide default the calls changed
        _trim_thread_arenas()


def _trim_thread_arenas() -> None:
    """Give back to the OS the CPU memory freed in the worker threads' malloc arenas.

    glibc serves each thread from its own arena and keeps what is freed there; after a
    CPU block forward in lock step that retained memory would outgrow the activations
    themselves. ``malloc_trim(0)`` releases it (a no-op elsewhere than glibc).
    """
    try:
        import ctypes

        malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    malloc_trim(0)


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
    call.wait_for_turn()
