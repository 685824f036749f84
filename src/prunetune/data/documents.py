"""`Documents`: the text of one split of one source, as a `datasets` table plus what it is.

Every loader (builtin, local files, hub) returns one: a ``datasets.Dataset`` (or, streamed,
an ``IterableDataset``) with one document per row in a ``text`` column, the string the
papers place between documents, a sentence saying exactly which text it is (printed next
to every perplexity), and a content key that changes whenever the text does (the token
caches are keyed on it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

TEXT = "text"  # every loader renames the source's text field to this column


def texts_digest(texts: Iterable[str]) -> str:
    """sha256 (hex) of the texts, each followed by a NUL: the builtin corpus's fingerprint since 0.1."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def key_of(*parts: object) -> str:
    """sha256 (hex) of ``parts`` written one per line: a cache or content key from plain values."""
    return hashlib.sha256("\n".join(map(str, parts)).encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, eq=False)
class Documents:
    """The documents of one split of one source.

    Attributes:
        source: the name or path the user gave.
        split: ``train``, ``validation`` or ``test``.
        rows: a ``datasets.Dataset`` (memory-mapped Arrow, or in memory for builtin and
            text files) or a ``datasets.IterableDataset`` (streamed), one document per row
            in the ``text`` column.
        joiner: the string placed between documents when they form one stream.
        description: which text this is, for people (``"docs.txt, held-out first 5% of lines
            (210 of 4,200)"``); printed next to every perplexity computed on it.
        content_key: sha256 (hex) that changes whenever the text does: of the texts
            (builtin), or of the files read, the column and the rows selected (local, hub).
            Token caches are keyed on it, so computing it never reads the whole text twice.
        protocol: the hub source whose papers' protocol applies (C4's calibration by
            document, its evaluation cut), also for a local copy in the hub's layout; else None.
    """

    source: str
    split: str
    rows: Any
    joiner: str
    description: str
    content_key: str
    protocol: Any = None

    @property
    def fingerprint(self) -> str:
        """16 hex digits of :attr:`content_key`, recorded with results (for builtin: sha256 of the texts)."""
        return self.content_key[:16]

    @property
    def streaming(self) -> bool:
        return not hasattr(self.rows, "__len__")

    def __len__(self) -> int:
        """The number of documents (not known for a streamed source)."""
        if self.streaming:
            raise TypeError(f"{self.description}: a streamed source does not know its length")
        return len(self.rows)

    def text_batches(self, size: int = 1000) -> Iterator[list[str]]:
        """The documents in order, ``size`` at a time (the Arrow data is read batch by batch)."""
        for batch in self.rows.iter(batch_size=size):
            yield batch[TEXT]

    @property
    def texts(self) -> tuple[str, ...]:
        """All documents as Python strings (reads everything: for small sources and tests)."""
        return tuple(text for batch in self.text_batches() for text in batch)

    def joined(self) -> str:
        return self.joiner.join(self.texts)
