"""Block-by-block calibration: capture the first block's inputs, then prune block after block.

Modules (the driver reads as the table of contents):

* :mod:`~prunetune.calibrate.driver` -- :func:`prune_sequentially`, the loop over blocks;
* :mod:`~prunetune.calibrate.capture` -- what the first decoder block receives;
* :mod:`~prunetune.calibrate.blocks` -- running a block: placement, extra arguments, propagation;
* :mod:`~prunetune.calibrate.two_pass` -- the papers' schedule (statistics on the dense block, prune, propagate);
* :mod:`~prunetune.calibrate.one_pass` -- ``true_sequential``: prune each layer right before it runs, in one forward;
* :mod:`~prunetune.calibrate.reconstruct` -- ``--reconstruct``: train each pruned block to its dense outputs;
* :mod:`~prunetune.calibrate.lockstep` -- runs the calibration batches of one forward in lock step;
* :mod:`~prunetune.calibrate.types` -- the options, timings and inputs they all share (imports none of them).
"""

from prunetune.calibrate.blocks import ExtrasCache, is_dispatched, propagate
from prunetune.calibrate.capture import capture_inputs
from prunetune.calibrate.driver import forward_blocks, prune_sequentially
from prunetune.calibrate.one_pass import SequentialPruning, probe_groups
from prunetune.calibrate.two_pass import LayerStatistics
from prunetune.calibrate.types import BlockInputs, BlockTiming, CalibrationOptions, ReconstructOptions

__all__ = [
    "BlockInputs", "BlockTiming", "CalibrationOptions", "ExtrasCache", "LayerStatistics", "ReconstructOptions",
    "SequentialPruning",
    "capture_inputs", "forward_blocks", "is_dispatched", "probe_groups", "propagate", "prune_sequentially",
]
