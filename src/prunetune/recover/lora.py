"""LoRA and masked LoRA on a frozen pruned model, through PEFT.

A plain LoRA adapter is an ordinary PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors``) and loads with ``PeftModel.from_pretrained``; a masked LoRA
adapter is saved so that plain PEFT refuses it (see :mod:`prunetune.recover.masked_lora`).
Both configs are :class:`~prunetune.recover.base.RecoveryLoraConfig`, so every save also
writes the folder's ``README.md`` (how to load and merge the adapter).

Target layers are chosen inside the decoder blocks only (by
:func:`prunetune.modules.prunable_layers`), so ``all-linear`` never reaches the embeddings or
the LM head, and a name that matches nothing is an error, not a silent no-op.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from peft import get_peft_model
from torch import nn

from prunetune.errors import UsageError
from prunetune.modules import find_decoder_blocks, prunable_layers
from prunetune.recover.base import (
    FrozenBaseCheck,
    RecoveryLoraConfig,
    Setup,
    base_layers,
)
from prunetune.recover.masked_lora import MaskedLoraConfig


class LoraOptions(Protocol):
    """The recipe's arguments as the adapter methods read them (a method reads only its own fields;
    the library does not import the recipe)."""

    lora_r: int
    lora_alpha: float
    lora_dropout: float

    def target_patterns(self) -> list[str]: ...

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"


def resolve_targets(model: nn.Module, patterns: list[str]) -> dict[str, nn.Module]:
    """Qualified name -> layer for the LoRA targets, every pattern required to match.

    Args:
        model: the unwrapped model.
        patterns: layer names or globs inside a block (``q_proj``, ``self_attn.*``), or ``all-linear``.

    Raises:
        UsageError: a pattern that matches no layer of the decoder blocks.
    """
    if patterns == [ALL_LINEAR]:
        return prunable_layers(model)
    blocks = find_decoder_blocks(model)
    available = sorted(blocks[0].linears) if blocks else []
    for pattern in patterns:
        if pattern == ALL_LINEAR:
            raise UsageError("--lora_target_modules all-linear cannot be combined with other names.")
        if not prunable_layers(model, [pattern]):
            raise UsageError(
                f"--lora_target_modules {pattern!r} matches no layer of the decoder blocks. "
                f"Layers in each block: {', '.join(available)} (give names, globs, or all-linear)."
            )
    return prunable_layers(model, patterns)


def relative_target_names(model: nn.Module, targets: dict[str, nn.Module]) -> list[str]:
    """Names inside a block (``self_attn.q_proj``): PEFT matches them as suffixes, one entry per kind."""
    chosen = set(targets.values())
    names = {rel for block in find_decoder_blocks(model) for rel, m in block.linears.items() if m in chosen}
    return sorted(names)


def build_lora_config(model: nn.Module, args: LoraOptions, masked: bool) -> RecoveryLoraConfig:
    targets = resolve_targets(model, args.target_patterns())
    conv1d = {not isinstance(m, nn.Linear) for m in targets.values()}  # GPT-2 Conv1D
    if len(conv1d) > 1:
        raise UsageError("--lora_target_modules mixes nn.Linear and Conv1D layers; target one kind at a time.")
    config_class = MaskedLoraConfig if masked else RecoveryLoraConfig
    return config_class(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=relative_target_names(model, targets),
        fan_in_fan_out=conv1d == {True},  # GPT-2 Conv1D stores (in, out)
        bias="none",
        task_type="CAUSAL_LM",
    )


def _setup(model: nn.Module, args: LoraOptions, masked: bool) -> Setup:
    check = FrozenBaseCheck(base_layers(model))  # before wrapping: names of the plain model
    config = build_lora_config(model, args, masked)
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("%s on %d layer kinds (%s): %d trainable parameters", "masked LoRA" if masked else "LoRA",
                len(config.target_modules), ", ".join(sorted(config.target_modules)), trainable)
    manifest = {
        "recovery_method": "masked_lora" if masked else "lora",
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                 "target_modules": sorted(config.target_modules)},
        # let apply_adapter / resume refuse a base pruned differently from the one trained on --
        # in every prunable layer, not only the adapted ones (the adapter corrects that pruning):
        # the positions (digests), and the counts for messages and readers older than digests
        "base_mask_digests": check.digests(),
        "base_zero_counts": dict(check.zeros),
    }
    return Setup(model=peft_model, check=check, saves_adapter=True, manifest=manifest)


def setup_lora(model: nn.Module, args: LoraOptions, resume_dir: Path | None = None) -> Setup:
    """Plain PEFT LoRA on the frozen model (merging it later densifies the adapted layers)."""
    return _setup(model, args, masked=False)


def setup_masked_lora(model: nn.Module, args: LoraOptions, resume_dir: Path | None = None) -> Setup:
    """Masked LoRA: delta W = (B A) * M, merged sparsity equals the pruned sparsity."""
    return _setup(model, args, masked=True)
