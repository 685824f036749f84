"""What lm-eval touches in the process, kept to the call: global RNG states and its log chatter.

prunetune's library leaves no process-wide state behind (STYLE.md). lm-eval seeds and draws from
Python's, numpy's and torch's global generators and logs notes a user cannot act on, so both are
scoped here to the calls that need them.
"""

from __future__ import annotations

import contextlib
import logging

from prunetune.rng import kept_rng_states  # noqa: F401  (re-exported: lm-eval's draws stay in the call)

# lm-eval's notes about its own shipped definitions (defaults it fills in, an in-memory model): nothing to act on
_CHATTER = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model",
            "is defined, but aggregation is not", "is defined, but higher_is_better is not")


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
