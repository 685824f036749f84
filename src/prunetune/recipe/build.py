"""Build a recovery run's model: the dtype, the loaded model and tokenizer, and the checks on them.

Everything here runs before training and refuses bad input with a :class:`~prunetune.errors.UsageError`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from prunetune.errors import UsageError, require
from prunetune.loading import LoadOptions, load_model, load_tokenizer, max_positions, torch_dtype
from prunetune.recipe.args import DataArguments, ModelArguments, RecoveryArguments, RecoveryTrainingArguments

logger = logging.getLogger(__name__)

MIN_SPARSITY = 0.01  # below this a model counts as unpruned


def resolve_dtype(model_args: ModelArguments, recovery_args: RecoveryArguments, device: torch.device) -> str:
    if model_args.dtype != "auto":
        if recovery_args.recovery_method == "full" and torch_dtype(model_args.dtype) == torch.float16:
            raise UsageError(
                f"--recovery_method full with --dtype {model_args.dtype} would step the optimizer on float16 master "
                "weights (updates below fp16's resolution are lost, AdamW's state underflows). Use --dtype auto or "
                "float32 (fp32 master weights; add --fp16 or --bf16 for mixed precision on a GPU), or --dtype bfloat16."
            )
        return model_args.dtype
    # frozen adapter bases train fine in bf16; full fine-tuning keeps fp32 master weights
    return "bfloat16" if device.type == "cuda" and recovery_args.uses_adapter else "float32"


def check_config(model, model_args: ModelArguments) -> None:
    """``--config_name`` as a local folder must describe the same architecture as the model."""
    if not model_args.config_name:
        return
    path = Path(model_args.config_name).expanduser()
    if not (path / "config.json").exists():
        logger.info("--config_name %s is not a local folder; recorded only (the model folder's config is used)", model_args.config_name)
        return
    given = json.loads((path / "config.json").read_text(encoding="utf-8"))
    own = model.config.to_dict()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if key in given and key in own and given[key] != own[key]:
            raise UsageError(f"--config_name {model_args.config_name} has {key}={given[key]} but the model has {own[key]}; give the config of the model that was pruned.")


def check_sparsity(model_name: str, sparsity: float, recovery_args: RecoveryArguments) -> None:
    if sparsity >= MIN_SPARSITY or recovery_args.allow_dense_finetune:
        return
    plain = "plain fine-tuning" if recovery_args.recovery_method == "full" else "plain LoRA"
    raise UsageError(
        f"{model_name} has no sparsity ({sparsity:.2%} of its prunable weights are zero): there is nothing to recover. "
        f"Prune it first (prunetune prune ...), or pass --allow_dense_finetune to run {plain} on the dense model."
    )


def load_options(model_args: ModelArguments, recovery_args: RecoveryArguments, training_args: RecoveryTrainingArguments):
    return LoadOptions(dtype=resolve_dtype(model_args, recovery_args, training_args.device),
                       trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir,
                       flag="--model_name_or_path")


def load_student_tokenizer(model_args: ModelArguments, recovery_args: RecoveryArguments,
                           training_args: RecoveryTrainingArguments):
    options = load_options(model_args, recovery_args, training_args)
    tokenizer_options = replace(options, flag="--tokenizer_name") if model_args.tokenizer_name else options
    return load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path, tokenizer_options)


def load(model_args: ModelArguments, recovery_args: RecoveryArguments, training_args: RecoveryTrainingArguments,
         tokenizer=None):
    options = load_options(model_args, recovery_args, training_args)
    if tokenizer is None:
        tokenizer = load_student_tokenizer(model_args, recovery_args, training_args)
    model = load_model(model_args.model_name_or_path, options)
    model.config.use_cache = False  # no KV cache while training
    return model.to(training_args.device), tokenizer


def resolve_block_size(model, data_args: DataArguments) -> int:
    limit = max_positions(model)
    block_size = data_args.block_size or min(1024, limit or 1024)
    require(limit is None or block_size <= limit, f"--block_size {block_size} exceeds the model's {limit} positions; use {limit} or less.")
    return block_size




def check_eval_seqlen(model, recovery_args: RecoveryArguments) -> None:
    """``--eval_seqlen`` within the model's positions: checked before training, not after it."""
    limit = max_positions(model)
    seqlen = recovery_args.eval_seqlen
    require(seqlen is None or limit is None or seqlen <= limit,
            f"--eval_seqlen {seqlen} exceeds the model's {limit} positions; use {limit} or less.")
