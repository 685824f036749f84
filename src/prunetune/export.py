"""Merge a recovery adapter into its pruned model, report the sparsity, save with a manifest.

Merging is done one adapted layer at a time: its kept mask (the base weight's nonzeros) is
taken just before that layer merges and dropped right after, so verifying positions -- not
just counts -- never holds more than one layer's mask (a 7B model's full set would be GBs).

* masked LoRA: the merged delta is zero at every pruned weight by construction; the report
  proves it (``pruned_nonzero == 0`` in every layer, per-layer sparsity equal). The merged
  weight is the one the adapter's evaluation multiplied by, bit for bit in every dtype (in
  bf16 / fp16 the same stochastic rounding and seed as the fused forward on the same device
  type: :func:`prunetune.recover.masked_lora.merged_weight`), so the merged model's perplexity
  is the adapter's.
* plain LoRA: the merge densifies the adapted layers; the report shows by how much, and
  ``remask=True`` re-applies the pruned mask after merging (which costs accuracy: measure it).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunetune.masks import measure_sparsity, zero_counts
from prunetune.modules import find_decoder_blocks
from prunetune.outputs import save_model_dir
from prunetune.recover.masked_lora import MaskedLoraLinear, MaskedLoraVariant, merged_weight

logger = logging.getLogger(__name__)


@dataclass
class LayerMerge:
    """Zero counts of one adapted layer before and after merging."""

    name: str
    total: int
    zeros_before: int
    zeros_after: int
    pruned_nonzero: int  # weights pruned before the merge that are nonzero after it
    kept_zeroed: int = 0  # kept weights that the merge rounded to exactly zero (bf16: W + delta == 0)

    @property
    def sparsity_before(self) -> float:
        return self.zeros_before / self.total

    @property
    def sparsity_after(self) -> float:
        return self.zeros_after / self.total


@dataclass
class MergeReport:
    """Sparsity of every prunable layer before and after a merge."""

    method: str  # lora | masked_lora
    remasked: bool
    layers: list[LayerMerge] = field(default_factory=list)
    other_zeros: int = 0  # prunable layers without an adapter (unchanged by the merge)
    other_total: int = 0

    @property
    def sparsity_before(self) -> float:
        return self._overall("zeros_before")

    @property
    def sparsity_after(self) -> float:
        return self._overall("zeros_after")

    def _overall(self, key: str) -> float:
        total = self.other_total + sum(layer.total for layer in self.layers)
        zeros = self.other_zeros + sum(getattr(layer, key) for layer in self.layers)
        return zeros / total if total else 0.0

    @property
    def pruned_nonzero(self) -> int:
        return sum(layer.pruned_nonzero for layer in self.layers)

    @property
    def kept_zeroed(self) -> int:
        return sum(layer.kept_zeroed for layer in self.layers)

    @property
    def pattern_kept(self) -> bool:
        """No pruned weight was revived (the guarantee of masked LoRA and of --remask)."""
        return self.pruned_nonzero == 0

    @property
    def exact(self) -> bool:
        """Every layer keeps exactly its pruned zeros: none revived, no kept weight rounded to zero."""
        return self.pruned_nonzero == 0 and self.kept_zeroed == 0

    def table(self) -> str:
        lines = [f"{'adapted layer':<44} {'before':>8} {'after':>8} {'revived':>10}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<44} {layer.sparsity_before:>8.4f} {layer.sparsity_after:>8.4f} {layer.pruned_nonzero:>10d}")
        lines.append(f"{'overall (all prunable layers)':<44} {self.sparsity_before:>8.4f} {self.sparsity_after:>8.4f} {self.pruned_nonzero:>10d}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "method": self.method, "remasked": self.remasked, "exact": self.exact, "kept_zeroed": self.kept_zeroed,
            "sparsity_before": self.sparsity_before, "sparsity_after": self.sparsity_after,
            "pruned_nonzero": self.pruned_nonzero,
            "layers": [asdict(layer) | {"sparsity_before": layer.sparsity_before, "sparsity_after": layer.sparsity_after}
                       for layer in self.layers],
        }


def tuner_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name (as in the plain model) -> PEFT LoRA layer."""
    return tuner_layers_of(peft_model.get_base_model())


def prunable_weights(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name (as in the plain model) -> prunable layer of a plain or PEFT-wrapped model.

    For an adapted layer this is its base layer; the LoRA matrices themselves are skipped.
    """
    wrappers = set(tuner_layers_of(model))
    layers = {}
    for block in find_decoder_blocks(model):
        for relative, module in block.linears.items():
            name = block.qualified(relative)
            owner = next((w for w in wrappers if name.startswith(w + ".")), None)
            if owner is None:
                layers[name] = module
            elif name == owner + ".base_layer":
                layers[owner] = module
    return layers


def tuner_layers_of(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _untouched_zeros(peft_model: nn.Module, adapted: dict[str, nn.Module]) -> tuple[int, int]:
    """Zeros and size of the prunable layers that carry no adapter."""
    untouched = {name: m for name, m in prunable_weights(peft_model.get_base_model()).items() if name not in adapted}
    return sum(zero_counts(untouched)), sum(m.weight.numel() for m in untouched.values())


@torch.no_grad()
def merged_zero_fraction(peft_model: nn.Module) -> float:
    """Overall sparsity of the prunable layers if the active adapter were merged (nothing is changed)."""
    adapted = tuner_layers(peft_model)
    zeros, total = _untouched_zeros(peft_model, adapted)
    for layer in adapted.values():
        weight = layer.get_base_layer().weight
        active = [adapter for adapter in layer.active_adapters if adapter in layer.lora_A]
        if isinstance(layer, MaskedLoraLinear) and all(isinstance(layer.lora_variant.get(a), MaskedLoraVariant) for a in active):
            merged = merged_weight(layer, active, weight)  # what merge_adapter would write, bit for bit
        else:
            merged = weight.clone()
            for adapter in active:
                merged += layer.get_delta_weight(adapter).to(weight.dtype)
        zeros += int((merged == 0).sum())
        total += merged.numel()
    return zeros / total if total else 0.0


@torch.no_grad()
def merge_adapter(peft_model: nn.Module, method: str, remask: bool = False) -> tuple[nn.Module, MergeReport]:
    """Merge the active adapter layer by layer and return the plain model and its report.

    Args:
        peft_model: a ``PeftModel`` (from :func:`prunetune.recover.adapter.apply_adapter`).
        method: ``lora`` or ``masked_lora`` (for the report).
        remask: zero every weight that was pruned before the merge, after merging.

    Raises:
        ValueError: the merge produced NaN/inf (PEFT's safe merge).
    """
    adapted = tuner_layers(peft_model)
    report = MergeReport(method=method, remasked=remask)
    report.other_zeros, report.other_total = _untouched_zeros(peft_model, adapted)
    for name, layer in adapted.items():
        weight = layer.get_base_layer().weight
        pruned = weight == 0  # the pruned model's zeros, taken just before this layer merges
        zeros_before = int(pruned.sum())
        layer.merge(safe_merge=True)
        if remask:
            weight.masked_fill_(pruned, 0)
        zero = weight == 0
        revived = int((~zero & pruned).sum())
        report.layers.append(LayerMerge(name, weight.numel(), zeros_before, int(zero.sum()), revived, int((zero & ~pruned).sum())))
    model = peft_model.unload()  # layers are merged already; this only removes the wrappers
    logger.info("merged %s adapter into %d layers: sparsity %.4f -> %.4f", method, len(adapted),
                report.sparsity_before, report.sparsity_after)
    return model, report


def save_merged(model: nn.Module, tokenizer, path: str | Path, manifest: dict, overwrite: bool = False) -> Path:
    """Save the merged model folder atomically, with ``prunetune.json`` (manifest + measured sparsity)."""
    report = measure_sparsity(model)
    manifest = {**manifest, "sparsity": report.to_dict()}
    return save_model_dir(model, tokenizer, path, manifest, overwrite=overwrite)
