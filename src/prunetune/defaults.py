"""Default data for a model: the one place that decides it, for every command and pipeline.

The bundled ``tiny`` model, and every model or adapter made from it, calibrates, trains and
evaluates on ``builtin`` (offline, the corpus it was trained on). Any other model gets the
papers' data: C4 to calibrate and to train (the Wanda LoRA recipe), WikiText-2 to evaluate.

"Made from it" is read from the models themselves, never from their names: the
``prunetune.json`` manifest of a pruned model, a recovered model, a merged model or an
adapter names its ``base_model``, which is followed (a pruned model's base is the dense
model; a recovered model's is the pruned one) until a folder without a manifest. That folder
is the bundled model when it is the bundled folder or holds the bundled tokenizer byte for
byte. Nothing here touches the network: a hub id is never the bundled model.

Usage::

    from prunetune.defaults import default_data
    default_data("evaluation", "out/wanda-50")   # "builtin" when out/wanda-50 was pruned from tiny
"""

from __future__ import annotations

import os
from pathlib import Path

from prunetune.errors import UsageError
from prunetune.loading import TINY_NAME, TINY_PATH
from prunetune.outputs import read_manifest

# The papers' data for a model that is not the bundled one (Wanda, SparseGPT; the LoRA recipe trains on C4).
PAPER_DATA = {"calibration": "c4", "evaluation": "wikitext2", "training": "c4"}
BUNDLED_DATA = "builtin"
ROLES = tuple(PAPER_DATA)
_MAX_HOPS = 64  # base_model chains are a few hops long; a longer one is a loop through renamed folders


def default_data(role: str, *models: str | None) -> str:
    """The data ``role`` uses by default for these models (a model, then e.g. its adapter).

    Args:
        role: ``calibration``, ``evaluation`` or ``training``.
        models: model names, folders or adapter folders; None entries are skipped.

    Returns:
        ``builtin`` when any of them is, or was made from, the bundled model; else the papers' data.
    """
    if role not in PAPER_DATA:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return BUNDLED_DATA if any(from_bundled(m) for m in models if m) else PAPER_DATA[role]


def from_bundled(model: str) -> bool:
    """True when ``model`` is the bundled tiny model or was made from it (see the module docstring)."""
    name, folder = model, None
    seen: set[Path] = set()
    for _ in range(_MAX_HOPS):
        if name == TINY_NAME:
            return True
        folder = _local_folder(name, folder)
        if folder is None or folder in seen:  # a hub id, a missing folder, or a loop of manifests
            return False
        seen.add(folder)
        base = _base_model(folder)
        if base is None:
            return _is_bundled_folder(folder)
        name = base
    return False


def _local_folder(name: str, referrer: Path | None) -> Path | None:
    """The existing folder ``name`` names: as given (from the current directory), else, for a
    relative name written into ``referrer``'s manifest, from the folders above ``referrer``
    (the command that wrote it ran there; the tree may since have moved)."""
    path = Path(name).expanduser()
    candidates = [path]
    if referrer is not None and not path.is_absolute():
        candidates += [parent / path for parent in referrer.parents]
    for candidate in candidates:
        if candidate.is_dir():
            return Path(os.path.realpath(candidate))
    return None


def _base_model(folder: Path) -> str | None:
    try:
        manifest = read_manifest(folder)
    except UsageError:  # a damaged manifest: the command reading the model says so; here it names no base
        return None
    base = (manifest or {}).get("base_model")
    return base if isinstance(base, str) and base else None


def _is_bundled_folder(folder: Path) -> bool:
    """The bundled folder itself, or a copy of it (its tokenizer, byte for byte)."""
    if folder == Path(os.path.realpath(TINY_PATH)):
        return True
    ours, theirs = TINY_PATH / "tokenizer.json", folder / "tokenizer.json"
    try:
        return theirs.stat().st_size == ours.stat().st_size and theirs.read_bytes() == ours.read_bytes()
    except OSError:
        return False
