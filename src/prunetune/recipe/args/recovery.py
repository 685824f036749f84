"""How to recover: ``RecoveryArguments``, the method, its LoRA settings, distillation and the memory estimate.

Values are checked in ``__post_init__``, before anything is loaded; each field's ``help`` is the
CLI help, as plain text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prunetune.errors import require
from prunetune.recipe.args.values import is_int, is_number
from prunetune.recover.distill import DistillSettings
from prunetune.recover.registry import METHODS

# Loss weights and temperature with --distill_from, from benchmarks/distill_sweep.py on the bundled
# model (Wanda 50%, 61,440 tokens; share of the pruning gap recovered on held-out text):
#   masked_lora: CE 43.5%, KL 50.4%, CE+KL 48.3% (T 2: 48.3%), KL+SquareHead 52.4%, CE+KL+SquareHead 49.9%
#   full:        CE 46.0%, KL 60.7%, KL+SquareHead 62.7%
# so KL + SquareHead without cross-entropy (the teacher's soft targets carry more than the
# one-hot next token); README "Recovery with distillation" has the SmolLM2-135M figures.
DISTILL_DEFAULTS = {"ce": 0.0, "kl": 1.0, "hidden": 1.0, "temperature": 1.0}
# The settings that mean something only with --distill_from, and their defaults.
DISTILL_ONLY = {"distill_ce_weight": DISTILL_DEFAULTS["ce"], "distill_kl_weight": DISTILL_DEFAULTS["kl"],
                "distill_hidden_weight": DISTILL_DEFAULTS["hidden"], "distill_temperature": DISTILL_DEFAULTS["temperature"]}


@dataclass
class RecoveryArguments:
    """How to recover: the method and its LoRA settings."""

    recovery_method: str = field(
        default="lora",
        metadata={"help": "lora (merging densifies), masked_lora (merging keeps the sparsity exactly), full "
                          "(kept weights train, pruned ones stay zero) or blockwise (per block, from --distill_from)."},
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
                          "memory). Default loss: KL + SquareHead, the best mix measured (docs: Recovery, distillation)."},
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
    nsamples: int = field(
        default=128,
        metadata={"help": "blockwise: calibration windows of the training text. Measured on SmolLM2-135M after Wanda "
                          "50%% (2 CPU cores, WikiText-2 validation text): the defaults, 128 x 128 tokens and 3 passes, "
                          "won back 61%% of the perplexity gap in 5.4 min; 4 passes 64%% in 6.5 min; 64 x 128, 3 "
                          "passes, 54%% in 2.5 min. The text counts "
                          "more than its amount: Tiny Shakespeare gave 32-37%% (configs/smollm2-135m-blockwise.yaml)."},
    )
    seqlen: int = field(default=128, metadata={"help": "blockwise: tokens per window."})
    blockwise_input: str = field(
        default="sparse",
        metadata={"help": "blockwise: a block's input: sparse (the blocks before it, as reconstructed), dense "
                          "(the dense model's) or mix (their average). Sparse won back 54%% of SmolLM2-135M's "
                          "Wanda 50%% gap where dense won back 49%%, at 64 x 128 tokens and 3 passes."},
    )
    blockwise_window: int = field(
        default=1,
        metadata={"help": "blockwise: consecutive blocks trained together (2 gave the same as 1 on SmolLM2-135M, "
                          "54.5%% against 54.4%% of the Wanda 50%% gap, in 10%% more time)."},
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
        require(is_int(self.lora_r) and self.lora_r > 0, f"--lora_r {self.lora_r!r} must be a positive rank (an integer).")
        require(is_number(self.lora_alpha) and self.lora_alpha > 0, f"--lora_alpha {self.lora_alpha!r} must be a positive number.")
        if self.lora_dropout is None:
            self.lora_dropout = 0.0 if self.recovery_method == "masked_lora" else 0.05
        require(is_number(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0,
                f"--lora_dropout {self.lora_dropout!r} must be in [0, 1).")
        require(isinstance(self.lora_target_modules, str),
                f"--lora_target_modules {self.lora_target_modules!r} must be a comma-separated string such as q_proj,v_proj.")
        require(bool(self.target_patterns()), "--lora_target_modules is empty; give layer names such as q_proj,v_proj or all-linear.")
        require(self.remask_after_step in ("auto", "always"), f"--remask_after_step {self.remask_after_step!r}; accepted: auto, always.")
        require(self.eval_seqlen is None or (is_int(self.eval_seqlen) and self.eval_seqlen >= 2),
                f"--eval_seqlen {self.eval_seqlen!r} is too small; give an integer of 2 or more.")
        for name in ("nsamples", "seqlen", "blockwise_window"):
            value = getattr(self, name)
            require(is_int(value) and value >= 1, f"--{name} {value!r} must be a positive integer.")
        require(self.blockwise_input in ("sparse", "dense", "mix"),
                f"--blockwise_input {self.blockwise_input!r}; accepted: sparse, dense, mix.")
        for name in ("distill_ce_weight", "distill_kl_weight", "distill_hidden_weight"):
            value = getattr(self, name)
            require(is_number(value) and value >= 0, f"--{name} {value!r} must be a number of 0 or more.")
        require(is_number(self.distill_temperature) and self.distill_temperature > 0,
                f"--distill_temperature {self.distill_temperature!r} must be a positive number.")
        require(is_int(self.distill_chunk_tokens) and self.distill_chunk_tokens > 0,
                f"--distill_chunk_tokens {self.distill_chunk_tokens!r} must be a positive integer.")
        require(self.distill_dtype in ("auto", "bfloat16", "float16", "float32"),
                f"--distill_dtype {self.distill_dtype!r}; accepted: auto, bfloat16, float16, float32.")
        if self.distill_from is None:
            given = [f"--{name} {getattr(self, name)}" for name, default in DISTILL_ONLY.items()
                     if getattr(self, name) != default]
            require(not given, f"{', '.join(given)} given without --distill_from: distillation settings apply only with a "
                               "teacher. Add --distill_from DENSE_MODEL (the model the student was pruned from), or drop "
                               f"{'them' if len(given) > 1 else 'it'}.")
        if self.distill_from is not None:
            require(isinstance(self.distill_from, str) and self.distill_from.strip() != "",
                    f"--distill_from {self.distill_from!r} must name a model.")
            require(self.distill_ce_weight + self.distill_kl_weight + self.distill_hidden_weight > 0,
                    "--distill_ce_weight, --distill_kl_weight and --distill_hidden_weight are all 0: nothing to train on.")

    def distill_settings(self):
        """The :class:`~prunetune.recover.distill.DistillSettings` asked for, or None without --distill_from."""
        if self.distill_from is None:
            return None
        return DistillSettings(teacher=self.distill_from, ce_weight=self.distill_ce_weight,
                               kl_weight=self.distill_kl_weight, hidden_weight=self.distill_hidden_weight,
                               temperature=self.distill_temperature, chunk_tokens=self.distill_chunk_tokens,
                               dtype=self.distill_dtype)

    def target_patterns(self) -> list[str]:
        return [p.strip() for p in self.lora_target_modules.split(",") if p.strip()]

    @property
    def uses_adapter(self) -> bool:
        return self.recovery_method in ("lora", "masked_lora")
