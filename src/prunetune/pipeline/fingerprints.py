"""Content fingerprints of the local files a stage reads: what makes a stage key follow the data.

A stage key hashes the *contents* of the model folder and the data files it reads, so an
edited file reruns exactly the stages that read it; :class:`FingerprintCache` keeps the
digests between runs so unchanged files are not read again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from pathlib import Path

from prunetune import loading
from prunetune.data import HUB_SOURCES, _split_path_field
from prunetune.data.hub_sources import split_protocol
from prunetune.digest import file_digest, file_stamp
from prunetune.outputs import write_json

logger = logging.getLogger(__name__)


# Files in a model folder that loading never reads: other weight formats (loading reads
# safetensors, or a GGUF file) and documentation. Python files count only with trust_remote_code.
_UNREAD_MODEL_SUFFIXES = (".md", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
CACHE_FORMAT = 2  # 2: keyed by prunetune.digest.FileStamp (ctime and device included)


class FingerprintCache:
    """sha256 of local files, kept between runs under the rule of :func:`prunetune.digest.file_digest`.

    Stage keys hash the *contents* of the files a stage reads; re-reading 13 GB of weights on
    every run would cost minutes, so a file whose resolved path, size, mtime_ns, ctime_ns, inode
    and device are unchanged since it was last hashed keeps its digest. Every write, rename or
    ``utime`` changes the ctime (which no user call can set back), so an in-place edit of the same
    length whose mtime is restored on purpose is seen too. A file modified within the last 2 s is
    not kept (a second write inside the same timestamp tick would leave its stat unchanged).
    Delete ``fingerprints.json`` in the output folder to force every file to be hashed again.

    Args:
        path: the JSON file holding the digests; None: keep them in memory only.
    """

    def __init__(self, path: Path | None = None):
        self.path = path
        self.entries: dict[str, str] = {}  # from the last run: FileStamp.key() -> sha256
        self.used: dict[str, str] = {}  # looked up or hashed this run (and not racy)
        self.hashed: list[str] = []  # files read this run (the others came from the cache)
        if path is not None and path.exists():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
                if saved.get("format") == CACHE_FORMAT:  # older formats: every file is hashed once again
                    self.entries = {str(k): str(v) for k, v in saved.get("files", {}).items()}
            except (OSError, ValueError, AttributeError):
                logger.warning("fingerprint cache %s is unreadable; hashing every file again", path)

    # the DigestMemo protocol, for file_digest
    def get(self, key: str) -> str | None:
        digest = self.used.get(key) or self.entries.get(key)
        if digest is not None:
            self.used[key] = digest
        return digest

    def __setitem__(self, key: str, digest: str) -> None:
        self.used[key] = digest

    def file(self, path: Path) -> str:
        """The sha256 of one file's bytes."""
        path = Path(path).expanduser().resolve()
        if self.get(file_stamp(path).key()) is None:
            self.hashed.append(str(path))
        return file_digest(path, self)

    def files(self, root: Path, files: list[Path]) -> str:
        """One digest over ``files`` (each named by its path relative to ``root``), order-free."""
        digest = hashlib.sha256()
        for file in sorted(files, key=lambda f: f.relative_to(root).as_posix()):
            digest.update(f"{file.relative_to(root).as_posix()}\0{self.file(file)}\0".encode())
        return digest.hexdigest()[:16]

    def save(self) -> None:
        """Write the digests used this run (files no longer read drop out)."""
        if self.path is not None:
            write_json(self.path, {"format": CACHE_FORMAT, "files": self.used})


def data_identity(source: str, cache: FingerprintCache) -> str | dict:
    """What a stage key records for a data source: named sources by name, local ones by content.

    ``builtin`` is the running interpreter's standard library; hashing its documents costs
    seconds of reading, and it changes only with the interpreter, so its version stands in.
    """
    if source in HUB_SOURCES:
        return source
    if source == "builtin":
        return f"builtin (python {platform.python_version()})"
    protocol_file = split_protocol(source)  # ptb:FILE: the file, read by the ptb protocol
    path = protocol_file[1] if protocol_file else _split_path_field(source)[0]
    root = path.expanduser().resolve()
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else [root]
    return {"source": source, "sha256": cache.files(root if root.is_dir() else root.parent, files)}


def model_identity(name: str, cache: FingerprintCache, trust_remote_code: bool = False) -> str | dict:
    """What a stage key records for a model: a local folder by the content of what loading reads.

    A GGUF file (or a named model such as ``smollm2-135m``) by its sha256, path and size; a hub
    id by name (its files live in the Hugging Face cache, and its revision is not pinned by the
    config).
    """
    folder = Path(loading.resolve_model_path(name))
    if loading.is_gguf_model(str(folder)):
        return loading.model_identity(name, cache)
    if not folder.is_dir():
        return name
    folder = folder.resolve()

    def read_by_loading(file: Path) -> bool:
        if file.name.startswith(".") or file.suffix in _UNREAD_MODEL_SUFFIXES:
            return False
        return trust_remote_code or file.suffix != ".py"

    files = [f for f in folder.iterdir() if f.is_file() and read_by_loading(f)]
    return {"model": name, "sha256": cache.files(folder, files)}

