"""The one place that finds decoder blocks and their prunable linear layers.

Nothing here names a model family. Decoder blocks are the entries of the largest
``nn.ModuleList`` whose members share one class and hold linear layers (checked against
``config.num_hidden_layers`` when the config has it); prunable layers are the
``nn.Linear`` and GPT-2 style ``Conv1D`` modules inside a block. Embeddings and the LM
head live outside the blocks and are never returned.

``Conv1D`` stores its weight as (in, out); :func:`weight_matrix` always returns the
(out, in) view that the pruning maths expects, sharing storage with the parameter.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from prunetune.errors import UsageError

try:  # transformers' GPT-2 style linear layer, weight stored transposed
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

LINEAR_TYPES = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())


@dataclass
class DecoderBlock:
    """One decoder block and its prunable layers.

    Attributes:
        index: position in the stack.
        name: the block's qualified name in the model (``model.layers.3``).
        module: the block.
        linears: relative name (``self_attn.q_proj``) -> layer, in definition order.
    """

    index: int
    name: str
    module: nn.Module
    linears: dict[str, nn.Module] = field(default_factory=dict)

    def qualified(self, relative: str) -> str:
        return f"{self.name}.{relative}"


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out_features, in_features) view of the parameter data."""
    weight = module.weight.data
    return weight.t() if _is_conv1d(module) else weight


def weight_param_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a prunable layer."""
    out_f, in_f = module.weight.shape
    return (in_f, out_f) if _is_conv1d(module) else (out_f, in_f)


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(Conv1D, type) and isinstance(module, Conv1D)


def _candidate_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    stacks = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        if not any(is_prunable(m) for m in module[0].modules()):
            continue
        stacks.append((name, module))
    return stacks


def check_model(model, what: str = "model") -> None:
    """Raise :class:`UsageError` unless ``model`` is a ``torch.nn.Module`` (API callers passing None, a path...)."""
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{what} must be a loaded torch.nn.Module (e.g. from prunetune.load_model), got "
                         f"{type(model).__name__} {str(model)[:80]!r}.")


def find_decoder_blocks(model: nn.Module) -> list[DecoderBlock]:
    """The decoder blocks of ``model`` with their prunable layers.

    Raises:
        UsageError: ``model`` is not a loaded model (a path, None...), or no stack of identical
            blocks holding linear layers exists.
    """
    check_model(model)
    stacks = _candidate_stacks(model)
    config = getattr(model, "config", None)
    expected = None
    if config is not None:
        expected = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if expected:
        matching = [s for s in stacks if len(s[1]) == expected]
        stacks = matching or stacks
    if not stacks:
        raise UsageError(
            f"Cannot find the decoder blocks of {type(model).__name__}: it has no nn.ModuleList of "
            "identical blocks holding nn.Linear/Conv1D layers. prunetune supports decoder-only "
            "transformer models whose blocks form such a list (Llama, Mistral, Qwen2, OPT, "
            "GPT-NeoX, GPT-2, ...)."
        )
    # The largest stack by parameter count is the decoder (vision towers etc. are smaller).
    name, stack = max(stacks, key=lambda s: sum(p.numel() for p in s[1].parameters()))
    blocks = []
    for index, block in enumerate(stack):
        linears = {n: m for n, m in block.named_modules() if n and is_prunable(m)}
        blocks.append(DecoderBlock(index, f"{name}.{index}" if name else str(index), block, linears))
    return blocks


def prunable_layers(model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None) -> dict[str, nn.Module]:
    """Qualified name -> prunable layer over all decoder blocks, filtered by glob patterns.

    ``targets`` / ``ignore`` are fnmatch patterns matched against the layer's relative name
    inside its block (``self_attn.q_proj``) and against its last component (``q_proj``).
    """
    layers = {}
    for block in find_decoder_blocks(model):
        for relative, module in block.linears.items():
            if targets and not _matches(relative, targets):
                continue
            if ignore and _matches(relative, ignore):
                continue
            layers[block.qualified(relative)] = module
    return layers


def _matches(relative: str, patterns: list[str]) -> bool:
    last = relative.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(last, p) for p in patterns)

