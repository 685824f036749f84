"""Sequential, block-by-block calibration: the driver every data-aware pruner runs on.

As in the SparseGPT and Wanda papers, the decoder is pruned one block at a time:

1. **capture** -- the calibration token ids go through the model until the first decoder
   block; a forward pre-hook on it records its inputs and whatever the architecture passes
   besides (attention mask, position ids, rotary ``position_embeddings``, cache position,
   ...), then stops the forward. Nothing here names a model family;
2. **statistics** -- each block runs on the calibration activations in batches, with hooks
   on its prunable layers that feed the pruner's statistic in fp32. Layers that read the
   same input tensor (q/k/v; gate/up) are detected by tensor identity and share one
   statistic. Once every hooked layer has seen its input the forward stops early: the last
   layer's output and the block's output are not needed in this pass;
3. **prune** -- the pruner chooses masks (and updates weights) for each group;
4. **propagate** -- the pruned block re-runs on the same activations; its outputs replace
   them in place and become the next block's inputs (one activation buffer, not two).

That is the papers' schedule: every layer of a block is calibrated on the *dense* block's
activations, at the cost of about 1.8 block forwards per block (the statistics pass stops
before the last layer's matmul). With ``true_sequential`` (:class:`SequentialPruning`) each
layer is instead pruned right before it first runs, from the inputs the block *as pruned so
far* gives it (o_proj after the pruned q/k/v, down_proj after the pruned gate/up), and the
same forward produces the next block's inputs: one block forward per block. The batches run
in lock step (:mod:`prunetune.lockstep`), so what must be kept for all batches at once is
only what the block's forward holds at a layer's input: for a Llama block about six
hidden-sized activations per token at o_proj (block input, normed input, q/k/v, attention
output) -- some 12 GiB for 128 x 2048 tokens of a 7B model in fp16 -- against one batch's
forward for the default schedule.

Memory: calibration activations take ``nsamples * seqlen * hidden`` elements in the
model's dtype (2 GiB for 128 x 2048 tokens of a 7B model in fp16), on the compute device or,
with ``offload_activations``, in CPU memory. With ``device`` set to an accelerator while the
model sits in CPU memory, only the block being pruned is moved there, so peak accelerator
memory is one block's weights + its statistics + one batch's forward + the pruner's work.
For a Llama-2-7B block in fp16 with batches of 8 x 2048 tokens that is, by count, 0.4 GiB of
weights, 0.6 GiB of SparseGPT Hessians (Wanda: 0.1 MiB of norms), about 1.5 GiB for the
batch forward and under 1 GiB of SparseGPT working memory: roughly 3 GiB (SparseGPT) and
2 GiB (Wanda), plus 2 GiB if the activations are not offloaded. These are estimates;
``benchmarks/prune_bench.py --device cuda --stream_blocks`` measures them. Models dispatched
with a ``device_map`` run each block where accelerate placed it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from prunetune import lockstep
from prunetune.errors import UsageError
from prunetune.modules import DecoderBlock, find_decoder_blocks, weight_matrix, weight_param_shape

logger = logging.getLogger(__name__)


@dataclass
class CalibrationOptions:
    """How calibration runs.

    Attributes:
        batch_size: calibration samples per block forward.
        device: where blocks run (e.g. ``cuda``); None = where each block already is.
        offload_activations: keep calibration activations in CPU memory between blocks.
        early_stop: end the statistics forward once every hooked layer has seen its input.
        true_sequential: prune each layer right before it first runs, from the inputs the
            block *as pruned so far* gives it, in a single block forward (see
            :class:`SequentialPruning`); default: every layer of a block is calibrated on the
            dense block's activations, then the block re-runs (the papers' reference).
        progress: show a progress bar over blocks.
    """

    batch_size: int = 8
    device: str | torch.device | None = None
    offload_activations: bool = False
    early_stop: bool = True
    true_sequential: bool = False
    progress: bool = False


@dataclass
class BlockTiming:
    """Seconds spent on one block (``statistics`` includes its forward pass; with
    ``true_sequential`` it is the block's only forward, which also propagates)."""

    block: int
    statistics: float = 0.0
    prune: float = 0.0
    propagate: float = 0.0

    @property
    def total(self) -> float:
        return self.statistics + self.prune + self.propagate

    def to_dict(self) -> dict:
        return {"block": self.block, "statistics": self.statistics, "prune": self.prune,
                "propagate": self.propagate, "total": self.total}


class _Stop(Exception):
    """Raised inside a forward to end it early (capture, statistics)."""


@dataclass
class BlockInputs:
    """Calibration activations entering a block, in batches.

    Attributes:
        hidden: per batch, hidden states (B, T, hidden); replaced in place block by block.
        extras: per batch, (extra positional args, keyword args) the first block received;
            identical tensors across batches are stored once.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    extras: list[tuple[tuple, dict]] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(h.shape[0] for h in self.hidden)


def _map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


class _TensorPool:
    """Stores equal tensors once (masks and rotary tables repeat for every batch)."""

    def __init__(self):
        self.tensors: list[torch.Tensor] = []

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        for known in self.tensors:
            if known.shape == tensor.shape and known.dtype == tensor.dtype and known.device == tensor.device \
                    and torch.equal(known, tensor):
                return known
        self.tensors.append(tensor)
        return tensor


def _storage_device(options: CalibrationOptions, fallback: torch.device) -> torch.device:
    return torch.device("cpu") if options.offload_activations else fallback


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: list[DecoderBlock], token_ids: torch.Tensor,
                   options: CalibrationOptions) -> BlockInputs:
    """Run the model up to its first decoder block and record what that block receives."""
    from prunetune.evaluate import model_device

    input_device = model_device(model)
    inputs = BlockInputs()
    pool = _TensorPool()

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        storage = _storage_device(options, hidden.device)
        stored = hidden.detach().to(storage)
        if storage.type == "cpu" and torch.cuda.is_available():
            stored = stored.pin_memory()  # fast, asynchronous uploads to the accelerator
        inputs.hidden.append(stored)
        inputs.extras.append((_map_tensors(tuple(args[1:]), pool), _map_tensors(kwargs, pool)))
        raise _Stop

    handle = blocks[0].module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for start in range(0, token_ids.shape[0], options.batch_size):
            batch = token_ids[start : start + options.batch_size].to(input_device)
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(inputs.hidden) != -(-token_ids.shape[0] // options.batch_size):
        raise RuntimeError(f"the first decoder block ({blocks[0].name}) did not run during the model's forward")
    return inputs


def is_dispatched(block: nn.Module) -> bool:
    """True when accelerate hooks (``device_map``) place and move this block's weights."""
    return any(hasattr(m, "_hf_hook") for m in block.modules())


class _BlockPlacement:
    """Moves a block to the compute device for its turn and back afterwards."""

    def __init__(self, block: nn.Module, device: torch.device | None):
        self.block = block
        params = list(block.parameters())
        self.home = params[0].device if params else torch.device("cpu")
        self.device = self.home if device is None or is_dispatched(block) else torch.device(device)
        self.moves = self.device != self.home

    def __enter__(self) -> torch.device:
        if self.moves:
            self.block.to(self.device)
        return self.device

    def __exit__(self, *exc) -> None:
        if self.moves:
            self.block.to(self.home)


class _ExtrasCache:
    """Extra block arguments moved to one device, converted once per distinct object."""

    def __init__(self, device: torch.device):
        self.device = device
        self.moved: dict[int, tuple[tuple, dict]] = {}
        self.pool = _TensorPool()
        self.by_tensor: dict[int, torch.Tensor] = {}

    def __call__(self, extras: tuple[tuple, dict]) -> tuple[tuple, dict]:
        key = id(extras)
        if key not in self.moved:
            self.moved[key] = _map_tensors(extras, self._move)
        return self.moved[key]

    def _move(self, tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in self.by_tensor:
            self.by_tensor[id(tensor)] = tensor.to(self.device, non_blocking=True)
        return self.by_tensor[id(tensor)]


def _run_block(block: nn.Module, hidden: torch.Tensor, extras: tuple[tuple, dict], device: torch.device):
    args, kwargs = extras
    output = block(hidden.to(device, non_blocking=True), *args, **kwargs)
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerStatistics:
    """Forward pre-hooks that feed one statistic per distinct input tensor of a block's layers.

    Groups are found on the first batch by tensor identity (``is``): layers whose pre-hooks
    see the very same tensor object in one forward share a statistic. Later batches update
    each statistic once, through its group's first layer.
    """

    def __init__(self, layers: dict[str, nn.Module], new_statistic, early_stop: bool):
        self.layers = layers
        self.new_statistic = new_statistic
        self.early_stop = early_stop
        self.groups: list[tuple[list[str], object]] = []  # (layer names, statistic)
        self.leader: dict[str, object | None] = {}  # name -> statistic it updates (None: shares)
        self.seen: list[tuple[weakref.ref, int]] = []  # first batch: (input, group index)
        self.fired: set[str] = set()
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):
        def hook(module, args):
            inputs = args[0]
            if name not in self.leader:
                self._assign(name, module, inputs)
            statistic = self.leader[name]
            if statistic is not None:
                statistic.update(inputs.detach())
            self.fired.add(name)
            if self.early_stop and len(self.fired) == len(self.layers):
                raise _Stop

        return hook

    def _assign(self, name: str, module: nn.Module, inputs: torch.Tensor) -> None:
        for ref, index in self.seen:
            if ref() is inputs:
                self.groups[index][0].append(name)
                self.leader[name] = None
                return
        statistic = self.new_statistic(weight_param_shape(module)[1], module.weight.device)
        self.seen.append((weakref.ref(inputs), len(self.groups)))
        self.groups.append(([name], statistic))
        self.leader[name] = statistic

    def run(self, block: nn.Module, inputs: BlockInputs, device: torch.device, extras: _ExtrasCache) -> None:
        for hidden, extra in zip(inputs.hidden, inputs.extras):
            self.fired.clear()
            try:
                _run_block(block, hidden, extras(extra), device)
            except _Stop:
                pass
            self.seen.clear()  # identities only mean something within one forward

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class SequentialPruning:
    """Forward pre-hooks that prune every layer right before it first runs ("true sequential").

    The block runs once, batch by batch in lock step (:mod:`prunetune.lockstep`). When a
    layer's pre-hook sees an input tensor that is new in this forward, the batch adds it to
    a fresh statistic and pauses; once every batch has done so the statistic is finished.
    The first batch past the pause prunes the layer -- together with the layers known to
    read the same tensor (``groups``: q/k/v, gate/up), so that SparseGPT solves them as one
    stacked system -- and those layers reuse the statistic without pausing. So each layer's
    statistic comes from the block *as pruned so far* -- o_proj sees the output of the pruned
    q/k/v -- and the pruned block's outputs come out of the same forward: one block forward
    instead of two.

    Args:
        layers: the block's layers to prune, by relative name.
        pruner: the :class:`~prunetune.pruning.base.Pruner`.
        groups: relative names of layers that read one input tensor (from
            :func:`probe_groups`); a layer in none is pruned alone. Checked during the forward:
            a layer of a group that turns out to read another tensor is an error.
        stop_when_done: end each forward once every layer is pruned (the last block's
            outputs are not needed).
    """

    def __init__(self, layers: dict[str, nn.Module], pruner, groups: list[list[str]] | None = None,
                 stop_when_done: bool = False):
        self.layers = layers
        self.pruner = pruner
        self.group_of = {name: group for group in groups or [] for name in group}
        self.stop_when_done = stop_when_done
        self.statistics: list = []  # by order of first appearance of the input
        self.groups: list[list[str]] = []  # layer names pruned from each statistic
        self.pruned: dict[str, int] = {}  # layer name -> index of the statistic it was pruned with
        self.prune_seconds = 0.0
        self.local = threading.local()  # per batch (one thread each): inputs seen in this forward
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):
        def hook(module, args):
            inputs = args[0]
            # weak references: holding the inputs would keep them alive for all batches at once
            seen = self.local.__dict__.setdefault("seen", [])
            index = next((i for i, ref in enumerate(seen) if ref() is inputs), None)
            if index is None:  # a new input: every batch contributes before anyone prunes
                index = len(seen)
                seen.append(weakref.ref(inputs))
                if index == len(self.statistics):
                    self.statistics.append(self.pruner.new_statistic(weight_param_shape(module)[1], module.weight.device))
                    self.groups.append([])
                self.statistics[index].update(inputs.detach())
                lockstep.pause(index)
            if name not in self.pruned:
                members = [n for n in self.group_of.get(name, [name]) if n in self.layers and n not in self.pruned]
                self._prune(members if name in members else [name], index)
            elif self.pruned[name] != index:
                raise RuntimeError(f"{name} was pruned with the layers it read the same input as in the probe "
                                   f"({', '.join(self.group_of.get(name, [name]))}), but reads another tensor here")
            if self.stop_when_done and len(self.pruned) == len(self.layers):
                raise _Stop

        return hook

    def finish_statistic(self, index: int) -> None:
        """The barrier: every batch has added its input to statistic ``index``."""
        self.statistics[index].finish()

    def _prune(self, names: list[str], index: int) -> None:
        device = self.layers[names[0]].weight.device
        _synchronize(device)
        start = time.perf_counter()
        self.pruner.prune_group([weight_matrix(self.layers[n]) for n in names], self.statistics[index])
        _synchronize(device)
        self.prune_seconds += time.perf_counter() - start
        self.pruned.update(dict.fromkeys(names, index))
        self.groups[index].extend(names)

    def run(self, block: nn.Module, inputs: BlockInputs, device: torch.device, extras: _ExtrasCache) -> None:
        """One lock-step forward over all batches; outputs replace ``inputs`` (unless stopped)."""

        def forward(index: int, hidden: torch.Tensor, extra) -> None:
            try:
                output = _run_block(block, hidden, extras(extra), device)
            except _Stop:
                return
            _store_output(inputs, index, hidden, output)

        calls = [functools.partial(forward, i, h, e) for i, (h, e) in enumerate(zip(inputs.hidden, inputs.extras))]
        try:
            lockstep.Lockstep(calls, self.finish_statistic).run()
        except lockstep.LockstepError as err:
            raise UsageError(f"--true_sequential needs every calibration batch to run the same layers of a block "
                             f"in the same order, and this model's blocks do not ({err}; mixture-of-experts routing "
                             "does this). Prune without --true_sequential.") from err
        missing = set(self.layers) - set(self.pruned)
        if missing:
            raise UsageError(f"--true_sequential: layers {sorted(missing)} did not run in the block's forward on the "
                             "calibration data, so they cannot be calibrated. Prune without --true_sequential, or "
                             "leave them out with --ignore.")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def probe_groups(block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs, device: torch.device,
                 extras: _ExtrasCache) -> list[list[str]]:
    """Which layers read the same input tensor, from one batch through the dense block (no statistics)."""
    hooks = LayerStatistics(layers, lambda in_features, device: None, early_stop=not is_dispatched(block))
    try:
        hooks.run(block, BlockInputs(inputs.hidden[:1], inputs.extras[:1]), device, extras)
    finally:
        hooks.remove()
    return [names for names, _ in hooks.groups]


@torch.no_grad()
def propagate(block: nn.Module, inputs: BlockInputs, device: torch.device, extras: _ExtrasCache) -> None:
    """Replace every batch of ``inputs`` by the block's outputs on it."""
    for index, (hidden, extra) in enumerate(zip(inputs.hidden, inputs.extras)):
        output = _run_block(block, hidden, extras(extra), device)
        _store_output(inputs, index, hidden, output)


def _store_output(inputs: BlockInputs, index: int, hidden: torch.Tensor, output: torch.Tensor) -> None:
    """The block's output for batch ``index`` becomes the next block's input.

    Written into the input's own buffer when it fits (the block has consumed it): offloaded
    activations stay in their pinned CPU memory, so every block's uploads are fast ones.
    A copy into pinned memory may be asynchronous: the next read of the buffer is an upload
    on the same CUDA stream, which runs after it. Pageable CPU memory is copied synchronously.
    """
    if output.shape == hidden.shape and output.dtype == hidden.dtype and output.data_ptr() != hidden.data_ptr():
        asynchronous = hidden.device.type != "cpu" or hidden.is_pinned()
        hidden.copy_(output, non_blocking=asynchronous and output.device.type == "cuda")
    else:
        inputs.hidden[index] = output.to(hidden.device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prune_sequentially(model: nn.Module, token_ids: torch.Tensor, pruner, layer_names: set[str] | None = None,
                       options: CalibrationOptions | None = None) -> list[BlockTiming]:
    """Calibrate and prune every decoder block in order; returns per-block timings.

    Args:
        model: a causal LM whose decoder blocks :func:`find_decoder_blocks` can find.
        token_ids: calibration token ids, (nsamples, seqlen).
        pruner: a :class:`prunetune.pruning.base.Pruner` that needs calibration.
        layer_names: qualified names of the layers to prune (default: all prunable layers).
        options: batching, devices, offloading.
    """
    options = options or CalibrationOptions()
    blocks = find_decoder_blocks(model)
    timings = []
    inputs = capture_inputs(model, blocks, token_ids, options)
    probed: dict[tuple[str, ...], list[list[str]]] = {}  # true_sequential: layers sharing an input
    for block in tqdm(blocks, desc=f"{pruner.name} blocks", unit="block", disable=not options.progress):
        layers = {rel: m for rel, m in block.linears.items() if layer_names is None or block.qualified(rel) in layer_names}
        timing = BlockTiming(block.index)
        with _BlockPlacement(block.module, options.device) as device:
            extras = _ExtrasCache(device)
            start = time.perf_counter()
            last = block.index == len(blocks) - 1
            # accelerate's post-forward hooks must run, so dispatched blocks are never cut short
            early_stop = options.early_stop and not is_dispatched(block.module)
            if layers and options.true_sequential:
                structure = tuple(layers)
                if structure not in probed:  # once per block structure (usually once per model)
                    probed[structure] = probe_groups(block.module, layers, inputs, device, extras)
                hooks = SequentialPruning(layers, pruner, probed[structure], stop_when_done=last and early_stop)
                try:
                    hooks.run(block.module, inputs, device, extras)
                finally:
                    hooks.remove()
                _synchronize(device)
                timing.prune = hooks.prune_seconds
                timing.statistics = time.perf_counter() - start - hooks.prune_seconds  # the one forward
                for names in hooks.groups:
                    logger.debug("%s: pruned %s from one input", block.name, ", ".join(names))
                del hooks
            elif layers:
                hooks = LayerStatistics(layers, pruner.new_statistic, early_stop)
                try:
                    hooks.run(block.module, inputs, device, extras)
                finally:
                    hooks.remove()
                _synchronize(device)
                timing.statistics = time.perf_counter() - start
                start = time.perf_counter()
                for names, statistic in hooks.groups:
                    pruner.prune_group([weight_matrix(layers[n]) for n in names], statistic)
                    statistic.derived.clear()  # e.g. SparseGPT's factor: one group's at a time
                    logger.debug("%s: pruned %s together", block.name, ", ".join(names))
                del hooks
                _synchronize(device)
                timing.prune = time.perf_counter() - start
            start = time.perf_counter()
            # the last block's outputs feed nothing we prune; true_sequential already propagated
            if not last and not (layers and options.true_sequential):
                propagate(block.module, inputs, device, extras)
            _synchronize(device)
            timing.propagate = time.perf_counter() - start
        timings.append(timing)
        logger.info("block %d: statistics %.2fs, prune %.2fs, propagate %.2fs", block.index,
                    timing.statistics, timing.prune, timing.propagate)
    return timings


@torch.no_grad()
def forward_blocks(model: nn.Module, token_ids: torch.Tensor, options: CalibrationOptions | None = None) -> float:
    """One plain calibration pass (capture, then every block once); returns its seconds.

    The reference cost a pruner is compared with: a data-aware pruner needs two block
    forwards per block (statistics, propagate).
    """
    options = options or CalibrationOptions()
    blocks = find_decoder_blocks(model)
    start = time.perf_counter()
    inputs = capture_inputs(model, blocks, token_ids, options)
    for block in blocks:
        with _BlockPlacement(block.module, options.device) as device:
            propagate(block.module, inputs, device, _ExtrasCache(device))
            _synchronize(device)
    return time.perf_counter() - start
