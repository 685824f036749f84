"""The Trainer of a recovery run: built around a method's setup, trained, saved.

The Trainer's own progress bar and log printer give way to
:class:`~prunetune.recover.callbacks.TrainingProgress`; the sparsity guard comes first among
prunetune's callbacks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from transformers import Trainer, default_data_collator
from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from prunetune.errors import UsageError
from prunetune.memory import track_peak_memory
from prunetune.recipe.args import RecoveryTrainingArguments, resolve_learning_rate
from prunetune.recipe.result import RecoveryResult
from prunetune.recipe.resume import TrainingBegun, load_failure
from prunetune.recover import distill
from prunetune.recover.callbacks import SparsityGuard, TrainingProgress

logger = logging.getLogger(__name__)


def make_trainer(setup, training_args: RecoveryTrainingArguments, train_data, tokenizer=None,
                 callbacks: list | None = None, *, eval_data=None, label: str = "recover",
                 block_size: int | None = None, distiller=None) -> tuple[Trainer, SparsityGuard]:
    """A ``Trainer`` for a method's setup, with the sparsity guard first among prunetune's callbacks.

    The Trainer's own progress bar and log printer give way to :class:`TrainingProgress`: one bar
    labelled ``label`` (loss, tokens/s, time left), the metrics logged at INFO (``-v``).
    """
    resolve_learning_rate(training_args, setup.manifest.get("recovery_method", "lora"))  # callers other than recover()
    if training_args.ddp_broadcast_buffers is None:
        # masks are identical on every rank by construction; broadcasting them each step costs GBs
        training_args.ddp_broadcast_buffers = False
    guard = SparsityGuard(setup.check, [p for p in setup.model.parameters() if p.requires_grad])
    kind, extra = (Trainer, {}) if distiller is None else (distill.DistillTrainer, {"distiller": distiller})
    trainer = kind(model=setup.model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
                   data_collator=default_data_collator, processing_class=tokenizer,
                   callbacks=[guard, *setup.callbacks, *(callbacks or [])], **extra)
    for replaced in (PrinterCallback, ProgressCallback, DEFAULT_PROGRESS_CALLBACK):  # the last: notebooks' bar
        trainer.remove_callback(replaced)
    block_size = block_size or (train_data[0]["input_ids"].shape[-1] if train_data is not None and len(train_data) else 0)
    global_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size
    trainer.add_callback(TrainingProgress(label, global_batch * block_size))
    return trainer, guard


def make_distiller(student, settings, options, training_args: RecoveryTrainingArguments, result: RecoveryResult,
                   memo: dict | None = None):
    """Load the frozen teacher and the loss around it; records the settings and the teacher (``memo``: the digest
    memo given to :func:`~prunetune.recover.distill.check_teacher`, so its weight files are read once)."""
    teacher = distill.load_teacher(settings, options, training_args.device)
    described = distill.describe_teacher(settings, teacher, memo)
    logger.info("distillation teacher %s: %.1f MiB in %s on %s", settings.teacher, described["bytes"] / 2**20,
                described["dtype"], training_args.device)
    result.extra["distillation"] = {**asdict(settings), "teacher_identity": described}
    return distill.Distiller(student, teacher, settings)


def train(trainer: Trainer, args: RecoveryTrainingArguments, resume_dir: Path | None, block_size: int,
           result: RecoveryResult) -> None:
    first_step = 0
    if resume_dir is not None:
        first_step = json.loads((resume_dir / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
    begun = TrainingBegun()
    trainer.add_callback(begun)
    with track_peak_memory(args.device) as peak:
        try:
            output = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
        except (UsageError, KeyboardInterrupt):
            raise
        except Exception as err:  # restoring the checkpoint (weights, optimizer, scheduler) failed
            if resume_dir is None or begun.begun:
                raise
            raise load_failure(resume_dir, err) from err
    result.steps = output.global_step - first_step
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    result.tokens = result.steps * global_batch * block_size
    result.train_seconds = float(output.metrics.get("train_runtime", 0.0))
    result.tokens_per_second = result.tokens / result.train_seconds if result.train_seconds else 0.0
    result.train_loss = output.training_loss
    # CUDA: peak allocated during training; CPU: how far the resident set rose above its level
    # when training started (the absolute RSS would count whatever the process held before)
    result.peak_memory_bytes = int(peak.block_mb * 2**20)
    result.peak_memory_kind = peak.kind if peak.kind != "rss" else "rss_increase"


def save(trainer: Trainer, setup) -> None:
    output_dir = Path(trainer.args.output_dir)
    trainer.save_model(str(output_dir))  # every rank: sharded strategies gather here
    if trainer.args.process_index != 0:
        return
    trainer.save_state()
    setup.save_extra(output_dir)
