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
        reconstruct: train each block's kept weights right after pruning it, to reproduce the
            dense block's outputs (:class:`ReconstructOptions`); None: prune only.
    """

    batch_size: int = 8
    device: str | torch.device | None = None
    offload_activations: bool = False
    early_stop: bool = True
    true_sequential: bool = False
    progress: bool = False
    lockstep_timeout: float | None = lockstep.DEFAULT_TIMEOUT
    reconstruct: ReconstructOptions | None = None


@dataclass
class ReconstructOptions:
    """Block-wise reconstruction inside the calibration pass (``prunetune prune --reconstruct``).

    Right after a block is pruned, its kept weights train (Adam, masks fixed) to reproduce the
    dense block's outputs on the block's calibration inputs, before those outputs feed the next
    block; the training step is :func:`prunetune.recover.reconstruction.train_window`, the one
    ``--recovery_method blockwise`` runs. The defaults are that method's (measured on SmolLM2-135M).

    Attributes:
        epochs: passes over the calibration batches, per block.
        learning_rate: Adam's learning rate (no decay, no warm-up).
        seed: shuffling of the batches (each block draws from its own seeded generator).
    """

    epochs: int = 3
    learning_rate: float = 1e-3
    seed: int = 0


@dataclass
class BlockTiming:
    """Seconds spent on one block (``statistics`` includes its forward pass; with
    ``true_sequential`` it is the block's only forward, which also propagates; ``reconstruct``
    covers the dense target forward and the training, with ``--reconstruct`` only)."""

    block: int
    statistics: float = 0.0
    prune: float = 0.0
    propagate: float = 0.0
    reconstruct: float = 0.0
    #: with ``--reconstruct``: normalised block-output error before / after training, each epoch's mean loss
    reconstruction: dict | None = None

    @property
    def total(self) -> float:
        return self.statistics + self.prune + self.propagate + self.reconstruct

    def to_dict(self) -> dict:
        timing = {"block": self.block, "statistics": self.statistics, "prune": self.prune,
                  "propagate": self.propagate, "total": self.total}
        if self.reconstruction is not None:
            timing.update(reconstruct=self.reconstruct, reconstruction=self.reconstruction)
        return timing


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
