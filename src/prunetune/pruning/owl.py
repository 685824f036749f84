"""OWL's statistics pass: every block's outlier ratio, measured on the dense model.

OWL (Yin et al., ICML 2024, arXiv:2310.05175) allocates sparsity by each block's share of
outlier weights: the fraction of its Wanda scores ``|W_ij| * ||X_j||_2`` (over all the
block's layers to prune) above ``M`` times the block's mean score. Every block's ratio must be
known before block 0 is pruned -- the spread is scaled by the minimum and maximum over *all*
blocks -- so, as in the paper's code, the scores come from a separate pass over the dense
model before pruning: capture the first block's inputs, then for each block one forward that
both feeds the input norms and produces the next block's (dense) inputs. Its cost is one
calibration forward of the model plus counting the scores (Wanda's own pass runs every block
about 1.8 times); ``benchmarks/owl_smollm2.py`` measures it (``statistics_seconds``): on
SmolLM2-135M with 128 x 128 calibration tokens, on two shared CPU cores, 330 s against 362 s
for Wanda's pruning pass at 70%.

The pruning pass cannot supply these scores: from block 1 on it sees the *pruned* model's
activations, and by then block 0 has already been pruned at a ratio that depends on them.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from prunetune.calibrate import BlockInputs, CalibrationOptions, ExtrasCache, LayerStatistics, capture_inputs, propagate
from prunetune.calibrate.blocks import BlockPlacement, synchronize
from prunetune.modules import find_decoder_blocks, weight_matrix
from prunetune.pruning.base import SquaredNorms

logger = logging.getLogger(__name__)


@torch.no_grad()
def block_outlier_ratios(model: nn.Module, token_ids: torch.Tensor, layer_names: set[str], m: float,
                         options: CalibrationOptions | None = None) -> dict[int, float]:
    """Outlier ratio of every block that has layers to prune, from one dense calibration pass.

    Args:
        model: the dense causal LM (not modified).
        token_ids: calibration token ids, (nsamples, seqlen).
        layer_names: qualified names of the layers to prune; a block's ratio is over these.
        m: the outlier threshold, a multiple of the block's mean score.
        options: batching and devices, as for pruning (the schedule options are not used).

    Returns:
        block index -> fraction of its scores above ``m`` times their mean.
    """
    options = options or CalibrationOptions()
    blocks = find_decoder_blocks(model)
    inputs: BlockInputs = capture_inputs(model, blocks, token_ids, options)
    ratios = {}
    last = max((b.index for b in blocks if any(b.qualified(r) in layer_names for r in b.linears)), default=-1)
    for block in blocks[: last + 1]:
        layers = {rel: module for rel, module in block.linears.items() if block.qualified(rel) in layer_names}
        start = time.perf_counter()
        with BlockPlacement(block.module, options.device) as device:
            hooks = LayerStatistics(layers, SquaredNorms, early_stop=False) if layers else None
            try:
                # one forward: the hooks read the dense inputs, the outputs feed the next block
                propagate(block.module, inputs, device, ExtrasCache(device))
            finally:
                if hooks is not None:
                    hooks.remove()
            if hooks is not None:
                ratios[block.index] = _outlier_ratio(layers, hooks.groups, m)
            synchronize(device)
        logger.info("OWL statistics, block %d: outlier ratio %.5f (%.2fs)", block.index, ratios.get(block.index, 0.0),
                    time.perf_counter() - start)
    return ratios


def _outlier_ratio(layers: dict[str, nn.Module], groups: list, m: float) -> float:
    """Streaming :func:`prunetune.pruning.profile.outlier_ratio`: one layer's scores alive at a time."""
    norms = {}
    for names, statistic in groups:
        statistic.finish()
        for name in names:
            norms[name] = statistic.values.sqrt()  # (in,) ||X_j||_2
    total, score_sum = 0, 0.0
    for name, module in layers.items():
        weight = weight_matrix(module)
        score_sum += float((weight.abs().float() * norms[name].to(weight.device)).double().sum())
        total += weight.numel()
    threshold = m * score_sum / total
    above = 0
    for name, module in layers.items():
        weight = weight_matrix(module)
        above += int(((weight.abs().float() * norms[name].to(weight.device)) > threshold).sum())
    return above / total
