"""Masks and sparsity: the single place that measures, holds and applies them.

A mask is a boolean tensor shaped like the layer's (out, in) weight matrix, ``True`` where
the weight is kept. :class:`MaskSet` maps qualified layer names to masks; it is taken once
(from a pruner, or from the zeros of a freshly pruned model) and then never re-derived.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunetune.modules import find_decoder_blocks, weight_matrix


@dataclass
class ModuleSparsity:
    block: int
    name: str  # qualified name
    relative: str  # name inside the block
    zeros: int
    total: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


@dataclass
class SparsityReport:
    """Zero counts of every prunable layer in the decoder blocks."""

    modules: list[ModuleSparsity] = field(default_factory=list)

    @property
    def zeros(self) -> int:
        return sum(m.zeros for m in self.modules)

    @property
    def total(self) -> int:
        return sum(m.total for m in self.modules)

    @property
    def overall(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    def per_block(self) -> dict[int, float]:
        zeros: dict[int, int] = {}
        totals: dict[int, int] = {}
        for m in self.modules:
            zeros[m.block] = zeros.get(m.block, 0) + m.zeros
            totals[m.block] = totals.get(m.block, 0) + m.total
        return {b: zeros[b] / totals[b] for b in zeros}

    def per_module(self) -> dict[str, float]:
        return {m.name: m.sparsity for m in self.modules}

    def to_dict(self) -> dict:
        return {
            "overall": self.overall,
            "zeros": self.zeros,
            "total": self.total,
            "per_block": {str(k): v for k, v in self.per_block().items()},
            "per_module": self.per_module(),
        }

    def table(self) -> str:
        lines = [f"{'module':<48} {'sparsity':>9} {'zeros':>12} {'total':>12}"]
        current = None
        for m in self.modules:
            if m.block != current:
                current = m.block
                lines.append(f"block {m.block}: {self.per_block()[m.block]:.4f}")
            lines.append(f"  {m.relative:<46} {m.sparsity:>9.4f} {m.zeros:>12d} {m.total:>12d}")
        lines.append(f"{'overall':<48} {self.overall:>9.4f} {self.zeros:>12d} {self.total:>12d}")
        return "\n".join(lines)


@torch.no_grad()
def measure_sparsity(model: nn.Module) -> SparsityReport:
    """Count exact zeros in every prunable layer of every decoder block."""
    report = SparsityReport()
    for block in find_decoder_blocks(model):
        for relative, module in block.linears.items():
            weight = module.weight
            report.modules.append(
                ModuleSparsity(block.index, block.qualified(relative), relative, int((weight == 0).sum()), weight.numel())
            )
    return report


class MaskSet:
    """Boolean kept-masks by qualified layer name, (out, in) orientation."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks

    def __len__(self) -> int:
        return len(self.masks)

    def __iter__(self):
        return iter(self.masks.items())

    @classmethod
    @torch.no_grad()
    def from_zeros(cls, model: nn.Module) -> "MaskSet":
        """Masks from the exact zeros of a pruned model (kept = nonzero). Taken once."""
        masks = {}
        for block in find_decoder_blocks(model):
            for relative, module in block.linears.items():
                masks[block.qualified(relative)] = weight_matrix(module) != 0
        return cls(masks)

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        modules = dict(model.named_modules())
        missing = [name for name in self.masks if name not in modules]
        if missing:
            raise KeyError(f"masked layers not in the model: {missing[:3]}")
        return {name: modules[name] for name in self.masks}

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every pruned weight in place."""
        for name, module in self.layers(model).items():
            weight = weight_matrix(module)
            weight.mul_(self.masks[name].to(device=weight.device, dtype=weight.dtype))

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1 - kept / total if total else 0.0

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().to(torch.uint8).cpu() for k, v in self.masks.items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "MaskSet":
        from safetensors.torch import load_file

        return cls({k: v.bool() for k, v in load_file(str(path)).items()})
