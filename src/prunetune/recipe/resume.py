"""What a resume must agree with: the checkpoint's recorded facts against this run's, and its files loading.

The checkpoint marker (:class:`~prunetune.recover.callbacks.CheckpointMarker`) records the method's
facts (LoRA rank and layers, base masks) and the run's (training text, teacher). A change that
makes the saved state unloadable is refused up front; one that changes what the run means (other
text, a teacher added or dropped) is named in a warning. A checkpoint whose files fail to load
(damaged, or of another setup) is reported in one paragraph naming it and the cause.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import TrainerCallback

from prunetune.errors import UsageError

logger = logging.getLogger(__name__)

# LoRA facts a resume cannot change: the saved adapter's tensors have their shapes and names.
FIXED_LORA = {"r": "--lora_r", "target_modules": "--lora_target_modules"}
CHANGED_LORA = {"alpha": "--lora_alpha", "dropout": "--lora_dropout"}
RUN_FACTS = {"training_source": "the training text (--dataset_name / --train_file)",
             "distill_from": "the distillation teacher (--distill_from)"}


def check_same_run(resume_dir: Path, checkpoint: dict, manifest: dict, run_facts: dict) -> None:
    """Compare a checkpoint's recorded facts with this run's setup (facts it does not record are skipped).

    Raises:
        UsageError: the LoRA rank or adapted layers differ (the saved adapter cannot load).
    """
    saved, now = checkpoint.get("lora") or {}, manifest.get("lora") or {}
    for key, flag in FIXED_LORA.items():
        if key in saved and key in now and saved[key] != now[key]:
            raise UsageError(
                f"--resume_from_checkpoint {resume_dir} was trained with {flag} {_show(saved[key])}, and this run asks "
                f"for {_show(now[key])}: the saved adapter's tensors cannot load into another shape. Resume with "
                f"{flag} {_show(saved[key])}, or start a new run.")
    for key, flag in CHANGED_LORA.items():
        if key in saved and key in now and saved[key] != now[key]:
            logger.warning("resuming %s with %s %s (it trained with %s)", resume_dir, flag, _show(now[key]), _show(saved[key]))
    for key, what in RUN_FACTS.items():
        if key in checkpoint and checkpoint[key] != run_facts.get(key):
            logger.warning("resuming %s with another %s: %s, where the checkpoint trained on %s", resume_dir, what,
                           run_facts.get(key) or "none", checkpoint[key] or "none")


def check_files(resume_dir: Path) -> None:
    """Open a checkpoint's weight files (headers only) and its optimizer state (memory-mapped) before any work.

    Raises:
        UsageError: a file that does not open, naming it and the reader's complaint.
    """
    for file in sorted(resume_dir.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as handle:
                handle.keys()
        except (OSError, SafetensorError) as err:
            raise _damaged(resume_dir, file, err) from err
    optimizer = resume_dir / "optimizer.pt"
    if optimizer.is_file():
        if not zipfile.is_zipfile(optimizer):  # torch.save writes a zip archive; a cut one loses its directory
            raise _damaged(resume_dir, optimizer, ValueError("not a complete PyTorch zip archive"))
        try:
            torch.load(optimizer, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file
            raise _damaged(resume_dir, optimizer, err) from err


def _damaged(resume_dir: Path, file: Path, error: BaseException) -> UsageError:
    return UsageError(
        f"--resume_from_checkpoint {resume_dir}: its {file.name} is damaged and cannot be read ({_cause(error)}): it was "
        "cut short or overwritten. Resume from an earlier checkpoint, or start a new run.")


def _cause(error: BaseException) -> str:
    """The first sentence of an exception's message, on one line."""
    text = " ".join(str(error).split())
    first = text.split(". ", 1)[0]
    return f"{type(error).__name__}: {first if len(first) <= 240 else first[:240] + ' ...'}"


def _show(value) -> str:
    return ",".join(value) if isinstance(value, (list, tuple)) else str(value)


class TrainingBegun(TrainerCallback):
    """Notes that the Trainer got past restoring a checkpoint (weights, optimizer, scheduler) and began."""

    def __init__(self):
        self.begun = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.begun = True


def load_failure(resume_dir: Path, error: BaseException) -> UsageError:
    """The one-paragraph error for a checkpoint the Trainer could not restore."""
    files = ", ".join(sorted(p.name for p in resume_dir.iterdir() if p.is_file())) if resume_dir.is_dir() else "none"
    return UsageError(
        f"--resume_from_checkpoint {resume_dir} could not be loaded: {_cause(error)} (files: {files}). "
        "The checkpoint is damaged (a file cut short or overwritten) or was written with other settings (--lora_r, "
        "--lora_target_modules, --optim, the model). Resume from an earlier checkpoint, or start a new run.")
