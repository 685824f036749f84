"""Magnitude pruning: drop the weights of smallest absolute value, per layer.

Score ``|W_ij|``. Unstructured: the ``floor(ratio * numel)`` smallest weights of each layer
(the per-layer magnitude baseline of the Wanda paper); N:M: the N smallest of every M
consecutive inputs of a row. Needs no calibration data.
"""

from __future__ import annotations

import torch

from prunetune.pruning.base import Pruner, Statistic


class MagnitudePruner(Pruner):
    name = "magnitude"
    statistic_class = None
    unstructured_rule = "layer"

    def choose(self, weights: list[torch.Tensor], statistic: Statistic | None, zeros: list[torch.Tensor],
               ratios: list[float]) -> list[torch.Tensor]:
        return [self.select(weight.abs(), ratio) for weight, ratio in zip(weights, ratios)]
