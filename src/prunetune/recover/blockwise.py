"""Block-wise reconstruction from the dense model: the local recovery of Shin et al. (EMNLP 2024).

"Rethinking Pruning Large Language Models: Benefits and Pitfalls of Reconstruction Error
Minimization" (https://arxiv.org/abs/2406.15524): with the masks fixed, each decoder block of
the pruned *student* is trained, in order, to reproduce the dense *teacher* block's output on
calibration text (Adam, normalised block-output MSE; the paper: 256 x 1024 C4 tokens, 10
epochs, lr 2e-4). Pruned weights stay exactly zero after every step, so unstructured and N:M
patterns survive. The driver::

    check: same block count, linear names and shapes          (UsageError before any work)
    capture both models' first-block inputs                   calibrate.capture
    for each window of k blocks (default 1):
        place its student and teacher blocks on the device    calibrate.blocks (streaming)
        targets = teacher window on the teacher's inputs
        student inputs: sparse | dense | mix (below)
        train the student window                              reconstruction.py
        write its weights to progress_dir (resume)
        propagate both streams through the window

Student inputs (``input_mode``):

* ``sparse``: the output of the already-reconstructed student blocks before the window (the
  student's own stream; what the model sees at inference);
* ``dense``: the teacher's activations at the window's input (the paper's better variant);
* ``mix``: ``mix_alpha * dense + (1 - mix_alpha) * sparse``, elementwise per batch.

Memory: the model stays where it is; only the window's blocks move to ``compute_device``,
with their gradients and Adam state. Activations (teacher and student stream, targets) stay
where they were captured: ``3 * nsamples * seqlen * hidden`` elements of the model's dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prunetune.calibrate import BlockInputs, CalibrationOptions, ExtrasCache, capture_inputs
from prunetune.calibrate.blocks import BlockPlacement
from prunetune.errors import UsageError
from prunetune.masks import MaskSet, measure_sparsity
from prunetune.modules import DecoderBlock, find_decoder_blocks, weight_matrix, weight_param_shape
from prunetune.recover.full import KEPT_BUFFER, MaskEnforcer
from prunetune.recover.reconstruction import LOSSES, outputs_and_error, reconstruction_error, train_window, window_outputs

logger = logging.getLogger(__name__)

INPUT_MODES = ("sparse", "dense", "mix")
RUN_FILE = "blockwise-run.json"  # the settings a progress folder belongs to


@dataclass
class BlockwiseConfig:
    """Settings of a block-wise reconstruction.

    Attributes:
        nsamples: calibration sequences used (the first ``nsamples`` rows of the ids given).
        seqlen: tokens per sequence (the first ``seqlen`` columns).
        epochs: passes over the training batches, per window.
        learning_rate: Adam's learning rate (no decay, no warm-up, as in the paper).
        batch_size: sequences per step.
        input_mode: ``sparse``, ``dense`` or ``mix`` (see the module docstring).
        mix_alpha: weight of the teacher's activations in ``mix`` mode, in [0, 1].
        window: consecutive blocks trained together; windows do not overlap.
        held_out: fraction of the sequences never trained on, where the error is also measured.
        compute_device: where each window trains (e.g. ``cuda``); None = where the blocks are.
        seed: shuffling of the batches (each window draws from its own seeded generator).
        loss: what training minimises: ``block`` (the block-output error normalised over the batch,
            the paper's) or ``token`` (each token's error over its own target norm, averaged).
    """

    # Defaults: measured on SmolLM2-135M after Wanda 50% (benchmarks/results/blockwise_*.json and
    # configs/smollm2-135m-blockwise.yaml): these settings win back 61% of the gap in 5.4 min on 2
    # CPU cores; sparse inputs beat dense ones at both budgets tried (54% vs 49%, 64% vs 59%); the
    # paper's lr 2e-4 is for ~10x more steps.
    nsamples: int = 128
    seqlen: int = 128
    epochs: int = 3
    learning_rate: float = 1e-3
    batch_size: int = 4
    input_mode: str = "sparse"
    mix_alpha: float = 0.5
    window: int = 1
    held_out: float = 0.1
    compute_device: str | None = None
    seed: int = 0
    loss: str = "block"

    def __post_init__(self):
        for name in ("nsamples", "seqlen", "epochs", "batch_size", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"Block-wise reconstruction: {name} must be a positive integer, got {value!r}.")
        if self.input_mode not in INPUT_MODES:
            raise UsageError(f"Block-wise reconstruction: input mode {self.input_mode!r} is not one of "
                             f"{', '.join(INPUT_MODES)}.")
        if not 0.0 <= self.mix_alpha <= 1.0:
            raise UsageError(f"Block-wise reconstruction: mix_alpha must lie in [0, 1], got {self.mix_alpha!r}.")
        if not 0.0 <= self.held_out < 1.0:
            raise UsageError(f"Block-wise reconstruction: held_out must lie in [0, 1), got {self.held_out!r}.")
        if self.loss not in LOSSES:
            raise UsageError(f"Block-wise reconstruction: loss {self.loss!r} is not one of {', '.join(LOSSES)}.")
        if not self.learning_rate > 0:
            raise UsageError(f"Block-wise reconstruction: learning_rate must be positive, got {self.learning_rate!r}.")

    @property
    def held_out_count(self) -> int:
        """Sequences held out: at least one when ``held_out > 0``, never all."""
        if self.held_out == 0:
            return 0
        return min(max(1, round(self.nsamples * self.held_out)), self.nsamples - 1)

    def fingerprint(self, calibration_ids: torch.Tensor) -> str:
        """What a progress folder must match: every setting but the device, and the token ids."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k != "compute_device"}
        if settings["loss"] == "block":  # the default: progress folders written before the option stay valid
            del settings["loss"]
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        digest.update(calibration_ids.to(torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


@dataclass
class WindowLoss:
    """Normalised reconstruction error of one window, before and after its training.

    ``train_*`` on the sequences trained on, ``held_*`` on the held-out ones (None without).
    """

    blocks: list[int]
    train_before: float
    train_after: float
    held_before: float | None
    held_after: float | None
    epoch_losses: list[float]
    seconds: float
    resumed: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BlockwiseReport:
    """What :func:`reconstruct` did: per-window losses, time, the sparsity of the result."""

    config: dict
    windows: list[WindowLoss] = field(default_factory=list)
    sparsity: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"config": self.config, "windows": [w.to_dict() for w in self.windows],
                "sparsity": self.sparsity, "seconds": self.seconds}


def check_same_architecture(student: nn.Module, teacher: nn.Module) -> tuple[list[DecoderBlock], list[DecoderBlock]]:
    """Both models' decoder blocks, refused unless their counts, linear names and shapes agree.

    Raises:
        UsageError: naming the first difference.
    """
    mine, theirs = find_decoder_blocks(student), find_decoder_blocks(teacher)
    if len(mine) != len(theirs):
        raise UsageError(f"The dense model has {len(theirs)} decoder blocks and the pruned model {len(mine)}: "
                         "block-wise reconstruction needs the dense model the pruned one was made from.")
    for a, b in zip(mine, theirs):
        shapes_a = {name: weight_param_shape(m) for name, m in a.linears.items()}
        shapes_b = {name: weight_param_shape(m) for name, m in b.linears.items()}
        if shapes_a != shapes_b:
            differ = sorted(set(shapes_a) ^ set(shapes_b)) or [n for n in shapes_a if shapes_a[n] != shapes_b[n]]
            name = differ[0]
            raise UsageError(f"Block {a.index} differs between the pruned and the dense model at {name} "
                             f"(pruned: {shapes_a.get(name, 'absent')}, dense: {shapes_b.get(name, 'absent')}): "
                             "block-wise reconstruction needs the dense model the pruned one was made from.")
    return mine, theirs


class Progress:
    """Finished windows in a folder: ``window-NNN.safetensors`` (the blocks' weights) + ``window-NNN.json``.

    The json is written after the weights, each by an atomic rename, so a window counts as
    finished only once both are complete. A folder written with other settings is refused.
    """

    def __init__(self, folder: str | Path, fingerprint: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        run_file = self.folder / RUN_FILE
        if run_file.exists():
            recorded = json.loads(run_file.read_text(encoding="utf-8")).get("fingerprint")
            if recorded != fingerprint:
                raise UsageError(f"The progress folder {self.folder} holds a block-wise run with other settings or "
                                 "calibration text; resume with the same ones, or start in an empty folder.")
        else:
            _write_atomic(run_file, lambda path: path.write_text(json.dumps({"fingerprint": fingerprint}), encoding="utf-8"))

    def _paths(self, start: int) -> tuple[Path, Path]:
        return self.folder / f"window-{start:03d}.safetensors", self.folder / f"window-{start:03d}.json"

    def load(self, start: int, blocks: list[DecoderBlock]) -> WindowLoss | None:
        """Load a finished window's weights into ``blocks``; its recorded losses, or None if unfinished."""
        weights, record = self._paths(start)
        if not record.exists():
            return None
        state = load_file(str(weights))
        for block in blocks:
            prefix = f"{block.index}."
            block.module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        loss = WindowLoss(**json.loads(record.read_text(encoding="utf-8")))
        loss.resumed = True
        return loss

    def save(self, start: int, blocks: list[DecoderBlock], loss: WindowLoss) -> None:
        weights, record = self._paths(start)
        state = {f"{block.index}.{name}": tensor.detach().cpu().contiguous()
                 for block in blocks for name, tensor in block.module.state_dict().items()}
        _write_atomic(weights, lambda path: save_file(state, str(path)))
        _write_atomic(record, lambda path: path.write_text(json.dumps(loss.to_dict()), encoding="utf-8"))


def _write_atomic(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


PARTS = ("train", "held")


@dataclass
class _Stream:
    """One model's activations at the current window's input, by part (training, held-out batches).

    ``extras`` are the extra block arguments of each batch (attention mask, rotary tables...).
    """

    hidden: dict[str, list[torch.Tensor]]
    extras: dict[str, list[tuple[tuple, dict]]]


def _capture(model: nn.Module, blocks: list[DecoderBlock], ids: dict[str, torch.Tensor], batch_size: int) -> _Stream:
    options = CalibrationOptions(batch_size=batch_size)
    captured = {part: capture_inputs(model, blocks, ids[part], options) if ids[part].shape[0] else BlockInputs()
                for part in PARTS}
    return _Stream({part: captured[part].hidden for part in PARTS}, {part: captured[part].extras for part in PARTS})


def _student_inputs(config: BlockwiseConfig, teacher: list[torch.Tensor], student: list[torch.Tensor] | None) -> list[torch.Tensor]:
    if config.input_mode == "dense":
        return teacher
    if config.input_mode == "sparse":
        return student
    return [torch.lerp(s, t.to(s.dtype), config.mix_alpha) for s, t in zip(student, teacher)]  # alpha t + (1 - alpha) s


def _calibration(calibration_ids: torch.Tensor, config: BlockwiseConfig) -> torch.Tensor:
    if calibration_ids.dim() != 2:
        raise UsageError(f"Calibration token ids must have shape (nsamples, seqlen); got {tuple(calibration_ids.shape)}.")
    n, t = calibration_ids.shape
    if n < config.nsamples or t < config.seqlen:
        raise UsageError(f"Block-wise reconstruction asks for {config.nsamples} x {config.seqlen} calibration tokens, "
                         f"but the ids given are {n} x {t}.")
    return calibration_ids[: config.nsamples, : config.seqlen].cpu()


def reconstruct(student: nn.Module, teacher: nn.Module, calibration_ids: torch.Tensor,
                config: BlockwiseConfig | None = None, progress_dir: str | Path | None = None) -> BlockwiseReport:
    """Train each window of the pruned ``student`` to reproduce the dense ``teacher``'s, in order.

    Args:
        student: the pruned model, trained in place; its zeros are the masks (taken once).
        teacher: the dense model it was pruned from; never modified.
        calibration_ids: token ids (n, t) with n >= ``config.nsamples``, t >= ``config.seqlen``;
            the last ``config.held_out_count`` sequences are held out.
        config: the settings (defaults: :class:`BlockwiseConfig`).
        progress_dir: after each window, its weights and losses are written here; a rerun with
            the same folder, settings and ids loads the finished windows instead of training them
            and ends with the same weights as an uninterrupted run.

    Raises:
        UsageError: different architectures, too few calibration ids, a progress folder of
            another run -- all before any training.
    """
    config = config or BlockwiseConfig()
    student_blocks, teacher_blocks = check_same_architecture(student, teacher)
    ids = _calibration(calibration_ids, config)
    progress = Progress(progress_dir, config.fingerprint(ids)) if progress_dir is not None else None
    modes = student.training, teacher.training
    student.eval()  # no dropout: targets and training are deterministic (and resumable)
    teacher.eval()
    try:
        return _reconstruct(student, teacher, student_blocks, teacher_blocks, ids, config, progress)
    finally:
        student.train(modes[0])
        teacher.train(modes[1])


def _reconstruct(student: nn.Module, teacher: nn.Module, student_blocks: list[DecoderBlock],
                 teacher_blocks: list[DecoderBlock], ids: torch.Tensor, config: BlockwiseConfig,
                 progress: Progress | None) -> BlockwiseReport:
    started = time.perf_counter()
    masks = MaskSet.from_zeros(student)
    split = len(ids) - config.held_out_count
    parts = {"train": ids[:split], "held": ids[split:]}
    teacher_stream = _capture(teacher, teacher_blocks, parts, config.batch_size)
    # the student's own stream: what it sees at inference; never an input in dense mode
    student_stream = None if config.input_mode == "dense" else _capture(student, student_blocks, parts, config.batch_size)
    extras = (student_stream or teacher_stream).extras
    report = BlockwiseReport(config=dataclasses.asdict(config))
    for start in range(0, len(student_blocks), config.window):
        window = student_blocks[start: start + config.window]
        modules = [block.module for block in window]
        teacher_modules = [block.module for block in teacher_blocks[start: start + config.window]]
        last = start + config.window >= len(student_blocks)
        tick = time.perf_counter()
        with ExitStack() as placed:
            for module in modules + teacher_modules:
                device = placed.enter_context(BlockPlacement(module, config.compute_device))
            cache, teacher_cache = ExtrasCache(device), ExtrasCache(device)
            targets = {part: window_outputs(teacher_modules, teacher_stream.hidden[part], teacher_stream.extras[part],
                                            teacher_cache) for part in PARTS}
            loss = progress.load(start, window) if progress is not None else None
            if loss is None:
                inputs = {part: _student_inputs(config, teacher_stream.hidden[part],
                                                student_stream.hidden[part] if student_stream else None) for part in PARTS}
                loss, outputs = _train_window(student, window, masks, config, start, inputs, targets, extras, cache)
                loss.seconds = time.perf_counter() - tick
                if progress is not None:
                    progress.save(start, window, loss)
            else:
                outputs = None
            if student_stream is not None and not last:
                for part in PARTS:  # sparse mode reuses the outputs its "after" error was measured on
                    student_stream.hidden[part] = (outputs[part] if outputs is not None else
                                                   window_outputs(modules, student_stream.hidden[part], extras[part], cache))
        teacher_stream = _Stream(targets, teacher_stream.extras)
        report.windows.append(loss)
        logger.info("blocks %s: held-out error %s -> %s, train %.4g -> %.4g, %.1fs%s", loss.blocks,
                    _fmt(loss.held_before), _fmt(loss.held_after), loss.train_before, loss.train_after,
                    loss.seconds, " (resumed)" if loss.resumed else "")
    _check_masks(student, masks)
    report.sparsity = measure_sparsity(student).overall
    report.seconds = time.perf_counter() - started
    return report


def _train_window(student: nn.Module, window: list[DecoderBlock], masks: MaskSet, config: BlockwiseConfig, start: int,
                  inputs: dict[str, list[torch.Tensor]], targets: dict[str, list[torch.Tensor]],
                  extras: dict[str, list], cache: ExtrasCache) -> tuple[WindowLoss, dict[str, list[torch.Tensor]] | None]:
    """Train one window in place: its losses, and in sparse mode its outputs on the student's stream."""
    modules = [block.module for block in window]
    before = {part: reconstruction_error(modules, inputs[part], targets[part], extras[part], cache) for part in PARTS}
    names = {block.qualified(relative) for block in window for relative in block.linears}
    enforcer = MaskEnforcer(student, MaskSet({name: masks.masks[name] for name in names}), remask="always")
    generator = torch.Generator().manual_seed(config.seed * 100_003 + start)  # per window: resumable
    try:
        epoch_losses = train_window(modules, enforcer, inputs["train"], targets["train"], extras["train"], cache,
                                    epochs=config.epochs, learning_rate=config.learning_rate, generator=generator,
                                    loss=config.loss)
    finally:
        for module in enforcer.layers.values():
            module._buffers.pop(KEPT_BUFFER, None)  # the mask buffers must not outlive the window
    keep = config.input_mode == "sparse"
    measured = {part: outputs_and_error(modules, inputs[part], targets[part], extras[part], cache, keep=keep) for part in PARTS}
    loss = WindowLoss([block.index for block in window], before["train"], measured["train"][1], before["held"],
                      measured["held"][1], epoch_losses, seconds=0.0)
    return loss, ({part: measured[part][0] for part in PARTS} if keep else None)


@torch.no_grad()
def _check_masks(student: nn.Module, masks: MaskSet) -> None:
    """Every pruned weight is still exactly zero (an internal invariant: a failure is a bug)."""
    revived = {name: int((weight_matrix(module)[~masks.masks[name]] != 0).sum())
               for name, module in masks.layers(student).items()}
    revived = {name: count for name, count in revived.items() if count}
    if revived:
        raise RuntimeError(f"block-wise reconstruction revived pruned weights: {revived}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
