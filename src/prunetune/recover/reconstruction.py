"""The per-window loop of block-wise reconstruction: pure functions on blocks and activations.

A *window* is ``k`` consecutive decoder blocks trained together (``k = 1``: one block). Its
student blocks learn to map their input batches to the teacher's output batches under the
normalised block-output error of Shin et al. (EMNLP 2024, https://arxiv.org/abs/2406.15524)::

    loss(batch) = ||y_student - y_teacher||^2 / ||y_teacher||^2      (sums over the batch)

Nothing here knows where the inputs come from (the sparse stream, the teacher's, a blend):
:mod:`prunetune.recover.blockwise` decides that. Masks are kept by
:class:`prunetune.recover.full.MaskEnforcer` (gradient hooks zero pruned gradient entries; the
weights are re-zeroed after every step), the same mechanism as ``--recovery_method full``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunetune.calibrate.blocks import ExtrasCache, run_block
from prunetune.recover.full import MaskEnforcer


def window_forward(modules: Sequence[nn.Module], hidden: torch.Tensor, extras: tuple[tuple, dict],
                   device: torch.device) -> torch.Tensor:
    """The window's output for one batch (B, T, hidden), on ``device``."""
    for module in modules:
        hidden = run_block(module, hidden, extras, device)
    return hidden


@torch.no_grad()
def window_outputs(modules: Sequence[nn.Module], hidden: Sequence[torch.Tensor], extras: Sequence[tuple[tuple, dict]],
                   cache: ExtrasCache) -> list[torch.Tensor]:
    """The window's output for every batch, each stored where its input batch lives."""
    return [window_forward(modules, h, cache(e), cache.device).to(h.device) for h, e in zip(hidden, extras)]


def squared_errors(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||output - target||^2, ||target||^2) over the whole batch, in float32."""
    target = target.to(output.device, torch.float32)
    return (output.float() - target).pow(2).sum(), target.pow(2).sum()


@torch.no_grad()
def outputs_and_error(modules: Sequence[nn.Module], inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                      extras: Sequence[tuple[tuple, dict]], cache: ExtrasCache,
                      keep: bool = False) -> tuple[list[torch.Tensor] | None, float | None]:
    """The window's outputs (stored like their inputs, when ``keep``) and its reconstruction error.

    The error is the sum of squared errors over all batches over the sum of squared target
    norms; None without batches.
    """
    outputs: list[torch.Tensor] | None = [] if keep else None
    error = norm = 0.0
    for hidden, target, extra in zip(inputs, targets, extras):
        output = window_forward(modules, hidden, cache(extra), cache.device)
        e, n = squared_errors(output, target)
        error, norm = error + float(e), norm + float(n)
        if keep:
            outputs.append(output.to(hidden.device))
    return outputs, (error / norm if norm else 0.0) if inputs else None


def reconstruction_error(modules: Sequence[nn.Module], inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                         extras: Sequence[tuple[tuple, dict]], cache: ExtrasCache) -> float | None:
    """:func:`outputs_and_error`'s error alone."""
    return outputs_and_error(modules, inputs, targets, extras, cache)[1]


def token_normalised_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||y_student,t - y_teacher,t||^2 / ||y_teacher,t||^2, in float32.

    Unlike the batch-normalised error, a few tokens of huge norm (the "massive activations" that
    appear part-way through many LLMs) do not drown the error of all the others.
    """
    target = target.to(output.device, torch.float32)
    error = (output.float() - target).pow(2).sum(-1)
    return (error / target.pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)).mean()


LOSSES = ("block", "token")


def train_window(modules: Sequence[nn.Module], enforcer: MaskEnforcer, inputs: Sequence[torch.Tensor],
                 targets: Sequence[torch.Tensor], extras: Sequence[tuple[tuple, dict]], cache: ExtrasCache, *,
                 epochs: int, learning_rate: float, generator: torch.Generator, loss: str = "block") -> list[float]:
    """Adam on every parameter of the window, one step per batch; returns each epoch's mean loss.

    The blocks stay in eval mode (no dropout): the target is a deterministic function of the
    input, and a rerun with the same seed gives the same weights. The optimizer (and so its
    state) lives only for this call: one window's Adam state in flight. ``loss``: ``block`` (the
    batch-normalised error above, the paper's) or ``token`` (:func:`token_normalised_error`).
    """
    params = [p for module in modules for p in module.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    enforcer.attach()
    losses = []
    try:
        for _ in range(epochs):
            total = torch.zeros((), device=cache.device)
            for index in torch.randperm(len(inputs), generator=generator).tolist():
                output = window_forward(modules, inputs[index], cache(extras[index]), cache.device)
                if loss == "token":
                    value = token_normalised_error(output, targets[index])
                else:
                    error, norm = squared_errors(output, targets[index])
                    value = error / norm.clamp_min(torch.finfo(torch.float32).tiny)
                value.backward()  # the enforcer's hooks zero the pruned gradient entries here
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                enforcer.remask()  # Adam keeps zeros exactly; this makes "zero after every step" unconditional
                total += value.detach()  # summed on the device: no host sync per step
            losses.append(float(total) / max(len(inputs), 1))
    finally:
        enforcer.detach()
        del optimizer
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return losses
