"""What every recovery method hands the trainer: the model to train, its sparsity check, callbacks.

A method (``lora``, ``masked_lora``, ``full``) is a function ``setup(model, args, resume_dir)
-> Setup``; the recipe does not know which one it runs. The sparsity check is what the
:class:`~prunetune.recover.callbacks.SparsityGuard` calls at each logging step and save:

* :class:`FrozenBaseCheck` for the adapter methods: the pruned weights are frozen, so the
  check only has to prove nothing wrote to them -- every pruned position still zero. It
  holds each mask packed to 1 bit per weight (1/16 of a bf16 model), which matters at 7B
  scale; a zero count alone would miss a zero that moved.
* :class:`prunetune.recover.full.MaskEnforcer` for full fine-tuning: exact positions.

Both follow FSDP2's sharding (:mod:`prunetune.recover.sharding`): once the Trainer has replaced
the weights by ``DTensor`` slices, each rank checks its own slices against the matching slice
of the mask and the counts are summed over the ranks.

The two adapter methods also share :class:`RecoveryLoraConfig`, whose save writes the adapter
folder's ``README.md``: what the adapter is and how to load and merge it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from peft import LoraConfig
from torch import nn

from prunetune.masks import digest_packed, pack_kept, pack_layer, popcount, to_host, zero_counts, zero_fraction  # noqa: F401 (re-exported)
from prunetune.modules import prunable_layers, weight_param_shape
from prunetune.recover.sharding import (
    is_sharded,
    local,
    shard_like,
    sum_over_shards,
    unpack_kept,
    zero_fraction_over_ranks,
)


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
        self._local_packed: dict[str, torch.Tensor] = {}  # under FSDP2: this rank's slice of each mask, packed

    @torch.no_grad()
    def violations(self) -> dict[str, int]:
        """Qualified name -> pruned positions (zero at construction) that are nonzero now; offenders only.

        Under FSDP2 each rank compares its weight slices with the same slices of the masks and
        the counts are summed over the ranks (the same result on every rank).
        """
        revived = []
        for name, module in self.layers.items():
            if is_sharded(module.weight):
                now, kept = self._local_bits(name, module)
            else:
                now, kept = pack_layer(module), self.packed[name]
            revived.append(popcount(now & ~kept.to(now.device)))  # padding bits: 0 & 1 = 0
        weights = [module.weight for module in self.layers.values()]
        if any(is_sharded(weight) for weight in weights):
            counts = sum_over_shards(revived, weights)
        else:
            counts = to_host(revived)
        return {name: int(c) for name, c in zip(self.layers, counts) if c}

    def _local_bits(self, name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the weight and of the construction-time mask, both packed, in the weight's layout."""
        if name not in self._local_packed:  # once: cut the whole mask as the weight is cut
            whole = unpack_kept(self.packed[name], weight_param_shape(module))  # (out, in)
            whole = whole if isinstance(module, nn.Linear) else whole.t().contiguous()  # GPT-2 Conv1D: (in, out)
            self._local_packed[name] = pack_kept(local(shard_like(whole, module.weight)))
        return pack_kept(local(module.weight.detach()) != 0), self._local_packed[name]

    def sparsity(self) -> float:
        if any(is_sharded(module.weight) for module in self.layers.values()):
            return zero_fraction_over_ranks(self.layers)
        return zero_fraction(self.layers)

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


ADAPTER_README = "README.md"


@dataclass
class RecoveryLoraConfig(LoraConfig):
    """``LoraConfig`` of the adapter methods; saving it also writes the folder's ``README.md``.

    ``PeftModel.save_pretrained`` (the final output and every Trainer checkpoint) first writes
    PEFT's blank model-card template, then each adapter's config through this method, so the
    card written here replaces the template. The saved ``adapter_config.json`` is plain LoRA's.
    """

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        (Path(save_directory) / ADAPTER_README).write_text(self.readme(), encoding="utf-8")

    def readme(self) -> str:
        """The adapter folder's README: a plain LoRA adapter, and how to merge it without losing the sparsity."""
        base = self._base()
        return f"""---
library_name: peft
tags:
- prunetune
- lora
---
# LoRA recovery adapter (prunetune)

A plain PEFT LoRA adapter written by `prunetune recover --recovery_method lora` to win back the
accuracy a pruned model lost. Its update `delta W = s (B A)` is dense: it also changes the pruned
(zero) weights, so merging it gives up the sparsity unless you re-mask.

{self.card_facts()}

## Load it

In the commands below `ADAPTER` is this folder. prunetune first checks that the base is pruned
as it was in training (plain PEFT's `PeftModel.from_pretrained` loads it too, without that check):

```sh
prunetune eval --model {base} --lora_weights ADAPTER
```

```python
from transformers import AutoModelForCausalLM
from prunetune.recover.adapter import apply_adapter

model = apply_adapter(AutoModelForCausalLM.from_pretrained("{base}"), "ADAPTER")
```

## Merge it

`prunetune merge` prints the sparsity of every adapted layer before and after the merge and,
since the merge densifies them, saves only once you choose how:

```sh
prunetune merge --model {base} --adapter ADAPTER --save_model OUT --remask
prunetune merge --model {base} --adapter ADAPTER --save_model OUT --allow_dense
```

`--remask` zeroes every pruned weight again after merging, which keeps the sparsity but costs
accuracy (the command measures the perplexity before and after); `--allow_dense` keeps the
dense merge (PEFT's `merge_and_unload` does the same). For a merge that keeps the sparsity
exactly, recover with `--recovery_method masked_lora`.
"""

    def _base(self) -> str:
        return self.base_model_name_or_path or "BASE"

    def card_facts(self) -> str:
        """The facts the config holds, as a Markdown list (base model, rank, scale, adapted layers)."""
        scale = self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
        targets = self.target_modules
        targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else [str(targets)]
        base = (f"`{self.base_model_name_or_path}`" if self.base_model_name_or_path
                else "not recorded (`BASE` below: the pruned model it was trained on)")
        rslora = " (rsLoRA: alpha / sqrt(r))" if self.use_rslora else ""
        return "\n".join([
            (f"- Base model: {base}. The adapter corrects that pruning: apply it to the same pruned model (prunetune "
             "compares the pruned positions with those recorded in `prunetune.json` and refuses another)."),
            f"- Rank r = {self.r}, lora_alpha = {self.lora_alpha}: scale s = {scale:g}{rslora}; dropout {self.lora_dropout}.",
            f"- Adapted layers, in every decoder block: {', '.join(f'`{name}`' for name in targets)}.",
            "- `prunetune.json`, in the folder of a finished run: the pruning, the training data, steps and tokens.",
        ])
