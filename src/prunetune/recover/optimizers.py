"""What prunetune knows about each optimizer the Trainer offers (``--optim``): one table, no other imports.

:data:`OPTIMIZERS` is read by the memory estimate (state bytes per parameter, step
temporaries), by :mod:`prunetune.recover.sharding` (bitsandbytes cannot step FSDP2's sharded
parameters) and by :func:`check_optimizer` (bitsandbytes installed, CUDA for the paged ones);
:data:`ZERO_PRESERVING` by :mod:`prunetune.recover.full` (which optimizers leave a pruned
weight at exactly zero without re-masking). A bottom module: it imports nothing of prunetune's
but :mod:`prunetune.errors`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from prunetune.errors import UsageError


@dataclass(frozen=True)
class OptimizerMemory:
    """What an optimizer adds: state bytes per parameter, and a weight-sized step temporary or not.

    Attributes:
        state: "adam" (two moments in the weights' dtype), "adam8" (two bitsandbytes 8-bit moments),
            "adam32" (two float32 moments), "one" (one moment in the weights' dtype), "one8" (one 8-bit
            moment), "one32" (one float32 moment), "factored" (Adafactor: a row and a column vector
            per matrix) or "none".
        foreach_temporary: the step allocates one weight-sized tensor (torch's foreach AdamW).
        bitsandbytes: the optimizer comes from bitsandbytes (an optional extra; paged ones need CUDA).
        paged: the state lives in CUDA unified memory and may be evicted to the host under pressure
            (counted on the GPU by the estimate: the case where it is not evicted).
    """

    state: str
    foreach_temporary: bool = False
    bitsandbytes: bool = False
    paged: bool = False


OPTIMIZERS: dict[str, OptimizerMemory] = {
    "adamw_torch_fused": OptimizerMemory("adam"),
    "adamw_torch": OptimizerMemory("adam", foreach_temporary=True),
    "adamw_bnb_8bit": OptimizerMemory("adam8", bitsandbytes=True),
    "adamw_8bit": OptimizerMemory("adam8", bitsandbytes=True),
    "paged_adamw_8bit": OptimizerMemory("adam8", bitsandbytes=True, paged=True),
    "paged_adamw_32bit": OptimizerMemory("adam32", bitsandbytes=True, paged=True),
    "lion_8bit": OptimizerMemory("one8", bitsandbytes=True),
    "lion_32bit": OptimizerMemory("one32", bitsandbytes=True),
    "paged_lion_8bit": OptimizerMemory("one8", bitsandbytes=True, paged=True),
    "paged_lion_32bit": OptimizerMemory("one32", bitsandbytes=True, paged=True),
    "rmsprop_bnb_8bit": OptimizerMemory("one8", bitsandbytes=True),
    "rmsprop_bnb_32bit": OptimizerMemory("one32", bitsandbytes=True),
    "sgd": OptimizerMemory("none"),  # the Trainer's sgd has no momentum unless --optim_args sets it
    "adagrad": OptimizerMemory("one"),
    "rmsprop": OptimizerMemory("one"),
    "adafactor": OptimizerMemory("factored"),
}

# Optimizer classes whose update is exactly zero where gradient, moment state and weight are zero
# (decoupled or L2 weight decay multiply a zero, momentum and both Adam moments stay 0).
ZERO_PRESERVING = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def optimizer_name(training_args) -> str:
    """``--optim`` as its plain name (the Trainer holds an ``OptimizerNames`` enum)."""
    return str(getattr(training_args.optim, "value", training_args.optim))


def check_optimizer(training_args) -> None:
    """Refuse, before any work, a bitsandbytes optimizer this machine cannot run.

    Raises:
        UsageError: bitsandbytes is not installed, or a paged optimizer without CUDA.
    """
    optim = optimizer_name(training_args)
    memory = OPTIMIZERS.get(optim)
    if memory is None or not memory.bitsandbytes:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(
            f"--optim {optim} needs bitsandbytes, which is not installed: pip install 'prunetune[bnb]' (its 8-bit "
            "optimizers run on CUDA GPUs; recent releases also on CPU). Without it use adamw_torch_fused (the "
            "default), adamw_torch or adafactor.")
    if memory.paged and not torch.cuda.is_available():
        raise UsageError(
            f"--optim {optim} pages its state between GPU and host memory, which needs CUDA, and this machine has no "
            "CUDA device. Use adamw_bnb_8bit (the same 8-bit state, not paged) or adamw_torch_fused.")
