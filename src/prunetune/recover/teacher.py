"""The teacher of a distillation run (``--distill_from``): checked, loaded, described.

Two teachers make a run that looks fine and learns nothing useful, so they are caught here:

* the student itself (the same folder, or another folder with the same weight files): the
  losses start at about 0, nothing is learned, and the run still exits 0. Refused before any
  work (:func:`check_teacher`).
* another pruned model (a sizeable share of its prunable weights exactly zero): it teaches the
  damage it has itself. Allowed, with a loud warning when it loads (:func:`load_teacher`), and
  its sparsity is recorded (:func:`describe_teacher`).

:func:`describe_teacher` is what a recovery's results record about the teacher: where it came
from, the sha256 of its weight files, its sparsity, and the loss weights it was used with.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

from torch import nn

from prunetune.digest import file_digest
from prunetune.errors import UsageError
from prunetune.loading import is_gguf_model, load_config, load_model, load_tokenizer, resolve_model_path
from prunetune.masks import measure_sparsity

logger = logging.getLogger(__name__)

# A dense model has (next to) no prunable weight exactly zero; above this share the teacher is itself pruned.
PRUNED_TEACHER_SPARSITY = 0.05
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def weight_files(name_or_path: str) -> list[Path] | None:
    """The files a model's weights are read from: a GGUF file, or a folder's weight files; None for a hub id."""
    path = Path(resolve_model_path(name_or_path))
    if is_gguf_model(str(path)):
        return [path]
    if not path.is_dir():
        return None
    return sorted(f for f in path.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def weights_digest(name_or_path: str, memo: dict | None = None) -> str | None:
    """sha256 over the names and sha256 of a model's weight files (None: a hub id, or no weight file found).

    Args:
        memo: a dict the caller owns, shared by calls that may hash the same files (a 7B model is 13 GB to read).
    """
    files = weight_files(name_or_path)
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file_digest(file, memo)}\n".encode())
    return digest.hexdigest()


def _same_folder(teacher: str, student: str) -> bool:
    """The teacher names the student's own folder or file (or the same hub id)."""
    teacher_path, student_path = Path(resolve_model_path(teacher)), Path(resolve_model_path(student))
    if teacher_path.exists() and student_path.exists():
        return teacher_path.resolve() == student_path.resolve()
    return teacher == student


def _same_weights(teacher: str, student: str, memo: dict | None) -> bool:
    """Two local models whose weight files hash the same (read only when their sizes agree)."""
    teacher_files, student_files = weight_files(teacher), weight_files(student)
    if not teacher_files or not student_files:
        return False
    if sorted(f.stat().st_size for f in teacher_files) != sorted(f.stat().st_size for f in student_files):
        return False  # different sizes: different weights, nothing to read
    return weights_digest(teacher, memo) == weights_digest(student, memo)


def check_teacher(teacher: str, student: str, settings, options, student_tokenizer, memo: dict | None = None,
                  student_is_dense: bool = False) -> None:
    """Refuse a teacher the student cannot be distilled from, from configs, tokenizers and weight digests
    (``student_tokenizer``: the one the recovery trains with, already loaded; ``settings``: the
    :class:`~prunetune.recover.distill.DistillSettings`; ``memo``: shared with :func:`describe_teacher`;
    ``student_is_dense``: ``student`` names the dense model the real student will be pruned from (a
    pipeline checking its entries before any stage), so a teacher equal to it is the right one).

    Raises:
        UsageError: naming the first mismatch: the student itself, model type, vocabulary size,
            tokenizer vocabulary, and (for hidden-state matching) block count and hidden size.
    """
    what = f"--distill_from {teacher}"
    if _same_folder(teacher, student) and not student_is_dense:
        raise _student_itself(what, student, "the same model")
    teacher_config = load_config(teacher, options)
    student_config = load_config(student, options)
    pairs = [("model type", "model_type"), ("vocabulary size", "vocab_size")]
    if settings.matches_hidden:
        pairs += [("number of blocks", "num_hidden_layers"), ("hidden size", "hidden_size")]
    for label, key in pairs:
        mine, theirs = getattr(student_config, key, None), getattr(teacher_config, key, None)
        if mine != theirs:
            extra = (" Hidden-state matching (--distill_hidden_weight) pairs block l of the student with block l "
                     "of the teacher; set it to 0 to distill logits only." if key in ("num_hidden_layers", "hidden_size") else "")
            raise UsageError(f"{what} cannot teach {student}: its {label} is {theirs!r}, the student's is {mine!r}. "
                             f"The teacher must be the dense model the student was pruned from (same architecture, "
                             f"vocabulary and tokenizer).{extra}")
    student_vocab = student_tokenizer.get_vocab()
    teacher_vocab = load_tokenizer(teacher, options).get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda item: item[1])
        raise UsageError(f"{what} cannot teach {student}: their tokenizers differ ({len(teacher_vocab)} vs "
                         f"{len(student_vocab)} tokens; first difference: {differing[0][0]!r} -> id {differing[0][1]}). "
                         "The same token id must mean the same text for both models; use the dense model the student "
                         "was pruned from as the teacher.")
    if not student_is_dense and _same_weights(teacher, student, memo):  # last: it may read both models' weight files
        raise _student_itself(what, student, "the same weights: its weight files have the same sha256")


def _student_itself(what: str, student: str, how: str) -> UsageError:
    return UsageError(f"{what} is the student itself ({how} as --model_name_or_path {student}): every distillation "
                      "loss would start at about 0 and nothing would be learned. Give the dense model the student was "
                      "pruned from.")


def load_teacher(settings, options, device) -> nn.Module:
    """The frozen teacher on ``device`` in ``settings.dtype`` (``auto``: the student's load dtype).

    Warns when the teacher is itself pruned (more than :data:`PRUNED_TEACHER_SPARSITY` of its
    prunable weights exactly zero).
    """
    if settings.dtype != "auto":
        options = replace(options, dtype=settings.dtype)
    teacher = load_model(settings.teacher, replace(options, flag="--distill_from"))
    teacher.requires_grad_(False)
    teacher.eval()
    teacher.config.use_cache = False
    sparsity = teacher_sparsity(teacher)
    if sparsity > PRUNED_TEACHER_SPARSITY:
        logger.warning("distillation teacher %s is itself pruned: %.1f%% of its prunable weights are exactly zero "
                       "(a dense model has about 0%%). The student will learn to imitate a damaged model; the usual "
                       "teacher is the dense model the student was pruned from.", settings.teacher, 100 * sparsity)
    return teacher.to(device)


def teacher_sparsity(teacher: nn.Module) -> float:
    """The share of the teacher's prunable weights that are exactly zero."""
    return measure_sparsity(teacher).overall


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def describe_teacher(settings, teacher: nn.Module, memo: dict | None = None) -> dict:
    """What a recovery's results record about its teacher (JSON-ready).

    Args:
        settings: the run's :class:`~prunetune.recover.distill.DistillSettings`.
        teacher: the loaded teacher (:func:`load_teacher`).
        memo: the digest memo given to :func:`check_teacher`, so the weight files are read once.

    Returns:
        ``teacher`` (as given), ``path`` (resolved; None for a hub id), ``weights_sha256`` (None for a
        hub id), ``sparsity``, ``pruned`` (sparsity above :data:`PRUNED_TEACHER_SPARSITY`), ``dtype``,
        ``bytes``, and ``loss_weights`` (ce, kl, hidden) with the ``temperature``.
    """
    path = Path(resolve_model_path(settings.teacher))
    sparsity = teacher_sparsity(teacher)
    return {
        "teacher": settings.teacher,
        "path": str(path.resolve()) if path.exists() else None,
        "weights_sha256": weights_digest(settings.teacher, memo),
        "sparsity": sparsity,
        "pruned": sparsity > PRUNED_TEACHER_SPARSITY,
        "dtype": str(next(teacher.parameters()).dtype).removeprefix("torch."),
        "bytes": model_bytes(teacher),
        "loss_weights": {"ce": settings.ce_weight, "kl": settings.kl_weight, "hidden": settings.hidden_weight},
        "temperature": settings.temperature,
    }
