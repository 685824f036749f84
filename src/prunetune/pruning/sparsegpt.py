"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh, 2023,
arXiv:2301.00774).

For a layer with weights W (out, in) and calibration inputs X, SparseGPT minimises
``||W X - W' X||`` over pruned W'. With the damped Hessian ``H = X^T X / n + lambda I``
(lambda = percdamp * mean(diag H)) and ``U``, the upper Cholesky factor of ``H^-1``
(``H^-1 = U^T U``), columns are visited left to right in blocks of ``blocksize``. As in the
reference code, a "dead" input (always zero in the calibration data: ``H_jj = 0``) gets
``H_jj = 1`` and its weights ``W[:, j] = 0``.

* the mask of a block is chosen from ``w^2 / U_jj^2`` (unstructured: the lowest
  ``floor(ratio * rows * block)`` of the block, per layer -- with a layer-wise profile,
  ``floor(ratio * rows * end) - floor(ratio * rows * start)`` for columns [start, end), so
  that the layer loses exactly ``floor(ratio * numel)``; N:M: the N lowest of every M
  columns, chosen when the walk reaches them);
* pruning column j sets its weight to zero and moves the error ``e_j = w_j / U_jj`` to the
  columns on its right: ``W[:, k] -= e_j U_jk`` for k > j (kept weights are updated).

The paper walks the columns of a block one at a time. Here, per row r with pruned set S_r,
the errors of a sub-block solve the triangular system ``E_S U_SS = w_S``: that is one
batched triangular solve with the per-row matrix ``P U P + (I - P)`` (P = diag of the
pruned indicator), then one matmul carries the errors to the remaining columns. No Python
loop over columns; layers that share an input (q/k/v, gate/up) share H and its factor and
are solved together, each keeping its own per-layer mask selection.
"""

from __future__ import annotations

import logging

import torch

from prunetune.errors import UsageError
from prunetune.pruning import selection
from prunetune.pruning.base import Hessian, Pruner
from prunetune.pruning.selection import Structure

logger = logging.getLogger(__name__)


class SparseGPTPruner(Pruner):
    """SparseGPT pruner.

    Args:
        blocksize: columns whose mask is chosen together (the paper's B = 128).
        percdamp: Hessian dampening as a fraction of its mean diagonal (0.01).
        solve_block: columns per batched triangular solve inside a block (unstructured).
    """

    name = "sparsegpt"
    statistic_class = Hessian
    unstructured_rule = "layer"

    def __init__(self, ratio=None, structure="unstructured", use_variant=False, blocksize: int = 128,
                 percdamp: float = 0.01, solve_block: int = 32):
        super().__init__(ratio, structure, use_variant)
        if blocksize < 1 or solve_block < 1 or not percdamp > 0:
            raise UsageError(f"SparseGPT needs blocksize >= 1, solve_block >= 1 and percdamp > 0 "
                             f"(got {blocksize}, {solve_block}, {percdamp}).")
        if self.structure.is_nm and blocksize % self.structure.m:
            raise UsageError(f"SparseGPT blocksize {blocksize} must be a multiple of M={self.structure.m}.")
        self.blocksize = blocksize
        self.percdamp = percdamp
        self.solve_block = solve_block

    def choose(self, weights: list[torch.Tensor], statistic: Hessian, zeros: list[torch.Tensor],
               ratios: list[float]) -> list[torch.Tensor]:
        device = statistic.device
        stacked = torch.cat([w.to(device=device, dtype=torch.float32) for w in weights])  # (rows, in)
        zero_mask = torch.cat([z.to(device) for z in zeros])
        sizes = [w.shape[0] for w in weights]
        factor = statistic.derived.get("sparsegpt_factor")
        if factor is None:  # once per shared input, even when its layers are pruned one by one
            statistic.derived["sparsegpt_dead"] = statistic.matrix.diagonal() == 0  # (in,) inputs always zero
            factor = inverse_hessian_factor(statistic.matrix, self.percdamp, in_place=True)
            statistic.matrix = None  # consumed: damped in place
            statistic.derived["sparsegpt_factor"] = factor
        # as the reference: a weight on an input that is always zero does nothing, so it is zeroed
        # (its score is then 0: pruned first, and it moves no error onto the other columns)
        stacked.masked_fill_(statistic.derived["sparsegpt_dead"], 0)  # broadcast over rows; no host sync
        pruned = obs_prune_(stacked, factor, ratios, self.structure, sizes, zero_mask,
                            self.blocksize, self.solve_block, exact_counts=self.exact_counts)
        kept = []
        for weight, rows, part_pruned in zip(weights, stacked.split(sizes), pruned.split(sizes)):
            weight.copy_(rows.to(weight.dtype))
            kept.append(~part_pruned.to(weight.device))
        return kept


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01, retries: int = 4,
                           in_place: bool = False) -> torch.Tensor:
    """Upper Cholesky factor U of the damped inverse Hessian (``H^-1 = U^T U``), float32.

    Input features never seen (zero diagonal) get a unit diagonal. If H is not positive
    definite after damping, the damping is multiplied by 10 (up to ``retries`` times).
    With ``in_place`` the Hessian itself is damped (and no longer usable): at most two
    (in, in) matrices are alive at once, which matters for 11008-wide MLP inputs.
    """
    matrix = hessian if in_place and hessian.dtype == torch.float32 else hessian.to(torch.float32).clone()
    diagonal = matrix.diagonal()
    diagonal[diagonal == 0] = 1
    damp = percdamp * diagonal.mean()
    diagonal.add_(damp)
    for _ in range(retries + 1):
        factor, info = torch.linalg.cholesky_ex(matrix)
        if int(info) == 0:
            del matrix
            inverse = torch.cholesky_inverse(factor)
            del factor
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
            raise RuntimeError("SparseGPT: the inverse Hessian is not positive definite; the calibration inputs are degenerate")
        logger.warning("SparseGPT: Hessian not positive definite with damping %.3g; retrying with 10x", float(damp))
        diagonal.add_(9 * damp)
        damp = damp * 10
    raise RuntimeError("SparseGPT: the Hessian stays singular after damping; the calibration inputs are degenerate")


def masked_triangular_errors(values: torch.Tensor, pruned: torch.Tensor, upper: torch.Tensor,
                             max_elements: int = 1 << 26) -> torch.Tensor:
    """OBS errors of pruning ``pruned`` entries, one column at a time, for every row at once.

    Row by row this solves ``e_S U_SS = w_S`` (zero elsewhere), which is what the
    sequential update ``e_j = w_j / U_jj; w_k -= e_j U_jk (k > j)`` produces.

    Args:
        values: current weights of the columns, (rows, b) float32.
        pruned: which entries are pruned, (rows, b) bool.
        upper: the (b, b) upper-triangular block of the inverse-Hessian factor.
        max_elements: bound on the per-row systems built at once (rows * b * b).

    Returns:
        errors (rows, b); zero at kept entries.
    """
    rows, width = values.shape
    errors = torch.empty_like(values)
    chunk = max(1, max_elements // (width * width))
    for start in range(0, rows, chunk):
        part = pruned[start : start + chunk]  # (r, b)
        both = part.unsqueeze(2) & part.unsqueeze(1)  # (r, b, b): rows and columns of S
        systems = torch.where(both, upper, torch.zeros((), dtype=upper.dtype, device=upper.device))
        systems.diagonal(dim1=1, dim2=2).add_((~part).to(upper.dtype))  # identity on kept entries
        rhs = (values[start : start + chunk] * part).unsqueeze(1)  # (r, 1, b)
        errors[start : start + chunk] = torch.linalg.solve_triangular(systems, rhs, upper=True, left=False).squeeze(1)
    return errors


def _select_unstructured(scores: torch.Tensor, ratios: list[float], sizes: list[int], start: int, end: int,
                         exact_counts: bool) -> torch.Tensor:
    """Per layer (row segment) selection over columns [start, end); returns the pruned mask.

    Papers' rounding: ``floor(ratio * rows * (end - start))`` per block. Exact counts: the
    block's share of the layer's ``floor(ratio * rows * in)``, by the floors of the running totals.
    """
    pruned = []
    for part, ratio in zip(scores.split(sizes), ratios):
        if exact_counts:
            rows = part.shape[0]
            count = selection.pruned_count(ratio, rows * end) - selection.pruned_count(ratio, rows * start)
            pruned.append(selection.lowest_per_row(part.reshape(1, -1), count).view_as(part))
        else:
            pruned.append(~selection.layer_mask(part, ratio))
    return torch.cat(pruned)


def obs_prune_(weights: torch.Tensor, factor: torch.Tensor, ratio: float | list[float], structure: Structure,
               sizes: list[int], zeros: torch.Tensor, blocksize: int = 128, solve_block: int = 32,
               exact_counts: bool = False) -> torch.Tensor:
    """Prune ``weights`` (rows, in) in place by SparseGPT's OBS walk; returns the pruned mask.

    Args:
        weights: float32, the row-stacked weights of layers sharing this Hessian.
        factor: U, the upper Cholesky factor of the damped inverse Hessian, (in, in).
        ratio: unstructured sparsity, one for all layers or one per stacked layer (ignored for N:M).
        structure: unstructured or N:M.
        sizes: rows of each stacked layer (unstructured masks are chosen per layer).
        zeros: entries already zero before pruning (always pruned).
        blocksize: columns per mask-selection block (128 in the paper).
        solve_block: columns per batched triangular solve (unstructured).
        exact_counts: each layer loses exactly ``floor(ratio * numel)`` (a layer-wise profile)
            instead of ``floor(ratio * rows * b)`` in every block of b columns.
    """
    rows, columns = weights.shape
    ratios = list(ratio) if isinstance(ratio, (list, tuple)) else [ratio] * len(sizes)
    pruned = torch.zeros_like(weights, dtype=torch.bool)
    step = structure.m if structure.is_nm else solve_block
    inverse_diagonal_sq = factor.diagonal().square()  # (in,)
    for block_start in range(0, columns, blocksize):
        block_end = min(block_start + blocksize, columns)
        block = weights[:, block_start:block_end]  # view: lazy updates of earlier blocks applied
        upper = factor[block_start:block_end, block_start:block_end]
        block_zeros = zeros[:, block_start:block_end]
        if not structure.is_nm:
            scores = block.square() / inverse_diagonal_sq[block_start:block_end]
            pruned[:, block_start:block_end] = _select_unstructured(scores, ratios, sizes, block_start, block_end,
                                                                    exact_counts) | block_zeros
        errors = torch.zeros_like(block)  # (rows, b)
        for sub_start in range(0, block_end - block_start, step):
            sub_end = min(sub_start + step, block_end - block_start)
            current = block[:, sub_start:sub_end] - errors[:, :sub_start] @ upper[:sub_start, sub_start:sub_end]
            sub_pruned = pruned[:, block_start + sub_start : block_start + sub_end]
            if structure.is_nm:
                scores = current.square() / inverse_diagonal_sq[block_start + sub_start : block_start + sub_end]
                sub_pruned |= ~selection.nm_mask(scores, structure) | block_zeros[:, sub_start:sub_end]
            errors[:, sub_start:sub_end] = masked_triangular_errors(current, sub_pruned,
                                                                     upper[sub_start:sub_end, sub_start:sub_end])
        # kept weights absorb the errors of pruned ones to their left inside the block ...
        block -= errors @ torch.triu(upper, diagonal=1)
        block.masked_fill_(pruned[:, block_start:block_end], 0)
        # ... and every column right of the block absorbs them all at once (lazy batch update)
        if block_end < columns:
            weights[:, block_end:] -= errors @ factor[block_start:block_end, block_end:]
    return pruned
