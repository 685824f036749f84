"""The sparsity guard: a Trainer callback that stops a run the moment sparsity or the loss breaks.

At every logging step and before every checkpoint it asks the method's sparsity check
(:mod:`prunetune.recover.base`) whether any pruned weight became nonzero, checks that the
trainable parameters are finite, and logs ``sparsity`` as a metric. A violation raises
:class:`TrainingStopped` *before* the checkpoint of that step is written, so the last
checkpoint on disk is always a good one; a NaN/inf logged loss raises it too.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from prunetune.errors import UsageError
from prunetune.recover.base import SparsityCheck

logger = logging.getLogger(__name__)


class TrainingStopped(UsageError):
    """A run stopped by the guard; the message says why and where the last good checkpoint is."""


def last_checkpoint(output_dir: str) -> str | None:
    try:
        return get_last_checkpoint(output_dir)
    except (FileNotFoundError, OSError):
        return None


def _resume_hint(output_dir: str) -> str:
    last = last_checkpoint(output_dir)
    if last is None:
        return "No checkpoint was written before this step."
    return f"The last good checkpoint is {last} (continue with --resume_from_checkpoint {last})."


class SparsityGuard(TrainerCallback):
    """Checks sparsity and finiteness at each log and before each save; logs ``sparsity``.

    Args:
        check: the method's sparsity check.
        params: the trainable parameters (checked for NaN/inf).
    """

    def __init__(self, check: SparsityCheck, params: list[torch.nn.Parameter]):
        self.check = check
        self.params = params
        self.sparsity: float | None = None
        self._measured_at: int | None = None

    def verify(self, step: int, output_dir: str) -> float:
        """Raise :class:`TrainingStopped` on drift or non-finite weights; return the sparsity."""
        if self.params:
            finite = torch.stack([p.detach().isfinite().all() for p in self.params]).all()
            if not bool(finite):
                raise TrainingStopped(
                    f"Training stopped at step {step}: the trainable weights hold NaN/inf (the loss diverged). "
                    f"{_resume_hint(output_dir)} Lower --learning_rate, add --warmup_steps, or use bf16 rather than fp16."
                )
        drift = self.check.violations()
        if drift:
            first = ", ".join(f"{name}: {count}" for name, count in list(drift.items())[:3])
            raise TrainingStopped(
                f"Training stopped at step {step}: {sum(drift.values())} pruned weights became nonzero in "
                f"{len(drift)} layers ({first}). {_resume_hint(output_dir)} Something bypassed prunetune's masks "
                "(a sharding setting such as FSDP/DeepSpeed, or a custom optimizer); please report it."
            )
        self.sparsity = self.check.sparsity()
        self._measured_at = step
        return self.sparsity

    def on_train_begin(self, args, state, control, **kwargs):
        self.verify(state.global_step, args.output_dir)
        logger.info("sparsity guard: %d layers, sparsity %.4f at step %d", len(self.check.layers), self.sparsity, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        # DefaultFlowCallback (first in the list) has already decided about logging and saving.
        if control.should_log or control.should_save:
            self.verify(state.global_step, args.output_dir)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        for key in ("loss", "train_loss", "eval_loss"):
            value = logs.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise TrainingStopped(
                    f"Training stopped at step {state.global_step}: {key} is {value}. {_resume_hint(args.output_dir)} "
                    "Lower --learning_rate, add --warmup_steps, or use bf16 rather than fp16."
                )
        if self._measured_at != state.global_step:
            self.verify(state.global_step, args.output_dir)
        logs["sparsity"] = self.sparsity
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["sparsity"] = self.sparsity  # Trainer.log appended before calling us

    def on_train_end(self, args, state, control, **kwargs):
        self.verify(state.global_step, args.output_dir)
