"""Masks that follow FSDP2's sharding: mask shards, local views, counts summed across ranks.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, what accelerate and the Trainer run for
``--fsdp``) every parameter of a wrapped module becomes a ``DTensor``: each rank holds one slice
of it (``Shard(0)``: a block of rows; with HSDP also replicated along a second mesh dimension),
its gradient arrives as a ``DTensor`` of the same layout after the reduce-scatter, and the
optimizer steps the slices. A kept mask that is to act on those slices must be cut the same way:
:func:`shard_like` gives it the parameter's mesh and placements, so rank r's mask rows are
exactly its weight rows and every mask operation stays local (no communication per step).

Counting across ranks (the sparsity guard): each rank counts on its own slices, then
:func:`sum_over_shards` adds the counts over the mesh dimensions along which the parameters are
sharded (not over replicas, which hold the same numbers), so every rank sees the global count
and every rank stops at the same step.

Everything here is a no-op on plain tensors: a single process, DDP and the adapter methods'
unsharded layers go through the same calls unchanged.

:func:`check_sharding` says, before any work, which sharded launches the masks can follow.
"""

from __future__ import annotations

import logging
import os

import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from transformers.training_args import ParallelMode

from prunetune.errors import UsageError
from prunetune.recover.optimizers import OPTIMIZERS, optimizer_name

logger = logging.getLogger(__name__)


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter, gradient or mask under FSDP2)."""
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a ``DTensor`` (a view: in-place changes reach the ``DTensor``); a plain tensor as is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_like(full: torch.Tensor, like: DTensor) -> DTensor:
    """``full`` (the global shape of ``like``) cut as ``like`` is: same mesh, same placements, same rows per rank.

    Each rank cuts its own copy of ``full`` (``src_data_rank=None``: no communication), which is
    right for masks every rank took from the same pruned model. The slice lands on the device of
    ``like``'s slice (with FSDP2's CPU offload: the CPU).

    Raises:
        ValueError: ``full`` has another shape than ``like`` (the mask of another layer).
    """
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"a mask of shape {tuple(full.shape)} cannot follow a parameter of shape {tuple(like.shape)}")
    shard = distribute_tensor(full.detach(), like.device_mesh, like.placements, src_data_rank=None)
    piece = local(shard)
    target = local(like)
    if piece.shape != target.shape:  # FSDP2 and DTensor both cut with torch.chunk; guard the assumption
        raise ValueError(f"mask slice {tuple(piece.shape)} differs from the parameter's slice {tuple(target.shape)}")
    if piece.device != target.device:
        piece = piece.to(target.device)
    return DTensor.from_local(piece, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def with_local(sharded: DTensor, piece: torch.Tensor) -> DTensor:
    """A ``DTensor`` laid out as ``sharded`` whose slice on this rank is ``piece``."""
    return DTensor.from_local(piece, sharded.device_mesh, sharded.placements, run_check=False,
                              shape=sharded.shape, stride=sharded.stride())


def _layout(tensor: DTensor) -> tuple:
    return tensor.device_mesh, tuple(tensor.placements)


@torch.no_grad()
def sum_over_shards(counts: list[torch.Tensor], like: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor counts taken on local slices, summed over the ranks that hold the other slices.

    Args:
        counts: one 0-d integer tensor per parameter, counted on this rank's slice.
        like: the parameters the counts were taken on (their layouts say what to sum over).

    Returns:
        A 1-d int64 tensor on the CPU, one global count per parameter, the same on every rank.
        One all-reduce per (mesh, placements) layout and sharded mesh dimension, whatever the
        number of parameters; none when nothing is sharded.
    """
    if not counts:
        return torch.zeros(0, dtype=torch.int64)
    groups: dict[tuple, list[int]] = {}
    for i, tensor in enumerate(like):
        key = _layout(tensor) if isinstance(tensor, DTensor) else None
        groups.setdefault(key, []).append(i)
    totals = torch.empty(len(counts), dtype=torch.int64)
    for key, indices in groups.items():  # insertion order: the same sequence of collectives on every rank
        values = torch.stack([counts[i].reshape(()).to(torch.int64) for i in indices])
        if key is not None:
            import torch.distributed as dist

            mesh, placements = key
            values = values.to(mesh.device_type if mesh.device_type != "cpu" else "cpu")
            for dim, placement in enumerate(placements):
                if isinstance(placement, Shard) or type(placement).__name__ == "_StridedShard":
                    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
        totals[indices] = values.cpu()
    return totals


@torch.no_grad()
def zero_fraction_over_ranks(layers: dict) -> float:
    """Exact zeros over the layers' weights, counted on each rank's slices and summed over the ranks.

    The same number as :func:`prunetune.masks.zero_fraction` on whole weights; equal on every rank.
    """
    weights = [module.weight for module in layers.values()]
    if not weights:
        return 0.0
    zeros = sum_over_shards([local(weight).eq(0).sum() for weight in weights], weights)
    total = sum(weight.numel() for weight in weights)  # a DTensor's numel is the global one
    return int(zeros.sum()) / total if total else 0.0


@torch.no_grad()
def all_ranks_true(flag: torch.Tensor, like: list[torch.Tensor]) -> bool:
    """A 0-d bool taken on local slices, and-ed over every rank when any of ``like`` is sharded."""
    sharded = next((t for t in like if isinstance(t, DTensor)), None)
    if sharded is None:
        return bool(flag)
    import torch.distributed as dist

    device = sharded.device_mesh.device_type
    value = flag.reshape(()).to(device=device, dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)  # every rank holds slices of these parameters
    return bool(value.item())


@torch.no_grad()
def unpack_kept(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The bool mask of ``shape`` that :func:`prunetune.masks.pack_kept` packed into ``packed``."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1  # (bytes, 8), most significant bit first
    numel = 1
    for size in shape:
        numel *= size
    return bits.reshape(-1)[:numel].bool().reshape(shape)


# --------------------------------------------------------------------------- what a launch may shard


def fsdp_settings(training_args) -> dict | None:
    """The FSDP plugin settings this run will get, or None without FSDP.

    From ``--fsdp`` / ``--fsdp_config`` (``TrainingArguments.fsdp_plugin_args``), else from the
    environment ``accelerate launch`` sets for an FSDP config file (``ACCELERATE_USE_FSDP``,
    ``FSDP_VERSION``, ...), with accelerate's defaults.
    """
    plugin = getattr(training_args, "fsdp_plugin_args", None)
    if training_args.fsdp and plugin:
        return dict(plugin)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("true", "1"):
        return None
    version = int(os.environ.get("FSDP_VERSION", "1"))
    return {"fsdp_version": version,
            "cpu_ram_efficient_loading": os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() in ("true", "1"),
            "state_dict_type": os.environ.get("FSDP_STATE_DICT_TYPE",
                                              "FULL_STATE_DICT" if version == 1 else "SHARDED_STATE_DICT")}


def check_sharding(method: str, training_args) -> None:
    """Refuse, before any work, the sharded setups whose masks or outputs prunetune cannot keep whole.

    Raises:
        UsageError: DeepSpeed with ``full``; FSDP version 1 or ``cpu_ram_efficient_loading`` with
            ``full``; ``masked_lora``, a sharded final state dict, a bitsandbytes optimizer or
            ``--do_eval`` under FSDP.
    """
    if method == "full" and training_args.deepspeed:
        raise UsageError(
            f"--recovery_method full with --deepspeed {training_args.deepspeed}: DeepSpeed ZeRO flattens the weights into "
            "partitions the masks cannot follow. Shard with FSDP2 instead (--fsdp full_shard, the Trainer's FSDP version 2), "
            "use DDP (torchrun / accelerate launch without a sharding config), or an adapter method.")
    mode = getattr(training_args, "parallel_mode", None)
    if training_args.fsdp and mode is not None and mode != ParallelMode.DISTRIBUTED:
        raise UsageError(
            f"--fsdp {_fsdp_flag(training_args)} needs several processes (FSDP shards the model over them), and this "
            "run is a single process. Launch it with torchrun --nproc_per_node N prunetune recover ... (or accelerate "
            "launch), or drop --fsdp to train in one process.")
    settings = fsdp_settings(training_args)
    if settings is None:
        return
    if training_args.use_cpu:
        logger.warning(
            "FSDP requested on a machine without an accelerator: accelerate shards only on GPUs (and similar devices), "
            "so this run is plain data parallelism (DDP, gloo) with whole weights on every process.")
    version = settings.get("fsdp_version", 1)
    if method == "full" and version != 2:
        raise UsageError(
            f"--recovery_method full with FSDP version {version}: FSDP1 flattens each wrapped module's weights into one "
            "flat parameter, which the masks cannot follow. Use FSDP version 2 (the Trainer's default: --fsdp full_shard, "
            "fsdp_config version 2; accelerate config: fsdp_version: 2).")
    if method == "masked_lora":
        raise UsageError(
            "--recovery_method masked_lora under FSDP: it trains, but the merged sparsity measured at the end of the run "
            "multiplies FSDP2's sharded adapter by whole masks and fails, so the run would not finish. Use DDP "
            "(torchrun / accelerate launch without a sharding config: a masked_lora adapter is small), or "
            "--recovery_method full or lora with FSDP2.")
    if method == "full" and settings.get("cpu_ram_efficient_loading"):
        raise UsageError(
            "--recovery_method full with FSDP cpu_ram_efficient_loading: only the main process would load the pruned "
            "weights, but every process takes its masks from the weights it loaded. Turn cpu_ram_efficient_loading off "
            "(the default).")
    state_dict = str(settings.get("state_dict_type", "FULL_STATE_DICT")).rsplit(".", 1)[-1].upper()
    if state_dict != "FULL_STATE_DICT":
        raise UsageError(
            f"FSDP state_dict_type {state_dict}: the recovered model or adapter is written as one whole folder "
            "(prunetune merge / eval read it), which needs state_dict_type FULL_STATE_DICT (the Trainer's default for "
            "--fsdp).")
    optim = optimizer_name(training_args)
    if optim in OPTIMIZERS and OPTIMIZERS[optim].bitsandbytes:
        raise UsageError(
            f"--optim {optim} under FSDP: bitsandbytes' optimizers step plain tensors and fail on FSDP2's sharded "
            "parameters (DTensor). Use adamw_torch_fused (the default) or adamw_torch: sharding already divides the "
            "optimizer state by the number of processes.")
    if training_args.do_eval:
        raise UsageError(
            "--do_eval under FSDP: the perplexity before and after training is scored on the main process alone, "
            "which a sharded model cannot do (every process must take part in its forward). Drop --do_eval and score "
            "the saved model afterwards: prunetune eval --model OUTPUT_DIR (for an adapter: --model BASE --lora_weights "
            "OUTPUT_DIR).")


def _fsdp_flag(training_args) -> str:
    """``--fsdp`` as given (the Trainer holds a list of ``FSDPOption``)."""
    value = training_args.fsdp
    items = value if isinstance(value, (list, tuple)) else [value]
    return " ".join(str(getattr(item, "value", item)) for item in items)
