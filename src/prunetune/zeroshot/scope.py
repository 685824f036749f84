"""What lm-eval touches in the process, kept to the call: global RNG states and its log chatter.

prunetune's library leaves no process-wide state behind (STYLE.md). lm-eval seeds and draws from
Python's, numpy's and torch's global generators and logs notes a user cannot act on, so both are
scoped here to the calls that need them.
"""

from __future__ import annotations

import contextlib
import logging

# lm-eval's notes about its own shipped definitions (defaults it fills in, an in-memory model): nothing to act on
_CHATTER = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model",
            "is defined, but aggregation is not", "is defined, but higher_is_better is not")


@contextlib.contextmanager
def kept_rng_states():
    """Python's, numpy's and torch's (CPU and CUDA) global RNG states come back as they were.

    lm-eval draws from (and seeds) them while it loads tasks and runs; the caller's draws must
    not depend on whether it evaluated in between.
    """
    import random

    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in _CHATTER)


@contextlib.contextmanager
def quiet_lm_eval():
    """Drop lm-eval's chatter (see _CHATTER) from its loggers for the duration; its other messages pass."""
    loggers = [logging.getLogger(name) for name in ("lm_eval.api.task", "lm_eval.models.huggingface")]
    chatter = _DropChatter()
    for each in loggers:
        each.addFilter(chatter)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(chatter)
