"""Arguments of ``prunetune recover``: model, data, recovery method, and Trainer settings.

Parsed by ``transformers.HfArgumentParser`` so the Wanda LoRA recipe's command line works
unchanged (``--model_name_or_path ... --config_name ... --dataset_name c4 --block_size 1024
--do_train --do_eval --max_train_samples ... --overwrite_output_dir --output_dir OUT``), and a
single ``.yaml`` / ``.json`` file of the same keys works too. ``run_clm.py``'s data and model
flags (``--train_file``, ``--validation_split_percentage``, ``--torch_dtype``, ...) keep their
meaning; the few that cannot apply here are refused by name. Each field's ``help`` is the CLI
help, written as plain text (``prunetune recover --help`` prints it as is). Values are checked
in ``__post_init__``, before anything is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from transformers.training_args import OptimizerNames

from prunetune.errors import UsageError, require

METHODS = ("lora", "masked_lora", "full")
# Loss weights and temperature with --distill_from, from benchmarks/distill_sweep.py on the bundled
# model (Wanda 50%, 61,440 tokens; share of the pruning gap recovered on held-out text):
#   masked_lora: CE 43.5%, KL 50.4%, CE+KL 48.3% (T 2: 48.3%), KL+SquareHead 52.4%, CE+KL+SquareHead 49.9%
#   full:        CE 46.0%, KL 60.7%, KL+SquareHead 62.7%
# so KL + SquareHead without cross-entropy (the teacher's soft targets carry more than the
# one-hot next token); README "Recovery with distillation" has the SmolLM2-135M figures.
DISTILL_DEFAULTS = {"ce": 0.0, "kl": 1.0, "hidden": 1.0, "temperature": 1.0}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Evaluation never scores the training text, so "train" is not an evaluation split here.
EVAL_SPLITS = ("validation", "test")

# run_clm.py flags accepted so its command lines run, rarely needed here (most change nothing):
# `prunetune recover --help` names them in one line, `--help-all` describes each.
RUN_CLM_ONLY = ("torch_dtype", "low_cpu_mem_usage", "use_fast_tokenizer", "dataset_config_name",
                "preprocessing_num_workers", "keep_linebreaks", "overwrite_cache", "streaming")


@dataclass
class ModelArguments:
    """Which pruned model to recover (the run_clm.py names)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The pruned model: a folder from prunetune prune, a hub id, or tiny."}
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Config of the unpruned model (the seed passes it): a folder is checked against the "
                          "model's config, a hub id recorded only."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer to use (default: the model's)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Hugging Face cache folder."})
    dtype: str = field(
        default="auto",
        # full keeps float32 master weights under auto and trains under bf16 autocast on CUDA
        metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16 (--torch_dtype: the same). auto: "
                          "bfloat16 for an adapter's frozen base on CUDA, float32 otherwise."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with a hub model (off: it executes remote code)."})
    torch_dtype: str | None = field(default=None, metadata={"help": "run_clm.py's name for --dtype; the same values."})
    low_cpu_mem_usage: bool = field(
        default=False,
        metadata={"help": "Accepted for run_clm.py command lines; changes nothing: transformers 5 always loads the "
                          "weights without a second copy in memory."},
    )
    use_fast_tokenizer: bool = field(
        default=True,
        metadata={"help": "Use the model's fast (Rust) tokenizer, as run_clm.py does by default. false is refused: "
                          "prunetune tokenizes with the fast tokenizer only."},
    )

    def __post_init__(self):
        require(bool(self.model_name_or_path), "--model_name_or_path is required: the pruned model folder, a hub id, or 'tiny'.")
        from prunetune.loading import DTYPES

        if self.torch_dtype is not None:
            require(self.torch_dtype in DTYPES, f"Unknown --torch_dtype {self.torch_dtype!r}; accepted: {', '.join(DTYPES)}.")
            require(self.dtype in ("auto", self.torch_dtype),
                    f"--torch_dtype {self.torch_dtype} and --dtype {self.dtype} disagree; they are the same flag "
                    "(run_clm.py's name and prunetune's): give one of them.")
            self.dtype = self.torch_dtype
        require(self.dtype in DTYPES, f"Unknown --dtype {self.dtype!r}; accepted: {', '.join(DTYPES)}.")
        require(self.use_fast_tokenizer is not False,
                "--use_fast_tokenizer false is not supported: prunetune tokenizes with the model's fast (Rust) "
                "tokenizer only; drop the flag.")


@dataclass
class DataArguments:
    """Training and evaluation text (run_clm.py's names)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training data: builtin (offline corpus), wikitext2, c4, ptb, or a local .txt/.jsonl/"
                          ".json/.parquet file or folder. Default: builtin for tiny and models pruned from it, c4 "
                          "(the seed's) otherwise."},
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "A local training text (.txt/.jsonl/.json/.parquet), instead of --dataset_name. "
                          "Without --validation_file, part of it is held out for evaluation."},
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "A local text for evaluation (then all of the training text trains)."},
    )
    validation_split_percentage: float = field(
        default=5,
        metadata={"help": "Percent of a local text without split files held out for evaluation, never trained "
                          "on (default: 5). 0: none (--do_eval then needs --validation_file)."},
    )
    dataset_config_name: str | None = field(
        default=None,
        metadata={"help": "Accepted for run_clm.py compatibility and ignored: prunetune's named sources fix their files "
                          "(c4: the papers' en shards; wikitext2: wikitext-2-raw-v1)."},
    )
    block_size: int | None = field(
        default=None, metadata={"help": "Training sequence length in tokens. Default: the model's context, capped at 1024."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Score at most this many evaluation windows."})
    validation_split: str = field(
        default="validation",
        metadata={"help": f"Split scored by --do_eval: {' or '.join(EVAL_SPLITS)} (C4: its validation shard)."},
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "Accepted for run_clm.py command lines; changes nothing: the fast tokenizer already "
                          "tokenizes in parallel threads."},
    )
    keep_linebreaks: bool = field(
        default=True,
        metadata={"help": "Keep the line breaks of .txt files, as run_clm.py does by default. false is refused: "
                          "prunetune reads a .txt file whole, line breaks included."},
    )
    overwrite_cache: bool = field(
        default=False,
        metadata={"help": "Accepted for run_clm.py command lines; changes nothing: the token cache is keyed on the "
                          "tokenizer's and the text's content, so it never serves stale ids."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the training source as a stream instead of converting it first (hub sources, "
                          "JSON/Parquet files named by split): for sources too large to store. Tokenizing stops "
                          "after --max_train_samples blocks."},
    )

    def __post_init__(self):
        require(self.block_size is None or (_is_int(self.block_size) and self.block_size >= 2),
                f"--block_size {self.block_size!r} is too small; give an integer of 2 or more.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            require(value is None or (_is_int(value) and value > 0), f"--{name} {value!r} must be a positive number of blocks.")
        require(self.validation_split in EVAL_SPLITS,
                f"--validation_split {self.validation_split!r} is not accepted: evaluation never scores the training "
                f"text; accepted: {', '.join(EVAL_SPLITS)}." if self.validation_split == "train" else
                f"--validation_split {self.validation_split!r}; accepted: {', '.join(EVAL_SPLITS)}.")
        percent = self.validation_split_percentage
        require(_is_number(percent) and 0 <= percent < 100,
                f"--validation_split_percentage {percent!r} is not accepted: give a percentage from 0 (hold out "
                "nothing) to below 100, e.g. 5.")
        require(self.preprocessing_num_workers is None or (_is_int(self.preprocessing_num_workers)
                                                           and self.preprocessing_num_workers > 0),
                f"--preprocessing_num_workers {self.preprocessing_num_workers!r} must be a positive integer.")
        require(self.keep_linebreaks is not False,
                "--keep_linebreaks false is not supported: prunetune reads a .txt file whole, line breaks included; "
                "drop the flag.")
        if self.dataset_name is not None and self.train_file is not None:
            raise UsageError(f"--dataset_name {self.dataset_name} and --train_file {self.train_file} both name the "
                             "training text; give one of them (--validation_file names the evaluation text).")
        if self.dataset_name is not None:
            from prunetune.data import check_source

            check_source(self.dataset_name, "--dataset_name")
        for flag in ("train_file", "validation_file"):
            value = getattr(self, flag)
            if value is not None:
                _check_local_file(flag, value)

    @property
    def training_source(self) -> str | None:
        """What trains: --train_file or --dataset_name (None: the model's default)."""
        return self.train_file or self.dataset_name

    @property
    def training_flag(self) -> str:
        """The option that named the training text (or that changes the default one), for messages."""
        return "--train_file" if self.train_file else "--dataset_name"


def _check_local_file(flag: str, value: str) -> None:
    """``--train_file`` / ``--validation_file`` name local text, not a named source."""
    from prunetune.data import check_local_file

    check_local_file(value, f"--{flag}", f", or use --dataset_name {value}")


@dataclass
class RecoveryArguments:
    """How to recover: the method and its LoRA settings."""

    recovery_method: str = field(
        default="lora",
        metadata={"help": "lora (merging densifies), masked_lora (the update is masked: merging keeps the "
                          "sparsity exactly) or full (every kept weight trains, pruned ones stay zero)."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator: the update is scaled by alpha / r."})
    # None resolves per method: masked_lora's fused forward needs the adapter to see the
    # same input as the base weight; dropout there would cost a second full-size matmul.
    lora_dropout: float | None = field(
        default=None, metadata={"help": "Dropout on the adapter's input. Default: 0.05 for lora, 0 for masked_lora "
                                        "(dropout costs it about 15%% step time)."},
    )
    lora_target_modules: str = field(
        default="q_proj,v_proj",
        metadata={"help": "Layers inside each block: names or globs, comma-separated, or all-linear."},
    )
    allow_dense_finetune: bool = field(
        default=False,
        metadata={"help": "Allow a model without sparsity (full is then plain fine-tuning)."},
    )
    remask_after_step: str = field(
        default="auto",
        # H100, 1.1B Llama: always costs +3.3% step time over unmasked training, auto +1.6%.
        metadata={"help": "full: re-zero pruned weights after each step: auto (not needed for torch Adam/AdamW/SGD, "
                          "which keep them zero) or always."},
    )
    eval_before_training: bool = field(
        default=True, metadata={"help": "With --do_eval, also score the model before training."}
    )
    eval_seqlen: int | None = field(default=None, metadata={"help": "Perplexity window length. Default: --block_size."})
    distill_from: str | None = field(
        default=None,
        metadata={"help": "Distil from the dense model the student was pruned from (frozen; one more model in "
                          "memory). Default loss: KL + SquareHead, the best mix measured (README)."},
    )
    distill_dtype: str = field(
        default="auto",
        metadata={"help": "The teacher's dtype: auto (the student's load dtype), bfloat16, float16 or float32. "
                          "bfloat16 halves the teacher's memory next to a float32 student."},
    )
    distill_ce_weight: float = field(
        default=DISTILL_DEFAULTS["ce"],
        metadata={"help": "Weight of next-token cross-entropy. The defaults (CE 0, KL 1, SquareHead 1, T 1) won back "
                          "the most of the pruning gap at equal tokens on the bundled model: masked_lora 52%% (CE alone "
                          "44%%), full 63%% (CE alone 46%%); see README."},
    )
    distill_kl_weight: float = field(
        default=DISTILL_DEFAULTS["kl"],
        metadata={"help": "Weight of KL from the teacher's next-token distribution."},
    )
    distill_hidden_weight: float = field(
        default=DISTILL_DEFAULTS["hidden"],
        metadata={"help": "Weight of per-block hidden-state matching (SquareHead)."},
    )
    distill_temperature: float = field(default=DISTILL_DEFAULTS["temperature"], metadata={"help": "KL temperature T."})
    distill_chunk_tokens: int = field(
        default=256,
        metadata={"help": "Positions whose logits are formed at once for the losses. A chunk holds about 7 "
                          "chunk x vocab float32 tensors at its peak (benchmarks/distill_cost.py, bundled model, "
                          "batch 8 x 256: peak RSS of a full step +43%% over cross-entropy at 1024, +12%% at 256, "
                          "same CPU time)."},
    )
    memory_estimate: bool = field(
        default=False,
        metadata={"help": "full: print the PREDICTED peak GPU memory of this model, dtype, optimizer and batch, and "
                          "setups that fit, then exit without reading weights."},
    )
    memory_estimate_processes: int | None = field(
        default=None,
        metadata={"help": "With --memory_estimate: the number of processes (GPUs) the run will have; with --fsdp they "
                          "share the weights. Default: this launch's world size."},
    )
    memory_estimate_budget_gb: float = field(
        default=80.0, metadata={"help": "With --memory_estimate: the GPU memory, in GB, to compare the peak with."},
    )

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
        for name in ("distill_ce_weight", "distill_kl_weight", "distill_hidden_weight"):
            value = getattr(self, name)
            require(_is_number(value) and value >= 0, f"--{name} {value!r} must be a number of 0 or more.")
        require(_is_number(self.distill_temperature) and self.distill_temperature > 0,
                f"--distill_temperature {self.distill_temperature!r} must be a positive number.")
        require(_is_int(self.distill_chunk_tokens) and self.distill_chunk_tokens > 0,
                f"--distill_chunk_tokens {self.distill_chunk_tokens!r} must be a positive integer.")
        require(self.distill_dtype in ("auto", "bfloat16", "float16", "float32"),
                f"--distill_dtype {self.distill_dtype!r}; accepted: auto, bfloat16, float16, float32.")
        if self.distill_from is not None:
            require(isinstance(self.distill_from, str) and self.distill_from.strip() != "",
                    f"--distill_from {self.distill_from!r} must name a model.")
            require(self.distill_ce_weight + self.distill_kl_weight + self.distill_hidden_weight > 0,
                    "--distill_ce_weight, --distill_kl_weight and --distill_hidden_weight are all 0: nothing to train on.")

    def distill_settings(self):
        """The :class:`~prunetune.recover.distill.DistillSettings` asked for, or None without --distill_from."""
        if self.distill_from is None:
            return None
        from prunetune.recover.distill import DistillSettings

        return DistillSettings(teacher=self.distill_from, ce_weight=self.distill_ce_weight,
                               kl_weight=self.distill_kl_weight, hidden_weight=self.distill_hidden_weight,
                               temperature=self.distill_temperature, chunk_tokens=self.distill_chunk_tokens,
                               dtype=self.distill_dtype)

    def target_patterns(self) -> list[str]:
        return [p.strip() for p in self.lora_target_modules.split(",") if p.strip()]

    @property
    def uses_adapter(self) -> bool:
        return self.recovery_method in ("lora", "masked_lora")


def _trainer(name: str, help: str, **changes):
    """A TrainingArguments field re-declared with plain-text help (and the Trainer's own default)."""
    parent = TrainingArguments.__dataclass_fields__[name]
    return field(default=changes.get("default", parent.default), metadata={**parent.metadata, "help": help})


# The Trainer options `prunetune recover --help` lists (the rest: --help-all), in that order.
TRAINER_OPTIONS = (
    "output_dir", "overwrite_output_dir", "do_train", "do_eval", "learning_rate", "per_device_train_batch_size",
    "per_device_eval_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps", "warmup_steps",
    "logging_steps", "eval_strategy", "eval_steps", "save_strategy", "save_steps", "save_total_limit",
    "resume_from_checkpoint", "seed", "bf16", "fp16", "gradient_checkpointing", "optim", "disable_tqdm",
)


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
    learning_rate: float = _trainer("learning_rate", "Peak learning rate: 1e-4 suits the adapters, 2e-5 full.")
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
    save_strategy: SaveStrategy | str = _trainer("save_strategy", "When to write checkpoints.")
    save_steps: float = _trainer("save_steps", "A checkpoint every N steps.")
    save_total_limit: int | None = _trainer("save_total_limit", "Keep the last N checkpoints. Default: all.")
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
        import torch

        # transformers 5 makes output_dir optional and fills in ./trainer_output: check before it does.
        require(self.output_dir is not None and str(self.output_dir).strip() != "",
                "--output_dir is required: the folder for the adapter/model (and recovery.json) this run writes.")
        self._check_training_values()
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
