"""The mask checks of ``benchmarks/prune_bench.py``: every block's first and last linear against float64.

After a timed run, :func:`verify` pushes the calibration data through the pruned model block by block
(as the pruning's own propagate pass does) and re-collects, in float64, the inputs the first and the
last linear of each block were calibrated on: with ``--true_sequential`` the pruned block's own (each
layer is pruned right before it first runs), with the papers' schedule the dense block's (its weights
swapped in from the dense copy for one pass). Then:

* Wanda: the pruned set must be the formula's, recomputed in float64: every row's
  ``floor(ratio * in)`` lowest ``|W_ij| * ||X_j||_2`` (N:M: the N lowest of every M consecutive
  inputs); a mismatch within ``tie_tolerance`` (relative) of its row's cut is a rounding tie;
* SparseGPT (no closed form: its masks follow its own weight updates): the layer reconstruction error
  ``||(W - W') X||_F`` from a float64 Gram of the first ``check_tokens`` rows, against magnitude
  pruning at the same structure;
* both: the structure of every checked mask (sparsity, or at least N zeros in every M).
"""

from __future__ import annotations

import time

import torch

from prunetune.calibrate import CalibrationOptions, ExtrasCache, capture_inputs
from prunetune.calibrate.blocks import BlockPlacement, propagate, run_block
from prunetune.modules import find_decoder_blocks, weight_matrix


class InputRecorder:
    """float64 sum of squares of every input feature (all rows) and, optionally, X^T X of the first ``gram_rows``."""

    def __init__(self, module, gram_rows: int | None):
        self.gram_rows = gram_rows  # None: no Gram; 0: every row
        self.squares = None
        self.gram = None
        self.gram_seen = 0
        self.handle = module.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
        squares = x.square().sum(0)
        self.squares = squares if self.squares is None else self.squares + squares
        if self.gram_rows is not None:
            take = x.shape[0] if self.gram_rows == 0 else min(x.shape[0], self.gram_rows - self.gram_seen)
            if take > 0:
                gram = x[:take].t() @ x[:take]
                self.gram = gram if self.gram is None else self.gram + gram
                self.gram_seen += take

    def remove(self) -> None:
        self.handle.remove()


def parse_nm(sparsity_type: str) -> tuple[int, int] | None:
    if ":" not in sparsity_type:
        return None
    n, m = (int(v) for v in sparsity_type.split(":"))
    return n, m


def lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """True at the ``count`` lowest entries of each row (ties: the earlier position)."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    if count:
        pruned.scatter_(1, scores.argsort(dim=1, stable=True)[:, :count], True)
    return pruned


def wanda_check(dense: torch.Tensor, pruned: torch.Tensor, squares: torch.Tensor, ratio: float, nm, tolerance: float) -> dict:
    """The formula's mask in float64 against the pruned weight's zeros."""
    scores = dense.abs() * squares.sqrt()  # (out, in)
    if nm:  # groups of M consecutive inputs of a row, N lowest pruned
        n, m = nm
        groups = scores.reshape(-1, m)
        expected_pruned = lowest_mask(groups, n).view_as(scores)
        ranked = groups.sort(dim=1).values
        cut = ((ranked[:, n - 1 : n] + ranked[:, n : n + 1]) / 2).expand(-1, m).reshape_as(scores)
    else:
        count = int(ratio * dense.shape[1] + 1e-9)
        expected_pruned = lowest_mask(scores, count)
        ranked = scores.sort(dim=1).values
        cut = ((ranked[:, count - 1 : count] + ranked[:, count : count + 1]) / 2).expand_as(scores)
    expected_pruned |= dense == 0  # a model's existing zeros stay pruned
    mismatched = expected_pruned != (pruned == 0)
    gap = ((scores - cut).abs() / cut.clamp_min(1e-300))[mismatched]
    beyond = int((gap > tolerance).sum())
    return {"mask_mismatches": int(mismatched.sum()), "rows_mismatched": int(mismatched.any(1).sum()),
            "mismatches_beyond_rounding": beyond, "largest_mismatch_gap": float(gap.max()) if gap.numel() else 0.0,
            "mask_equals_formula": beyond == 0}


def magnitude_weight(dense: torch.Tensor, ratio: float, nm) -> torch.Tensor:
    """Magnitude pruning at the same structure (unstructured: per layer, as SparseGPT's own rule)."""
    if nm:
        n, m = nm
        pruned = lowest_mask(dense.abs().reshape(-1, m), n).view_as(dense)
    else:
        flat = dense.abs().reshape(1, -1)
        pruned = lowest_mask(flat, int(ratio * flat.shape[1] + 1e-9)).view_as(dense)
    return dense.masked_fill(pruned, 0)


def sparsegpt_check(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor, ratio: float, nm) -> dict:
    def error(weight):  # ||(W - W') X||_F from X^T X
        delta = dense - weight
        return float(((delta @ gram) * delta).sum().clamp_min(0).sqrt())

    result = {"reconstruction_error": error(pruned), "magnitude_error": error(magnitude_weight(dense, ratio, nm))}
    result["error_ratio_vs_magnitude"] = result["reconstruction_error"] / max(result["magnitude_error"], 1e-300)
    return result


def structure_check(pruned: torch.Tensor, ratio: float, nm) -> dict:
    zeros = pruned == 0
    sparsity = float(zeros.double().mean())
    if nm:
        n, m = nm
        ok = bool((zeros.reshape(-1, m).sum(1) >= n).all())
    else:
        ok = abs(sparsity - ratio) <= 1.0 / pruned.shape[1]
    return {"sparsity": sparsity, "structure_ok": ok}


@torch.no_grad()
def verify(args, model, ids: torch.Tensor, method: str, sequential: bool, dense: dict[str, torch.Tensor],
           seconds_left) -> dict:
    """Re-collect, in float64, what the first and last linear of each block were calibrated on; check their masks.

    Args:
        args: prune_bench's arguments (batch size, devices, sparsity, ``check``, ``check_tokens``, ``tie_tolerance``).
        model: the model as the timed run left it (pruned).
        ids: the calibration token ids of that run.
        method: ``wanda`` or ``sparsegpt``.
        sequential: the run's schedule (``--true_sequential``) or the papers' (False).
        dense: the dense weights by qualified parameter name (CPU copies).
        seconds_left: () -> seconds before the caller's budget runs out.
    """
    blocks = find_decoder_blocks(model)
    if args.check == "ends":
        blocks_checked = {blocks[0].index, blocks[-1].index}
    else:
        blocks_checked = {b.index for b in blocks}
    options = CalibrationOptions(batch_size=args.batch_size, offload_activations=args.offload_activations, device=args.compute)
    nm = parse_nm(args.sparsity_type)
    start = time.perf_counter()
    inputs = capture_inputs(model, blocks, ids, options)
    layers = []
    for block in blocks:
        if seconds_left() < 5:
            return {"error": f"budget ran out at block {block.index}", "layers": layers}
        check_here = block.index in blocks_checked
        names = list(block.linears)
        chosen = {names[0]: block.linears[names[0]], names[-1]: block.linears[names[-1]]} if check_here else {}
        with BlockPlacement(block.module, options.device) as device:
            extras = ExtrasCache(device)
            recorders = {rel: InputRecorder(layer, args.check_tokens if method == "sparsegpt" else None)
                         for rel, layer in chosen.items()}
            try:
                if chosen and not sequential:  # the parallel schedule calibrated every layer on the dense block
                    params = dict(block.module.named_parameters())
                    pruned_copy = {rel: p.detach().clone() for rel, p in params.items()}
                    for rel, param in params.items():
                        param.copy_(dense[f"{block.name}.{rel}"], non_blocking=True)
                    for hidden, extra in zip(inputs.hidden, inputs.extras):
                        run_block(block.module, hidden, extras(extra), device)
                    for rel, param in params.items():
                        param.copy_(pruned_copy[rel])
                    del pruned_copy
                    for recorder in recorders.values():
                        recorder.remove()
                if block.index < len(blocks) - 1 or (chosen and sequential):
                    propagate(block.module, inputs, device, extras)  # sequential: the recorders see this pass
            finally:
                for recorder in recorders.values():
                    recorder.remove()
            for rel, layer in chosen.items():
                recorder = recorders[rel]
                pruned = weight_matrix(layer).double()
                original = dense[f"{block.name}.{rel}.weight"].to(pruned.device).double()
                if original.shape != pruned.shape:  # Conv1D stores (in, out)
                    original = original.t()
                row = {"block": block.index, "layer": block.qualified(rel), "which": "first" if rel == names[0] else "last"}
                row.update(structure_check(pruned, args.sparsity_ratio, nm))
                if method == "wanda":
                    row.update(wanda_check(original, pruned, recorder.squares, args.sparsity_ratio, nm, args.tie_tolerance))
                else:
                    row.update(sparsegpt_check(original, pruned, recorder.gram, args.sparsity_ratio, nm))
                    row["gram_rows"] = recorder.gram_seen
                layers.append(row)
                del original, pruned
            del recorders
    summary = {"blocks_checked": len(blocks_checked), "layers_checked": len(layers), "seconds": time.perf_counter() - start,
               "all_structures_ok": all(r["structure_ok"] for r in layers)}
    if method == "wanda":
        summary.update(all_masks_equal_formula=all(r["mask_equals_formula"] for r in layers),
                       mask_mismatches=sum(r["mask_mismatches"] for r in layers),
                       mismatches_beyond_rounding=sum(r["mismatches_beyond_rounding"] for r in layers))
    else:
        ratios = [r["error_ratio_vs_magnitude"] for r in layers]
        summary.update(max_error_ratio_vs_magnitude=max(ratios), mean_error_ratio_vs_magnitude=sum(ratios) / len(ratios),
                       all_below_magnitude=all(r < 1 for r in ratios), gram_rows=layers[0]["gram_rows"] if layers else 0)
    summary["layers"] = layers
    return summary
