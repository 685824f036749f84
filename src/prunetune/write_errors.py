"""A write that the storage refused (full disk, quota, file size, read-only): one paragraph naming the output.

:func:`writing_output` wraps the code that writes an output folder; :mod:`prunetune.outputs`
uses it for every atomic save and lock, and a command that writes in place (``recover``'s
Trainer saves) can wrap its save the same way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path

from prunetune.errors import UsageError

# errno values that say the storage, not the program, failed a write
STORAGE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EFBIG: "the file is larger than the file system or the process limit allows",
                  errno.EROFS: "the file system is read-only"}
# Rust writers (safetensors, tokenizers) raise a plain exception whose message ends "(os error 28)"
_RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")


def write_errno(error: BaseException) -> int | None:
    """The errno of a failed write: an ``OSError``'s, or the one a Rust writer's message gives."""
    if isinstance(error, OSError):
        return error.errno
    if isinstance(error, Exception) and (found := _RUST_IO_ERROR.search(str(error))):
        return int(found.group(1))
    return None


def write_failure(path: Path, error: BaseException, what: str = "Output folder") -> UsageError:
    """A one-paragraph :class:`UsageError` for a write into ``path`` that failed with ``error``."""
    code = write_errno(error)
    cause = STORAGE_ERRNOS.get(code) or (os.strerror(code) if code else str(error))
    detail = getattr(error, "strerror", None) or str(error)
    if getattr(error, "filename", None):  # it may lie outside the folder (a cache on the same full disk)
        detail += f", writing {error.filename}"
    return UsageError(f"{what} {path} could not be written: {cause} ({detail}). Nothing half-written was left in its "
                      "place. Free space (or quota) on that file system or choose another location, then run the "
                      "command again.")


@contextlib.contextmanager
def writing_output(path: str | Path, what: str = "Output folder", storage_only: bool = False):
    """Turn a failed write inside the block into a :class:`UsageError` naming ``path`` and the cause.

    Wrap the code that writes an output (``save_pretrained``, a Trainer's ``save_model``). With
    ``storage_only`` only a full disk, an exceeded quota, a file too large or a read-only file
    system is turned (for blocks that also read, where other errors are not about the output).
    """
    try:
        yield
    except UsageError:
        raise
    except Exception as error:
        code = write_errno(error)
        if code is None or (storage_only and code not in STORAGE_ERRNOS):
            raise
        raise write_failure(Path(path), error, what) from error
