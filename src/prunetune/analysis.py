"""Per-layer relative output error of pruned (or recovered) weights, on the dense model's inputs.

For one prunable linear layer with dense weight ``W`` (out, in), other weights ``W'`` of the
same shape (pruned, or recovered and merged), and ``X`` (n, in) the inputs the *dense* model
gives that layer on a few calibration windows::

    error = ||X Wᵀ - X W'ᵀ||_F / ||X Wᵀ||_F

the share of the layer's dense output that the new weights fail to reproduce -- what Wanda
and SparseGPT minimize layer by layer (SparseGPT, https://arxiv.org/abs/2301.00774, eq. 1).
Unlike the sparsity of a uniformly pruned model, it varies from layer to layer and shows
where recovery helped. It is computed from the Gram matrix ``G = XᵀX`` (in, in), since
``||X Dᵀ||_F² = Σ (D G) ⊙ D``: the dense inputs are captured once, in one forward pass, and
each configuration then costs one (out, in) x (in, in) product per layer. Memory: one
float64 (in, in) matrix per distinct layer input (layers fed the same tensor share one).

Usage::

    grams = input_grams(dense_model, calibration_ids)          # once
    dense = layer_weights(dense_model)
    errors = reconstruction_errors(dense, layer_weights(pruned_model), grams)  # per configuration
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prunetune.errors import require
from prunetune.modules import prunable_layers, weight_matrix, weight_param_shape


@torch.no_grad()
def input_grams(model: nn.Module, token_ids: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``XᵀX`` (in, in, float64, CPU) of every prunable layer's input over ``token_ids``.

    Args:
        model: the dense causal LM; its prunable layers are found by :func:`prunable_layers`.
        token_ids: calibration windows, (n, seqlen).
        batch_size: windows per forward pass.

    Returns:
        qualified layer name -> Gram matrix of the layer's inputs, every token of every window.
    """
    layers = prunable_layers(model)
    grams: dict[str, torch.Tensor] = {}
    for name, module in layers.items():
        size = weight_param_shape(module)[1]
        grams[name] = torch.zeros(size, size, dtype=torch.float64)
    # One batch: input tensor id -> (the tensor, its Gram). Layers fed one tensor (q/k/v) share the
    # product; holding the tensor keeps its id from being reused by a later one within the batch.
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def accumulate(module, args):
            x = args[0]
            if id(x) not in shared:
                flat = x.detach().reshape(-1, x.shape[-1]).double()  # (B*T, in)
                shared[id(x)] = (x, (flat.T @ flat).cpu())
            grams[name] += shared[id(x)][1]
        return accumulate

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for first in range(0, token_ids.shape[0], batch_size):
            shared.clear()
            model(input_ids=token_ids[first : first + batch_size].to(device), use_cache=False)
    finally:
        shared.clear()
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return grams


def layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """qualified name -> (out, in) weight of every prunable layer, a float32 CPU copy."""
    return {name: weight_matrix(module).detach().float().cpu().clone() for name, module in prunable_layers(model).items()}


def relative_error(dense: torch.Tensor, other: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X denseᵀ - X otherᵀ||_F / ||X denseᵀ||_F`` for ``gram = XᵀX``; nan when the dense output is 0.

    Args:
        dense: (out, in) dense weight.
        other: (out, in) weight to compare.
        gram: (in, in) Gram matrix of the layer's inputs.
    """
    require(dense.shape == other.shape, f"weights of shapes {tuple(dense.shape)} and {tuple(other.shape)} cannot be compared.")
    w = dense.double()
    d = w - other.double()
    reference = float(((w @ gram) * w).sum())
    difference = max(float(((d @ gram) * d).sum()), 0.0)  # >= 0 up to rounding (G is positive semidefinite)
    return math.sqrt(difference / reference) if reference > 0 else math.nan


def reconstruction_errors(dense: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
                          grams: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-layer :func:`relative_error` of ``other`` against ``dense``, for every layer in ``grams``."""
    missing = [name for name in grams if name not in other]
    require(not missing, f"the compared model has no layer {missing[0] if missing else ''!r}; compare models of one architecture.")
    return {name: relative_error(dense[name], other[name], gram) for name, gram in grams.items()}
