"""Prune and repair in one calibration pass: reconstruct each block right after pruning it.

For a block (``prunetune prune --reconstruct``), :mod:`prunetune.calibrate.driver` runs::

    targets = dense block(inputs)             before pruning: what the block should output
    prune the block                           either schedule; the masks are chosen here
    train its kept weights: block(inputs) ~ targets      train_window, masks fixed
    propagate through the reconstructed block

The inputs are the calibration activations the pass propagates, i.e. what the pruned and
reconstructed model so far produces (``--recovery_method blockwise``'s ``sparse`` input mode).
The training is :func:`prunetune.recover.reconstruction.train_window`, the same function as
block-wise recovery's, under the same normalised block-output error. Masks are the block's
zeros right after pruning, held by :class:`prunetune.recover.full.MaskEnforcer`: every pruned
weight stays exactly zero, N:M intact. A block whose error training raised (a learning rate too
large) is put back as pruned: a reconstructed block is never worse on the calibration data.
Memory: one block's weights (twice: the pruned copy), gradients and Adam state, plus the dense
targets (one more set of the calibration activations).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from prunetune.calibrate.blocks import ExtrasCache, synchronize
from prunetune.calibrate.types import BlockInputs, ReconstructOptions
from prunetune.masks import MaskSet
from prunetune.modules import weight_matrix
from prunetune.recover.full import KEPT_BUFFER, MaskEnforcer
from prunetune.recover.reconstruction import reconstruction_error, train_window, window_outputs


def dense_targets(block: nn.Module, inputs: BlockInputs, extras: ExtrasCache) -> list[torch.Tensor]:
    """The block's outputs on every calibration batch, before it is pruned (stored like the inputs)."""
    return window_outputs([block], inputs.hidden, inputs.extras, extras)


def reconstruct_block(block: nn.Module, index: int, layers: dict[str, nn.Module], inputs: BlockInputs,
                      targets: list[torch.Tensor], extras: ExtrasCache, options: ReconstructOptions) -> dict:
    """Train the pruned ``block`` in place to map ``inputs`` to ``targets``; returns its losses.

    Args:
        block: the decoder block, already pruned, on the compute device.
        index: its index (seeds its generator, so a rerun gives the same weights).
        layers: its pruned layers by relative name; their zeros are the masks kept fixed.
        inputs: the calibration batches entering it.
        targets: the dense block's outputs on them (:func:`dense_targets`).
        extras: the extra block arguments, moved to the compute device.
        options: epochs, learning rate, seed.

    Returns:
        ``{"error_before", "error_after", "epoch_losses", "reverted", "seconds"}`` (errors:
        normalised MSE over all batches). A block whose error went up is put back as pruned
        (``reverted``; its ``error_after`` is then ``error_before``).
    """
    start = time.perf_counter()
    before = reconstruction_error([block], inputs.hidden, targets, inputs.extras, extras)
    with torch.no_grad():
        masks = MaskSet({name: weight_matrix(module) != 0 for name, module in layers.items()})
    pruned = {name: value.clone() for name, value in block.state_dict().items()}  # one block's weights
    enforcer = MaskEnforcer(block, masks, remask="always")  # names relative to the block
    generator = torch.Generator().manual_seed(options.seed * 100_003 + index)
    try:
        with torch.enable_grad():
            losses = train_window([block], enforcer, inputs.hidden, targets, inputs.extras, extras,
                                  epochs=options.epochs, learning_rate=options.learning_rate, generator=generator)
    finally:
        for module in enforcer.layers.values():
            module._buffers.pop(KEPT_BUFFER, None)  # the mask buffers must not outlive the block's turn
    after = reconstruction_error([block], inputs.hidden, targets, inputs.extras, extras)
    reverted = not after <= before  # e.g. a learning rate too large: never worse than pruning alone
    if reverted:
        block.load_state_dict(pruned)
        after = before
    del pruned
    synchronize(extras.device)
    return {"error_before": before, "error_after": after, "epoch_losses": losses, "reverted": reverted,
            "seconds": time.perf_counter() - start}
