"""Trainer settings of a recovery run: ``RecoveryTrainingArguments``, ``transformers.TrainingArguments``
with defaults chosen for recovery and plain-text help on the options ``prunetune recover --help`` lists."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from transformers.training_args import OptimizerNames

from prunetune.errors import UsageError, require
from prunetune.recipe.args.values import is_int, is_number


def _trainer(name: str, help: str, **changes):
    """A TrainingArguments field re-declared with plain-text help (and the Trainer's own default)."""
    parent = TrainingArguments.__dataclass_fields__[name]
    return field(default=changes.get("default", parent.default), metadata={**parent.metadata, "help": help})


# The Trainer options `prunetune recover --help` lists (the rest: --help-all), in that order.
TRAINER_OPTIONS = (
    "output_dir", "overwrite_output_dir", "do_train", "do_eval", "learning_rate", "per_device_train_batch_size",
    "per_device_eval_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps", "warmup_steps",
    "logging_steps", "eval_strategy", "eval_steps", "save_strategy", "save_steps", "save_total_limit",
    "keep_checkpoints", "resume_from_checkpoint", "seed", "bf16", "fp16", "gradient_checkpointing", "optim",
    "disable_tqdm",
)
# --learning_rate when none is given: what suits each method (the Trainer's 5e-5 suits neither).
LEARNING_RATES = {"lora": 1e-4, "masked_lora": 1e-4, "full": 2e-5}
SAVE_STEPS = 500  # the Trainer's default checkpoint interval


@dataclass
class RecoveryTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` with defaults chosen for recovery runs.

    The options ``prunetune recover --help`` shows are re-declared here with plain-text help;
    their defaults are the Trainer's unless a comment says otherwise.
    """

    output_dir: str | None = _trainer("output_dir", "Required: the folder for the adapter or model, recovery.json, checkpoints.")
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a non-empty --output_dir that prunetune wrote."}
    )
    # The command exists to train; --do_train false only evaluates (with --do_eval).
    do_train: bool = field(default=True, metadata={"help": "Train (default; false: only evaluate)."})
    do_eval: bool = _trainer("do_eval", "Perplexity on held-out text, before and after training.")
    # None: chosen per method by resolve_learning_rate (recorded in recovery.json)
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate. Default: 1e-4 (adapters), 2e-5 (full); resumed: the "
                                        "checkpoint's."})
    per_device_train_batch_size: int = _trainer("per_device_train_batch_size", "Blocks per step and device.")
    per_device_eval_batch_size: int = _trainer("per_device_eval_batch_size", "Evaluation windows per forward.")
    gradient_accumulation_steps: int = _trainer(
        "gradient_accumulation_steps", "Batches per optimizer step.")
    num_train_epochs: float = _trainer("num_train_epochs", "Passes over the training blocks.")
    max_steps: int = _trainer("max_steps", "Steps to train, instead of epochs (-1: by epochs).")
    warmup_steps: float = _trainer("warmup_steps", "Linear warm-up steps (below 1: a fraction).")
    # The sparsity guard runs at each logging step; 500 would leave short runs unchecked.
    logging_steps: float = field(default=10, metadata={"help": "Log and check sparsity every N steps."})
    eval_strategy: IntervalStrategy | str = _trainer(
        "eval_strategy", "Also score the held-out text during training (eval_curve in recovery.json).")
    eval_steps: float | None = _trainer("eval_steps", "Evaluate every N steps. Default: --logging_steps.")
    # None: not given -- checkpoints every 500 steps for resuming an interrupted run, removed once it finishes
    save_strategy: SaveStrategy | str | None = field(
        default=None, metadata={"help": "When to write checkpoints. Default: steps."})
    save_steps: float | None = field(default=None, metadata={"help": f"A checkpoint every N steps. Default: {SAVE_STEPS}."})
    save_total_limit: int | None = _trainer("save_total_limit", "Keep the last N checkpoints. Default: all.")
    keep_checkpoints: bool | None = field(
        default=None,
        metadata={"help": "Keep the checkpoints once the run finishes. Default: with --save_strategy/--save_steps."})
    resume_from_checkpoint: str | None = _trainer(
        "resume_from_checkpoint", "A checkpoint-N folder, or latest (the last complete one).")
    seed: int = _trainer("seed", "Seed of the adapter's init and the data order.")
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision. Default: on where CUDA has bf16."})
    fp16: bool = _trainer("fp16", "fp16 mixed precision (prefer bf16 where the GPU has it).")
    gradient_checkpointing: bool | None = _trainer(
        "gradient_checkpointing", "Recompute activations: less memory, more time (= --activation_checkpointing).")
    optim: OptimizerNames | str = _trainer(
        "optim", "adamw_torch_fused (default), adamw_torch, sgd, adafactor, ... (--help-all: all).")
    # Bars by default whatever the transformers log level (the Trainer would hide them below
    # warning, which the CLI sets); -q sets this to true.
    disable_tqdm: bool | None = _trainer("disable_tqdm", "Hide the progress bars (as -q does).", default=False)
    # Recovery only ever needs the evaluation loss; the Trainer would otherwise gather every
    # eval logit (windows x block x vocab floats) in memory.
    prediction_loss_only: bool = _trainer("prediction_loss_only", "Evaluation keeps only the loss (default).", default=True)
    # Stop on a NaN/inf loss instead of hiding it; also spares a host sync on every step.
    logging_nan_inf_filter: bool = field(default=False, metadata={"help": "Replace NaN/inf losses by the running mean in logs (off: stop on them)."})

    def __post_init__(self):
        # transformers 5 makes output_dir optional and fills in ./trainer_output: check before it does.
        require(self.output_dir is not None and str(self.output_dir).strip() != "",
                "--output_dir is required: the folder for the adapter/model (and recovery.json) this run writes.")
        self._check_training_values()
        if self.keep_checkpoints is None:  # asked for checkpoints: keep them ("no" asks for none)
            strategy = getattr(self.save_strategy, "value", self.save_strategy)
            self.keep_checkpoints = strategy not in (None, "no") or self.save_steps is not None
        if self.save_strategy is None:
            self.save_strategy = "steps"
        if self.save_steps is None:
            self.save_steps = SAVE_STEPS
        if self.gradient_checkpointing is not None and self.activation_checkpointing is None:
            # run_clm's name, taken as ours: no deprecation warning for the flag its users type
            self.activation_checkpointing = self.gradient_checkpointing
        if self.disable_tqdm is None:
            self.disable_tqdm = False
        accelerated = torch.cuda.is_available() or torch.backends.mps.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
        if not accelerated:
            # CPU-only machine: say so, which also lets torchrun / accelerate launch run gloo DDP
            self.use_cpu = True
            self.dataloader_pin_memory = False
        if self.bf16 is None:
            self.bf16 = bool(not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if self.ddp_find_unused_parameters is None:
            # every trainable parameter takes part in every forward here; True costs an autograd traversal per step
            self.ddp_find_unused_parameters = False
        try:
            super().__post_init__()
        except (ValueError, ImportError) as err:
            raise UsageError(f"Invalid training arguments: {err}") from err

    def _check_training_values(self) -> None:
        """Values the Trainer would accept and then train nothing (or NaN) with."""
        def number(name: str, value, minimum: float, *, integer: bool, strict: bool, hint: str) -> None:
            ok = is_int(value) if integer else is_number(value)
            ok = ok and (value > minimum if strict else value >= minimum)
            require(ok, f"--{name} {value!r} is not accepted: {hint}.")

        require(self.do_train or self.do_eval,
                "--do_train false without --do_eval does nothing: give --do_eval to only evaluate, or drop "
                "--do_train false to train.")
        if self.learning_rate is not None:
            number("learning_rate", self.learning_rate, 0, integer=False, strict=True,
                   hint="give a positive finite number, e.g. 1e-4 (lora, masked_lora) or 2e-5 (full)")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            number(name, getattr(self, name), 1, integer=True, strict=False, hint="give an integer of 1 or more")
        number("max_steps", self.max_steps, -1, integer=True, strict=False,
               hint="give a positive number of optimizer steps, or -1 to train --num_train_epochs epochs")
        number("num_train_epochs", self.num_train_epochs, 0, integer=False, strict=False,
               hint="give a positive number of passes over the training data (fractions allowed)")
        if self.do_train and self.max_steps <= 0:
            require(self.num_train_epochs > 0,
                    f"--num_train_epochs {self.num_train_epochs!r} with --max_steps {self.max_steps} trains nothing and would "
                    "save an untrained adapter; give --num_train_epochs above 0 or --max_steps N (N > 0).")
        number("warmup_steps", self.warmup_steps, 0, integer=False, strict=False,
               hint="give 0 or more (below 1: a fraction of the run)")
        number("logging_steps", self.logging_steps, 0, integer=False, strict=True,
               hint="give a positive number of steps (below 1: a fraction of the run)")
        for name in ("save_steps", "eval_steps"):
            value = getattr(self, name)
            if value is not None:
                number(name, value, 0, integer=False, strict=True,
                       hint="give a positive number of steps (below 1: a fraction of the run)")


def resolve_learning_rate(args: RecoveryTrainingArguments, method: str, checkpoint_rate: float | None = None) -> float:
    """Fill in ``--learning_rate`` when none was given: the checkpoint's on resume, else the method's default."""
    if args.learning_rate is None:
        args.learning_rate = checkpoint_rate or LEARNING_RATES[method]
    return args.learning_rate
