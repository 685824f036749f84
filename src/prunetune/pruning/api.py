"""``prune(model, tokenizer, config) -> PruneReport``: the pruning stage of the pipeline.

Validates everything it can before touching the model (method, ratio, N:M, layer shapes,
sequence length, the sparsity profile), draws the calibration samples (or takes the token ids
it is given), with ``sparsity_profile="owl"`` measures the blocks' outlier ratios on the dense
model (:mod:`prunetune.pruning.owl`), runs the pruner -- block by block through
:mod:`prunetune.calibrate` when it needs data, layer by layer otherwise -- and reports what it
did, per-layer ratios of the profile included.

Example::

    from prunetune.pruning import PruneConfig, prune
    report = prune(model, tokenizer, PruneConfig(method="wanda", sparsity_ratio=0.5))
    print(report.sparsity.overall, report.seconds)
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import torch

from prunetune.calibrate import BlockTiming, CalibrationOptions, ReconstructOptions, prune_sequentially
from prunetune.data import calibration_samples, check_source, load_documents
from prunetune.errors import UsageError, require
from prunetune.evaluate import check_seqlen, default_seqlen
from prunetune.loading import check_device
from prunetune.masks import SparsityReport, measure_sparsity
from prunetune.modules import check_model, find_decoder_blocks, prunable_layers, weight_matrix, weight_param_shape
import prunetune.pruning.profile as profiles
from prunetune.pruning.base import Pruner
from prunetune.pruning.magnitude import MagnitudePruner
from prunetune.pruning.owl import block_outlier_ratios
from prunetune.pruning.sparsegpt import SparseGPTPruner
from prunetune.pruning.wanda import WandaPruner

logger = logging.getLogger(__name__)

PRUNERS: dict[str, type[Pruner]] = {
    "magnitude": MagnitudePruner,
    "wanda": WandaPruner,
    "sparsegpt": SparseGPTPruner,
}

DEFAULT_SEQLEN_CAP = 2048  # the papers calibrate with 2048-token windows
ALREADY_SPARSE = 0.01  # overall zero fraction above which a model counts as already pruned


@dataclass
class PruneConfig:
    """What to prune and how.

    Attributes:
        method: a registered pruner name (``magnitude``, ``wanda``, ``sparsegpt``).
        sparsity_ratio: fraction of weights to prune in [0, 1); None: N/M with N:M, else 0.5.
        sparsity_type: ``unstructured`` or ``N:M`` (at least N zeros in every M inputs).
        use_variant: Wanda's per-row cumulative-score variant (unstructured only).
        nsamples: calibration windows (the papers use 128).
        seqlen: tokens per window; None = the model's context, capped at 2048.
        seed: calibration sampling seed.
        calib_dataset: data source name or path (see :mod:`prunetune.data`).
        calibration_ids: explicit (n, seqlen) token ids; replaces calib_dataset/nsamples/seqlen.
        batch_size: calibration windows per block forward.
        device: where blocks run (e.g. ``cuda`` for a model kept in CPU memory); None = in place.
        offload_activations: keep calibration activations in CPU memory.
        true_sequential: prune each layer from the inputs the block *as pruned so far* gives
            it, in one block forward instead of two (faster; masks differ from the papers'
            reference, where every layer of a block sees the dense block's activations).
        targets: glob patterns of layers to prune (default: every linear in the blocks).
        ignore: glob patterns of layers to leave dense.
        options: extra pruner options, e.g. ``{"blocksize": 128, "percdamp": 0.01}`` for SparseGPT.
        sparsity_profile: how the ratio varies over layers (unstructured only): ``uniform``
            (None), ``owl``, or a JSON/YAML file (or a dict) of block index or layer glob ->
            ratio; see :mod:`prunetune.pruning.profile`. The overall sparsity stays the target.
        owl_m: OWL's outlier threshold, a multiple of the block's mean Wanda score.
        owl_lambda: OWL's largest deviation of a block's ratio from the target.
        reconstruct: right after pruning each block, train its kept weights (masks fixed) to
            reproduce the dense block's outputs on its calibration inputs, before those outputs
            feed the next block (see :mod:`prunetune.calibrate.reconstruct`); wanda and sparsegpt.
        reconstruct_epochs: with ``reconstruct``, passes over the calibration batches per block (default 3).
        reconstruct_lr: with ``reconstruct``, Adam's learning rate (default 1e-3).
        reconstruct_batch_size: with ``reconstruct``, windows per training step; the calibration
            pass then runs in batches of this size too (default: ``batch_size``).
        cache_dir: Hugging Face datasets cache.
        progress: show progress bars.
    """

    method: str = "wanda"
    sparsity_ratio: float | None = None
    sparsity_type: str = "unstructured"
    use_variant: bool = False
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    calib_dataset: str = "c4"
    calibration_ids: torch.Tensor | None = field(default=None, repr=False)
    batch_size: int = 8
    device: str | None = None
    offload_activations: bool = False
    true_sequential: bool = False
    targets: list[str] | None = None
    ignore: list[str] | None = None
    options: dict = field(default_factory=dict)
    sparsity_profile: str | dict | None = None
    owl_m: float = profiles.DEFAULT_OWL_M
    owl_lambda: float = profiles.DEFAULT_OWL_LAMBDA
    reconstruct: bool = False
    reconstruct_epochs: int | None = None  # None: ReconstructOptions' default
    reconstruct_lr: float | None = None
    reconstruct_batch_size: int | None = None  # None: batch_size
    cache_dir: str | None = None
    progress: bool = False

    def __post_init__(self):
        # Before any work: a GPU this machine lacks would otherwise fail after the calibration data is drawn.
        self.device = check_device(self.device, "--compute_device (PruneConfig.device)")
        self.pruner = build_pruner(self.method, self.sparsity_ratio, self.sparsity_type, self.use_variant, self.options)
        self.sparsity_ratio = self.pruner.ratio
        self.profile = profiles.parse_profile(self.sparsity_profile, self.sparsity_ratio, self.owl_m, self.owl_lambda,
                                              nm=self.pruner.structure.is_nm)
        require(not self.true_sequential or self.pruner.needs_calibration,
                f"true_sequential changes how calibration statistics are gathered; the {self.method} pruner uses none "
                "(accepted with wanda and sparsegpt).")
        require(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if self.calibration_ids is not None:
            ids = self.calibration_ids
            require(torch.is_tensor(ids) and ids.dim() == 2 and not ids.is_floating_point() and ids.numel() > 0,
                    "calibration_ids must be a non-empty integer tensor of shape (nsamples, seqlen), got "
                    f"{getattr(ids, 'shape', type(ids).__name__)}.")
            self.nsamples, self.seqlen = int(ids.shape[0]), int(ids.shape[1])
        require(isinstance(self.nsamples, int) and self.nsamples >= 1, f"nsamples must be a positive integer, got {self.nsamples!r}.")
        require(self.seqlen is None or (isinstance(self.seqlen, int) and self.seqlen >= 2),
                f"seqlen must be an integer >= 2 (or None for the model's context), got {self.seqlen!r}.")
        if self.needs_calibration and self.calibration_ids is None:
            check_source(self.calib_dataset, flag="--calib_dataset")
        self.reconstruction = _reconstruct_options(self)


    @property
    def needs_calibration(self) -> bool:
        """Calibration data is drawn: the pruner needs it, or OWL's statistics pass (magnitude too)."""
        return self.pruner.needs_calibration or self.profile.kind == profiles.OWL


def _reconstruct_options(config: PruneConfig) -> ReconstructOptions | None:
    """The validated reconstruction settings (None without ``reconstruct``)."""
    given = [f"--{k}" for k in ("reconstruct_epochs", "reconstruct_lr", "reconstruct_batch_size")
             if getattr(config, k) is not None]
    if not config.reconstruct:
        require(not given, f"{', '.join(given)}: only used with --reconstruct, which is off; pass --reconstruct too, "
                           f"or leave {'it' if len(given) == 1 else 'them'} out.")
        return None
    require(config.pruner.needs_calibration, f"--reconstruct trains each block on the calibration pass; the "
            f"{config.method} pruner makes none (accepted with wanda and sparsegpt).")
    defaults = ReconstructOptions()
    epochs = defaults.epochs if config.reconstruct_epochs is None else config.reconstruct_epochs
    lr = defaults.learning_rate if config.reconstruct_lr is None else config.reconstruct_lr
    require(isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1,
            f"--reconstruct_epochs must be a positive integer, got {epochs!r}.")
    require(isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < float("inf"),
            f"--reconstruct_lr must be a positive number, got {lr!r}.")
    size = config.reconstruct_batch_size
    require(size is None or (isinstance(size, int) and not isinstance(size, bool) and size >= 1),
            f"--reconstruct_batch_size must be a positive integer, got {size!r}.")
    return ReconstructOptions(epochs=epochs, learning_rate=float(lr), seed=config.seed)


def pruner_class(name: str) -> type[Pruner]:
    """The registered pruner called ``name``.

    Raises:
        UsageError: unknown name (the message lists the accepted ones).
    """
    if name not in PRUNERS:
        raise UsageError(f"Unknown pruning method {name!r}; accepted: {', '.join(PRUNERS)}.")
    return PRUNERS[name]


def build_pruner(method: str, ratio, structure, use_variant: bool = False, options: dict | None = None) -> Pruner:
    """A validated pruner from the registry (:data:`PRUNERS`)."""
    cls = pruner_class(method)
    try:
        return cls(ratio, structure, use_variant, **(options or {}))
    except TypeError as err:
        raise UsageError(f"Unknown option for the {method} pruner: {err}. Options: {dict(options or {})}.") from err


@dataclass
class PruneReport:
    """What :func:`prune` did (``to_dict`` gives the JSON written next to results)."""

    method: str
    sparsity_ratio: float
    sparsity_type: str
    use_variant: bool
    seconds: float
    sparsity: SparsityReport
    initial_sparsity: float = 0.0
    calibration: dict | None = None  # dataset, fingerprint, nsamples, seqlen, seed
    options: dict = field(default_factory=dict)
    block_timings: list[BlockTiming] = field(default_factory=list)
    true_sequential: bool = False
    profile: profiles.ProfileReport | None = None  # None: uniform
    reconstruction: dict | None = None  # with --reconstruct: settings and each block's error before/after

    @property
    def already_sparse(self) -> bool:
        return self.initial_sparsity > ALREADY_SPARSE

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "sparsity_ratio": self.sparsity_ratio,
            "sparsity_type": self.sparsity_type,
            "use_variant": self.use_variant,
            "true_sequential": self.true_sequential,
            "seconds": self.seconds,
            "initial_sparsity": self.initial_sparsity,
            "calibration": self.calibration,
            "options": self.options,
            "sparsity": self.sparsity.to_dict(),
            "sparsity_profile": self.profile.to_dict() if self.profile else {"kind": profiles.UNIFORM},
            "block_timings": [t.to_dict() for t in self.block_timings],
            **({"reconstruction": self.reconstruction} if self.reconstruction is not None else {}),
        }


def tokens_fingerprint(ids: torch.Tensor) -> str:
    """sha256 (16 hex digits) of explicit calibration token ids."""
    return hashlib.sha256(ids.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def check_layers(model, config: PruneConfig) -> dict[str, torch.nn.Module]:
    layers = prunable_layers(model, config.targets, config.ignore)  # UsageError if no blocks
    require(layers, f"No layer matches targets={config.targets} / ignore={config.ignore}; nothing to prune.")
    for name, module in layers.items():
        config.pruner.check_layer(name, weight_param_shape(module)[1])
        require(module.weight.device.type != "meta",
                f"Layer {name} has its weights offloaded (device 'meta'): pruning changes weights in place. "
                "Load the model into CPU or GPU memory (device_map without disk offload), and use "
                "--compute_device to run blocks on the accelerator.")
    if config.profile.kind == "mapping":
        _profile_ratios(model, layers, config, None)  # an unknown block or layer, an unreachable target: before any work
    return layers


def _profile_ratios(model, layers: dict[str, torch.nn.Module], config: PruneConfig,
                    outliers: dict[int, float] | None) -> profiles.ProfileReport:
    """Per-layer ratios of a non-uniform profile, shifted to meet the target exactly."""
    block_of, relative_of = {}, {}
    for block in find_decoder_blocks(model):
        for relative in block.linears:
            if block.qualified(relative) in layers:
                block_of[block.qualified(relative)] = block.index
                relative_of[block.qualified(relative)] = relative
    counts = {name: module.weight.numel() for name, module in layers.items()}
    spec, target = config.profile, config.sparsity_ratio
    owl = None
    if spec.kind == profiles.OWL:
        order = sorted(outliers)
        by_block = dict(zip(order, profiles.owl_block_ratios([outliers[b] for b in order], target, spec.owl_lambda)))
        raw = {name: by_block[block_of[name]] for name in layers}
        origin = {name: f"block {block_of[name]}" for name in layers}
        owl = {"m": spec.owl_m, "lambda": spec.owl_lambda, "outlier_ratios": {str(b): outliers[b] for b in order}}
    else:
        raw, origin = profiles.mapping_ratios(spec, {n: (block_of[n], relative_of[n]) for n in layers}, target)
    ratios = profiles.meet_target(raw, counts, target, origin)
    return profiles.ProfileReport(kind=spec.kind, target=target, layer_ratios=ratios, source=spec.source, owl=owl,
                                  block_ratios=profiles.block_means(ratios, counts, block_of))


def _calibration_ids(model, tokenizer, config: PruneConfig) -> tuple[torch.Tensor, dict]:
    if config.calibration_ids is not None:
        ids = config.calibration_ids
        check_seqlen(model, ids.shape[1])
        vocab = model.get_input_embeddings().num_embeddings
        require(int(ids.min()) >= 0 and int(ids.max()) < vocab,
                f"calibration_ids hold token ids outside the model's vocabulary [0, {vocab}).")
        return ids, {"dataset": "tokens", "fingerprint": tokens_fingerprint(ids),
                     "nsamples": ids.shape[0], "seqlen": ids.shape[1], "seed": None}
    require(tokenizer is not None, f"Calibrating on {config.calib_dataset!r} needs a tokenizer; pass one, or pass calibration_ids.")
    seqlen = config.seqlen or default_seqlen(model, cap=DEFAULT_SEQLEN_CAP)
    check_seqlen(model, seqlen)

    ids = calibration_samples(tokenizer, config.calib_dataset, config.nsamples, seqlen, seed=config.seed,
                              cache_dir=config.cache_dir, flag="--calib_dataset")
    fingerprint = load_documents(config.calib_dataset, "train", config.cache_dir, flag="--calib_dataset").fingerprint
    return ids, {"dataset": config.calib_dataset, "fingerprint": fingerprint, "nsamples": config.nsamples,
                 "seqlen": seqlen, "seed": config.seed}


def _reconstruction_summary(config: PruneConfig, timings: list[BlockTiming]) -> dict | None:
    if config.reconstruction is None:
        return None
    blocks = [{"block": t.block, **t.reconstruction, "seconds": t.reconstruct} for t in timings if t.reconstruction]
    return {"epochs": config.reconstruction.epochs, "learning_rate": config.reconstruction.learning_rate,
            "batch_size": config.reconstruct_batch_size or config.batch_size, "input_mode": "sparse", "blocks": blocks}


@torch.no_grad()
def prune(model, tokenizer=None, config: PruneConfig | None = None) -> PruneReport:
    """Prune ``model`` in place.

    Args:
        model: a Hugging Face causal LM (any architecture whose decoder blocks can be found).
        tokenizer: its tokenizer (needed unless the method is data-free or
            ``config.calibration_ids`` is given).
        config: what to do; default Wanda at 50% unstructured.

    Returns:
        A :class:`PruneReport` (per-module sparsity, time, calibration data and fingerprint).

    Raises:
        UsageError: a model that is not a torch module, bad configuration, layers that cannot
            take the structure, a model whose blocks cannot be found, calibration data that is
            missing or too small.
    """
    check_model(model)
    config = PruneConfig() if config is None else config
    require(isinstance(config, PruneConfig), f"config must be a PruneConfig, got {type(config).__name__}.")
    pruner = config.pruner
    layers = check_layers(model, config)
    initial = measure_sparsity(model)
    if initial.overall > ALREADY_SPARSE:
        logger.warning("The model is already %.1f%% sparse; its existing zeros stay pruned.", 100 * initial.overall)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    calibration, timings, profile = None, [], None
    try:
        if config.needs_calibration:
            ids, calibration = _calibration_ids(model, tokenizer, config)
            options = CalibrationOptions(batch_size=config.reconstruct_batch_size or config.batch_size,
                                         device=config.device, offload_activations=config.offload_activations,
                                         true_sequential=config.true_sequential, progress=config.progress,
                                         reconstruct=config.reconstruction)
        start = time.perf_counter()  # time the pruning, not the tokenization
        if not config.profile.uniform:
            outliers = None
            if config.profile.kind == profiles.OWL:
                outliers = block_outlier_ratios(model, ids, set(layers), config.profile.owl_m, options)
            profile = _profile_ratios(model, layers, config, outliers)
            if outliers is not None:
                profile.owl["statistics_seconds"] = time.perf_counter() - start
            pruner.layer_ratios = profiles.LayerRatios(profile.layer_ratios, layers)
        if pruner.needs_calibration:
            timings = prune_sequentially(model, ids, pruner, set(layers), options)
        else:
            for block in find_decoder_blocks(model):
                block_start = time.perf_counter()
                for relative, module in block.linears.items():
                    if block.qualified(relative) in layers:
                        pruner.prune_group([weight_matrix(module)])
                timings.append(BlockTiming(block.index, prune=time.perf_counter() - block_start))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        pruner.layer_ratios = None  # the config's pruner prunes uniformly again
        model.train(was_training)
    report = PruneReport(method=pruner.name, sparsity_ratio=pruner.ratio, sparsity_type=str(pruner.structure),
                         use_variant=pruner.use_variant, seconds=seconds, sparsity=measure_sparsity(model),
                         initial_sparsity=initial.overall, calibration=calibration, options=dict(config.options),
                         block_timings=timings, true_sequential=config.true_sequential, profile=profile,
                         reconstruction=_reconstruction_summary(config, timings))
    logger.info("%s: %.4f sparse in %.2fs", pruner.name, report.sparsity.overall, seconds)
    return report
