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
  Other optimizers (bitsandbytes' 8-bit AdamW, Adafactor, ...) are re-masked after every step.

Under FSDP2 (``--fsdp``, see :mod:`prunetune.recover.sharding`) the Trainer replaces every
weight by a sharded ``DTensor`` when it prepares the model, after this setup ran. The enforcer
follows (:meth:`MaskEnforcer.sync_with_parameters`, called by its callback at the start of
training and by every check): each mask is cut like its weight and the gradient hooks move to
the sharded parameters, whose hooks FSDP2 runs on each rank's gradient slice right after the
reduce-scatter; masking, re-masking and counting then act on local slices, and the guard's
counts are summed over the ranks. Checkpoints gather the masks once (a collective on every
rank) and keep them packed on the host, 1 bit per weight, for every later save.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from prunetune.errors import UsageError
from prunetune.masks import MaskSet, pack_kept
from prunetune.recover.base import Setup, device_mask, zero_fraction
from prunetune.recover.optimizers import ZERO_PRESERVING
from prunetune.recover.sharding import (
    is_sharded,
    local,
    shard_like,
    sum_over_shards,
    unpack_kept,
    with_local,
    zero_fraction_over_ranks,
)


class FullOptions(Protocol):
    """The recipe's arguments as ``full`` reads them (a method reads only its own fields; the library
    does not import the recipe)."""

    remask_after_step: bool

logger = logging.getLogger(__name__)

MASKS_NAME = "masks.safetensors"
KEPT_BUFFER = "prunetune_kept_mask"  # True / 1 = kept; bool on CUDA, the weight's dtype on CPU (device_mask)


def _storage(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """An (out, in) mask in the layer's weight layout (GPT-2 Conv1D stores (in, out))."""
    return mask if isinstance(module, nn.Linear) else mask.t().contiguous()


def _register_mask(module: nn.Module, kept: torch.Tensor) -> None:
    module._buffers.pop(KEPT_BUFFER, None)
    module.register_buffer(KEPT_BUFFER, device_mask(kept, module.weight), persistent=False)


@torch.no_grad()
def zero_pruned_(module: nn.Module, tensor: torch.Tensor) -> None:
    """Zero, in place, the entries of ``tensor`` (weight-shaped) that are pruned in ``module``.

    A sharded ``tensor`` (FSDP2: a weight or gradient slice) is zeroed on this rank's slice with
    the mask's slice, which :meth:`MaskEnforcer.sync_with_parameters` cut the same way.
    """
    kept, tensor = local(module._buffers[KEPT_BUFFER]), local(tensor)
    if kept.dtype == torch.bool:  # CUDA (see the module docstring)
        torch.where(kept, tensor, torch.zeros((), dtype=tensor.dtype), out=tensor)
    else:
        tensor.mul_(kept)


def kept_mask(module: nn.Module) -> torch.Tensor:
    """The module's kept mask as bool, in its weight layout (this rank's slice under FSDP2)."""
    kept = local(module._buffers[KEPT_BUFFER])
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
        self._hooked: list[torch.Tensor] = []  # the parameters the hooks sit on
        self._attached = False
        self._packed: dict[str, tuple[torch.Tensor, tuple[int, ...]]] | None = None  # gathered once when sharded

    def attach(self) -> "MaskEnforcer":
        """Register the gradient hooks on the layers' current weights (idempotent)."""
        self._attached = True
        if not self._handles:
            for module in self.layers.values():
                hook = lambda weight, module=module: _mask_gradient(weight, module)  # noqa: E731
                self._handles.append(module.weight.register_post_accumulate_grad_hook(hook))
                self._hooked.append(module.weight)
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._hooked = [], []
        self._attached = False

    @property
    def sharded(self) -> bool:
        """Whether the masked weights are FSDP2 ``DTensor`` slices."""
        return any(is_sharded(module.weight) for module in self.layers.values())

    def sync_with_parameters(self) -> bool:
        """Follow weights that FSDP2 replaced by sharded ``DTensor`` parameters; True if anything moved.

        Each mask still held whole is cut like its weight (:func:`prunetune.recover.sharding.shard_like`:
        same mesh and placements, so rank r masks exactly its own rows) and re-encoded for the
        slice's device, freeing the whole mask; gradient hooks on parameters that are no longer
        the layers' weights move to the new ones. Cheap when nothing changed: every check calls it.
        """
        moved = False
        for module in self.layers.values():
            weight, kept = module.weight, module._buffers[KEPT_BUFFER]
            if is_sharded(weight) and not is_sharded(kept):
                whole = kept if kept.dtype == torch.bool else kept != 0
                piece = shard_like(whole, weight)
                module._buffers[KEPT_BUFFER] = with_local(piece, device_mask(local(piece), local(weight)))
                moved = True
        # only towards sharded parameters: inside FSDP2's forward a layer shows its transient unsharded weight
        if self._attached and any(hooked is not module.weight and is_sharded(module.weight)
                                  for hooked, module in zip(self._hooked, self.layers.values())):
            self.detach()
            self.attach()
            moved = True
        if moved:
            logger.info("masks follow the sharded weights: %d layers%s", len(self.layers),
                        f", {type(next(iter(self.layers.values())).weight.placements[0]).__name__} slices"
                        if self.sharded else "")
        return moved

    def needs_remask(self, optimizer) -> bool:
        """Whether zeroing the weights after a step of ``optimizer`` can change anything."""
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        return self.remask_policy == "always" or not isinstance(inner, ZERO_PRESERVING)

    def remask(self) -> None:
        """Zero every pruned weight in place (each rank its own slices)."""
        self.sync_with_parameters()
        for module in self.layers.values():
            zero_pruned_(module, module.weight.data)

    @torch.no_grad()
    def violations(self) -> dict[str, int]:
        """Qualified name -> pruned weights that are nonzero, over all ranks (offenders only; one host sync)."""
        if not self.layers:
            return {}
        self.sync_with_parameters()
        weights = [module.weight for module in self.layers.values()]
        counts = [local(module.weight).ne(0).logical_and_(kept_mask(module).logical_not()).sum()
                  for module in self.layers.values()]
        totals = sum_over_shards(counts, weights)
        return {name: int(c) for name, c in zip(self.layers, totals) if c}

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of exact zeros over the masked weights, over all ranks."""
        return zero_fraction_over_ranks(self.layers) if self.sharded else zero_fraction(self.layers)

    def mask_set(self) -> MaskSet:
        """The kept masks, (out, in), on CPU -- what goes into checkpoints.

        Under FSDP2 the first call gathers the mask slices, a collective every rank must make
        (:class:`MaskCallback` does at each save and at the end of training); the masks never
        change, so every rank keeps them packed on the host (1 bit per weight) and later calls,
        such as the final save on the main process alone, need no communication.
        """
        self.sync_with_parameters()
        if not self.sharded and self._packed is None:
            masks = {}
            for name, module in self.layers.items():
                kept = kept_mask(module)
                masks[name] = (kept if isinstance(module, nn.Linear) else kept.t()).cpu()
            return MaskSet(masks)
        if self._packed is None:
            packed = {}
            for name, module in self.layers.items():
                whole = module._buffers[KEPT_BUFFER].full_tensor()  # all-gather of this layer's slices
                whole = whole if whole.dtype == torch.bool else whole != 0
                packed[name] = (pack_kept(whole).cpu(), tuple(whole.shape))
                del whole
            self._packed = packed
        masks = {}
        for name, (bits, shape) in self._packed.items():
            kept = unpack_kept(bits, shape)
            masks[name] = kept if isinstance(self.layers[name], nn.Linear) else kept.t().contiguous()
        return MaskSet(masks)


class MaskCallback(TrainerCallback):
    """Re-mask after each optimizer step (when it can matter); write the masks into each checkpoint.

    At the start of training it lets the enforcer follow weights the Trainer sharded (FSDP2),
    before the first backward; at each save and at the end it takes part in gathering sharded
    masks on every rank (the main process writes them).
    """

    def __init__(self, enforcer: MaskEnforcer):
        self.enforcer = enforcer
        self._remask: bool | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.enforcer.sync_with_parameters()

    def on_train_end(self, args, state, control, **kwargs):
        if self.enforcer.sharded:
            self.enforcer.mask_set()  # gathered on every rank now: the final save runs on the main process only

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._remask is None:
            self._remask = self.enforcer.needs_remask(optimizer)
            logger.info("re-masking weights after each optimizer step: %s (%s, --remask_after_step %s)",
                        self._remask, type(getattr(optimizer, "optimizer", optimizer)).__name__, self.enforcer.remask_policy)
        if self._remask:
            self.enforcer.remask()

    def on_save(self, args, state, control, **kwargs):
        masks = self.enforcer.mask_set() if state.is_world_process_zero or self.enforcer.sharded else None
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                masks.save(folder / MASKS_NAME)


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


def setup_full(model: nn.Module, args: FullOptions, resume_dir: Path | None = None) -> Setup:
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
