"""The papers' schedule (the default): every layer of a block is calibrated on the *dense* block.

As in the SparseGPT and Wanda papers, for each block:

1. **statistics** -- the block runs on the calibration activations in batches, with hooks on
   its prunable layers that feed the pruner's statistic in fp32. Layers that read the same
   input tensor (q/k/v; gate/up) are detected by tensor identity and share one statistic.
   Once every hooked layer has seen its input the forward stops early: the last layer's
   output and the block's output are not needed in this pass;
2. **prune** -- the pruner chooses masks (and updates weights) for each group;

then the driver's propagation pass re-runs the pruned block to produce the next block's
inputs. About 1.8 block forwards per block (the statistics pass stops before the last
layer's matmul); what is alive at once is one batch's forward.
"""

from __future__ import annotations

import logging
import time
import weakref

import torch
from torch import nn

from prunetune.calibrate.blocks import ExtrasCache, Stop, is_dispatched, run_block, synchronize
from prunetune.calibrate.types import BlockInputs, BlockTiming, CalibrationOptions
from prunetune.modules import DecoderBlock, weight_matrix, weight_param_shape

logger = logging.getLogger(__name__)


class LayerStatistics:
    """Forward pre-hooks that feed one statistic per distinct input tensor of a block's layers.

    Groups are found on the first batch by tensor identity (``is``): layers whose pre-hooks
    see the very same tensor object in one forward share a statistic. Later batches update
    each statistic once, through its group's first layer.

    Args:
        layers: the block's layers, by relative name.
        new_statistic: ``(in_features, device) -> Statistic`` (None: only find the groups).
        early_stop: end each forward once every layer has seen its input.
    """

    def __init__(self, layers: dict[str, nn.Module], new_statistic, early_stop: bool):
        self.layers = layers
        self.new_statistic = new_statistic
        self.early_stop = early_stop
        self.groups: list[tuple[list[str], object]] = []  # (layer names, statistic)
        self.leader: dict[str, object | None] = {}  # name -> statistic it updates (None: shares)
        self.seen: list[tuple[weakref.ref, int]] = []  # first batch: (input, group index)
        self.fired: set[str] = set()
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):
        def hook(module, args):
            inputs = args[0]
            if name not in self.leader:
                self._assign(name, module, inputs)
            statistic = self.leader[name]
            if statistic is not None:
                statistic.update(inputs.detach())
            self.fired.add(name)
            if self.early_stop and len(self.fired) == len(self.layers):
                raise Stop

        return hook

    def _assign(self, name: str, module: nn.Module, inputs: torch.Tensor) -> None:
        for ref, index in self.seen:
            if ref() is inputs:
                self.groups[index][0].append(name)
                self.leader[name] = None
                return
        statistic = self.new_statistic(weight_param_shape(module)[1], module.weight.device)
        self.seen.append((weakref.ref(inputs), len(self.groups)))
        self.groups.append(([name], statistic))
        self.leader[name] = statistic

    def run(self, block: nn.Module, inputs: BlockInputs, device: torch.device, extras: ExtrasCache) -> None:
        for hidden, extra in zip(inputs.hidden, inputs.extras):
            self.fired.clear()
            try:
                run_block(block, hidden, extras(extra), device)
            except Stop:
                pass
            self.seen.clear()  # identities only mean something within one forward

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class TwoPass:
    """Statistics on the dense block, then prune every group; the driver propagates.

    Args:
        pruner: the :class:`~prunetune.pruning.base.Pruner`.
        options: the calibration options (``early_stop``).
    """

    propagates = False  # the driver runs the propagation pass

    def __init__(self, pruner, options: CalibrationOptions):
        self.pruner = pruner
        self.options = options

    def prune_block(self, block: DecoderBlock, layers: dict[str, nn.Module], inputs: BlockInputs,
                    device: torch.device, extras: ExtrasCache, timing: BlockTiming, last: bool) -> None:
        """Gather the statistics of ``layers`` and prune them; fills ``timing.statistics`` / ``timing.prune``."""
        start = time.perf_counter()
        # accelerate's post-forward hooks must run, so dispatched blocks are never cut short
        early_stop = self.options.early_stop and not is_dispatched(block.module)
        hooks = LayerStatistics(layers, self.pruner.new_statistic, early_stop)
        try:
            hooks.run(block.module, inputs, device, extras)
        finally:
            hooks.remove()
        synchronize(device)
        timing.statistics = time.perf_counter() - start
        start = time.perf_counter()
        for names, statistic in hooks.groups:
            self.pruner.prune_group([weight_matrix(layers[n]) for n in names], statistic)
            statistic.derived.clear()  # e.g. SparseGPT's factor: one group's at a time
            logger.debug("%s: pruned %s together", block.name, ", ".join(names))
        del hooks
        synchronize(device)
        timing.prune = time.perf_counter() - start
