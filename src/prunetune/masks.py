"""Masks and sparsity: the single place that measures, holds and applies them.

A mask is a boolean tensor shaped like the layer's (out, in) weight matrix, ``True`` where
the weight is kept. :class:`MaskSet` maps qualified layer names to masks; it is taken once
(from a pruner, or from the zeros of a freshly pruned model) and then never re-derived.

A mask can also be held *packed*, 1 bit per weight (:func:`pack_kept`), and fingerprinted
(:func:`mask_digest`): that is how a frozen base is checked during training and how an
adapter records which pruning it was trained on, without keeping a byte per weight.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunetune.errors import UsageError
from prunetune.modules import find_decoder_blocks, prunable_layers, weight_matrix

# 64 bits of sha256: the digest tells apart the prunings one user may mix up (accidental
# collisions are ~2^-64 per pair), not an adversary (who could just edit the manifest);
# 16 characters keep a 7B model's manifest (224 layers) short and readable.
DIGEST_CHARS = 16


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
def zero_counts(layers: dict[str, nn.Module]) -> list[int]:
    """Exact zeros per layer, with one host sync for all of them (one per device): the one zero counter."""
    return [int(c) for c in to_host([(m.weight == 0).sum() for m in layers.values()])]


def zero_fraction(layers: dict[str, nn.Module]) -> float:
    total = sum(m.weight.numel() for m in layers.values())
    return sum(zero_counts(layers)) / total if total else 0.0


@torch.no_grad()
def measure_sparsity(model: nn.Module) -> SparsityReport:
    """Count exact zeros in every prunable layer of every decoder block."""
    report = SparsityReport()
    entries = [(block, relative, module) for block in find_decoder_blocks(model) for relative, module in block.linears.items()]
    counts = zero_counts({block.qualified(relative): module for block, relative, module in entries})
    for (block, relative, module), zeros in zip(entries, counts):
        report.modules.append(ModuleSparsity(block.index, block.qualified(relative), relative, zeros, module.weight.numel()))
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
        """The model's module for each masked layer name.

        Raises:
            UsageError: a masked layer the model does not have (masks taken from another model,
                or names that lack or add a wrapper prefix such as ``base_model.model.``).
        """
        modules = dict(model.named_modules())
        missing = [name for name in self.masks if name not in modules]
        if missing:
            known = [name for block in find_decoder_blocks(model) for name in map(block.qualified, block.linears)]
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            example = f" (its prunable layers are named like {known[0]})" if known else ""
            raise UsageError(f"{len(missing)} of the {len(self.masks)} masked layers are not in the "
                             f"{type(model).__name__} model: {shown}{example}. The masks must come from this model "
                             "(MaskSet.from_zeros(model) or its pruner), with the same layer names.")
        return {name: modules[name] for name in self.masks}

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


@torch.no_grad()
def pack_kept(kept: torch.Tensor) -> torch.Tensor:
    """A mask packed 8 positions per byte, on the mask's device.

    Positions are taken in row-major order of ``kept``, most significant bit first (the
    order of ``numpy.packbits``); the last byte is padded with zeros. Packing where the
    weight lives means only 1/8 of a byte per weight ever crosses to the host.

    Args:
        kept: a bool mask of any shape (nonzero = kept for other dtypes).

    Returns:
        A flat uint8 tensor of ``ceil(kept.numel() / 8)`` bytes.
    """
    bits = kept.reshape(-1)
    bits = (bits if bits.dtype == torch.bool else bits != 0).view(torch.uint8)  # 0/1, one byte each
    pad = -bits.numel() % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)  # made on the device: no copy
    return (bits.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)  # (numel / 8,)


def pack_layer(module: nn.Module) -> torch.Tensor:
    """The layer's kept mask (``weight != 0``, (out, in) orientation) packed by :func:`pack_kept`."""
    return pack_kept(weight_matrix(module) != 0)


def popcount(packed: torch.Tensor) -> torch.Tensor:
    """Number of set bits in a packed mask, as a 0-d int64 tensor on its device (no host sync)."""
    x = packed - ((packed >> 1) & 0x55)  # per-byte SWAR popcount: 2-bit sums
    x = (x & 0x33) + ((x >> 2) & 0x33)  # 4-bit sums
    return ((x + (x >> 4)) & 0x0F).sum(dtype=torch.int64)


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy tensors to the CPU with one transfer (one host sync) per device they live on."""
    host: list[torch.Tensor | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(i)
    for indices in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices]).cpu()
        for i, part in zip(indices, flat.split([tensors[i].numel() for i in indices])):
            host[i] = part.view(tensors[i].shape)
    return host


def digest_packed(packed: torch.Tensor, shape: tuple[int, ...]) -> str:
    """The digest of a mask of ``shape`` from its packed bits (see :func:`mask_digest`)."""
    digest = hashlib.sha256("x".join(map(str, shape)).encode() + b":")
    digest.update(packed.cpu().numpy().tobytes())
    return digest.hexdigest()[:DIGEST_CHARS]


def mask_digest(kept: torch.Tensor) -> str:
    """A fingerprint of a mask's positions: sha256 of its shape and packed bits, 16 hex digits.

    Equal exactly when the shapes and the kept positions are equal (up to a 2^-64 chance),
    whatever the device. For a layer, pass the (out, in) orientation (:func:`weight_matrix`),
    so that a GPT-2 ``Conv1D`` and its ``nn.Linear`` twin agree.
    """
    return digest_packed(pack_kept(kept), tuple(kept.shape))


def layer_digests(layers: dict[str, nn.Module]) -> dict[str, str]:
    """Qualified name -> :func:`mask_digest` of the layer's ``weight != 0``; one host sync per device."""
    names = list(layers)
    packed = to_host([pack_layer(layers[name]) for name in names])
    return {name: digest_packed(bits, tuple(weight_matrix(layers[name]).shape)) for name, bits in zip(names, packed)}


def mask_digests(model: nn.Module) -> dict[str, str]:
    """:func:`layer_digests` of every prunable layer of the decoder blocks."""
    return layer_digests(prunable_layers(model))
