"""Wanda: pruning by weights and activations (Sun et al., 2023, arXiv:2306.11695).

Score ``S_ij = |W_ij| * ||X_j||_2``, the weight's magnitude times the L2 norm of its input
feature over all calibration tokens. Scores are compared within each output row: every row
loses exactly ``floor(ratio * in_features)`` weights (N:M: the N lowest of every M
consecutive inputs). ``use_variant`` replaces the per-row count by a per-row cumulative-score
threshold (see :func:`prunetune.pruning.selection.variant_mask`). No weight update.
"""

from __future__ import annotations

import torch

from prunetune.pruning.base import Pruner, SquaredNorms


class WandaPruner(Pruner):
    name = "wanda"
    statistic_class = SquaredNorms
    unstructured_rule = "row"
    supports_variant = True

    def choose(self, weights: list[torch.Tensor], statistic: SquaredNorms, zeros: list[torch.Tensor],
               ratios: list[float]) -> list[torch.Tensor]:
        input_norms = statistic.values.sqrt()  # (in,) ||X_j||_2, fp32
        kept = []
        for weight, ratio in zip(weights, ratios):
            scores = weight.abs().float() * input_norms.to(weight.device)  # (out, in)
            kept.append(self.select(scores, ratio))
        return kept
