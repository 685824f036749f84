"""The predicted peak memory of one process of ``--recovery_method full``: the terms and the peak.

See :mod:`prunetune.recipe.memory_estimate` for what each term counts and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunetune.errors import UsageError
from prunetune.recipe.memory_estimate.shape import ModelShape
from prunetune.recover.optimizers import OPTIMIZERS, OptimizerMemory

GiB = 2**30
GB = 10**9
BNB_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizers: one float32 scale per 256 values per moment
# The setup README "Several GPUs" and the estimate recommend for a 7B model on one 80 GB GPU.
RECOMMENDED = {"dtype": "bfloat16", "optim": "adamw_bnb_8bit", "gradient_checkpointing": True}


def optimizer_memory(optim: str) -> OptimizerMemory:
    """The memory model of ``--optim``.

    Raises:
        UsageError: an optimizer the estimate does not model.
    """
    try:
        return OPTIMIZERS[optim]
    except KeyError:
        raise UsageError(f"--memory_estimate does not model --optim {optim}; it knows: {', '.join(OPTIMIZERS)}.") from None



@dataclass(frozen=True)
class TrainingSetup:
    """The choices the estimate depends on.

    Attributes:
        dtype: the weights' dtype (float32: fp32 master weights; bfloat16).
        optim: the Trainer's ``--optim`` name.
        bf16: bf16 mixed precision (autocast; under FSDP2 the gathered blocks' dtype).
        gradient_checkpointing: recompute each block in the backward pass.
        micro_batch: blocks per device and step; block_size: tokens per block.
        processes: data-parallel processes; fsdp: FSDP2 shards over them (else DDP when > 1).
    """

    dtype: str = "float32"
    optim: str = "adamw_torch_fused"
    bf16: bool = True
    gradient_checkpointing: bool = False
    micro_batch: int = 8
    block_size: int = 1024
    processes: int = 1
    fsdp: bool = False

    def label(self) -> str:
        parts = [f"{self.dtype} weights", "bf16 autocast" if self.bf16 else "no autocast", self.optim,
                 "gradient checkpointing" if self.gradient_checkpointing else "no checkpointing",
                 f"micro-batch {self.micro_batch} x {self.block_size}"]
        if self.processes > 1:
            parts.append(f"{'FSDP2' if self.fsdp else 'DDP'} over {self.processes} processes")
        return ", ".join(parts)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryEstimate:
    """A predicted peak, with the terms that make it up (bytes, per process).

    Attributes:
        resident: held through the whole step (weights, masks, optimizer state, gathered blocks).
        moments: what comes on top of ``resident`` at each candidate peak moment, by term.
        alone: moments that are not on top of ``resident`` (under FSDP2: the whole model on each GPU
            before the Trainer shards it).
        peak: the largest moment's total; peak_moment: which one.
    """

    shape: ModelShape
    setup: TrainingSetup
    resident: dict[str, int]
    moments: dict[str, dict[str, int]]
    alone: tuple[str, ...] = ()
    peak: int = 0
    peak_moment: str = ""

    def __post_init__(self):
        base = sum(self.resident.values())
        totals = {moment: sum(terms.values()) + (0 if moment in self.alone else base)
                  for moment, terms in self.moments.items()}
        self.peak_moment = max(totals, key=totals.get)
        self.peak = totals[self.peak_moment]

    def fits(self, budget_bytes: float) -> bool:
        return self.peak <= budget_bytes

    def table(self) -> str:
        """The breakdown as text: every resident term, the terms of the peak moment, the total."""
        lines = [f"{'term':<46} {'GiB':>8}"]
        for term, size in ({} if self.peak_moment in self.alone else self.resident).items():
            lines.append(f"{term:<46} {size / GiB:>8.2f}")
        for term, size in self.moments[self.peak_moment].items():
            lines.append(f"{term + ' (' + self.peak_moment + ')':<46} {size / GiB:>8.2f}")
        lines.append(f"{'predicted peak (PyTorch allocated)':<46} {self.peak / GiB:>8.2f}   = {self.peak / GB:.1f} GB")
        return "\n".join(lines)


def _optimizer_state(shape: ModelShape, memory: OptimizerMemory, weight_bytes: int) -> int:
    # the Trainer registers embeddings for 32-bit bitsandbytes state (transformers' create_optimizer)
    full_precision = shape.small + shape.embedding
    large = shape.params - full_precision
    per_8bit = 1 + 4 / BNB_BLOCK  # the 8-bit moment and its share of a float32 scale
    if memory.state == "adam":
        return 2 * weight_bytes * shape.params
    if memory.state == "adam8":
        return int(2 * per_8bit * large) + 2 * 4 * full_precision
    if memory.state == "adam32":
        return 2 * 4 * shape.params
    if memory.state == "one":
        return weight_bytes * shape.params
    if memory.state == "one8":
        return int(per_8bit * large) + 4 * full_precision
    if memory.state == "one32":
        return 4 * shape.params
    if memory.state == "factored":
        return 4 * sum(rows + cols for rows, cols in shape.matrices) + 4 * (shape.params - sum(r * c for r, c in shape.matrices))
    return 0


def block_activation_bytes(shape: ModelShape, residual_bytes: int, compute_bytes: int, autocast_inputs: bool) -> int:
    """Bytes one decoder block saves for its backward pass, per token (see the module docstring).

    Args:
        residual_bytes: the residual stream's dtype size (the weights' under autocast).
        compute_bytes: the matmuls' dtype size.
        autocast_inputs: each linear layer casts its float32 input itself (q, k, v: three copies; gate, up: two).
    """
    h, kv, inter = shape.hidden, shape.kv_dim, shape.intermediate
    norms = 2 * (4 * h + residual_bytes * h)  # float32 input kept by the variance, normalized output
    linear_inputs = (3 + 2 if autocast_inputs else 1 + 1) * compute_bytes * h  # attention and MLP inputs
    attention = compute_bytes * (h + 2 * kv) + compute_bytes * h + 4 * shape.heads  # q, k, v, output (= o_proj input), lse
    mlp = 4 * compute_bytes * inter  # gate, up, act(gate), act(gate) * up (= down_proj input)
    return norms + linear_inputs + attention + mlp


def estimate(shape: ModelShape, setup: TrainingSetup) -> MemoryEstimate:
    """Predict the peak memory of one process for ``setup`` (see the module docstring for the model)."""
    memory = optimizer_memory(setup.optim)
    n = setup.processes if setup.fsdp else 1
    weight_bytes = 4 if (setup.fsdp and setup.bf16) else DTYPE_BYTES[setup.dtype]
    autocast = setup.bf16 and not setup.fsdp
    compute_bytes = 2 if (setup.bf16 or weight_bytes == 2) else 4
    residual_bytes = compute_bytes if setup.fsdp else weight_bytes
    tokens = setup.micro_batch * setup.block_size

    resident = {
        "weights": shape.params * weight_bytes // n,
        "masks (bool, 1 byte per masked weight)": shape.masked // n,
        f"optimizer state ({setup.optim})": _optimizer_state(shape, memory, weight_bytes) // n,
    }
    if setup.fsdp and n > 1:
        resident["FSDP2 gathered blocks (running + prefetched)"] = 2 * shape.block_params * compute_bytes
    gradients = {"gradients": shape.params * weight_bytes // n}
    if setup.processes > 1 and not setup.fsdp:
        gradients["DDP gradient buckets"] = shape.params * weight_bytes

    per_block = block_activation_bytes(shape, residual_bytes, compute_bytes, autocast and weight_bytes == 4)
    head = tokens * ((4 + residual_bytes) * shape.hidden + compute_bytes * shape.hidden)  # final norm, output layer input
    loss = tokens * shape.vocab * (compute_bytes + 4 + 4 + 4)  # logits, float32 copy, log-softmax, its gradient
    forward = {}
    if setup.gradient_checkpointing:
        forward["activations (block inputs, checkpointed)"] = tokens * shape.layers * residual_bytes * shape.hidden
        forward["one block recomputed"] = tokens * per_block
    else:
        forward["activations"] = tokens * shape.layers * per_block
    forward["output layer and loss"] = head + loss
    if autocast and weight_bytes == 4:
        forward["autocast bf16 weight copies"] = 2 * shape.linear
    backward_end = dict(gradients)
    if setup.gradient_checkpointing:  # the first block's recomputation comes last, with every other gradient
        backward_end["one block recomputed"] = tokens * per_block
    step = dict(gradients)
    if memory.foreach_temporary:
        step["foreach step temporary"] = shape.params * weight_bytes // n
    moments = {"end of forward": forward, "end of backward": backward_end, "optimizer step": step}
    alone = ()
    if setup.fsdp and n > 1:  # each process loads the whole model and its masks before the Trainer shards them
        moments["before sharding"] = {"whole model, as loaded": shape.params * DTYPE_BYTES[setup.dtype],
                                      "whole masks": shape.masked}
        alone = ("before sharding",)
    return MemoryEstimate(shape, setup, resident, moments, alone)
