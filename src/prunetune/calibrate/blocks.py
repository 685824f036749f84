"""Running one decoder block on the calibration batches: placement, extra arguments, outputs.

What capture and both schedules share: moving a block to the compute device for its turn
(:class:`BlockPlacement`), storing the extra block arguments once (:class:`TensorPool`) and
moving them there once (:class:`ExtrasCache`), one block forward on one batch
(:func:`run_block`, ended early by raising :class:`Stop` from a hook), and the propagation
pass that turns a block's outputs into the next block's inputs (:func:`propagate`,
:func:`store_output`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prunetune.calibrate.types import BlockInputs


class Stop(Exception):
    """Raised inside a forward to end it early (capture, statistics)."""


def map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``obj`` with ``fn`` applied to every tensor inside its tuples, lists and dicts."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


class TensorPool:
    """Stores equal tensors once (masks and rotary tables repeat for every batch)."""

    def __init__(self):
        self.tensors: list[torch.Tensor] = []

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        for known in self.tensors:
            if known.shape == tensor.shape and known.dtype == tensor.dtype and known.device == tensor.device \
                    and torch.equal(known, tensor):
                return known
        self.tensors.append(tensor)
        return tensor


def is_dispatched(block: nn.Module) -> bool:
    """True when accelerate hooks (``device_map``) place and move this block's weights."""
    return any(hasattr(m, "_hf_hook") for m in block.modules())


class BlockPlacement:
    """Moves a block to the compute device for its turn and back afterwards.

    A block placed by accelerate (:func:`is_dispatched`) stays where accelerate runs it.
    """

    def __init__(self, block: nn.Module, device: torch.device | str | None):
        self.block = block
        params = list(block.parameters())
        self.home = params[0].device if params else torch.device("cpu")
        self.device = self.home if device is None or is_dispatched(block) else torch.device(device)
        self.moves = self.device != self.home

    def __enter__(self) -> torch.device:
        if self.moves:
            self.block.to(self.device)
        return self.device

    def __exit__(self, *exc) -> None:
        if self.moves:
            self.block.to(self.home)


class ExtrasCache:
    """Extra block arguments moved to one device, converted once per distinct object."""

    def __init__(self, device: torch.device):
        self.device = device
        self.moved: dict[int, tuple[tuple, dict]] = {}
        self.pool = TensorPool()
        self.by_tensor: dict[int, torch.Tensor] = {}

    def __call__(self, extras: tuple[tuple, dict]) -> tuple[tuple, dict]:
        key = id(extras)
        if key not in self.moved:
            self.moved[key] = map_tensors(extras, self._move)
        return self.moved[key]

    def _move(self, tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in self.by_tensor:
            self.by_tensor[id(tensor)] = tensor.to(self.device, non_blocking=True)
        return self.by_tensor[id(tensor)]


def run_block(block: nn.Module, hidden: torch.Tensor, extras: tuple[tuple, dict], device: torch.device) -> torch.Tensor:
    """The block's output hidden states for one batch (B, T, hidden)."""
    args, kwargs = extras
    output = block(hidden.to(device, non_blocking=True), *args, **kwargs)
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def propagate(block: nn.Module, inputs: BlockInputs, device: torch.device, extras: ExtrasCache) -> None:
    """Replace every batch of ``inputs`` by the block's outputs on it."""
    for index, (hidden, extra) in enumerate(zip(inputs.hidden, inputs.extras)):
        output = run_block(block, hidden, extras(extra), device)
        store_output(inputs, index, hidden, output)


def store_output(inputs: BlockInputs, index: int, hidden: torch.Tensor, output: torch.Tensor) -> None:
    """The block's output for batch ``index`` becomes the next block's input.

    Written into the input's own buffer when it fits (the block has consumed it): offloaded
    activations stay in their pinned CPU memory, so every block's uploads are fast ones.
    A copy into pinned memory may be asynchronous: the next read of the buffer is an upload
    on the same CUDA stream, which runs after it. Pageable CPU memory is copied synchronously.
    """
    if output.shape == hidden.shape and output.dtype == hidden.dtype and output.data_ptr() != hidden.data_ptr():
        asynchronous = hidden.device.type != "cpu" or hidden.is_pinned()
        hidden.copy_(output, non_blocking=asynchronous and output.device.type == "cuda")
    else:
        inputs.hidden[index] = output.to(hidden.device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
