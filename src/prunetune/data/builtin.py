"""The ``builtin`` corpus: the standard-library sources of the running interpreter.

An offline corpus every Python install has, so the bundled model, the demo and the tests
need no download. Tests (``test``/``tests``/``idle_test`` folders, ``test_*.py``) and
site-packages are left out; files are sorted and assigned to a split by a hash of their
relative path, stable across runs and machines. Each file is one document; documents are
joined with ``"\\n\\n"`` into a stream. The tables in the README and the bundled model's card
were computed on exactly these texts: change nothing here without recomputing them.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from pathlib import Path

from prunetune.data.documents import TEXT, Documents, texts_digest

# split -> buckets of sha256(relative path) % 100
BUCKETS = {"train": range(90), "validation": range(90, 95), "test": range(95, 100)}
TEST_DIRS = {"test", "tests", "idle_test"}
JOINER = "\n\n"


def builtin_files() -> list[tuple[str, Path]]:
    """Standard-library source files of this interpreter: (relative path, path), sorted.

    Walks the library without descending into site-packages (tens of thousands of files
    that are not part of the corpus) or test folders, or into symlinked folders (as
    ``Path.rglob`` does not).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        here = Path(folder)
        subfolders[:] = [name for name in subfolders if name not in TEST_DIRS
                         and not (here == root and name in ("site-packages", "dist-packages"))]
        for name in names:
            if name.endswith(".py") and not name.startswith("test_"):
                path = here / name
                files.append((path.relative_to(root).as_posix(), path))
    files.sort()
    return files


def bucket(relative_path: str) -> int:
    return int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 100


def builtin_documents(split: str) -> Documents:
    """The files of ``split`` as an in-memory ``datasets.Dataset`` (a few MB: no cache needed)."""
    import datasets

    texts = [path.read_text(encoding="utf-8", errors="replace")
             for rel, path in builtin_files() if bucket(rel) in BUCKETS[split]]
    rows = datasets.Dataset.from_dict({TEXT: texts})
    description = f"builtin {split} split ({len(texts):,} standard-library files of Python {platform.python_version()})"
    return Documents("builtin", split, rows, JOINER, description, texts_digest(texts))
