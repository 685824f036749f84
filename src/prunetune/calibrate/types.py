"""The types every calibration module shares: options, per-block timings, captured inputs.

They sit at the bottom of :mod:`prunetune.calibrate`: capture, both schedules and the driver
import them from here, and this module imports none of them, so no module imports the driver
back. (``driver`` and ``capture`` re-export them under their old names.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prunetune.calibrate import lockstep


@dataclass
class CalibrationOptions:
    """How calibration runs.

    Attributes:
        batch_size: calibration samples per block forward.
        device: where blocks run (e.g. ``cuda``); None = where each block already is.
        offload_activations: keep calibration activations in CPU memory between blocks.
        early_stop: end the statistics forward once every hooked layer has seen its input.
        true_sequential: prune each layer right before it first runs, from the inputs the
            block *as pruned so far* gives it, in a single block forward (see
            :mod:`prunetune.calibrate.one_pass`); default: every layer of a block is calibrated
            on the dense block's activations, then the block re-runs (the papers' reference).
        progress: show a progress bar over blocks.
        lockstep_timeout: with ``true_sequential``, seconds one batch may run between two
            pauses before the run is abandoned as hung (None: wait forever).
    """

    batch_size: int = 8
    device: str | torch.device | None = None
    offload_activations: bool = False
    early_stop: bool = True
    true_sequential: bool = False
    progress: bool = False
    lockstep_timeout: float | None = lockstep.DEFAULT_TIMEOUT


@dataclass
class BlockTiming:
    """Seconds spent on one block (``statistics`` includes its forward pass; with
    ``true_sequential`` it is the block's only forward, which also propagates)."""

    block: int
    statistics: float = 0.0
    prune: float = 0.0
    propagate: float = 0.0

    @property
    def total(self) -> float:
        return self.statistics + self.prune + self.propagate

    def to_dict(self) -> dict:
        return {"block": self.block, "statistics": self.statistics, "prune": self.prune,
                "propagate": self.propagate, "total": self.total}


@dataclass
class BlockInputs:
    """Calibration activations entering a block, in batches.

    Attributes:
        hidden: per batch, hidden states (B, T, hidden); replaced in place block by block.
        extras: per batch, (extra positional args, keyword args) the first block received;
            identical tensors across batches are stored once.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    extras: list[tuple[tuple, dict]] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(h.shape[0] for h in self.hidden)
