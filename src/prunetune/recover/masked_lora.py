"""Masked LoRA: a LoRA update confined to the kept weights, so merging keeps the sparsity.

For a pruned layer with weight ``W`` (out, in) and kept mask ``M`` (``True`` where the
pruned model's weight is nonzero)::

    y = x @ (W + s * (B @ A) * M)^T          s = lora_alpha / r  (or / sqrt(r) with rsLoRA)

so ``merge`` adds exactly zero to every pruned weight. The update ``(B A) * M`` is no longer
low rank, which is why this cannot be expressed as plain LoRA weights.

It plugs into PEFT through PEFT's own extension points rather than beside it:

* :class:`MaskedLoraConfig` is a ``LoraConfig`` with one more field, ``use_masked_lora``,
  tagged ``is_lora_variant`` so PEFT's ``resolve_lora_variant`` picks the variant, and it
  registers :class:`MaskedLoraLinear` as the custom LoRA layer for ``nn.Linear`` / GPT-2
  ``Conv1D``.
* :class:`MaskedLoraVariant` (a ``LoraVariant``) does merge / unmerge / the unfused forward.
* :class:`MaskedLoraLinear` (a ``peft.tuners.lora.Linear``) adds the variant to its registry
  and a fused forward (:class:`~prunetune.recover.masked_linear.MaskedLinearFunction`): when the adapter input is the layer
  input (no dropout in training), ``W + s (B A) * M`` is formed once and multiplied once, so
  the forward costs one matmul, like the base layer; the extra work is the (out, in) weight
  gradient in the backward. With dropout the variant's two-matmul forward is used (same maths).

The saved adapter is PEFT's folder (``adapter_config.json``, ``adapter_model.safetensors``
with ordinary ``lora_A`` / ``lora_B``) with one difference: ``adapter_config.json`` says
``"peft_type": "PRUNETUNE_MASKED_LORA: ..."`` (:data:`SAVED_PEFT_TYPE`) instead of ``"LORA"``,
plus ``"use_masked_lora": true``. Plain PEFT cannot apply the adapter correctly -- ``(B A) * M``
is full rank, so no LoRA weights, ``target_modules`` or rank pattern express it, and PEFT loads
no code from an adapter folder -- and would otherwise load it as unmasked LoRA (wrong outputs, a
merge that revives pruned weights). With this ``peft_type`` every plain PEFT loader
(``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``, transformers' ``load_adapter``)
stops with ``KeyError: 'PRUNETUNE_MASKED_LORA: plain PEFT cannot apply it; ...'``.
:meth:`MaskedLoraConfig.to_dict` writes it, so every save path (``PeftModel.save_pretrained``,
the Trainer's checkpoints) does; in memory the config stays ``PeftType.LORA``, which is what
PEFT's code checks. The Trainer's ``--resume_from_checkpoint`` is unaffected: it loads the
checkpoint's weights into the adapter the model already has and does not read the config.
:func:`prunetune.recover.adapter.apply_adapter` and :meth:`MaskedLoraConfig.load` read this
form and the earlier one (``"peft_type": "LORA"`` with ``"use_masked_lora": true``). Saving
also writes the folder's ``README.md`` (:meth:`MaskedLoraConfig.readme`).

The mask is the base weight's nonzero pattern, taken once when the adapter is created (or
loaded) and held as a non-persistent buffer (``prunetune_kept_mask_<adapter>``; bool on CUDA,
see :func:`~prunetune.recover.base.device_mask`): the base
is frozen, so ``W != 0`` cannot change during training and needs no file of its own; it
moves with ``model.to`` and never enters the adapter's state dict. A kept weight that is
exactly zero in the pruned model counts as pruned (it cannot be adapted), which is what
keeps the merged sparsity equal to the pruned sparsity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from peft.tuners.tuners_utils import check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn

from prunetune.modules import LINEAR_TYPES
from prunetune.recover.base import RecoveryLoraConfig, device_mask
from prunetune.recover.masked_linear import (
    DROPPED_MANTISSA_BITS,
    EVAL_ROUNDING_SEED,
    FusedPlan,
    MaskedLinearFunction,
    draw_rounding_seed,
    effective_weight,
    matmul_dtype,
)

MASK_BUFFER_PREFIX = "prunetune_kept_mask_"
MASKED_PEFT_TYPE = "PRUNETUNE_MASKED_LORA"
# What adapter_config.json says instead of "LORA". Every plain PEFT loader looks it up in its table of
# methods and stops with KeyError: '<this text>', so the text is the message the user reads.
SAVED_PEFT_TYPE = f"{MASKED_PEFT_TYPE}: plain PEFT cannot apply it; load it with prunetune (see README.md)"


@dataclass
class MaskedLoraConfig(RecoveryLoraConfig):
    """``LoraConfig`` for masked LoRA. Everything else is LoRA's, with LoRA's defaults.

    Saved with ``peft_type`` :data:`SAVED_PEFT_TYPE` (see :meth:`to_dict`), read back by :meth:`load`.
    """

    use_masked_lora: bool = field(
        default=True,
        metadata={
            "help": "Confine the update to the base weight's nonzero pattern: delta W = (B A) * (W != 0).",
            "is_lora_variant": True,
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self._register_custom_module({layer_type: MaskedLoraLinear for layer_type in LINEAR_TYPES})

    def to_dict(self) -> dict:
        """The saved form (what ``save_pretrained`` writes): ``peft_type`` is :data:`SAVED_PEFT_TYPE`, not ``LORA``."""
        return {**super().to_dict(), "peft_type": SAVED_PEFT_TYPE}

    @classmethod
    def load(cls, adapter_path: str | Path) -> MaskedLoraConfig:
        """Read ``adapter_config.json`` into this class: the saved form, or the earlier ``LORA`` + ``use_masked_lora``."""
        saved = json.loads((Path(adapter_path) / "adapter_config.json").read_text(encoding="utf-8"))
        saved.pop("runtime_config", None)
        saved.pop("peft_type", None)  # LORA in memory (set by LoraConfig), whatever the file says
        known = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in saved.items() if k in known})

    def readme(self) -> str:
        """The adapter folder's README: what the adapter is, why plain PEFT refuses it, how to load and merge it."""
        base = self._base()
        return f"""---
library_name: prunetune
tags:
- prunetune
- masked-lora
- sparse
---
# Masked LoRA recovery adapter (prunetune)

A masked LoRA adapter written by `prunetune recover --recovery_method masked_lora` to win back
the accuracy a pruned model lost, without giving up its sparsity. Its update is confined to the
weights the pruning kept:

```
delta W = s (B A) * M        M = (W != 0), the pruned base's kept mask
```

so it adds exactly zero to every pruned weight.

{self.card_facts()}

## Plain PEFT cannot apply it, and refuses

`(B A) * M` is not low rank: no plain LoRA adapter expresses it, and PEFT loads no code from an
adapter folder. Loaded as plain LoRA, `B A` would be applied unmasked: wrong outputs, and a
`merge_and_unload` that revives the pruned weights. So `adapter_config.json` says
`"peft_type": "{MASKED_PEFT_TYPE}: ..."` instead of `"LORA"`, and `PeftModel.from_pretrained`,
`AutoPeftModelForCausalLM` and transformers' `load_adapter` stop with

```
KeyError: '{SAVED_PEFT_TYPE}'
```

The weights in `adapter_model.safetensors` are ordinary `lora_A` / `lora_B` factors; the mask
is not stored, it is the base's nonzero pattern.

## Load it

In the commands below `ADAPTER` is this folder. prunetune checks that the base is pruned as it
was in training, then rebuilds the masked layers:

```sh
prunetune eval --model {base} --lora_weights ADAPTER
```

```python
from transformers import AutoModelForCausalLM
from prunetune.recover.adapter import apply_adapter

model = apply_adapter(AutoModelForCausalLM.from_pretrained("{base}"), "ADAPTER")  # a peft.PeftModel
```

## Merge it

```sh
prunetune merge --model {base} --adapter ADAPTER --save_model OUT
```

Sparsity guarantee: the merge adds exactly zero to every pruned weight, so every adapted layer
keeps the pruned model's sparsity. `prunetune merge` verifies it layer by layer before saving
(the `revived` column of the table it prints is 0 in every layer). In bf16 a kept weight can
also round to exactly zero where `W + delta == 0`; the command reports those.
"""


def is_masked_config(config: dict | LoraConfig) -> bool:
    """True for a masked LoRA adapter config (a saved ``adapter_config.json`` dict, either form, or a config)."""
    if isinstance(config, dict):
        return str(config.get("peft_type")).startswith(MASKED_PEFT_TYPE) or bool(config.get("use_masked_lora", False))
    return bool(getattr(config, "use_masked_lora", False))


def kept_mask(module: nn.Module, adapter: str) -> torch.Tensor:
    """The layer's kept mask (1 = kept), in the base weight's storage orientation."""
    return getattr(module, MASK_BUFFER_PREFIX + adapter)


def masked_delta(module: MaskedLoraLinear, adapter: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``s * (B A) * M`` in the base weight's storage orientation (transposed for Conv1D)."""
    weight_B = module.lora_B[adapter].weight
    weight_A = module.lora_A[adapter].weight
    # bf16/fp16 matmuls on CPU are slow and lossy; merges on CPU are done in fp32.
    if weight_B.device.type == "cpu" and weight_B.dtype in (torch.float16, torch.bfloat16):
        weight_B, weight_A = weight_B.float(), weight_A.float()
    product = transpose(weight_B @ weight_A, module.fan_in_fan_out)
    delta = product * kept_mask(module, adapter) * module.scaling[adapter]
    return delta.to(dtype or module.lora_B[adapter].weight.dtype)


def merged_weight(module: LoraLinear, adapters: list[str], weight: torch.Tensor) -> torch.Tensor:
    """``weight + sum_i s_i (B_i A_i) * M_i`` in ``weight``'s dtype: the weight the fused forward evaluates.

    The same function, plan and rounding seed as an ``eval()`` forward in ``weight``'s dtype
    (:data:`EVAL_ROUNDING_SEED` in bf16 / fp16), so on the same device type the merged weight is
    bit for bit the one the adapter was evaluated with. Rounding ``W + delta`` to nearest instead
    would lose most of an update below half a step of ``W`` (see :mod:`prunetune.recover.masked_linear`).
    """
    dtype = weight.dtype
    plan = FusedPlan(scalings=tuple(float(module.scaling[a]) for a in adapters), fan_in_fan_out=bool(module.fan_in_fan_out),
                     dtype=dtype, seed=EVAL_ROUNDING_SEED if dtype in DROPPED_MANTISSA_BITS else None)
    factors = [t.detach() for a in adapters for t in (module.lora_A[a].weight, module.lora_B[a].weight, kept_mask(module, a))]
    return effective_weight(weight.detach(), tuple(factors), plan)


class MaskedLoraVariant(LoraVariant):
    """PEFT variant hooks: mask set-up, merge/unmerge of the masked delta, unfused forward."""

    def supports_lora_conversion(self) -> bool:
        return False  # (B A) * M is not low rank

    @staticmethod
    def init(module: LoraLinear, adapter_name: str, **kwargs: Any) -> None:
        weight = module.get_base_layer().weight.detach()
        module.register_buffer(MASK_BUFFER_PREFIX + adapter_name, device_mask(weight != 0, weight), persistent=False)

    @staticmethod
    def merge_safe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return merged_weight(module, [active_adapter], orig_weight)

    @staticmethod
    def merge_unsafe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = merged_weight(module, [active_adapter], orig_weight.data)

    @staticmethod
    def unmerge(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """``W' - delta``: exact in fp32; in bf16 / fp16 within a rounding step of ``W`` (the merge rounded)."""
        return orig_weight - masked_delta(module, active_adapter, orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        """``result + dropout(x) @ (s (B A) * M)^T``; used when dropout is active (training)."""
        dropped = module.lora_dropout[active_adapter](x)
        delta = masked_delta(module, active_adapter)
        if module.fan_in_fan_out:
            delta = delta.t()  # (out, in) for F.linear
        return result + F.linear(dropped, delta.to(dropped.dtype))

class MaskedLoraLinear(LoraLinear):
    """PEFT LoRA ``Linear`` that knows the masked variant and fuses its forward when it can."""

    @property
    def lora_variants(self):
        return {**super().lora_variants, ("use_masked_lora",): MaskedLoraVariant}

    def resolve_lora_variant(self, *, config: LoraConfig | None = None, **kwargs) -> LoraVariant | None:
        if config is not None:  # PEFT >= 0.21: the registry above decides (and rejects DoRA + masked)
            return super().resolve_lora_variant(config=config, **kwargs)
        # older PEFT passes update_layer's flags instead of the config; this class is only
        # ever created for a MaskedLoraConfig, so the variant is always the masked one
        if kwargs.get("use_dora"):
            raise ValueError("masked LoRA cannot be combined with DoRA")
        return MaskedLoraVariant()

    def get_delta_weight(self, adapter) -> torch.Tensor:
        if isinstance(self.lora_variant.get(adapter), MaskedLoraVariant):
            return masked_delta(self, adapter)
        return super().get_delta_weight(adapter)

    def _fusable_adapters(self, args, kwargs) -> list[str] | None:
        """The active masked adapters when the one-matmul forward is exact, else None."""
        if args or any(v is not None for v in kwargs.values()) or self.disable_adapters or self.merged:
            return None  # mixed-adapter batches, variant kwargs, merged or disabled: PEFT's own path
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return None
        for adapter in active:
            if not isinstance(self.lora_variant.get(adapter), MaskedLoraVariant) or self.lora_bias[adapter]:
                return None
            if self.training and not isinstance(self.lora_dropout[adapter], nn.Identity):
                return None  # dropout feeds the adapter a different input than the base weight
        return active

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapters = self._fusable_adapters(args, kwargs)
        if adapters is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        dtype = matmul_dtype(x.device.type, base.weight.dtype)
        plan = FusedPlan(scalings=tuple(float(self.scaling[a]) for a in adapters), fan_in_fan_out=bool(self.fan_in_fan_out),
                         dtype=dtype, seed=self._rounding_seed() if dtype in DROPPED_MANTISSA_BITS else None)
        factors = [t for a in adapters for t in (self.lora_A[a].weight, self.lora_B[a].weight, kept_mask(self, a))]
        return MaskedLinearFunction.apply(x, base.weight, base.bias, plan, *factors)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """PEFT's merge, except that active masked adapters merge together and round once, as the fused forward does."""
        names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not names or any(not isinstance(self.lora_variant.get(a), MaskedLoraVariant) or self.lora_bias[a] for a in names):
            return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        weight = self.get_base_layer().weight
        merged = merged_weight(self, names, weight)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapters {names} seem to be broken")
        weight.data = merged
        self.merged_adapters.extend(names)

    def _rounding_seed(self) -> int:
        return draw_rounding_seed() if self.training else EVAL_ROUNDING_SEED

    def __repr__(self) -> str:
        return "masked_" + super().__repr__()
