"""Masked full fine-tuning: every kept weight trains, every pruned weight stays exactly zero.

The masks are taken once -- from the pruned model's zeros at the start of a run, or from the
checkpoint's ``masks.safetensors`` on resume -- and held as non-persistent buffers on their
layers (``prunetune_kept_mask``: 1 where kept; bool on CUDA, see
:func:`~prunetune.recover.base.device_mask`), so they follow ``model.to`` and never enter the
saved weights. They are never re-derived from ``W == 0`` (a kept weight
that passes through zero stays trainable).

Two guarantees, each one elementwise multiply per masked layer (memory-bound: about 9 bytes
per weight per pass with bool masks):

* a tensor hook on each masked weight multiplies every gradient by the mask as autograd
  produces it -- before accumulation, clipping, DDP's all-reduce (the hook runs before the
  reducer's) and the optimizer -- so the gradient norm and optimizer moments never see
  pruned entries;
* after every optimizer step the weights are multiplied by the mask again, so nothing the
  optimizer does on its own (decoupled weight decay, momentum in other optimizers, fp16
  loss-scale quirks) can revive a pruned weight. With torch's Adam/AdamW/SGD and masked
  gradients this pass is provably a no-op (zero gradient and zero state give a zero update);
  it is the guarantee for every other optimizer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from prunetune.errors import UsageError
from prunetune.masks import MaskSet
from prunetune.recover.args import RecoveryArguments
from prunetune.recover.base import Setup, device_mask, zero_fraction

logger = logging.getLogger(__name__)

MASKS_NAME = "masks.safetensors"
BUFFER_NAME = "prunetune_kept_mask"


def _storage(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """An (out, in) mask in the layer's weight layout (GPT-2 Conv1D stores (in, out))."""
    return mask if isinstance(module, nn.Linear) else mask.t().contiguous()


class MaskEnforcer:
    """Holds the pruned masks on their layers, masks gradients, re-masks weights, checks.

    Args:
        model: the model to train (unwrapped).
        masks: kept masks by qualified layer name, (out, in).
    """

    def __init__(self, model: nn.Module, masks: MaskSet):
        self.layers = masks.layers(model)
        for name, module in self.layers.items():
            kept = device_mask(_storage(module, masks.masks[name]), module.weight)
            module.register_buffer(BUFFER_NAME, kept, persistent=False)
        self._handles: list = []

    def attach(self) -> "MaskEnforcer":
        """Register the gradient hooks (idempotent)."""
        if not self._handles:
            for module in self.layers.values():
                self._handles.append(module.weight.register_hook(_grad_masker(module)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def remask(self) -> None:
        """Zero every pruned weight in place."""
        for module in self.layers.values():
            module.weight.mul_(getattr(module, BUFFER_NAME))

    @torch.no_grad()
    def violations(self) -> dict[str, int]:
        names = list(self.layers)
        counts = torch.stack([
            m.weight.ne(0).logical_and_(getattr(m, BUFFER_NAME).logical_not()).sum().cpu() for m in self.layers.values()
        ]) if names else torch.zeros(0)
        return {name: int(c) for name, c in zip(names, counts) if c}

    def sparsity(self) -> float:
        return zero_fraction(self.layers)

    def mask_set(self) -> MaskSet:
        """The kept masks, (out, in), on CPU -- what goes into checkpoints."""
        masks = {}
        for name, module in self.layers.items():
            kept = getattr(module, BUFFER_NAME).bool()
            masks[name] = (kept if isinstance(module, nn.Linear) else kept.t()).cpu()
        return MaskSet(masks)


def _grad_masker(module: nn.Module):
    def mask_gradient(grad: torch.Tensor) -> torch.Tensor:
        return grad * getattr(module, BUFFER_NAME)

    return mask_gradient


class MaskCallback(TrainerCallback):
    """Re-mask after each optimizer step; write the masks into each checkpoint."""

    def __init__(self, enforcer: MaskEnforcer):
        self.enforcer = enforcer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.enforcer.remask()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                self.enforcer.mask_set().save(folder / MASKS_NAME)


def masks_for_run(model: nn.Module, resume_dir: Path | None) -> MaskSet:
    """The checkpoint's masks on resume (checked against the model), else the model's zeros."""
    from_model = MaskSet.from_zeros(model)
    if resume_dir is None or not (resume_dir / MASKS_NAME).exists():
        if resume_dir is not None:
            logger.warning("%s has no %s; taking the masks from the pruned model's zeros", resume_dir, MASKS_NAME)
        return from_model
    saved = MaskSet.load(resume_dir / MASKS_NAME)
    if set(saved.masks) != set(from_model.masks):
        raise UsageError(f"The masks in {resume_dir} name other layers than the model; resume with the model it was trained from.")
    for name, kept in saved.masks.items():
        # every weight pruned in the checkpoint must be zero in the pruned model
        if kept.shape != from_model.masks[name].shape or bool((~kept & from_model.masks[name]).any()):
            raise UsageError(f"The masks in {resume_dir} do not match the model's zeros at {name}; resume with the pruned model the run started from.")
    return saved


def setup_full(model: nn.Module, args: RecoveryArguments, resume_dir: Path | None = None) -> Setup:
    """Train every parameter; masked layers keep their pruned weights at exactly zero."""
    masks = masks_for_run(model, resume_dir)
    model.requires_grad_(True)
    enforcer = MaskEnforcer(model, masks).attach()
    enforcer.remask()  # a no-op on a pruned model; makes resumed masks authoritative
    logger.info("masked full fine-tuning: %d masked layers, mask sparsity %.4f", len(masks), masks.sparsity())

    def save_masks(folder: Path) -> None:
        os.makedirs(folder, exist_ok=True)
        enforcer.mask_set().save(Path(folder) / MASKS_NAME)

    manifest = {"recovery_method": "full", "masks": MASKS_NAME, "mask_sparsity": masks.sparsity()}
    return Setup(model=model, check=enforcer, callbacks=[MaskCallback(enforcer)], saves_adapter=False,
                 save_extra=save_masks, manifest=manifest)
