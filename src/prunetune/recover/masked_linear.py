"""The fused forward of masked LoRA: ``F.linear(x, W + sum_i s_i (B_i A_i) * M_i, b)`` with one matmul.

:class:`MaskedLinearFunction` is what :class:`prunetune.recover.masked_lora.MaskedLoraLinear`
runs when the adapter input is the layer input (no dropout in training): ``W + s (B A) * M``
is formed once and multiplied once, so the forward costs one matmul, like the base layer; the
extra work is the (out, in) weight gradient in the backward. Tensors in, tensors out, no PEFT:
``tests/unit/test_masked_lora.py`` checks it against the formula written out.

Precision of the fused forward. The sum is accumulated in fp32 and rounded once to the matmul's
dtype (autocast's, else the weight's). In fp32 that is the exact formula. In bf16 / fp16,
rounding to *nearest* cannot work, however the sum is accumulated: a bf16 base weight sits
exactly on the bf16 grid, so every ``|delta|`` below half a step of ``W`` rounds back to ``W``
and the update is lost, while the gradient assumes all of it. So the sum is rounded
*stochastically* (:func:`round_stochastically`: up or down with probability proportional to
the distance). The rounded weight then equals ``W + delta`` in expectation, a pruned weight
stays exactly zero, and no matmul is added (Gupta et al. 2015, https://arxiv.org/abs/1502.02551).
Measured with ``benchmarks/masked_lora_precision.py``: one 512x512 bf16 layer, 50% kept by
magnitude, r = 8, mean ``|delta| / |W|`` = 1.5e-3 over the kept weights, 4,096 random
inputs. The figure is the least-squares slope of the output change against the fp64
intended change ``x @ delta^T``, the same with and without bf16 autocast:

* before this change (``addcmul`` in bf16): 0.767;
* the fp32 sum rounded to nearest: 0.768;
* PEFT's plain LoRA, same factors: 0.894 (PEFT's order on the masked delta, which is the
  dropout path here: 0.783);
* now: 1.000 (0.995-1.005 over 5 seeds).

In training each forward takes its rounding seed from the global CPU generator, as dropout
draws from its generator, so ``torch.manual_seed`` reproduces a run and activation
checkpointing, which restores the RNG state, recomputes the same weight. In ``eval()`` the
seed is fixed (:data:`EVAL_ROUNDING_SEED`): evaluations are deterministic and leave the global
generator alone, and the rounding is still unbiased across the weights of a layer. The merge
(:func:`prunetune.recover.masked_lora.merged_weight`) forms the weight with the same function,
dtype and seed, so a merged model holds exactly the weights the adapter was evaluated with
(noise is drawn on the weight's device: merge on the device type you evaluated on; CPU and
CUDA generators differ). Cost: forming the weight takes a
few elementwise passes more than before, each forward and again in backward (on 2 CPU cores:
256 ms against 85 ms for a 2048x2048 bf16 weight). That is within the noise of a CPU bf16
layer step, which the matmuls dominate. It is not yet measured on a GPU, where elementwise
passes weigh more (``--device cuda``).

Memory. The fused path saves for backward only the layer input (in the matmul's dtype)
and references to tensors the module holds anyway (``W``, ``M``, ``A``, ``B``). Backward
recomputes the effective weight (a rank-r matmul and the passes above) from the same seed,
so it is the exact gradient of the forward. Before this change autograd also kept that
weight whenever the input needed a gradient, i.e. in every layer but the first: one extra
weight-sized tensor per adapted layer, so with ``all-linear`` a second copy of the adapted
weights. Measured for a 1024x1024 layer and 1,024 inputs: 4 MiB input + 4 MiB weight before,
the 4 MiB input now (fp32); 2 + 2 MiB before, 2 MiB now (bf16 autocast).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Low fp32 mantissa bits a narrower float drops (fp32 has 23, bf16 7, fp16 10): stochastic rounding adds
# noise below them and truncates. A dtype missing here is at least as wide as the fp32 sum (no rounding).
DROPPED_MANTISSA_BITS = {torch.bfloat16: 16, torch.float16: 13}


def round_stochastically(value: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Round an fp32 tensor to bf16 / fp16 up or down, with probability proportional to the distance.

    Adds uniform integer noise below the bits ``dtype`` keeps and truncates them, on the fp32
    bit pattern (sign and magnitude, so it is symmetric in the sign): ``E[result] == value``.
    Values already representable in ``dtype`` (zero included) come back unchanged. For fp16,
    values in its subnormal range are then rounded to nearest.

    Args:
        value: fp32 tensor; overwritten (the caller's scratch sum).
        dtype: ``torch.bfloat16`` or ``torch.float16``.
        seed: seeds a generator on ``value``'s device, so the same seed gives the same rounding.

    Returns:
        ``value`` rounded to ``dtype``.
    """
    dropped = DROPPED_MANTISSA_BITS[dtype]
    generator = torch.Generator(device=value.device).manual_seed(seed)
    bits = value.view(torch.int32)
    noise = torch.empty_like(bits).random_(0, 1 << dropped, generator=generator)
    bits.add_(noise).bitwise_and_(-(1 << dropped))  # a carry into the exponent is the correct next value
    return value.to(dtype)  # exact: the dropped bits are zero


@dataclass(frozen=True)
class FusedPlan:
    """The non-tensor inputs of :class:`MaskedLinearFunction`.

    Attributes:
        scalings: ``s`` per adapter, in the order of the factors.
        fan_in_fan_out: the base weight is stored (in, out) (GPT-2 ``Conv1D``).
        dtype: the matmul's dtype: autocast's where it applies, else the base weight's.
        seed: stochastic rounding seed when ``dtype`` is narrower than the fp32 sum, else None.
    """

    scalings: tuple[float, ...]
    fan_in_fan_out: bool
    dtype: torch.dtype
    seed: int | None


def matmul_dtype(device_type: str, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``F.linear`` would run in here: autocast's (it leaves fp64 alone), else the weight's."""
    if (weight_dtype != torch.float64 and torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    return weight_dtype


def _no_autocast(device_type: str):
    """Autocast off: the function casts explicitly, so the fp32 sum is not cast to bf16 behind its back."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _adapters(factors: tuple[torch.Tensor, ...], plan: FusedPlan):
    """``(lora_A, lora_B, kept, scaling)`` per adapter from the flat factor list."""
    return [(*factors[i:i + 3], scaling) for i, scaling in zip(range(0, len(factors), 3), plan.scalings)]


def effective_weight(weight: torch.Tensor, factors: tuple[torch.Tensor, ...], plan: FusedPlan) -> torch.Tensor:
    """``W + sum_i s_i (B_i A_i) * M_i`` summed in fp32 (fp64 for fp64 weights), rounded once to ``plan.dtype``.

    Returns the weight in storage orientation ((in, out) for ``Conv1D``), stochastically
    rounded when ``plan.seed`` is set (see :func:`round_stochastically` for why).
    """
    accumulate = torch.promote_types(weight.dtype, torch.float32)
    total = None
    for lora_A, lora_B, kept, scaling in _adapters(factors, plan):
        scaled_A = lora_A.to(accumulate) * scaling  # (r, in): the scale costs r * in, not out * in
        lora_B = lora_B.to(accumulate)  # (out, r)
        product = scaled_A.t() @ lora_B.t() if plan.fan_in_fan_out else lora_B @ scaled_A  # contiguous, storage orientation
        total = torch.addcmul(weight, product, kept) if total is None else total.addcmul_(product, kept)
        del product  # before the rounding noise: one layer's scratch peaks at 8 bytes per weight, not 12
    if plan.seed is None:
        return total.to(plan.dtype)
    return round_stochastically(total, plan.dtype, plan.seed)


class MaskedLinearFunction(torch.autograd.Function):
    """``F.linear(x, W + sum_i s_i (B_i A_i) * M_i, b)`` with one matmul and a recomputed weight.

    Call as ``apply(x, weight, bias, plan, lora_A_1, lora_B_1, kept_1, lora_A_2, ...)``
    (``weight`` and the masks in storage orientation, ``bias`` may be None). Saves the input
    (in ``plan.dtype``) and references to the module's own tensors; backward recomputes the
    effective weight with the same rounding seed, so it is the exact gradient of what the
    forward computed. Gradients (``G = dL/dW`` in (out, in), ``D_i = G * M_i``)::

        dx = dy @ W_eff      dA_i = s_i B_i^T D_i      dB_i = s_i D_i A_i^T      db = sum dy

    Everything runs in ``plan.dtype`` with autocast off (the caller resolved autocast into
    ``plan.dtype``), and each gradient is returned in its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, plan: FusedPlan, *factors):
        with _no_autocast(x.device.type):
            inputs = x.to(plan.dtype)
            merged = effective_weight(weight, factors, plan)
            out = F.linear(inputs, merged.t() if plan.fan_in_fan_out else merged,
                           None if bias is None else bias.to(plan.dtype))
        weight_grad_needed = ctx.needs_input_grad[1] or any(ctx.needs_input_grad[4:])  # dL/dW needs the input
        ctx.save_for_backward(inputs if weight_grad_needed else None, weight, *factors)
        ctx.plan = plan
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        inputs, weight, *factors = ctx.saved_tensors
        plan: FusedPlan = ctx.plan
        needs = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = None
        factor_grads = [None] * len(factors)
        with _no_autocast(grad_output.device.type):
            grad_output = grad_output.to(plan.dtype)
            if needs[0]:
                merged = effective_weight(weight, factors, plan)
                grad_x = (grad_output @ (merged.t() if plan.fan_in_fan_out else merged)).to(ctx.x_dtype)
                del merged
            flat_grad = grad_output.reshape(-1, grad_output.shape[-1])  # (N, out)
            if needs[2]:
                grad_bias = flat_grad.sum(0).to(ctx.bias_dtype)
            if needs[1] or any(needs[4:]):
                flat_inputs = inputs.reshape(-1, inputs.shape[-1])  # (N, in)
                # dL/dW once for all adapters, in storage orientation (contiguous like the masks)
                full = flat_inputs.t() @ flat_grad if plan.fan_in_fan_out else flat_grad.t() @ flat_inputs
                if needs[1]:
                    grad_weight = full.to(weight.dtype)
                adapters = _adapters(tuple(factors), plan)
                for index, (lora_A, lora_B, kept, scaling) in enumerate(adapters):
                    in_place = index == len(adapters) - 1 and not needs[1]  # last use of ``full``
                    masked = full.mul_(kept) if in_place else full * kept
                    masked = masked.t() if plan.fan_in_fan_out else masked  # (out, in)
                    if needs[4 + 3 * index]:
                        factor_grads[3 * index] = (lora_B.to(plan.dtype).t() @ masked).to(lora_A.dtype).mul_(scaling)
                    if needs[5 + 3 * index]:
                        factor_grads[3 * index + 1] = (masked @ lora_A.to(plan.dtype).t()).to(lora_B.dtype).mul_(scaling)
        return grad_x, grad_weight, grad_bias, None, *factor_grads


EVAL_ROUNDING_SEED = 0x5EED  # eval(): one fixed rounding, so two evaluations agree exactly


def draw_rounding_seed() -> int:
    """A seed for one forward's stochastic rounding, from the global CPU generator (as dropout draws)."""
    return int(torch.randint(0, 2**62, (1,)).item())

