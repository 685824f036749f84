"""Trainer callbacks of the recovery recipe: the sparsity guard, checkpoint markers, progress.

The guard stops a run the moment sparsity or the loss breaks: at every logging step and
before every checkpoint it asks the method's sparsity check (:mod:`prunetune.recover.base`)
whether any pruned weight became nonzero, checks that the trainable parameters are finite,
and logs ``sparsity`` as a metric. Under FSDP2 the checks count on each rank's slices and sum
(or, for finiteness, and) the results over the ranks, so every rank stops at the same step. A violation raises :class:`TrainingStopped` *before* the
checkpoint of that step is written, so the last checkpoint on disk is always a good one; a
NaN/inf logged loss raises it too. :class:`TrainingProgress` is the run's one progress bar.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from prunetune.errors import UsageError
from prunetune.outputs import write_json
from prunetune.recover.base import SparsityCheck
from prunetune.recover.sharding import all_ranks_true, local

logger = logging.getLogger(__name__)


class TrainingStopped(UsageError):
    """A run stopped by the guard; the message says why and where the last good checkpoint is."""


CHECKPOINT_MARKER = "prunetune_checkpoint.json"  # written last into each checkpoint: it is complete


def _read_json(file: Path) -> dict | None:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def checkpoint_info(folder: str | Path) -> dict | None:
    """What prunetune recorded when the checkpoint was complete (None: not complete, or older than markers)."""
    return _read_json(Path(folder) / CHECKPOINT_MARKER)


def checkpoint_complete(folder: str | Path, markers_expected: bool = True) -> bool:
    """A checkpoint every file of which was written: its marker is there (the last thing written).

    Checkpoints written before markers existed (``markers_expected=False``) count as complete
    when their ``trainer_state.json`` -- the Trainer's last file -- is readable.
    """
    folder = Path(folder)
    if checkpoint_info(folder) is not None:
        return True
    return not markers_expected and _read_json(folder / "trainer_state.json") is not None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of a run, highest step first."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := pattern.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The highest-numbered *complete* checkpoint (one killed mid-save or cut by a full disk is skipped)."""
    folders = checkpoints(output_dir)
    markers_expected = any((p / CHECKPOINT_MARKER).exists() for p in folders)
    for folder in folders:
        if checkpoint_complete(folder, markers_expected):
            return str(folder)
        logger.warning("skipping %s: it was not written completely (killed during the save, or the disk filled up)", folder)
    return None


# A checkpoint whose weights reach this many times the largest weight of the pruned base has
# diverged (trained weights stay within a few times it), even while they are finite.
DIVERGED_FACTOR = 1000.0
WEIGHT_FILES = ("model*.safetensors", "adapter_model*.safetensors")  # masks.safetensors holds masks, not weights


def weights_problem(folder: str | Path, bound: float | None) -> str | None:
    """Why a checkpoint's weights are no good to resume from (NaN/inf, or above ``bound``); None when sane.

    Reads the checkpoint's safetensors weight files one tensor at a time; a folder without any
    (or unreadable ones, which resuming reports itself) is not judged here.
    """
    largest = 0.0
    for pattern in WEIGHT_FILES:
        for file in sorted(Path(folder).glob(pattern)):
            try:
                with safe_open(str(file), "pt") as handle:
                    for key in handle.keys():
                        tensor = handle.get_tensor(key)
                        if not tensor.is_floating_point() or tensor.numel() == 0:
                            continue
                        if not bool(tensor.isfinite().all()):
                            return f"{key} holds NaN/inf"
                        largest = max(largest, float(tensor.abs().max()))
            except (OSError, SafetensorError):
                return None
    if bound is not None and largest > bound:
        return f"weights up to {largest:.3g}, beyond {DIVERGED_FACTOR:g} x the pruned model's largest"
    return None


def last_good_checkpoint(output_dir: str | Path, bound: float | None = None) -> tuple[str | None, list[str]]:
    """The newest complete checkpoint whose weights are sane, and the newer ones skipped as diverged ("folder: why")."""
    diverged = []
    folders = checkpoints(output_dir)
    markers_expected = any((p / CHECKPOINT_MARKER).exists() for p in folders)
    for folder in folders:
        if not checkpoint_complete(folder, markers_expected):
            continue  # last_checkpoint's rule
        problem = weights_problem(folder, bound)
        if problem is None:
            return str(folder), diverged
        diverged.append(f"{folder}: {problem}")
    return None, diverged


def _resume_hint(output_dir: str, bound: float | None = None) -> str:
    last, diverged = last_good_checkpoint(output_dir, bound)
    skipped = (f" Not {', '.join(diverged)}: it had already diverged." if len(diverged) == 1 else
               f" Not {'; '.join(diverged)}: they had already diverged." if diverged else "")
    if last is None:
        return ("No checkpoint with sane weights was written before this step." if diverged else
                "No checkpoint was written before this step.") + skipped
    return f"The last good checkpoint is {last}.{skipped}"


def _divergence_advice(output_dir: str, bound: float | None = None) -> str:
    """What to do after a NaN/inf: true advice, since a resume takes the new --learning_rate (see LearningRateOverride)."""
    last, _ = last_good_checkpoint(output_dir, bound)
    resume = (f"Continue from {last} with a lower rate: --resume_from_checkpoint {last} --learning_rate NEW "
              "(the restored schedule is rescaled to NEW)") if last else "Start again with a lower --learning_rate"
    return f"{resume}, or add --warmup_steps; with fp16, use bf16 instead."


class CheckpointMarker(TrainerCallback):
    """Writes ``prunetune_checkpoint.json`` into each checkpoint once every other file of it is on disk.

    Registered after the callbacks that add files to a checkpoint (the masks of ``full``), so
    the marker is the last file written; ``--resume_from_checkpoint latest`` only picks marked
    checkpoints. It records what a resume must agree with (method, base masks, learning rate).

    Args:
        facts: method facts (the setup's manifest: recovery_method, base mask digests, ...).
    """

    def __init__(self, facts: dict):
        self.facts = facts

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            write_json(folder / CHECKPOINT_MARKER, {**self.facts, "complete": True, "step": state.global_step,
                                                    "learning_rate": args.learning_rate})


class LearningRateOverride(TrainerCallback):
    """On resume, a ``--learning_rate`` other than the checkpoint's rescales the restored schedule.

    The Trainer restores the optimizer's and the scheduler's state, which carry the old rate;
    without this, "resume with a lower learning rate" would silently keep the old one. The
    warm-up and decay shape stay; every rate is multiplied by new / old.
    """

    def __init__(self, checkpoint_rate: float | None):
        self.checkpoint_rate = checkpoint_rate

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        old, new = self.checkpoint_rate, args.learning_rate
        if not old or not new or math.isclose(old, new, rel_tol=1e-9) or optimizer is None:
            return
        factor = new / old
        inner = getattr(optimizer, "optimizer", optimizer)
        for group in inner.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [rate * factor for rate in scheduler.base_lrs]
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr = [group["lr"] for group in inner.param_groups]
        logger.warning("resuming with --learning_rate %g (the checkpoint trained with %g): the restored schedule is "
                       "scaled by %.4g", new, old, factor)


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
        self.bound = _weight_bound(check)  # a checkpoint beyond it has diverged (NaN advice)

    def verify(self, step: int, output_dir: str) -> float:
        """Raise :class:`TrainingStopped` on drift or non-finite weights; return the sparsity."""
        if self.params:
            # each rank checks its own slices under FSDP2; all of them stop if any holds a NaN/inf
            finite = torch.stack([local(p.detach()).isfinite().all() for p in self.params]).all()
            if not all_ranks_true(finite, self.params):
                raise TrainingStopped(
                    f"Training stopped at step {step}: the trainable weights hold NaN/inf (the loss diverged). "
                    f"{_resume_hint(output_dir, self.bound)} {_divergence_advice(output_dir, self.bound)}"
                )
        drift = self.check.violations()
        if drift:
            first = ", ".join(f"{name}: {count}" for name, count in list(drift.items())[:3])
            raise TrainingStopped(
                f"Training stopped at step {step}: {sum(drift.values())} pruned weights became nonzero in "
                f"{len(drift)} layers ({first}). {_resume_hint(output_dir)} (continue with --resume_from_checkpoint "
                "latest). Something bypassed prunetune's masks "
                "(a sharding setting such as FSDP/DeepSpeed, or a custom optimizer); please report it."
            )
        self.sparsity = self.check.sparsity()
        self._measured_at = step
        return self.sparsity

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            # the prepared model's parameters: FSDP2 has replaced the ones given at construction by
            # sharded ones (holding the old ones would also keep every rank's whole copy alive)
            self.params = [p for p in model.parameters() if p.requires_grad]
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
                    f"Training stopped at step {state.global_step}: {key} is {value}. "
                    f"{_resume_hint(args.output_dir, self.bound)} {_divergence_advice(args.output_dir, self.bound)}"
                )
        if self._measured_at != state.global_step:
            self.verify(state.global_step, args.output_dir)
        logs["sparsity"] = self.sparsity
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["sparsity"] = self.sparsity  # Trainer.log appended before calling us

    def on_train_end(self, args, state, control, **kwargs):
        self.verify(state.global_step, args.output_dir)


@torch.no_grad()
def _weight_bound(check: SparsityCheck) -> float | None:
    """:data:`DIVERGED_FACTOR` x the largest weight of the checked (pruned) layers, as they are now; None if unknown."""
    weights = [getattr(module, "weight", None) for module in check.layers.values()]
    weights = [local(w) for w in weights if isinstance(w, torch.Tensor) and w.numel() and not w.is_meta]
    if not weights:
        return None
    largest = float(torch.stack([w.detach().abs().max().float() for w in weights]).max())
    return DIVERGED_FACTOR * largest if math.isfinite(largest) and largest > 0 else None


class TrainingProgress(TrainerCallback):
    """One labelled progress bar per training run, with the last loss, tokens/s and the time left.

    Takes the place of the Trainer's ``ProgressCallback`` and ``PrinterCallback``: the bar
    (main process only, hidden by ``--disable_tqdm`` / ``-q``) shows steps done, the last
    logged loss and the training throughput, and tqdm's estimate of the time left; an
    evaluation during training gets its own labelled bar. Every logged metrics dict goes to
    this module's logger at INFO (shown with ``-v``), never to stdout.

    Args:
        label: the bar's label, e.g. ``recover masked_lora``.
        tokens_per_step: global batch x block size (0: no tokens/s).
    """

    def __init__(self, label: str, tokens_per_step: int):
        self.label = label
        self.tokens_per_step = tokens_per_step
        self.bar = None
        self.eval_bar = None
        self.postfix: dict[str, str] = {}
        self._start: tuple[float, int] | None = None

    def _shows(self, args, state) -> bool:
        return state.is_world_process_zero and not args.disable_tqdm

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self._start = (time.perf_counter(), state.global_step)
        if self._shows(args, state):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.label, unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        started, first_step = self._start
        elapsed = time.perf_counter() - started
        if self.tokens_per_step and elapsed > 0:
            self.postfix["tokens/s"] = f"{(state.global_step - first_step) * self.tokens_per_step / elapsed:,.0f}"
            self._show_postfix(refresh=False)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not self._shows(args, state) or eval_dataloader is None or not hasattr(eval_dataloader, "__len__"):
            return
        if self.eval_bar is None:
            from tqdm.auto import tqdm

            self.eval_bar = tqdm(total=len(eval_dataloader), desc="perplexity (held-out)", unit="batch",
                                 leave=self.bar is None, dynamic_ncols=True)
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        logger.info("step %d: %s", state.global_step, ", ".join(f"{k} {_short(v)}" for k, v in logs.items()))
        if "loss" in logs:
            self.postfix["loss"] = _short(logs["loss"])
        if "eval_loss" in logs and isinstance(logs["eval_loss"], float):
            self.postfix["held-out ppl"] = _short(math.exp(min(logs["eval_loss"], 700.0)))
        self._show_postfix()

    def _show_postfix(self, refresh: bool = True) -> None:
        if self.bar is not None:
            order = ("loss", "held-out ppl", "tokens/s")
            self.bar.set_postfix({key: self.postfix[key] for key in order if key in self.postfix}, refresh=refresh)

    def on_train_end(self, args, state, control, **kwargs):
        for bar in (self.eval_bar, self.bar):
            if bar is not None:
                bar.close()
        self.bar = self.eval_bar = None


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
