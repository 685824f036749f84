"""What every pruner shares: the sparsity target, input statistics, and the pruning step.

A pruner says two things and nothing else:

* which :class:`Statistic` it accumulates from a layer's inputs (``None``: no calibration
  data needed, e.g. magnitude). Layers that read the *same* input tensor (q/k/v, gate/up)
  share one statistic; the calibration driver (:mod:`prunetune.calibrate`) finds them;
* how to choose kept masks for such a group of weight matrices given that statistic
  (:meth:`Pruner.choose`), possibly updating the kept weights (SparseGPT).

This class owns the rest: the validated ratio and N:M structure (parsed once), the
unstructured selection rule, the divisibility check, keeping a model's existing zeros
pruned, and zeroing the pruned weights. With a non-uniform sparsity profile
(:mod:`prunetune.pruning.profile`) each layer has its own ratio (:attr:`Pruner.layer_ratios`),
and every layer prunes exactly ``floor(ratio * numel)`` weights (rows of a per-row rule lose
the floor or the ceiling of ``ratio * in``), so that the model meets the target overall.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from prunetune.errors import UsageError
from prunetune.pruning import selection
from prunetune.pruning.profile import LayerRatios
from prunetune.pruning.selection import Structure


class Statistic:
    """Accumulates, in float32, what a pruner needs from the inputs of one or more layers.

    Args:
        in_features: width of the layer input.
        device: where the statistic lives (the layer's device).
    """

    def __init__(self, in_features: int, device: torch.device):
        self.in_features = in_features
        self.device = device
        self.rows = 0  # input rows (tokens) seen
        self.finished = False
        #: what pruners derive from the finished statistic, computed once for every layer
        #: that shares it (e.g. SparseGPT's inverse-Hessian factor)
        self.derived: dict[str, object] = {}

    def update(self, inputs: torch.Tensor) -> None:
        """Add a batch of layer inputs, shape (..., in_features)."""
        raise NotImplementedError

    def finish(self) -> None:
        """After the last batch: normalise (once, however often it is called)."""
        if not self.finished:
            self.finished = True
            self._finalize()

    def _finalize(self) -> None:
        """Subclasses: normalise, free buffers."""


class SquaredNorms(Statistic):
    """Squared L2 norm of every input feature over all calibration tokens: ``||X_j||_2^2``."""

    def __init__(self, in_features: int, device: torch.device):
        super().__init__(in_features, device)
        self.values = torch.zeros(in_features, dtype=torch.float32, device=device)  # (in,)

    def update(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, self.in_features).to(self.device)  # (tokens, in)
        # dtype=float32 reduces in fp32: squares of fp16 outlier activations would overflow
        self.values += torch.linalg.vector_norm(flat, dim=0, dtype=torch.float32).square()
        self.rows += flat.shape[0]


class Hessian(Statistic):
    """``H = X^T X / tokens`` over all calibration tokens, (in, in) float32.

    Args:
        chunk_rows: tokens converted to float32 at a time (bounds the temporary copy).
    """

    def __init__(self, in_features: int, device: torch.device, chunk_rows: int = 8192):
        super().__init__(in_features, device)
        self.matrix = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.chunk_rows = chunk_rows
        self.half_gram: bool | None = None  # does mm(..., out_dtype=float32) run here? (learned on first use)

    def update(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, self.in_features).to(self.device)  # (tokens, in)
        self.rows += flat.shape[0]
        if self.half_gram is not False and flat.device.type == "cuda" and flat.dtype in (torch.float16, torch.bfloat16):
            self.half_gram = _half_gram_into(self.matrix, flat)
            if self.half_gram:
                return
        # No TF32 toggle here: torch.set_float32_matmul_precision is process-wide, so the fp32
        # fallback runs at whatever precision the caller chose (exact for fp16/bf16 inputs either way).
        for start in range(0, flat.shape[0], self.chunk_rows):
            chunk = flat[start : start + self.chunk_rows].float()
            self.matrix.addmm_(chunk.t(), chunk)

    def _finalize(self) -> None:
        if self.rows:
            self.matrix /= self.rows


def _half_gram_into(matrix: torch.Tensor, flat: torch.Tensor) -> bool:
    """``matrix += flat^T flat`` straight from fp16/bf16 (CUDA), accumulated and returned in fp32.

    Half-precision products are exact in fp32, so this equals the fp32 GEMM (up to
    summation order) at tensor-core speed, without an fp32 copy of the inputs and without
    touching any process-wide matmul setting. Returns False where the op is unavailable
    (older torch, some GPUs): the caller falls back to an fp32 GEMM.
    """
    try:
        matrix += torch.mm(flat.t(), flat, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


class Pruner:
    """Base class: validated sparsity target + the pruning step for a group of layers.

    Args:
        ratio: fraction of weights to prune in [0, 1) (``None`` with N:M: N/M).
        structure: ``"unstructured"``, ``"N:M"`` or a :class:`Structure`.
        use_variant: Wanda's cumulative-score variant (pruners with ``supports_variant``).

    Raises:
        UsageError: invalid ratio/structure combination, or options the pruner lacks.
    """

    name: ClassVar[str] = ""
    #: the Statistic subclass to accumulate; None = needs no calibration data
    statistic_class: ClassVar[type[Statistic] | None] = None
    #: unstructured selection: "row" (every row loses the same count) or "layer"
    unstructured_rule: ClassVar[str] = "layer"
    supports_variant: ClassVar[bool] = False

    def __init__(self, ratio: float | None = None, structure: str | Structure = "unstructured", use_variant: bool = False):
        self.structure = selection.parse_structure(structure)
        self.ratio = selection.resolve_ratio(ratio, self.structure, use_variant)
        if use_variant and not self.supports_variant:
            raise UsageError(f"--use_variant is a Wanda option; the {self.name} pruner does not accept it.")
        self.use_variant = use_variant
        #: per-layer ratios of a non-uniform profile (None: every layer at ``ratio``, the papers' rounding)
        self.layer_ratios: LayerRatios | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.statistic_class is not None

    def new_statistic(self, in_features: int, device: torch.device) -> Statistic | None:
        return self.statistic_class(in_features, device) if self.statistic_class else None

    def check_layer(self, name: str, in_features: int) -> None:
        """Raise :class:`UsageError` before any work if the layer cannot take the structure."""
        selection.check_divisible(self.structure, in_features, name)

    @property
    def exact_counts(self) -> bool:
        """Per-layer counts ``floor(ratio * numel)`` (a profile) instead of the papers' per-row floors."""
        return self.layer_ratios is not None

    def ratios_for(self, weights: list[torch.Tensor]) -> list[float]:
        """The ratio of each weight's layer."""
        if self.layer_ratios is None:
            return [self.ratio] * len(weights)
        return [self.layer_ratios.lookup(weight) for weight in weights]

    def select(self, scores: torch.Tensor, ratio: float | None = None) -> torch.Tensor:
        """Kept mask from scores by this pruner's rule (N:M, variant, per row or per layer)."""
        ratio = self.ratio if ratio is None else ratio
        if self.structure.is_nm:
            return selection.nm_mask(scores, self.structure)
        if self.use_variant:
            return selection.variant_mask(scores, ratio)
        if self.unstructured_rule == "row":
            return selection.balanced_row_mask(scores, ratio) if self.exact_counts else selection.row_mask(scores, ratio)
        return selection.layer_mask(scores, ratio)

    def choose(self, weights: list[torch.Tensor], statistic: Statistic | None, zeros: list[torch.Tensor],
               ratios: list[float]) -> list[torch.Tensor]:
        """Kept masks for weight matrices that share one input statistic.

        Args:
            weights: (out, in) views of the layers' weights; may be updated in place.
            statistic: the finished statistic of their common input (None if not needed).
            zeros: boolean masks of the weights that were already zero (stay pruned).
            ratios: the sparsity ratio of each weight's layer.

        Returns:
            One boolean kept mask per weight.
        """
        raise NotImplementedError

    @torch.no_grad()
    def prune_group(self, weights: list[torch.Tensor], statistic: Statistic | None = None) -> list[torch.Tensor]:
        """Prune weight matrices sharing one input in place; returns their kept masks."""
        if statistic is not None:
            statistic.finish()
        zeros = [w == 0 for w in weights]
        kept_masks = self.choose(weights, statistic, zeros, self.ratios_for(weights))
        for weight, kept, zero in zip(weights, kept_masks, zeros):
            kept &= ~zero  # a model's existing zeros stay pruned
            weight.masked_fill_(~kept, 0)
        return kept_masks
