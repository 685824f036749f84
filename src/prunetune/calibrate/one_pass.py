"""The ``--true_sequential`` schedule: each layer pruned right before it first runs, in one forward.

Each layer is pruned from the inputs the block *as pruned so far* gives it (o_proj after the
pruned q/k/v, down_proj after the pruned gate/up), and the same forward produces the next
block's inputs: one block forward per block, against about 1.8 for the papers' schedule
(:mod:`prunetune.calibrate.two_pass`), whose layers all see the dense block.

The batches run in lock step (:mod:`prunetune.calibrate.lockstep`), so what must be kept for
all batches at once is only what the block's forward holds at a layer's input: for a Llama
block about six hidden-sized activations per token at o_proj (block input, normed input,
q/k/v, attention output) -- some 12 GiB for 128 x 2048 tokens of a 7B model in fp16 --
against one batch's forward for the default schedule.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref

import torch
from torch import nn

from prunetune.calibrate import lockstep
from prunetune.calibrate.blocks import ExtrasCache, Stop, is_dispatched, run_block, store_output, synchronize
from prunetune.calibrate.two_pass import LayerStatistics
from prunetune.calibrate.types import BlockInputs, BlockTiming, CalibrationOptions
from prunetune.errors import UsageError
from prunetune.modules import DecoderBlock, weight_matrix, weight_param_shape

logger = logging.getLogger(__name__)


class SequentialPruning:
    """Forward pre-hooks that prune every layer right before it first runs ("true sequential").

    The block runs once, batch by batch in lock step (:mod:`prunetune.calibrate.lockstep`). When a
    layer's pre-hook sees an input tensor that is new in this forward, the batch adds it to
    a fresh statistic and pauses; once every batch has done so the statistic is finished.
    The first batch past the pause prunes the layer -- together with the layers known to
    read the same tensor (``groups``: q/k/v, gate/up), so that SparseGPT solves them as one
    stacked system -- and those layers reuse the statistic without pausing. So each layer's
    statistic comes from the block *as pruned so far* -- o_proj sees the output of the pruned
    q/k/v -- and the pruned block's outputs come out of the same forward: one block forward
    instead of two.

    Args:
        layers: the block's layers to prune, by relative name.
        pruner: the :class:`~prunetune.pruning.base.Pruner`.
        groups: relative names of layers that read one input tensor (from
            :func:`probe_groups`); a layer in none is pruned alone. Checked during the forward:
            a layer of a group that turns out to read another tensor is an error.
        stop_when_done: end each forward once every layer is pruned (the last block's
            outputs are not needed).
        timeout: seconds a batch may run between two pauses before the lock step gives up
            (see :class:`~prunetune.calibrate.lockstep.Lockstep`).
    """

    def __init__(self, layers: dict[str, nn.Module], pruner, groups: list[list[str]] | None = None,
                 stop_when_done: bool = False, timeout: float | None = lockstep.DEFAULT_TIMEOUT):
        self.layers = layers
        self.pruner = pruner
        self.group_of = {name: group for group in groups or [] for name in group}
        self.stop_when_done = stop_when_done
        self.timeout = timeout
        self.statistics: list = []  # by order of first appearance of the input
        self.groups: list[list[str]] = []  # layer names pruned from each statistic
        self.pruned: dict[str, int] = {}  # layer name -> index of the statistic it was pruned with
        self.prune_seconds = 0.0
        self.local = threading.local()  # per batch (one thread each): inputs seen in this forward
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):
        def hook(module, args):
            inputs = args[0]
            # weak references: holding the inputs would keep them alive for all batches at once
            seen = self.local.__dict__.setdefault("seen", [])
            index = next((i for i, ref in enumerate(seen) if ref() is inputs), None)
            if index is None:  # a new input: every batch contributes before anyone prunes
                index = len(seen)
                seen.append(weakref.ref(inputs))
                if index == len(self.statistics):
                    self.statistics.append(self.pruner.new_statistic(weight_param_shape(module)[1], module.weight.device))
                    self.groups.append([])
                self.statistics[index].update(inputs.detach())
                lockstep.pause(index)
            if name not in self.pruned:
                members = [n for n in self.group_of.get(name, [name]) if n in self.layers and n not in self.pruned]
                self._prune(members if name in members else [name], index)
            elif self.pruned[name] != index:
                raise RuntimeError(f"{name} was pruned with the layers it read the same input as in the probe "
                                   f"({', '.join(self.group_of.get(name, [name]))}), but reads another tensor here")
            if self.stop_when_done and len(self.pruned) == len(self.layers):
                raise Stop

        return hook

    def finish_statistic(self, index: int) -> None:
        """The barrier: every batch has added its input to statistic ``index``."""
        self.statistics[index].finish()

    def _prune(self, names: list[str], index: int) -> None:
        device = self.layers[names[0]].weight.device
        synchronize(device)
        start = time.perf_counter()
        self.pruner.prune_group([weight_matrix(self.layers[n]) for n in names], self.statistics[index])
        synchronize(device)
        self.prune_seconds += time.perf_counter() - start
        self.pruned.update(dict.fromkeys(names, index))
        self.groups[index].extend(names)

    def run(self, block: nn.Module, inputs: BlockInputs, device: torch.device, extras: ExtrasCache) -> None:
        """One lock-step forward over all batches; outputs replace ``inputs`` (unless stopped)."""

        def forward(index: int, hidden: torch.Tensor, extra) -> None:
            try:
                output = run_block(block, hidden, extras(extra), device)
            except Stop:
                return
            store_output(inputs, index, hidden, output)

        calls = [functools.partial(forward, i, h, e) for i, (h, e) in enumerate(zip(inputs.hidden, inputs.extras))]
        try:
            lockstep.Lockstep(calls, self.finish_statistic, timeout=self.timeout).run()
        except lockstep.LockstepError as err:
            raise UsageError(f"--true_sequential needs every calibration batch to run the same layers of a block "
                             f"in the same order, and this model's blocks do not ({err}; mixture-of-experts routing "
                             "does this). Prune without --true_sequential.") from err
        missing = set(self.layers) - set(self.pruned)
        if missing:
            raise UsageError(f"--true_sequential: layers {sorted(missing)} did not run in the block's forward on the "
                             "calibration data, so they cannot be calibrated. Prune without --true_sequential, or "
                             "leave them out with --ignore.")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def probe_groups(block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs, device: torch.device,
                 extras: ExtrasCache) -> list[list[str]]:
    """Which layers read the same input tensor, from one batch through the dense block (no statistics)."""
    hooks = LayerStatistics(layers, lambda in_features, device: None, early_stop=not is_dispatched(block))
    try:
        hooks.run(block, BlockInputs(inputs.hidden[:1], inputs.extras[:1]), device, extras)
    finally:
        hooks.remove()
    return [names for names, _ in hooks.groups]


class OnePass:
    """Prune each layer of a block right before it runs, in one lock-step forward that also propagates.

    Args:
        pruner: the :class:`~prunetune.pruning.base.Pruner`.
        options: the calibration options (``early_stop``, ``lockstep_timeout``).
    """

    propagates = True  # the block's one forward produces the next block's inputs

    def __init__(self, pruner, options: CalibrationOptions):
        self.pruner = pruner
        self.options = options
        self.probed: dict[tuple[str, ...], list[list[str]]] = {}  # layers sharing an input, per block structure

    def prune_block(self, block: DecoderBlock, layers: dict[str, nn.Module], inputs: BlockInputs,
                    device: torch.device, extras: ExtrasCache, timing: BlockTiming, last: bool) -> None:
        """Prune ``layers`` and replace ``inputs`` by the pruned block's outputs (unless ``last``)."""
        start = time.perf_counter()
        # accelerate's post-forward hooks must run, so dispatched blocks are never cut short
        early_stop = self.options.early_stop and not is_dispatched(block.module)
        structure = tuple(layers)
        if structure not in self.probed:  # once per block structure (usually once per model)
            self.probed[structure] = probe_groups(block.module, layers, inputs, device, extras)
        hooks = SequentialPruning(layers, self.pruner, self.probed[structure], stop_when_done=last and early_stop,
                                  timeout=self.options.lockstep_timeout)
        try:
            hooks.run(block.module, inputs, device, extras)
        finally:
            hooks.remove()
        synchronize(device)
        timing.prune = hooks.prune_seconds
        timing.statistics = time.perf_counter() - start - hooks.prune_seconds  # the one forward
        for names in hooks.groups:
            logger.debug("%s: pruned %s from one input", block.name, ", ".join(names))
