"""Recovery after pruning, the library: win back accuracy without giving up the sparsity.

Four methods, one module each, by name in :mod:`.registry` (the recipe that runs them,
``prunetune recover``, is :mod:`prunetune.recipe`):

* ``lora`` (:mod:`.lora`): PEFT LoRA on the frozen pruned model; merging densifies.
* ``masked_lora`` (:mod:`.masked_lora`): delta W = (B A) * M through PEFT's LoRA variant
  hooks; merging keeps the pruned sparsity exactly.
* ``full`` (:mod:`.full`): every kept weight trains; masks taken once, gradients masked,
  pruned weights verified (and re-zeroed where the optimizer could move them).
* ``blockwise`` (:mod:`.blockwise`, training loop in :mod:`.reconstruction`): each decoder block's
  kept weights trained to reproduce the dense block's output, block after block (no Trainer).

Every Trainer run carries the :class:`~.callbacks.SparsityGuard`. Parallelism: DDP (``torchrun`` /
``accelerate launch``) and FSDP2 for ``full`` (masks sharded with their weights, :mod:`.sharding`;
distillation included) are tested on 2 CPU processes (gloo); DeepSpeed is passed through
``TrainingArguments`` untested.

Heavy modules load on first use, so ``from prunetune.recover.adapter import apply_adapter``
(``prunetune eval --lora_weights``) does not import the Trainer. ``recover`` and
``RecoveryResult`` are the recipe's, named here for callers of ``prunetune.recover.recover``.
"""

from __future__ import annotations

import importlib

__all__ = ["recover", "RecoveryResult", "SETUPS", "apply_adapter", "MaskedLoraConfig", "MaskEnforcer", "SparsityGuard"]

_HOMES = {
    "recover": "prunetune.recipe", "RecoveryResult": "prunetune.recipe", "SETUPS": f"{__name__}.registry",
    "apply_adapter": f"{__name__}.adapter", "MaskedLoraConfig": f"{__name__}.masked_lora",
    "MaskEnforcer": f"{__name__}.full", "SparsityGuard": f"{__name__}.callbacks",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
