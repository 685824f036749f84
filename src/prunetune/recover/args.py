"""Arguments of ``prunetune recover``: model, data, recovery method, and Trainer settings.

Parsed by ``transformers.HfArgumentParser`` so the Wanda LoRA recipe's command line works
unchanged (``--model_name_or_path ... --config_name ... --dataset_name c4 --block_size 1024
--do_train --do_eval --max_train_samples ... --overwrite_output_dir --output_dir OUT``), and a
single ``.yaml`` / ``.json`` file of the same keys works too. Each field's ``help`` is the CLI
help. Values are checked in ``__post_init__``, before anything is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from prunetune.errors import UsageError, require

METHODS = ("lora", "masked_lora", "full")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
SPLITS = ("train", "validation", "test")


@dataclass
class ModelArguments:
    """Which pruned model to recover (the run_clm.py names)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The pruned model: a local folder (from `prunetune prune`), a hub id, or 'tiny'."}
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Config of the unpruned model (the seed passes it). A local folder is checked against the "
                          "model's own config; a hub id is recorded only (the pruned folder already holds its config)."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer to use (default: the model's)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Hugging Face cache folder."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype. auto: bfloat16 for the frozen base of lora/masked_lora on CUDA, float32 "
                          "otherwise (full keeps float32 master weights and trains under bf16 autocast on CUDA)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with a hub model (off: it executes remote code)."})

    def __post_init__(self):
        require(bool(self.model_name_or_path), "--model_name_or_path is required: the pruned model folder, a hub id, or 'tiny'.")
        from prunetune.loading import DTYPES

        require(self.dtype in DTYPES, f"Unknown --dtype {self.dtype!r}; accepted: {', '.join(DTYPES)}.")


@dataclass
class DataArguments:
    """Training and evaluation text."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training data: builtin (offline corpus), wikitext2, c4, ptb, or a local .txt/.jsonl/.json/"
                          ".parquet file or folder. Default: builtin for 'tiny', c4 (the seed's) otherwise."},
    )
    dataset_config_name: str | None = field(
        default=None,
        metadata={"help": "Accepted for run_clm.py compatibility and ignored: prunetune's named sources fix their files "
                          "(c4: the papers' en shards; wikitext2: wikitext-2-raw-v1)."},
    )
    block_size: int | None = field(
        default=None, metadata={"help": "Training sequence length (default: the model's context, capped at 1024)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Score at most this many evaluation windows."})
    validation_split: str = field(
        default="validation", metadata={"help": f"Split for --do_eval perplexity: {', '.join(SPLITS)} (C4: always its validation shard)."}
    )

    def __post_init__(self):
        require(self.block_size is None or (_is_int(self.block_size) and self.block_size >= 2),
                f"--block_size {self.block_size!r} is too small; give an integer of 2 or more.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            require(value is None or (_is_int(value) and value > 0), f"--{name} {value!r} must be a positive number of blocks.")
        require(self.validation_split in SPLITS, f"--validation_split {self.validation_split!r}; accepted: {', '.join(SPLITS)}.")
        if self.dataset_name is not None:
            from prunetune.data import check_source

            check_source(self.dataset_name)


@dataclass
class RecoveryArguments:
    """How to recover: the method and its LoRA settings."""

    recovery_method: str = field(
        default="lora",
        metadata={"help": "lora: PEFT LoRA on the frozen pruned model (merging densifies it). masked_lora: the update "
                          "is confined to the kept weights, delta W = (B A) * M, so merging keeps the sparsity exactly. "
                          "full: every kept weight trains; pruned weights stay exactly zero."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator: the update is scaled by alpha / r."})
    # None resolves per method: masked_lora's fused forward needs the adapter to see the
    # same input as the base weight; dropout there would cost a second full-size matmul.
    lora_dropout: float | None = field(
        default=None, metadata={"help": "Dropout on the adapter's input. Default: 0.05 (the seed's) for lora, 0.0 for "
                                        "masked_lora (any dropout disables its one-matmul forward, about 15%% more step time)."},
    )
    lora_target_modules: str = field(
        default="q_proj,v_proj",
        metadata={"help": "Comma-separated layer names or globs inside each decoder block (q_proj, self_attn.*, ...), "
                          "or all-linear."},
    )
    allow_dense_finetune: bool = field(
        default=False,
        metadata={"help": "Allow recovering a model without sparsity (then full is plain fine-tuning)."},
    )
    remask_after_step: str = field(
        default="auto",
        metadata={"help": "full: zero the pruned weights after every optimizer step. auto: unless the optimizer is "
                          "torch Adam/AdamW/SGD, which provably keep them zero under masked gradients (the guard "
                          "verifies); always: every step (H100, 1.1B Llama: +3.3%% step time vs unmasked, against +1.6%% for auto)."},
    )
    eval_before_training: bool = field(
        default=True, metadata={"help": "With --do_eval, also score the pruned model before training, to show the gain."}
    )
    eval_seqlen: int | None = field(default=None, metadata={"help": "Window length for --do_eval perplexity (default: --block_size)."})

    def __post_init__(self):
        require(self.recovery_method in METHODS, f"Unknown --recovery_method {self.recovery_method!r}; accepted: {', '.join(METHODS)}.")
        require(_is_int(self.lora_r) and self.lora_r > 0, f"--lora_r {self.lora_r!r} must be a positive rank (an integer).")
        require(_is_number(self.lora_alpha) and self.lora_alpha > 0, f"--lora_alpha {self.lora_alpha!r} must be a positive number.")
        if self.lora_dropout is None:
            self.lora_dropout = 0.0 if self.recovery_method == "masked_lora" else 0.05
        require(_is_number(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0,
                f"--lora_dropout {self.lora_dropout!r} must be in [0, 1).")
        require(isinstance(self.lora_target_modules, str),
                f"--lora_target_modules {self.lora_target_modules!r} must be a comma-separated string such as q_proj,v_proj.")
        require(bool(self.target_patterns()), "--lora_target_modules is empty; give layer names such as q_proj,v_proj or all-linear.")
        require(self.remask_after_step in ("auto", "always"), f"--remask_after_step {self.remask_after_step!r}; accepted: auto, always.")
        require(self.eval_seqlen is None or (_is_int(self.eval_seqlen) and self.eval_seqlen >= 2),
                f"--eval_seqlen {self.eval_seqlen!r} is too small; give an integer of 2 or more.")

    def target_patterns(self) -> list[str]:
        return [p.strip() for p in self.lora_target_modules.split(",") if p.strip()]

    @property
    def uses_adapter(self) -> bool:
        return self.recovery_method in ("lora", "masked_lora")


@dataclass
class RecoveryTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` with defaults chosen for recovery runs."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing non-empty --output_dir (stale checkpoints in it are removed)."}
    )
    # The command exists to train; --do_train False only evaluates (with --do_eval).
    do_train: bool = field(default=True, metadata={"help": "Train (default). --do_train False with --do_eval only evaluates."})
    # The sparsity guard runs at each logging step; 500 would leave short runs unchecked.
    logging_steps: float = field(default=10, metadata={"help": "Log (and check sparsity) every N steps (< 1: fraction of the run)."})
    # Stop on a NaN/inf loss instead of hiding it; also spares a host sync on every step.
    logging_nan_inf_filter: bool = field(default=False, metadata={"help": "Replace NaN/inf losses by the running mean in logs (off: stop on them)."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision. Default: on when CUDA supports bf16."})

    def __post_init__(self):
        import torch

        # transformers 5 makes output_dir optional and fills in ./trainer_output: check before it does.
        require(self.output_dir is not None and str(self.output_dir).strip() != "",
                "--output_dir is required: the folder for the adapter/model (and recovery.json) this run writes.")
        self._check_training_values()
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
            ok = _is_int(value) if integer else _is_number(value)
            ok = ok and (value > minimum if strict else value >= minimum)
            require(ok, f"--{name} {value!r} is not accepted: {hint}.")

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


ARGUMENT_CLASSES = (ModelArguments, DataArguments, RecoveryArguments, RecoveryTrainingArguments)
