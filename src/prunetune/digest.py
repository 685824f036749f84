"""sha256 of local files, remembered by the file's stat: the one rule behind every digest cache.

:func:`file_digest` is what the pipeline's stage keys
(:class:`~prunetune.pipeline.fingerprints.FingerprintCache`), the data layer's content keys
(:mod:`prunetune.data.local`) and a GGUF model's identity (:mod:`prunetune.gguf`) use. A digest
is reused only while the file's resolved path, size, mtime_ns, ctime_ns, inode and device are
all unchanged. The kernel sets ctime on every write, rename and ``utime`` and no user call can
set it back, so an edit of the same size whose mtime is then restored (``touch -d``,
``os.utime``, ``cp -p``) is seen, and so is a file replaced by another of the same size and
mtime. A file modified within the last 2 s is hashed but not remembered: a second write inside
the same timestamp tick would leave its stat unchanged (git's "racily clean" case).

Usage::

    digest = file_digest("data.jsonl")               # read every time
    memo = {}                                        # any mapping the caller owns, or a FolderMemo
    digest = file_digest("data.jsonl", memo)         # read once while the file is unchanged
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Protocol

RACY_NS = 2 * 10**9  # files modified this recently are hashed but not remembered
CHUNK_BYTES = 1 << 22  # 4 MiB reads: weights and data shards are hundreds of MB to GBs


class DigestMemo(Protocol):
    """Where digests are remembered: a dict, a :class:`FolderMemo`, a pipeline's fingerprint cache."""

    def get(self, key: str) -> str | None: ...

    def __setitem__(self, key: str, digest: str) -> None: ...


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file without reading it."""

    path: str  # resolved: a symlink and its target share one entry
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    def key(self) -> str:
        return "|".join(str(part) for part in astuple(self))

    def racy(self) -> bool:
        """True while a second write could still leave this stat unchanged."""
        return time.time_ns() - self.mtime_ns < RACY_NS


def file_stamp(path: str | Path) -> FileStamp:
    """The :class:`FileStamp` of ``path`` (resolved) as it is now."""
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    return FileStamp(str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str | Path, memo: DigestMemo | None = None) -> str:
    """Hex sha256 of the file at ``path``, from ``memo`` while its :class:`FileStamp` is unchanged.

    The stat is taken before reading, so a write during the read shows up at the next call.

    Args:
        path: the file.
        memo: where digests are remembered, keyed by :meth:`FileStamp.key`; None: read every time.
    """
    stamp = file_stamp(path)
    if memo is not None:
        known = memo.get(stamp.key())
        if known:
            return known
    digest = sha256_of(stamp.path)
    if memo is not None and not stamp.racy():
        memo[stamp.key()] = digest
    return digest


class FolderMemo:
    """Digests kept on disk between processes: one small file per :class:`FileStamp` in ``folder``.

    Each is written to a temporary sibling and renamed, so a reader sees a whole digest or none.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _file(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.sha256"

    def get(self, key: str) -> str | None:
        try:
            return self._file(key).read_text().strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def __setitem__(self, key: str, digest: str) -> None:
        memo = self._file(key)
        memo.parent.mkdir(parents=True, exist_ok=True)
        partial = memo.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(digest)
        os.replace(partial, memo)
