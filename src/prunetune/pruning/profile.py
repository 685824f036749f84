"""Layer-wise sparsity profiles: how much of each layer to prune when the ratio is not uniform.

A profile turns one target ratio into per-layer ratios. Three kinds:

* ``uniform`` (the default): every layer at the target, as the papers prune;
* ``owl``: Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024, arXiv:2310.05175).
  Blocks with more outliers keep more weights; the outlier ratios come from a dense
  statistics pass (:mod:`prunetune.pruning.owl`);
* a mapping (a JSON/YAML file for the CLI), ``block index or layer glob -> ratio``, e.g. an
  AlphaPruning or BESA allocation. A layer glob beats a block index; among globs the last
  matching entry wins; layers no entry names start at the target.

Exact accounting, whatever the block shapes: the ratios are shifted by one common amount so
that their mean *weighted by each layer's weight count* is the target; each layer then prunes
``floor(ratio * numel)`` weights, so the model's overall sparsity is the target to within one
weight per layer. A profile that needs a ratio outside [0, 1) to meet the target is refused
(:class:`~prunetune.errors.UsageError`, naming the entry) before any weight changes.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import nn

from prunetune.config import load_mapping
from prunetune.errors import UsageError, require

UNIFORM = "uniform"
OWL = "owl"
DEFAULT_OWL_M = 5.0  # the paper's M: an outlier scores above 5x its block's mean (Yin et al., section 4)
DEFAULT_OWL_LAMBDA = 0.08  # the paper's lambda for LLaMA at 70%: block ratios within about +-8 points


@dataclass
class ProfileSpec:
    """A parsed profile, before it meets a model.

    Attributes:
        kind: ``uniform``, ``owl`` or ``mapping``.
        source: the file the mapping came from (None: given in code or not a mapping).
        entries: mapping kind: block index (int) or layer glob (str) -> ratio, in the given order.
        owl_m: OWL's outlier threshold, a multiple of the block's mean score.
        owl_lambda: OWL's largest deviation from the target (half the width of the spread).
    """

    kind: str = UNIFORM
    source: str | None = None
    entries: dict[int | str, float] = field(default_factory=dict)
    owl_m: float = DEFAULT_OWL_M
    owl_lambda: float = DEFAULT_OWL_LAMBDA

    @property
    def uniform(self) -> bool:
        return self.kind == UNIFORM


def _check_ratio(value, where: str) -> float:
    require(isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value < 1,
            f"Sparsity profile {where} has ratio {value!r}; accepted: a number in [0, 1) (the fraction of the "
            "layer's weights to prune).")
    return float(value)


def _entry_key(key, where: str) -> int | str:
    if isinstance(key, bool):
        key = str(key)
    if isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit()):
        return int(key)
    require(isinstance(key, str) and key.strip(),
            f"Sparsity profile {where} has key {key!r}; accepted: a block index (0, 1, ...) or a layer glob "
            "such as 'model.layers.3.*' or 'mlp.down_proj'.")
    return key.strip()


def parse_profile(value, target: float, owl_m: float = DEFAULT_OWL_M, owl_lambda: float = DEFAULT_OWL_LAMBDA,
                  nm: bool = False) -> ProfileSpec:
    """Validate a profile setting without a model.

    Args:
        value: None or ``"uniform"``, ``"owl"``, a JSON/YAML file path, or a mapping.
        target: the overall sparsity ratio the profile must meet.
        owl_m: OWL's M (> 0).
        owl_lambda: OWL's lambda, in [0, 0.5).
        nm: the structure is N:M (then only uniform is accepted).

    Raises:
        UsageError: an unknown keyword, a missing or malformed file, a bad key or ratio, OWL
            settings out of range, or any non-uniform profile with N:M.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == UNIFORM):
        return ProfileSpec()
    require(not nm, f"--sparsity_profile {value if isinstance(value, str) else 'mapping'} cannot be combined with "
            "N:M sparsity: the N:M pattern fixes every layer's ratio at N/M (every group of M weights loses N). "
            "Use unstructured sparsity for a non-uniform profile.")
    if isinstance(value, str) and value.strip().lower() == OWL:
        require(isinstance(owl_m, numbers.Real) and not isinstance(owl_m, bool) and owl_m > 0,
                f"--owl_m must be a positive number (a multiple of the block's mean score), got {owl_m!r}.")
        require(isinstance(owl_lambda, numbers.Real) and not isinstance(owl_lambda, bool) and 0 <= owl_lambda < 0.5,
                f"--owl_lambda must be a number in [0, 0.5) (the largest deviation from the target), got {owl_lambda!r}.")
        require(target - owl_lambda >= 0 and target + owl_lambda < 1,
                f"OWL spreads block ratios over [target - lambda, target + lambda] = [{target - owl_lambda:g}, "
                f"{target + owl_lambda:g}], outside [0, 1); lower --owl_lambda or change --sparsity_ratio.")
        return ProfileSpec(OWL, owl_m=float(owl_m), owl_lambda=float(owl_lambda))
    source = None
    if isinstance(value, str):
        source = value
        try:
            value = load_mapping(value)
        except UsageError as err:
            raise UsageError(f"--sparsity_profile {source!r} is neither 'uniform', 'owl' nor a readable profile file: "
                             f"{err}") from err
    require(isinstance(value, dict) and value,
            f"A sparsity profile must be 'uniform', 'owl' or a non-empty mapping of block index or layer glob to "
            f"ratio, got {type(value).__name__}.")
    where = f"file {source}" if source else "mapping"
    entries: dict[int | str, float] = {}
    for key, ratio in value.items():
        entry = _entry_key(key, f"{where}, entry {key!r},")
        entries[entry] = _check_ratio(ratio, f"{where}, entry {key!r},")
    return ProfileSpec("mapping", source=source, entries=entries)


def _glob_matches(pattern: str, name: str, relative: str) -> bool:
    last = relative.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(candidate, pattern) for candidate in (name, relative, last))


def mapping_ratios(spec: ProfileSpec, layers: dict[str, tuple[int, str]], target: float) -> tuple[dict[str, float], dict[str, str]]:
    """Raw per-layer ratios of a mapping profile (before the shift to the target).

    Args:
        spec: a ``mapping`` profile.
        layers: qualified name -> (block index, name inside the block) of the layers to prune.
        target: the ratio of layers no entry names.

    Returns:
        (ratio by layer, the entry that set it by layer -- ``"target"`` where none did).

    Raises:
        UsageError: a block index the model lacks, or a glob that matches no layer to prune.
    """
    blocks = sorted({block for block, _ in layers.values()})
    ratios = dict.fromkeys(layers, target)
    origin = dict.fromkeys(layers, "target")
    where = f"file {spec.source}" if spec.source else "mapping"
    for key, ratio in spec.entries.items():  # block indices first: any glob beats them
        if isinstance(key, int):
            require(key in blocks, f"Sparsity profile {where}, entry {key!r}: no block {key} has layers to prune "
                    f"(blocks with layers to prune: {blocks[0]}-{blocks[-1]}).")
            for name, (block, _) in layers.items():
                if block == key and origin[name] == "target":
                    ratios[name], origin[name] = ratio, str(key)
    for key, ratio in spec.entries.items():
        if isinstance(key, str):
            matched = [name for name, (_, relative) in layers.items() if _glob_matches(key, name, relative)]
            example = next(iter(layers))
            require(matched, f"Sparsity profile {where}, entry {key!r}: matches no layer to prune (layer names look "
                    f"like {example!r}; a glob may also match the name inside the block or its last part).")
            for name in matched:
                ratios[name], origin[name] = ratio, key
    return ratios, origin


def meet_target(ratios: dict[str, float], counts: dict[str, int], target: float,
                origin: dict[str, str] | None = None) -> dict[str, float]:
    """Shift all ratios by one amount so that their weight-count-weighted mean is ``target``.

    Raises:
        UsageError: a shifted ratio outside [0, 1) (naming the entry it came from).
    """
    total = sum(counts.values())
    shift = (target * total - sum(ratios[name] * counts[name] for name in ratios)) / total
    shifted = {}
    for name, ratio in ratios.items():
        value = ratio + shift
        if abs(value) < 1e-12:
            value = 0.0
        entry = (origin or {}).get(name, "block ratio")
        require(0 <= value < 1,
                f"The sparsity profile cannot meet the target {target:g}: its entry {entry!r} gives {name} ratio "
                f"{ratio:g}, and meeting the target (weighted by each layer's weight count) shifts every ratio by "
                f"{shift:+.4f}, to {value:.4f}, outside [0, 1). Narrow the profile's spread or change --sparsity_ratio.")
        shifted[name] = value
    return shifted


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """OWL's layer-wise outlier distribution for one block: the fraction of its scores above
    ``m`` times their mean, over all its layers' scores together (|W| * ||X_j||, any shapes)."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.double().sum()) for s in scores) / total
    above = sum(int((s > m * mean).sum()) for s in scores)
    return above / total


def owl_block_ratios(outlier_ratios: list[float], target: float, owl_lambda: float) -> list[float]:
    """OWL's allocation: outlier ratios scaled linearly onto a spread of width ``2 * lambda``
    (most outliers -> least sparsity), shifted so that the mean over blocks is ``target``.

    As the paper's code: ``d_k = (o_k - min o) / (max o - min o) * 2 lambda``, then
    ``sparsity_k = target - (d_k - mean d)``. Equal outlier ratios give the uniform profile.
    """
    low, high = min(outlier_ratios), max(outlier_ratios)
    if high - low <= 0:
        return [target] * len(outlier_ratios)
    spread = [(o - low) / (high - low) * 2 * owl_lambda for o in outlier_ratios]
    mean = sum(spread) / len(spread)
    return [target - (d - mean) for d in spread]


class LayerRatios:
    """Per-layer ratios a pruner looks up for the weight views it is handed.

    The calibration schedules hand a pruner (out, in) views of the layers' weights, not names;
    a view shares its layer's storage, wherever the block has been placed, so the layer is
    found by comparing storage addresses at lookup time.

    Args:
        ratios: qualified name -> ratio.
        modules: qualified name -> layer.
    """

    def __init__(self, ratios: dict[str, float], modules: dict[str, nn.Module]):
        self.ratios = ratios
        self.modules = {name: modules[name] for name in ratios}

    def lookup(self, weight: torch.Tensor) -> float:
        pointer = weight.untyped_storage().data_ptr()
        for name, module in self.modules.items():
            if module.weight.untyped_storage().data_ptr() == pointer:
                return self.ratios[name]
        raise RuntimeError("a weight handed to the pruner belongs to no layer of the sparsity profile")


@dataclass
class ProfileReport:
    """The profile a pruning used (written into the report and the manifest)."""

    kind: str
    target: float
    layer_ratios: dict[str, float]
    block_ratios: dict[int, float]  # per block, weighted by weight counts
    source: str | None = None
    owl: dict | None = None  # m, lambda, outlier ratios by block, statistics seconds

    def to_dict(self) -> dict:
        return {"kind": self.kind, "target": self.target, "source": self.source,
                "block_ratios": {str(k): v for k, v in self.block_ratios.items()},
                "layer_ratios": self.layer_ratios, "owl": self.owl}


def block_means(ratios: dict[str, float], counts: dict[str, int], blocks: dict[str, int]) -> dict[int, float]:
    """Weight-count-weighted mean ratio of each block."""
    pruned: dict[int, float] = {}
    totals: dict[int, int] = {}
    for name, ratio in ratios.items():
        block = blocks[name]
        pruned[block] = pruned.get(block, 0.0) + ratio * counts[name]
        totals[block] = totals.get(block, 0) + counts[name]
    return {block: pruned[block] / totals[block] for block in sorted(pruned)}
