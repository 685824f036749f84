"""Errors a user can cause.

The CLI turns a :class:`UsageError` into a one-paragraph message on stderr and exit
code 2, without a traceback. Library code raises it whenever the cause is the input
(a bad path, an unknown name, a value out of range), never for internal bugs.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input: the message names the value and what would be accepted."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`UsageError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UsageError(message)
