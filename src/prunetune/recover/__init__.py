"""Recovery after pruning: win back accuracy without giving up the sparsity.

Three methods, one recipe (:func:`recover`, what ``prunetune recover`` runs):

* ``lora`` (:mod:`.lora`): PEFT LoRA on the frozen pruned model; merging densifies.
* ``masked_lora`` (:mod:`.masked_lora`): delta W = (B A) * M through PEFT's LoRA variant
  hooks; merging keeps the pruned sparsity exactly.
* ``full`` (:mod:`.full`): every kept weight trains; masks taken once, gradients masked,
  pruned weights verified (and re-zeroed where the optimizer could move them).

Every run carries the :class:`~.callbacks.SparsityGuard`. Parallelism: DDP (``torchrun`` /
``accelerate launch``) is tested (2 CPU processes, gloo); FSDP and DeepSpeed are passed
through ``TrainingArguments`` untested for the adapter methods and refused for ``full``
(its masks need whole weights).

Heavy modules load on first use, so ``from prunetune.recover.adapter import apply_adapter``
(``prunetune eval --lora_weights``) does not import the Trainer.
"""

from __future__ import annotations

import importlib

__all__ = ["recover", "RecoveryResult", "SETUPS", "apply_adapter", "MaskedLoraConfig", "MaskEnforcer", "SparsityGuard"]

_HOMES = {
    "recover": "recipe", "RecoveryResult": "recipe", "SETUPS": "recipe",
    "apply_adapter": "adapter", "MaskedLoraConfig": "masked_lora",
    "MaskEnforcer": "full", "SparsityGuard": "callbacks",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
