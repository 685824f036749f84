"""What every recovery method hands the trainer: the model to train, its sparsity check, callbacks.

A method (``lora``, ``masked_lora``, ``full``) is a function ``setup(model, args, resume_dir)
-> Setup``; the recipe does not know which one it runs. The sparsity check is what the
:class:`~prunetune.recover.callbacks.SparsityGuard` calls at each logging step and save:

* :class:`FrozenBaseCheck` for the adapter methods: the pruned weights are frozen, so the
  check only has to prove nothing wrote to them (zero count per layer unchanged) -- no
  masks are held, which matters at 7B scale.
* :class:`prunetune.recover.full.MaskEnforcer` for full fine-tuning: exact positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from prunetune.modules import prunable_layers


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
    """Exact zeros per layer, with one host sync for all of them."""
    if not layers:
        return []
    return torch.stack([(m.weight == 0).sum() for m in layers.values()]).cpu().tolist()


def zero_fraction(layers: dict[str, nn.Module]) -> float:
    total = sum(m.weight.numel() for m in layers.values())
    return sum(zero_counts(layers)) / total if total else 0.0


class FrozenBaseCheck:
    """Sparsity check for a frozen pruned base: each layer's zero count must never change.

    Args:
        layers: qualified name -> prunable layer of the *unwrapped* model (PEFT keeps the same
            module objects as ``base_layer``, so these stay valid after wrapping).
    """

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.zeros = self._count()

    def _count(self) -> dict[str, int]:
        return dict(zip(self.layers, zero_counts(self.layers)))

    def violations(self) -> dict[str, int]:
        now = self._count()
        return {name: abs(self.zeros[name] - now[name]) for name in self.layers if now[name] != self.zeros[name]}

    def sparsity(self) -> float:
        return zero_fraction(self.layers)

    def zero_counts(self) -> dict[str, int]:
        return dict(self.zeros)


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
