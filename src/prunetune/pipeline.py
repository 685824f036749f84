"""The pipeline: prune -> recover -> evaluate -> merge/export -> report, from one config.

This is the only module that knows the order of the stages. Each stage writes its own
directory under ``output_dir/stages/`` with a ``stage.json`` manifest holding the hash of its
inputs (its own settings plus the hashes of the stages it reads); a stage whose manifest is
complete and whose hash is unchanged is reused, so a re-run after a crash, or after adding a
method to the config, redoes only what is missing. Stage directories are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

from prunetune.config import from_mapping, load_mapping
from prunetune.errors import UsageError, require
from prunetune.outputs import atomic_dir, write_json

logger = logging.getLogger(__name__)

STAGE_MANIFEST = "stage.json"
STAGE_FORMAT = 1  # bump when a stage's outputs change meaning, to invalidate old runs


# --------------------------------------------------------------------------- config


@dataclass
class CalibrationSpec:
    dataset: str = "c4"  # the papers calibrate on C4
    nsamples: int = 128
    seqlen: int | None = None  # None: the model's context, capped at 2048
    seed: int = 0


@dataclass
class EvaluationSpec:
    dataset: str = "wikitext2"
    seqlen: int | None = None  # None: the model's context, capped at 2048
    batch_size: int = 8
    max_windows: int | None = None  # score only the first windows (quick runs)
    split: str = "test"


@dataclass
class PruneSpec:
    method: Literal["magnitude", "wanda", "sparsegpt"]
    sparsity_ratio: float | None = None  # None with N:M means N/M
    sparsity_type: str = "unstructured"
    use_variant: bool = False
    name: str | None = None  # default: "<method>-<ratio|N:M>"

    def label(self) -> str:
        if self.name:
            return self.name
        if self.sparsity_type == "unstructured":
            ratio = 0.5 if self.sparsity_ratio is None else self.sparsity_ratio
            structure = f"{ratio * 100:g}%"
        else:
            structure = self.sparsity_type
        return f"{self.method}{'-variant' if self.use_variant else ''} {structure}"


@dataclass
class RecoverySpec:
    prune: str  # the label of a prune entry (e.g. "wanda 50%")
    methods: list[Literal["lora", "masked_lora", "full"]] = field(default_factory=lambda: ["lora", "masked_lora", "full"])
    dataset: str = "c4"
    block_size: int = 1024
    max_train_samples: int | None = None
    max_steps: int = -1
    num_train_epochs: float = 1.0
    learning_rate: float = 1e-4
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float | None = None
    lora_target_modules: str = "q_proj,v_proj"
    warmup_ratio: float = 0.0
    logging_steps: int = 10
    # Per-method overrides of the keys above, e.g. {full: {learning_rate: 2.0e-5}}.
    method_overrides: dict = field(default_factory=dict)

    def for_method(self, method: str) -> dict:
        settings = {k: v for k, v in asdict(self).items() if k not in ("prune", "methods", "method_overrides")}
        overrides = self.method_overrides.get(method, {}) or {}
        unknown = [k for k in overrides if k not in settings]
        if unknown:
            raise UsageError(f"recover.method_overrides.{method}: unknown key {unknown[0]!r}. Accepted keys: {', '.join(settings)}.")
        settings.update(overrides)
        return settings


@dataclass
class PipelineConfig:
    model: str
    output_dir: str
    title: str = "prunetune results"
    dtype: str = "auto"
    device: str | None = None  # None: cuda when available
    seed: int = 0
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    prune: list[PruneSpec] = field(default_factory=list)
    recover: list[RecoverySpec] = field(default_factory=list)
    progress: bool = True

    def __post_init__(self):
        from prunetune.data import check_source
        from prunetune.loading import DTYPES

        require(self.dtype in DTYPES, f"config.dtype: {self.dtype!r} is not accepted; use one of {', '.join(DTYPES)}.")
        check_source(self.calibration.dataset)
        check_source(self.evaluation.dataset)
        labels = [p.label() for p in self.prune]
        duplicates = {x for x in labels if labels.count(x) > 1}
        require(not duplicates, f"config.prune: two entries are both named {sorted(duplicates)[0]!r}; give one a distinct 'name'.")
        for spec in self.prune:  # validates method, ratio and N:M before any work
            from prunetune.pruning import PruneConfig

            PruneConfig(method=spec.method, sparsity_ratio=spec.sparsity_ratio, sparsity_type=spec.sparsity_type,
                        use_variant=spec.use_variant, calib_dataset=self.calibration.dataset)
        for index, spec in enumerate(self.recover):
            require(spec.prune in labels, f"config.recover[{index}].prune: {spec.prune!r} names no prune entry; accepted: {', '.join(labels)}.")
            check_source(spec.dataset)
            for method in spec.methods:
                spec.for_method(method)


def load_config(path_or_mapping, overrides: dict | None = None) -> PipelineConfig:
    """A validated :class:`PipelineConfig` from a YAML/JSON file or a mapping."""
    data = load_mapping(path_or_mapping) if not isinstance(path_or_mapping, dict) else dict(path_or_mapping)
    data.update(overrides or {})
    return from_mapping(PipelineConfig, data)


# --------------------------------------------------------------------------- stages


def _hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else {"%": "pct", ":": "of", " ": "_"}.get(c, "-") for c in label)


@dataclass
class StageResult:
    name: str
    directory: Path
    key: str
    result: dict
    reused: bool


class StageRunner:
    """Runs stages with reuse: a stage with a complete manifest and the same key is skipped."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.executed: list[str] = []
        self.reused: list[str] = []

    def run(self, name: str, inputs: dict, work: Callable[[Path], dict]) -> StageResult:
        directory = self.root / "stages" / _slug(name)
        key = _hash({"format": STAGE_FORMAT, "stage": name, "inputs": inputs})
        manifest = directory / STAGE_MANIFEST
        if manifest.exists():
            saved = json.loads(manifest.read_text())
            if saved.get("key") == key and saved.get("complete"):
                logger.info("stage %s: reusing %s", name, directory)
                self.reused.append(name)
                return StageResult(name, directory, key, saved["result"], True)
        logger.info("stage %s: running", name)
        started = time.perf_counter()
        with atomic_dir(directory) as tmp:
            result = work(tmp)
            write_json(tmp / STAGE_MANIFEST, {"stage": name, "key": key, "inputs": inputs, "complete": True,
                                              "seconds": time.perf_counter() - started, "result": result})
        self.executed.append(name)
        return StageResult(name, directory, key, result, False)
