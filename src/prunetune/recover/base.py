"""What every recovery method hands the trainer: the model to train, its sparsity check, callbacks.

A method (``lora``, ``masked_lora``, ``full``) is a function ``setup(model, args, resume_dir)
-> Setup``; the recipe does not know which one it runs. The sparsity check is what the
:class:`~prunetune.recover.callbacks.SparsityGuard` calls at each logging step and save:

* :class:`FrozenBaseCheck` for the adapter methods: the pruned weights are frozen, so the
  check only has to prove nothing wrote to them -- every pruned position still zero. It
  holds each mask packed to 1 bit per weight (1/16 of a bf16 model), which matters at 7B
  scale; a zero count alone would miss a zero that moved.
* :class:`prunetune.recover.full.MaskEnforcer` for full fine-tuning: exact positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from prunetune.masks import digest_packed, pack_layer, popcount, to_host
from prunetune.modules import prunable_layers, weight_param_shape


class SparsityCheck(Protocol):
    """Answers "are the pruned weights still zero?" cheaply enough to ask at every log step."""

    layers: dict[str, nn.Module]

    def violations(self) -> dict[str, int]:
        """Qualified layer name -> number of pruned weights that are no longer zero (only offenders)."""

    def sparsity(self) -> float:
        """Current fraction of exact zeros over the checked layers."""


def device_mask(kept: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A kept mask stored for fast elementwise use against ``weight`` (same device).

    CUDA kernels read a bool operand at near full bandwidth, so masks stay 1 byte per weight
    there; CPU kernels have no vectorized bool path (``grad * bool_mask`` is ~4x slower than
    ``grad * float_mask``), so on CPU the mask takes the weight's dtype. Either way the
    products are exact (x * 1 == x, x * 0 == 0 for finite x).
    """
    kept = kept.to(weight.device)
    return kept if weight.is_cuda else kept.to(weight.dtype)


@torch.no_grad()
def zero_counts(layers: dict[str, nn.Module]) -> list[int]:
    """Exact zeros per layer, with one host sync for all of them (one per device)."""
    return [int(c) for c in to_host([(m.weight == 0).sum() for m in layers.values()])]


def zero_fraction(layers: dict[str, nn.Module]) -> float:
    total = sum(m.weight.numel() for m in layers.values())
    return sum(zero_counts(layers)) / total if total else 0.0


class FrozenBaseCheck:
    """Sparsity check for a frozen pruned base: every pruned position must stay exactly zero.

    At construction it takes each layer's kept mask (``weight != 0``, (out, in)) and holds it
    packed, 1 bit per weight, on the weight's device: 1/16 of the memory of a bf16 model
    (1/32 of fp32), against 1 byte per weight for a bool mask. :meth:`violations` re-packs
    the current ``weight != 0`` and counts the pruned positions now set, so a zero that moved
    inside a layer (same count, other position) is caught; all layers cost one host sync.

    Args:
        layers: qualified name -> prunable layer of the *unwrapped* model (PEFT keeps the same
            module objects as ``base_layer``, so these stay valid after wrapping).

    Attributes:
        packed: qualified name -> packed kept mask (:func:`prunetune.masks.pack_kept`).
        zeros: qualified name -> zero count at construction.
    """

    @torch.no_grad()
    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.packed = {name: pack_layer(module) for name, module in layers.items()}
        kept = to_host([popcount(bits) for bits in self.packed.values()])
        self.zeros = {name: module.weight.numel() - int(k) for (name, module), k in zip(layers.items(), kept)}

    @torch.no_grad()
    def violations(self) -> dict[str, int]:
        """Qualified name -> pruned positions (zero at construction) that are nonzero now; offenders only."""
        revived = []
        for name, module in self.layers.items():
            now = pack_layer(module)
            revived.append(popcount(now & ~self.packed[name].to(now.device)))  # padding bits: 0 & 1 = 0
        counts = to_host(revived)
        return {name: int(c) for name, c in zip(self.layers, counts) if c}

    def sparsity(self) -> float:
        return zero_fraction(self.layers)

    def zero_counts(self) -> dict[str, int]:
        return dict(self.zeros)

    def digests(self, names: list[str] | None = None) -> dict[str, str]:
        """Qualified name -> :func:`prunetune.masks.mask_digest` of the mask taken at construction."""
        names = list(self.layers) if names is None else list(names)
        packed = to_host([self.packed[name] for name in names])
        return {name: digest_packed(bits, weight_param_shape(self.layers[name])) for name, bits in zip(names, packed)}


@dataclass
class Setup:
    """A model ready for the Trainer, and what the recipe needs around it.

    Attributes:
        model: what the Trainer trains (a ``PeftModel`` for the adapter methods).
        check: the sparsity check the guard runs.
        callbacks: extra ``TrainerCallback``s (re-masking, mask checkpoints).
        saves_adapter: the output is a PEFT adapter folder (else a full model folder).
        save_extra: writes method-specific files (masks) into a checkpoint or output folder.
        manifest: method facts recorded in the output's ``prunetune.json``.
    """

    model: nn.Module
    check: SparsityCheck
    callbacks: list = field(default_factory=list)
    saves_adapter: bool = True
    save_extra: Callable[[Path], None] = lambda path: None
    manifest: dict = field(default_factory=dict)


def base_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable layer of an unwrapped model (call before PEFT wraps it)."""
    return prunable_layers(model)
