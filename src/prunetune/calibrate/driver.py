"""Sequential, block-by-block calibration: the driver every data-aware pruner runs on.

As in the SparseGPT and Wanda papers, the decoder is pruned one block at a time::

    capture the first block's inputs                 capture.py
    for each decoder block:
        place it on the compute device               blocks.py
        gather statistics and prune its layers       two_pass.py (default) or one_pass.py (true_sequential)
        (--reconstruct: train it to its dense outputs  reconstruct.py)
        propagate: its outputs are the next inputs   blocks.py (one_pass.py does it in its forward)

Memory: calibration activations take ``nsamples * seqlen * hidden`` elements in the
model's dtype (2 GiB for 128 x 2048 tokens of a 7B model in fp16), on the compute device or,
with ``offload_activations``, in CPU memory. With ``device`` set to an accelerator while the
model sits in CPU memory, only the block being pruned is moved there, so peak accelerator
memory is one block's weights + its statistics + one batch's forward + the pruner's work.
For a Llama-2-7B block in fp16 with batches of 8 x 2048 tokens that is, by count, 0.4 GiB of
weights, 0.6 GiB of SparseGPT Hessians (Wanda: 0.1 MiB of norms), about 1.5 GiB for the
batch forward and under 1 GiB of SparseGPT working memory: roughly 3 GiB (SparseGPT) and
2 GiB (Wanda), plus 2 GiB if the activations are not offloaded. These are estimates;
``benchmarks/prune_bench.py --device cuda --stream_blocks`` measures them. Models dispatched
with a ``device_map`` run each block where accelerate placed it.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from prunetune.calibrate.blocks import BlockPlacement, ExtrasCache, propagate, synchronize
from prunetune.calibrate.capture import capture_inputs
from prunetune.calibrate.one_pass import OnePass
from prunetune.calibrate.reconstruct import dense_targets, reconstruct_block
from prunetune.calibrate.two_pass import TwoPass
from prunetune.calibrate.types import BlockTiming, CalibrationOptions  # re-exported: their old home
from prunetune.modules import DecoderBlock, find_decoder_blocks

logger = logging.getLogger(__name__)


def _layers_to_prune(block: DecoderBlock, layer_names: set[str] | None) -> dict[str, nn.Module]:
    return {rel: m for rel, m in block.linears.items() if layer_names is None or block.qualified(rel) in layer_names}


@torch.no_grad()
def prune_sequentially(model: nn.Module, token_ids: torch.Tensor, pruner, layer_names: set[str] | None = None,
                       options: CalibrationOptions | None = None) -> list[BlockTiming]:
    """Calibrate and prune every decoder block in order; returns per-block timings.

    Args:
        model: a causal LM whose decoder blocks :func:`find_decoder_blocks` can find.
        token_ids: calibration token ids, (nsamples, seqlen).
        pruner: a :class:`prunetune.pruning.base.Pruner` that needs calibration.
        layer_names: qualified names of the layers to prune (default: all prunable layers).
        options: batching, devices, offloading, schedule.
    """
    options = options or CalibrationOptions()
    blocks = find_decoder_blocks(model)
    inputs = capture_inputs(model, blocks, token_ids, options)
    schedule = OnePass(pruner, options) if options.true_sequential else TwoPass(pruner, options)
    timings = []
    for block in tqdm(blocks, desc=f"{pruner.name} blocks", unit="block", disable=not options.progress):
        layers = _layers_to_prune(block, layer_names)
        last = block.index == len(blocks) - 1
        timing = BlockTiming(block.index)
        with BlockPlacement(block.module, options.device) as device:
            extras = ExtrasCache(device)
            reconstructs = bool(layers) and options.reconstruct is not None
            if reconstructs:
                start = time.perf_counter()
                targets = dense_targets(block.module, inputs, extras)
                # one_pass overwrites the inputs with the pruned block's outputs: keep them to train on
                saved = [h.clone() for h in inputs.hidden] if schedule.propagates else None
                timing.reconstruct = time.perf_counter() - start
            if layers:
                schedule.prune_block(block, layers, inputs, device, extras, timing, last)
            if reconstructs:
                if saved is not None:
                    inputs.hidden[:] = saved
                timing.reconstruction = reconstruct_block(block.module, block.index, layers, inputs, targets, extras,
                                                          options.reconstruct)
                timing.reconstruct += timing.reconstruction.pop("seconds")
                del targets, saved
            start = time.perf_counter()
            # the last block's outputs feed nothing we prune
            if not last and not (layers and schedule.propagates and not reconstructs):
                propagate(block.module, inputs, device, extras)
            synchronize(device)
            timing.propagate = time.perf_counter() - start
        timings.append(timing)
        logger.info("block %d: statistics %.2fs, prune %.2fs, propagate %.2fs", block.index,
                    timing.statistics, timing.prune, timing.propagate)
        if timing.reconstruction is not None:
            logger.info("block %d: reconstruction error %.4g -> %.4g in %.2fs", block.index,
                        timing.reconstruction["error_before"], timing.reconstruction["error_after"], timing.reconstruct)
    return timings


@torch.no_grad()
def forward_blocks(model: nn.Module, token_ids: torch.Tensor, options: CalibrationOptions | None = None) -> float:
    """One plain calibration pass (capture, then every block once); returns its seconds.

    The reference cost a pruner is compared with (``benchmarks/prune_bench.py``): a
    data-aware pruner needs two block forwards per block (statistics, propagate).
    """
    options = options or CalibrationOptions()
    blocks = find_decoder_blocks(model)
    start = time.perf_counter()
    inputs = capture_inputs(model, blocks, token_ids, options)
    for block in blocks:
        with BlockPlacement(block.module, options.device) as device:
            propagate(block.module, inputs, device, ExtrasCache(device))
            synchronize(device)
    return time.perf_counter() - start
