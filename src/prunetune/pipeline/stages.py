"""Stages with reuse: each stage's directory holds a ``stage.json`` keyed on the hash of its inputs.

A stage whose manifest is complete and whose key is unchanged is reused; any other is run
into a temporary sibling and renamed into place (a crash leaves no half-written stage).
Each start and end is announced as a :class:`StageEvent` to an optional listener, which the
CLI prints as one line per stage (the library itself never prints).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prunetune.outputs import atomic_dir, write_json

logger = logging.getLogger(__name__)

STAGE_MANIFEST = "stage.json"
STAGE_FORMAT = 2  # bump when a stage's outputs change meaning, to invalidate old runs (2: per-stage memory)


def stage_hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else {"%": "pct", ":": "of", " ": "_"}.get(c, "-") for c in label)


@dataclass
class StageResult:
    name: str
    directory: Path
    key: str
    result: dict
    reused: bool


@dataclass
class StageEvent:
    """A stage starting (``running``), finishing (``done``) or found finished (``reused``).

    ``seconds``: the stage's wall time (for ``reused``, that of the run that made it); None while running.
    """

    index: int  # 1-based position in the run
    total: int  # stages in the run
    name: str
    status: Literal["running", "done", "reused"]
    seconds: float | None = None

    def line(self) -> str:
        """``[3/11] prune wanda 50%: running…`` / ``done in 4.2 s`` / ``reused (ran 4.2 s)``."""
        head = f"[{self.index}/{self.total}] {self.name}"
        if self.status == "running":
            return f"{head}: running…"
        took = _seconds(self.seconds)
        return f"{head}: done in {took}" if self.status == "done" else f"{head}: reused" + (f" (ran {took})" if took else "")


def _finished(name: str, directory: Path) -> dict | None:
    """The manifest of a finished stage in ``directory``, or None (none there, unfinished, or damaged)."""
    manifest = directory / STAGE_MANIFEST
    if not manifest.exists():
        return None
    try:
        saved = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:  # damaged: the stage runs again, replacing it
        logger.warning("stage %s: %s is unreadable (%s); running the stage again", name, manifest, err)
        return None
    return saved if isinstance(saved, dict) and saved.get("complete") and "result" in saved else None


def _seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class StageRunner:
    """Runs stages with reuse: a stage with a complete manifest and the same key is skipped.

    Args:
        root: the folder that holds one directory per stage.
        listener: called with a :class:`StageEvent` as each stage starts and ends.
        total: how many stages the run has (for ``[i/total]``); 0: count as they come.
        shared: ``root`` is shared with other configs (``stages_dir``): a finished stage of the same
            name but another key is another config's result, so it is kept, and this one goes to
            ``<folder>-<key[:8]>`` beside it. Otherwise a stale stage is replaced.
    """

    def __init__(self, root: Path, listener: Callable[[StageEvent], None] | None = None, total: int = 0,
                 shared: bool = False):
        self.root = Path(root)
        self.listener = listener
        self.total = total
        self.shared = shared
        self.executed: list[str] = []
        self.reused: list[str] = []

    def _announce(self, name: str, status: str, seconds: float | None = None) -> None:
        if self.listener is not None:
            index = len(self.executed) + len(self.reused) + (1 if status == "running" else 0)
            self.listener(StageEvent(index, max(self.total, index), name, status, seconds))

    def run(self, name: str, inputs: dict, work: Callable[[Path], dict], folder: str | None = None) -> StageResult:
        """Reuse or run the stage ``name`` in ``root/folder`` (default: a slug of the name)."""
        directory = self.root / (folder or _slug(name))
        key = stage_hash({"format": STAGE_FORMAT, "stage": name, "inputs": inputs})
        saved = _finished(name, directory)
        if self.shared and saved is not None and saved.get("key") != key:  # another config's stage: keep it
            directory = directory.with_name(f"{directory.name}-{key[:8]}")
            saved = _finished(name, directory)
        if saved is not None and saved.get("key") == key:
            logger.info("stage %s: reusing %s", name, directory)
            self.reused.append(name)
            self._announce(name, "reused", saved.get("seconds"))
            return StageResult(name, directory, key, saved["result"], True)
        logger.info("stage %s: running", name)
        self._announce(name, "running")
        started = time.perf_counter()
        with atomic_dir(directory, overwrite=True) as tmp:  # a stale stage (other key) is replaced
            result = work(tmp)
            seconds = time.perf_counter() - started
            write_json(tmp / STAGE_MANIFEST, {"stage": name, "key": key, "inputs": inputs, "complete": True,
                                              "seconds": seconds, "result": result})
        self.executed.append(name)
        self._announce(name, "done", seconds)
        return StageResult(name, directory, key, result, False)


def memory_figures(peak) -> dict:
    """A stage's memory figures: ``peak_memory_mb`` is the one the report shows (see prunetune.memory)."""
    return {"peak_memory_mb": peak.block_mb, "peak_memory_kind": peak.kind,
            "memory": {"peak_mb": peak.peak_mb, "baseline_mb": peak.baseline_mb, "increase_mb": peak.increase_mb}}
