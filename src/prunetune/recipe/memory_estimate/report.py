"""The ``--memory_estimate`` dry run's text, and the recipe's hook that logs the prediction of a CUDA run."""

from __future__ import annotations

import logging

import torch

from prunetune.errors import UsageError
from prunetune.recipe.memory_estimate.estimate import GB, RECOMMENDED, GiB, TrainingSetup, estimate
from prunetune.recipe.memory_estimate.shape import model_shape
from prunetune.recover.optimizers import optimizer_name
from prunetune.recover.sharding import fsdp_settings

logger = logging.getLogger(__name__)


def setup_from_args(model_args, data_args, recovery_args, training_args, bf16: bool | None = None) -> TrainingSetup:
    """The setup a ``prunetune recover`` command line would run on a CUDA GPU.

    ``--dtype auto`` means float32 master weights for ``full``. ``bf16``: None takes the parsed
    ``--bf16``, except on a machine without CUDA, where the parsed value says nothing about the
    GPU the run is for and the Trainer's GPU default (bf16 autocast) is assumed.
    """
    if bf16 is None:
        bf16 = bool(training_args.bf16) or (not torch.cuda.is_available() and not training_args.fp16)
    dtype = "float32" if model_args.dtype == "auto" else model_args.dtype
    processes = recovery_args.memory_estimate_processes or training_args.world_size
    return TrainingSetup(
        dtype=dtype, optim=optimizer_name(training_args), bf16=bf16,
        gradient_checkpointing=bool(training_args.gradient_checkpointing),
        micro_batch=training_args.per_device_train_batch_size, block_size=data_args.block_size or 1024,
        processes=processes, fsdp=fsdp_settings(training_args) is not None)


def report(model_args, data_args, recovery_args, training_args, bf16: bool | None = None) -> str:
    """The text ``--memory_estimate`` prints: the chosen setup's breakdown, then the alternatives.

    Args:
        bf16: the ``--bf16`` the command line gave explicitly (None: not given; see :func:`setup_from_args`).

    Raises:
        UsageError: a method other than ``full``, an unknown optimizer, a model without a readable shape.
    """
    if recovery_args.recovery_method != "full":
        raise UsageError(f"--memory_estimate predicts --recovery_method full; got {recovery_args.recovery_method}. "
                         "Add --recovery_method full (the adapter methods keep a frozen bf16 base and need far less).")
    processes, budget_gb = recovery_args.memory_estimate_processes, recovery_args.memory_estimate_budget_gb
    if processes is not None and not (isinstance(processes, int) and not isinstance(processes, bool) and processes > 0):
        raise UsageError(f"--memory_estimate_processes {processes!r} is not accepted: give the number of GPUs, 1 or more.")
    if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not 0 < budget_gb < float("inf"):
        raise UsageError(f"--memory_estimate_budget_gb {budget_gb!r} is not accepted: give the GPU's memory in GB, e.g. 80.")
    shape = model_shape(model_args.model_name_or_path, model_args.config_name, model_args.trust_remote_code)
    chosen = setup_from_args(model_args, data_args, recovery_args, training_args, bf16)
    result = estimate(shape, chosen)
    budget = recovery_args.memory_estimate_budget_gb * GB
    lines = [
        f"PREDICTED peak GPU memory (not a measurement) of prunetune recover --recovery_method full on {shape.name}",
        f"model shape: {shape.source}: {shape.params / 1e9:.2f}B parameters ({shape.masked / 1e9:.2f}B masked), "
        f"{shape.layers} blocks, hidden {shape.hidden}, intermediate {shape.intermediate}, vocab {shape.vocab}",
        f"setup: {chosen.label()}",
        "",
        result.table(),
        "",
        f"{'fits' if result.fits(budget) else 'does NOT fit'} a GPU of {recovery_args.memory_estimate_budget_gb:g} GB "
        f"(peak: {result.peak_moment}; the CUDA context, ~0.5-1 GiB, and allocator slack come on top).",
        "",
        "other setups, same model and batch:",
    ]
    alternatives = {
        "recommended: bf16 weights, 8-bit AdamW, checkpointing": TrainingSetup(
            dtype=RECOMMENDED["dtype"], optim=RECOMMENDED["optim"], bf16=True,
            gradient_checkpointing=RECOMMENDED["gradient_checkpointing"], micro_batch=chosen.micro_batch,
            block_size=chosen.block_size),
        "default: fp32 weights, bf16 autocast, fused AdamW": TrainingSetup(
            micro_batch=chosen.micro_batch, block_size=chosen.block_size),
        "fp32 weights, 8-bit AdamW, checkpointing": TrainingSetup(
            optim="adamw_bnb_8bit", gradient_checkpointing=True, micro_batch=chosen.micro_batch,
            block_size=chosen.block_size),
    }
    for label, setup in alternatives.items():
        other = estimate(shape, setup)
        lines.append(f"  {label:<55} {other.peak / GiB:>7.2f} GiB ({other.peak / GB:.1f} GB)"
                     f"{'' if other.fits(budget) else '  does not fit'}")
    if chosen.processes == 1:
        for n in (2, 4, 8):
            other = estimate(shape, TrainingSetup(micro_batch=chosen.micro_batch, block_size=chosen.block_size,
                                                  processes=n, fsdp=True))
            lines.append(f"  {'default under FSDP2, ' + str(n) + ' GPUs (per GPU)':<55} {other.peak / GiB:>7.2f} GiB "
                         f"({other.peak / GB:.1f} GB)")
    lines.append("measure it: python benchmarks/full_7b_memory.py (on a GPU)")
    return "\n".join(lines)


def announce(model_args, data_args, recovery_args, training_args) -> None:
    """The recipe's hook: refuse ``memory_estimate`` outside the command line; log the prediction of a CUDA ``full`` run.

    A prediction above the GPU's memory is a warning, before any weight is loaded; the run goes on
    (the prediction may be wrong, and the measured peak is in ``recovery.json``).

    Raises:
        UsageError: ``memory_estimate`` set on a call of :func:`prunetune.recipe.recover`.
    """
    if recovery_args.memory_estimate:
        raise UsageError("memory_estimate is a dry run of the command line (prunetune recover ... --memory_estimate); "
                         "from Python call prunetune.recipe.memory_estimate.report(model_args, data_args, "
                         "recovery_args, training_args) instead of recover().")
    if recovery_args.recovery_method != "full" or training_args.device.type != "cuda":
        return
    try:
        result = estimate(model_shape(model_args.model_name_or_path, model_args.config_name, model_args.trust_remote_code),
                          setup_from_args(model_args, data_args, recovery_args, training_args))
    except (UsageError, ValueError, KeyError, OSError) as err:  # an estimate never stops a run
        logger.debug("no memory prediction for %s: %s", model_args.model_name_or_path, err)
        return
    total = torch.cuda.get_device_properties(training_args.device).total_memory
    logger.info("predicted peak GPU memory %.2f GiB (%s; --memory_estimate shows the terms)", result.peak / GiB,
                result.setup.label())
    if result.peak > total:
        logger.warning("predicted peak GPU memory %.1f GiB is above this GPU's %.1f GiB: expect running out of memory. "
                       "--memory_estimate lists setups that fit (e.g. --dtype bfloat16 --optim adamw_bnb_8bit "
                       "--gradient_checkpointing, or FSDP2 over several GPUs).", result.peak / GiB, total / GiB)
