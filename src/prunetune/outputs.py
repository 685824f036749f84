"""Atomic outputs: a result appears whole or not at all.

Directories are written into a temporary sibling and renamed into place at the end; a
failure removes the temporary directory, so no half-written output is ever left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from prunetune.errors import UsageError


def check_output_dir(path: str | Path, overwrite: bool = False, flag: str = "--overwrite_output_dir") -> Path:
    """Refuse an existing non-empty output directory unless ``overwrite``."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"Output path {path} exists and is a file; give a directory path.")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"Output directory {path} already exists and is not empty. Choose another path or pass {flag} to replace it.")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory that replaces ``path`` when the block succeeds."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


MANIFEST_NAME = "prunetune.json"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape results, for manifests."""
    import importlib.metadata as metadata
    import platform

    versions = {"python": platform.python_version()}
    for name in ("prunetune", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def save_model_dir(model, tokenizer, path: str | Path, manifest: dict, overwrite: bool = True) -> Path:
    """Save a Hugging Face model folder (safetensors + tokenizer) plus ``prunetune.json``, atomically."""
    path = check_output_dir(path, overwrite=overwrite, flag="--overwrite")
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / MANIFEST_NAME, {**manifest, "versions": library_versions()})
    return path


def read_manifest(path: str | Path) -> dict | None:
    """The ``prunetune.json`` manifest of a model folder, or None when it has none."""
    file = Path(path).expanduser() / MANIFEST_NAME
    if not file.exists():
        return None
    return json.loads(file.read_text(encoding="utf-8"))
