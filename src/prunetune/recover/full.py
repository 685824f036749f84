"""Masked full fine-tuning: every kept weight trains, every pruned weight stays exactly zero.

The masks are taken once -- from the pruned model's zeros at the start of a run, or from the
checkpoint's ``masks.safetensors`` on resume -- and never re-derived from ``W == 0`` (a kept
weight that passes through zero stays trainable). Each lives on its layer as a
non-persistent buffer, ``prunetune_kept_mask`` (True / 1 where the weight stays, as in
masked LoRA), so it follows ``model.to`` and never enters the saved weights. Its encoding is
:func:`prunetune.recover.base.device_mask`'s, chosen for the fastest in-place kernel:

* CPU: the weight's dtype, applied with ``mul_`` (measured on CPU, 2048 x 2048, one thread:
  3.4 ms for fp32 and 3.3 ms for bf16, against 18-22 ms for ``mul_`` by a bool mask and
  43-49 ms for ``masked_fill_`` or ``torch.where``);
* CUDA: bool, applied with ``torch.where(kept, x, 0, out=x)``. Measured before on an H100,
  ``masked_fill_`` by a pruned mask ran at 2.6 TB/s against 2.1 TB/s for ``mul_`` by a bool
  or float mask; ``where`` moves the same bytes as ``masked_fill_`` (read mask and tensor,
  write tensor) with the kept mask itself, whereas ``masked_fill_(~kept, 0)`` would allocate
  and write a negated mask at every call. (``where`` on CUDA is not measured yet:
  ``benchmarks/recover_bench.py`` on the next GPU run.)

Two mechanisms:

* Gradients: a post-accumulate-grad hook zeroes the pruned entries of ``weight.grad`` in place
  after every backward -- before clipping, before DDP's all-reduce (that hook runs before the
  reducer's), before the optimizer -- so the gradient norm and the optimizer moments never
  see pruned entries. Accumulation and checkpointing change nothing: it runs on the
  accumulated gradient.
* Weights: after an optimizer step the pruned weights are zeroed again (``remask``). With
  ``--remask_after_step auto`` (default) this runs unless the optimizer is torch's Adam /
  AdamW / SGD: for those, a zero gradient with zero moment state leaves a zero weight exactly
  zero (decoupled or L2 weight decay multiply it, momentum and both Adam moments stay 0), so
  the pass is a proven no-op -- and the sparsity guard verifies every pruned weight at each
  logging step and before each save anyway. ``always`` runs it regardless. Measured on an
  H100, 1.1B Llama, micro-batch 8 x 1024 (benchmarks/recover_bench.py): +1.6% step time with
  gradient masking alone, +3.3% with the weight pass every step as well -- hence ``auto``.
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
KEPT_BUFFER = "prunetune_kept_mask"  # True / 1 = kept; bool on CUDA, the weight's dtype on CPU (device_mask)
# Optimizers whose update is exactly zero where gradient, moment state and weight are zero.
ZERO_PRESERVING = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def _storage(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """An (out, in) mask in the layer's weight layout (GPT-2 Conv1D stores (in, out))."""
    return mask if isinstance(module, nn.Linear) else mask.t().contiguous()


def _register_mask(module: nn.Module, kept: torch.Tensor) -> None:
    module._buffers.pop(KEPT_BUFFER, None)
    module.register_buffer(KEPT_BUFFER, device_mask(kept, module.weight), persistent=False)


@torch.no_grad()
def zero_pruned_(module: nn.Module, tensor: torch.Tensor) -> None:
    """Zero, in place, the entries of ``tensor`` (weight-shaped) that are pruned in ``module``."""
    kept = module._buffers[KEPT_BUFFER]
    if kept.dtype == torch.bool:  # CUDA (see the module docstring)
        torch.where(kept, tensor, torch.zeros((), dtype=tensor.dtype), out=tensor)
    else:
        tensor.mul_(kept)


def kept_mask(module: nn.Module) -> torch.Tensor:
    """The module's kept mask as bool, in its weight layout."""
    kept = module._buffers[KEPT_BUFFER]
    return kept if kept.dtype == torch.bool else kept != 0


def _mask_gradient(weight: torch.Tensor, module: nn.Module) -> None:
    zero_pruned_(module, weight.grad)


class MaskEnforcer:
    """Holds the masks on their layers, masks gradients, re-masks weights, checks.

    Args:
        model: the model to train (unwrapped).
        masks: kept masks by qualified layer name, (out, in).
        remask: ``auto`` (re-mask after a step unless the optimizer preserves zeros) or ``always``.
    """

    def __init__(self, model: nn.Module, masks: MaskSet, remask: str = "auto"):
        self.layers = masks.layers(model)
        self.remask_policy = remask
        for name, module in self.layers.items():
            _register_mask(module, _storage(module, masks.masks[name]))
        self._handles: list = []

    def attach(self) -> "MaskEnforcer":
        """Register the gradient hooks (idempotent)."""
        if not self._handles:
            for module in self.layers.values():
                hook = lambda weight, module=module: _mask_gradient(weight, module)  # noqa: E731
                self._handles.append(module.weight.register_post_accumulate_grad_hook(hook))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def needs_remask(self, optimizer) -> bool:
        """Whether zeroing the weights after a step of ``optimizer`` can change anything."""
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        return self.remask_policy == "always" or not isinstance(inner, ZERO_PRESERVING)

    def remask(self) -> None:
        """Zero every pruned weight in place."""
        for module in self.layers.values():
            zero_pruned_(module, module.weight.data)

    @torch.no_grad()
    def violations(self) -> dict[str, int]:
        if not self.layers:
            return {}
        counts = torch.stack([
            module.weight.ne(0).logical_and_(kept_mask(module).logical_not()).sum() for module in self.layers.values()
        ]).cpu()  # one host sync
        return {name: int(c) for name, c in zip(self.layers, counts) if c}

    def sparsity(self) -> float:
        return zero_fraction(self.layers)

    def mask_set(self) -> MaskSet:
        """The kept masks, (out, in), on CPU -- what goes into checkpoints."""
        masks = {}
        for name, module in self.layers.items():
            kept = kept_mask(module)
            masks[name] = (kept if isinstance(module, nn.Linear) else kept.t()).cpu()
        return MaskSet(masks)


class MaskCallback(TrainerCallback):
    """Re-mask after each optimizer step (when it can matter); write the masks into each checkpoint."""

    def __init__(self, enforcer: MaskEnforcer):
        self.enforcer = enforcer
        self._remask: bool | None = None

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._remask is None:
            self._remask = self.enforcer.needs_remask(optimizer)
            logger.info("re-masking weights after each optimizer step: %s (%s, --remask_after_step %s)",
                        self._remask, type(getattr(optimizer, "optimizer", optimizer)).__name__, self.enforcer.remask_policy)
        if self._remask:
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
    enforcer = MaskEnforcer(model, masks, remask=args.remask_after_step).attach()
    enforcer.remask()  # a no-op on a pruned model; makes resumed masks authoritative
    logger.info("masked full fine-tuning: %d masked layers, mask sparsity %.4f", len(masks), masks.sparsity())

    def save_masks(folder: Path) -> None:
        os.makedirs(folder, exist_ok=True)
        enforcer.mask_set().save(Path(folder) / MASKS_NAME)

    manifest = {"recovery_method": "full", "masks": MASKS_NAME, "mask_sparsity": masks.sparsity()}
    return Setup(model=model, check=enforcer, callbacks=[MaskCallback(enforcer)], saves_adapter=False,
                 save_extra=save_masks, manifest=manifest)
