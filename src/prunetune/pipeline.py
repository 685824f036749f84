"""The pipeline: prune -> recover -> evaluate -> merge/export -> report, from one config.

This is the only module that knows the order of the stages. Each stage writes its own
directory under ``output_dir/stages/`` (or ``stages_dir``) with a ``stage.json`` manifest
holding the hash of its inputs: its own settings, the hashes of the stages it reads, and the
*content* fingerprints of every local file it reads (model folder, calibration, evaluation and
training data). A stage whose manifest is complete and whose hash is unchanged is reused, so a
re-run after a crash, or after adding a method to the config, redoes only what is missing,
while an edited data file or model folder redoes what read it. Stage directories are written
atomically. Everything the config alone can reveal -- numbers out of range, N:M groups that do
not tile a layer, windows longer than the model's context -- is checked before any stage runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

from prunetune.config import from_mapping, load_mapping
from prunetune.errors import UsageError, require
from prunetune.outputs import atomic_dir, write_json

logger = logging.getLogger(__name__)

STAGE_MANIFEST = "stage.json"
RESOLVED_CONFIG = "config.resolved.yaml"  # marks a pipeline run folder
STAGE_FORMAT = 2  # bump when a stage's outputs change meaning, to invalidate old runs (2: per-stage memory)
FINGERPRINT_CACHE = "fingerprints.json"


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
    true_sequential: bool = False  # one block forward; each layer sees the block as pruned so far
    name: str | None = None  # default: "<method>-<ratio|N:M>"

    def label(self) -> str:
        if self.name:
            return self.name
        if self.sparsity_type == "unstructured":
            ratio = 0.5 if self.sparsity_ratio is None else self.sparsity_ratio
            structure = f"{ratio * 100:g}%"
        else:
            structure = self.sparsity_type
        suffix = " (true sequential)" if self.true_sequential else ""
        return f"{self.method}{'-variant' if self.use_variant else ''} {structure}{suffix}"


@dataclass
class RecoverySpec:
    prune: str  # the label of a prune entry (e.g. "wanda 50%")
    methods: list[Literal["lora", "masked_lora", "full"]] = field(default_factory=lambda: ["lora", "masked_lora", "full"])
    dataset: str = "c4"
    block_size: int = 1024
    max_train_samples: int | None = None
    max_steps: int = -1  # <= 0: train num_train_epochs instead
    num_train_epochs: float = 1.0
    learning_rate: float = 1e-4
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float | None = None
    lora_target_modules: str = "q_proj,v_proj"
    warmup_steps: int = 0
    logging_steps: int = 10
    # Per-method overrides of the keys above, e.g. {full: {learning_rate: 2.0e-5}}.
    method_overrides: dict = field(default_factory=dict)

    def for_method(self, method: str, where: str = "config.recover") -> dict:
        """The settings ``method`` trains with: the keys above, then its ``method_overrides``.

        Raises:
            UsageError: an override names an unknown key or holds a value of the wrong type.
        """
        settings = {k: v for k, v in asdict(self).items() if k not in ("prune", "methods", "method_overrides")}
        overrides = self.method_overrides.get(method, {}) or {}
        place = f"{where}.method_overrides.{method}"
        require(isinstance(overrides, dict), f"{place}: {overrides!r} is not a mapping of keys to values.")
        unknown = [k for k in overrides if k not in settings]
        if unknown:
            raise UsageError(f"{place}: unknown key {unknown[0]!r}. Accepted keys: {', '.join(settings)}.")
        typed = from_mapping(RecoverySpec, {"prune": self.prune, **overrides}, place)  # types, as for the keys above
        settings.update({k: getattr(typed, k) for k in overrides})
        return settings


@dataclass
class PipelineConfig:
    model: str
    output_dir: str
    title: str = "prunetune results"
    dtype: str = "auto"
    device: str | None = None  # None: cuda when available
    seed: int = 0
    trust_remote_code: bool = False  # run code shipped with a hub model (it executes that code)
    # Where stage directories live. None: output_dir/stages. A relative path is taken from
    # output_dir, so two configs can share finished stages, each with its own report.
    stages_dir: str | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    prune: list[PruneSpec] = field(default_factory=list)
    recover: list[RecoverySpec] = field(default_factory=list)
    progress: bool = True

    def __post_init__(self):
        from prunetune.data import SPLITS, check_source
        from prunetune.loading import DTYPES

        require(self.dtype in DTYPES, f"config.dtype: {self.dtype!r} is not accepted; use one of {', '.join(DTYPES)}.")
        check_source(self.calibration.dataset)
        check_source(self.evaluation.dataset)
        calibration, evaluation = self.calibration, self.evaluation
        _check_count("config.calibration.nsamples", calibration.nsamples, "calibration windows")
        _check_seqlen("config.calibration.seqlen", calibration.seqlen)
        _check_seqlen("config.evaluation.seqlen", evaluation.seqlen)
        _check_count("config.evaluation.batch_size", evaluation.batch_size, "windows per forward")
        if evaluation.max_windows is not None:
            _check_count("config.evaluation.max_windows", evaluation.max_windows, "windows (or null: all)")
        require(evaluation.split in SPLITS, f"config.evaluation.split: {evaluation.split!r} is not accepted; use one of {', '.join(SPLITS)}.")
        labels = [p.label() for p in self.prune]
        duplicates = {x for x in labels if labels.count(x) > 1}
        if duplicates:
            raise UsageError(f"config.prune: two entries are both named {sorted(duplicates)[0]!r}; give one a distinct 'name'.")
        for spec in self.prune:  # validates method, ratio and N:M before any work
            self.prune_config(spec)
        for index, spec in enumerate(self.recover):
            where = f"config.recover[{index}]"
            require(spec.prune in labels, f"{where}.prune: {spec.prune!r} names no prune entry; accepted: {', '.join(labels)}.")
            for method in spec.methods:
                settings = spec.for_method(method, where)
                check_source(settings["dataset"])
                _check_recovery(settings, functools.partial(_setting_key, spec, method, where=where))

    def prune_config(self, spec: PruneSpec):
        """The :class:`prunetune.pruning.PruneConfig` of one prune entry (validates it)."""
        from prunetune.pruning import PruneConfig

        calibration = self.calibration
        return PruneConfig(method=spec.method, sparsity_ratio=spec.sparsity_ratio, sparsity_type=spec.sparsity_type,
                           use_variant=spec.use_variant, nsamples=calibration.nsamples, seqlen=calibration.seqlen,
                           seed=calibration.seed, calib_dataset=calibration.dataset,
                           true_sequential=spec.true_sequential, progress=self.progress)

    def stages_root(self) -> Path:
        output_dir = Path(self.output_dir).expanduser()
        return output_dir / "stages" if self.stages_dir is None else output_dir / Path(self.stages_dir).expanduser()


def _check_count(key: str, value: int, what: str) -> None:
    require(value >= 1, f"{key}: {value} is not accepted; give 1 or more {what}.")


def _check_seqlen(key: str, value: int | None) -> None:
    require(value is None or value >= 2,
            f"{key}: {value} is not accepted; give 2 or more tokens (a window predicts its tokens after the first), "
            "or null for the model's context (capped at 2048).")


def _setting_key(spec: RecoverySpec, method: str, key: str, where: str) -> str:
    """The config key a recovery setting came from: an override, or the recover entry itself."""
    overrides = spec.method_overrides.get(method) or {}
    return f"{where}.method_overrides.{method}.{key}" if key in overrides else f"{where}.{key}"


def _check_recovery(settings: dict, key: Callable[[str], str]) -> None:
    """Recovery numbers a Trainer would reject (or silently misuse) only after pruning ran."""
    require(settings["block_size"] >= 2, f"{key('block_size')}: {settings['block_size']} is not accepted; give 2 or more tokens per block.")
    counts = {"per_device_train_batch_size": "blocks per device and step", "gradient_accumulation_steps":
              "batches per optimizer step", "lora_r": "as the adapter's rank", "logging_steps": "steps between logs"}
    for name, what in counts.items():
        _check_count(key(name), settings[name], what)
    if settings["max_train_samples"] is not None:
        _check_count(key("max_train_samples"), settings["max_train_samples"], "training blocks (or null: all)")
    epochs = settings["num_train_epochs"]
    require(math.isfinite(epochs) and epochs >= 0, f"{key('num_train_epochs')}: {epochs} is not accepted; give a finite number >= 0.")
    require(settings["max_steps"] >= 1 or epochs > 0,
            f"{key('max_steps')}: {settings['max_steps']} with num_train_epochs {epochs} trains nothing; "
            "give max_steps >= 1, or max_steps -1 and num_train_epochs > 0.")
    rate = settings["learning_rate"]
    require(math.isfinite(rate) and rate > 0, f"{key('learning_rate')}: {rate} is not accepted; give a finite number > 0 (e.g. 1.0e-4).")
    require(settings["warmup_steps"] >= 0, f"{key('warmup_steps')}: {settings['warmup_steps']} is not accepted; give 0 or more steps.")
    alpha = settings["lora_alpha"]
    require(math.isfinite(alpha) and alpha > 0, f"{key('lora_alpha')}: {alpha} is not accepted; give a finite number > 0.")
    require(any(p.strip() for p in settings["lora_target_modules"].split(",")),
            f"{key('lora_target_modules')}: {settings['lora_target_modules']!r} names no layer; give names such as "
            "q_proj,v_proj, globs such as self_attn.*, or all-linear.")
    dropout = settings["lora_dropout"]
    require(dropout is None or 0 <= dropout < 1, f"{key('lora_dropout')}: {dropout} is not accepted; give a value in [0, 1) or null.")


def load_config(path_or_mapping, overrides: dict | None = None) -> PipelineConfig:
    """A validated :class:`PipelineConfig` from a YAML/JSON file or a mapping."""
    data = load_mapping(path_or_mapping) if not isinstance(path_or_mapping, dict) else dict(path_or_mapping)
    data.update(overrides or {})
    return from_mapping(PipelineConfig, data)


# --------------------------------------------------------------------------- fingerprints


# Files in a model folder that loading never reads: other weight formats (loading is
# safetensors only) and documentation. Python files count only with trust_remote_code.
_UNREAD_MODEL_SUFFIXES = (".md", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
_RACY_NS = 2 * 10**9  # files modified this recently are hashed but not cached (see FingerprintCache)


class FingerprintCache:
    """sha256 of local files, remembered by (absolute path, size, mtime_ns, inode).

    Stage keys hash the *contents* of the files a stage reads; re-reading 13 GB of weights on
    every run would cost minutes, so a file whose size, mtime_ns and inode are unchanged since
    it was last hashed keeps its digest. Any ordinary edit or replacement changes the mtime (set
    by the kernel on every write), the size or the inode, and the file is hashed again. An edit
    that keeps both size and mtime_ns (an in-place rewrite of the same length whose mtime is then
    set back on purpose, e.g. with ``touch -d`` or ``os.utime``) is not seen: the trade-off
    make, rsync and git's index make, accepted because it takes deliberate effort; delete
    ``fingerprints.json`` in the output folder to force every file to be hashed again. A file
    modified within the last 2 s is not cached at all, since a second write inside the same
    timestamp tick would leave its mtime unchanged (git's "racily clean" case).

    Args:
        path: the JSON file holding the digests; None: keep them in memory only.
    """

    def __init__(self, path: Path | None = None):
        self.path = path
        self.entries: dict[str, dict] = {}  # from the last run, by absolute path
        self.used: dict[str, dict] = {}  # looked up this run
        self.hashed: list[str] = []  # files read this run (the others came from the cache)
        if path is not None and path.exists():
            try:
                self.entries = json.loads(path.read_text(encoding="utf-8")).get("files", {})
            except (OSError, ValueError, AttributeError):
                logger.warning("fingerprint cache %s is unreadable; hashing every file again", path)

    def file(self, path: Path) -> str:
        """The sha256 of one file's bytes."""
        path = Path(path).expanduser().resolve()
        stat = path.stat()  # taken before reading: a write during the read shows up next run
        identity = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
        for known in (self.used.get(str(path)), self.entries.get(str(path))):
            if known is not None and all(known.get(k) == v for k, v in identity.items()):
                self.used[str(path)] = known
                return known["sha256"]
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
        self.hashed.append(str(path))
        racy = time.time_ns() - stat.st_mtime_ns < _RACY_NS
        self.used[str(path)] = {**identity, "sha256": digest.hexdigest(), "racy": racy}
        return digest.hexdigest()

    def files(self, root: Path, files: list[Path]) -> str:
        """One digest over ``files`` (each named by its path relative to ``root``), order-free."""
        digest = hashlib.sha256()
        for file in sorted(files, key=lambda f: f.relative_to(root).as_posix()):
            digest.update(f"{file.relative_to(root).as_posix()}\0{self.file(file)}\0".encode())
        return digest.hexdigest()[:16]

    def save(self) -> None:
        """Write the digests used this run (files no longer read drop out)."""
        if self.path is not None:
            kept = {path: {k: v for k, v in entry.items() if k != "racy"} for path, entry in self.used.items()
                    if not entry.get("racy")}
            write_json(self.path, {"format": 1, "files": kept})


def data_identity(source: str, cache: FingerprintCache) -> str | dict:
    """What a stage key records for a data source: named sources by name, local ones by content.

    ``builtin`` is the running interpreter's standard library; hashing its documents costs
    seconds of reading, and it changes only with the interpreter, so its version stands in.
    """
    from prunetune.data import HUB_SOURCES, _split_path_field

    if source in HUB_SOURCES:
        return source
    if source == "builtin":
        return f"builtin (python {platform.python_version()})"
    path, _ = _split_path_field(source)
    root = path.expanduser().resolve()
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else [root]
    return {"source": source, "sha256": cache.files(root if root.is_dir() else root.parent, files)}


def model_identity(name: str, cache: FingerprintCache, trust_remote_code: bool = False) -> str | dict:
    """What a stage key records for a model: a local folder by the content of what loading reads.

    A hub id is recorded by name (its files live in the Hugging Face cache, and its revision is
    not pinned by the config).
    """
    from prunetune.loading import resolve_model_path

    folder = Path(resolve_model_path(name))
    if not folder.is_dir():
        return name
    folder = folder.resolve()

    def read_by_loading(file: Path) -> bool:
        if file.name.startswith(".") or file.suffix in _UNREAD_MODEL_SUFFIXES:
            return False
        return trust_remote_code or file.suffix != ".py"

    files = [f for f in folder.iterdir() if f.is_file() and read_by_loading(f)]
    return {"model": name, "sha256": cache.files(folder, files)}


def recovery_dtype(method: str, dtype: str) -> str:
    """The dtype a recovery method loads its weights in, given the pipeline's ``dtype``.

    ``full`` trains every weight: an optimizer stepping on float16 master weights loses small
    updates to rounding and keeps AdamW's moments in float16 (underflow, overflow), so float16
    becomes ``auto``: float32 master weights, trained under bf16 autocast on CUDA. Adapters
    train float32 LoRA weights and may keep their frozen base in float16.
    """
    import torch

    from prunetune.loading import DTYPES

    if method == "full" and DTYPES[dtype] is torch.float16:
        return "auto"
    return dtype


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
    """Runs stages with reuse: a stage with a complete manifest and the same key is skipped.

    Args:
        root: the folder that holds one directory per stage.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.executed: list[str] = []
        self.reused: list[str] = []

    def run(self, name: str, inputs: dict, work: Callable[[Path], dict]) -> StageResult:
        directory = self.root / _slug(name)
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
        with atomic_dir(directory, overwrite=True) as tmp:  # a stale stage (other key) is replaced
            result = work(tmp)
            write_json(tmp / STAGE_MANIFEST, {"stage": name, "key": key, "inputs": inputs, "complete": True,
                                              "seconds": time.perf_counter() - started, "result": result})
        self.executed.append(name)
        return StageResult(name, directory, key, result, False)


def _memory(peak) -> dict:
    """A stage's memory figures: ``peak_memory_mb`` is the one the report shows (see prunetune.memory)."""
    return {"peak_memory_mb": peak.block_mb, "peak_memory_kind": peak.kind,
            "memory": {"peak_mb": peak.peak_mb, "baseline_mb": peak.baseline_mb, "increase_mb": peak.increase_mb}}


# --------------------------------------------------------------------------- the run


@dataclass
class PipelineResult:
    output_dir: Path
    report_path: Path
    rows: list
    executed: list[str]
    reused: list[str]
    table: str


class Pipeline:
    """Runs one :class:`PipelineConfig`; each stage goes through :class:`StageRunner`."""

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.root = Path(config.output_dir).expanduser()
        self.stages = StageRunner(config.stages_root())
        self.fingerprints = FingerprintCache(self.root / FINGERPRINT_CACHE)
        self._identities: dict[str, str | dict] = {}
        self._tokenizer = None
        self._dtype_logged = False

    # ---- helpers shared by the stages
    def device(self) -> str:
        if self.config.device:
            return self.config.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def load_options(self):
        from prunetune.loading import LoadOptions

        return LoadOptions(dtype=self.config.dtype, device=self.device(), trust_remote_code=self.config.trust_remote_code)

    def tokenizer(self):
        if self._tokenizer is None:
            from prunetune.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.config.model, self.load_options())
        return self._tokenizer

    def evaluate(self, model) -> dict:
        from prunetune.evaluate import autocast_for, default_seqlen, evaluate_dataset

        spec = self.config.evaluation
        seqlen = spec.seqlen or default_seqlen(model)
        result = evaluate_dataset(model, self.tokenizer(), spec.dataset, seqlen, batch_size=spec.batch_size,
                                  split=spec.split, max_windows=spec.max_windows, progress=self.config.progress,
                                  autocast_dtype=autocast_for(model))
        return result.to_dict()

    def identity(self, kind: str, name: str) -> str | dict:
        """The content identity of the model or a data source, computed once per run."""
        if (kind, name) not in self._identities:
            if kind == "model":
                self._identities[kind, name] = model_identity(name, self.fingerprints, self.config.trust_remote_code)
            else:
                self._identities[kind, name] = data_identity(name, self.fingerprints)
        return self._identities[kind, name]

    def base_inputs(self) -> dict:
        """What every stage reads: the model (by content), the evaluation settings and data."""
        return {"model": self.identity("model", self.config.model), "dtype": self.config.dtype, "device": self.device(),
                "trust_remote_code": self.config.trust_remote_code, "evaluation": asdict(self.config.evaluation),
                "evaluation_data": self.identity("data", self.config.evaluation.dataset)}

    def fingerprint_inputs(self) -> None:
        """Hash every local file the stages read, once, and keep the digests for the next run."""
        self.identity("model", self.config.model)
        sources = [self.config.evaluation.dataset, self.config.calibration.dataset]
        sources += [spec.for_method(method)["dataset"] for spec in self.config.recover for method in spec.methods]
        for source in dict.fromkeys(sources):
            self.identity("data", source)
        self.fingerprints.save()

    # ---- checks before any work
    def check(self) -> None:
        """Everything the model's config reveals, before any stage runs (no weights are loaded).

        Raises:
            UsageError: an N:M structure that does not tile a prunable layer, a window or block
                longer than the model's context, a model whose decoder blocks cannot be found.
        """
        from prunetune.loading import max_positions
        from prunetune.modules import prunable_layers, weight_param_shape

        skeleton = self._skeleton()
        try:
            layers = prunable_layers(skeleton)
        except UsageError as err:
            raise UsageError(f"config.model: {err}") from err
        for index, spec in enumerate(self.config.prune):
            pruner = self.config.prune_config(spec).pruner
            for name, module in layers.items():
                try:
                    pruner.check_layer(name, weight_param_shape(module)[1])
                except UsageError as err:
                    raise UsageError(f"config.prune[{index}].sparsity_type: {err}") from err
        limit = max_positions(skeleton)
        if limit is None:
            return
        lengths = {"config.calibration.seqlen": self.config.calibration.seqlen,
                   "config.evaluation.seqlen": self.config.evaluation.seqlen}
        for index, spec in enumerate(self.config.recover):
            for method in spec.methods:
                where = _setting_key(spec, method, "block_size", f"config.recover[{index}]")
                lengths[where] = spec.for_method(method)["block_size"]
        for key, length in lengths.items():
            require(length is None or length <= limit,
                    f"{key}: {length} tokens exceed the {limit} positions of {self.config.model}; give {limit} or less.")

    def _skeleton(self):
        """The model built from its config on the meta device: shapes without weights."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from prunetune.loading import _load_failure, resolve_model_path

        path = resolve_model_path(self.config.model)
        try:
            model_config = AutoConfig.from_pretrained(path, trust_remote_code=self.config.trust_remote_code)
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(model_config, trust_remote_code=self.config.trust_remote_code)
        except (OSError, ValueError) as err:
            raise UsageError(f"config.model: {_load_failure('model config', self.config.model, err)}") from err

    # ---- stages
    def dense_stage(self) -> StageResult:
        def work(directory: Path) -> dict:
            from prunetune.loading import load_model
            from prunetune.masks import measure_sparsity

            model = load_model(self.config.model, self.load_options())
            evaluation = self.evaluate(model)
            return {"evaluation": evaluation, "sparsity": measure_sparsity(model).to_dict()}

        return self.stages.run("dense", self.base_inputs(), work)

    def prune_stage(self, spec: PruneSpec) -> StageResult:
        settings = asdict(spec)
        if not settings["true_sequential"]:  # off: hashed as before the option existed
            del settings["true_sequential"]
        config = self.config.prune_config(spec)
        inputs = {**self.base_inputs(), "prune": settings}
        if config.pruner.needs_calibration:  # magnitude reads no data
            inputs["calibration"] = asdict(self.config.calibration)
            inputs["calibration_data"] = self.identity("data", self.config.calibration.dataset)

        def work(directory: Path) -> dict:
            from prunetune.loading import load_model
            from prunetune.memory import track_peak_memory
            from prunetune.outputs import save_model_dir
            from prunetune.pruning import prune

            with track_peak_memory(self.device()) as peak:  # loading and pruning; not the evaluation
                model = load_model(self.config.model, self.load_options())
                report = prune(model, self.tokenizer(), config)
            evaluation = self.evaluate(model)
            summary = {k: v for k, v in report.to_dict().items() if k != "block_timings"}
            save_model_dir(model, self.tokenizer(), directory / "model",
                           {"stage": "prune", "base_model": self.config.model, **summary})
            return {"label": spec.label(), "evaluation": evaluation, "prune": summary, **_memory(peak), "model_dir": "model"}

        return self.stages.run(f"prune {spec.label()}", inputs, work)

    def recover_stage(self, spec: RecoverySpec, method: str, pruned: StageResult) -> StageResult:
        settings = spec.for_method(method)
        dtype = recovery_dtype(method, self.config.dtype)
        if dtype != self.config.dtype and not self._dtype_logged:
            logger.warning("full recovery trains float32 master weights (dtype %s -> auto): an optimizer must not step "
                           "on %s weights; lora/masked_lora keep their frozen base in %s", self.config.dtype,
                           self.config.dtype, self.config.dtype)
            self._dtype_logged = True
        inputs = {**self.base_inputs(), "pruned": pruned.key, "method": method, "recovery": settings,
                  "recovery_dtype": dtype, "recovery_data": self.identity("data", settings["dataset"]),
                  "seed": self.config.seed}

        def work(directory: Path) -> dict:
            return self._recover(directory, pruned.directory / pruned.result["model_dir"], method, settings)

        return self.stages.run(f"recover {spec.prune} + {method}", inputs, work)

    def recovery_arguments(self, train_dir: Path, pruned_dir: Path, method: str, settings: dict) -> tuple:
        """The four argument objects of :func:`prunetune.recover.recipe.recover` for one stage."""
        from prunetune.recover.args import (
            DataArguments,
            ModelArguments,
            RecoveryArguments,
            RecoveryTrainingArguments,
        )

        model_args = ModelArguments(model_name_or_path=str(pruned_dir), dtype=recovery_dtype(method, self.config.dtype),
                                    trust_remote_code=self.config.trust_remote_code)
        data_args = DataArguments(dataset_name=settings["dataset"], block_size=settings["block_size"],
                                  max_train_samples=settings["max_train_samples"])
        recovery_args = RecoveryArguments(recovery_method=method, lora_r=settings["lora_r"], lora_alpha=settings["lora_alpha"],
                                          lora_dropout=settings["lora_dropout"],
                                          lora_target_modules=settings["lora_target_modules"], eval_before_training=False)
        training_args = RecoveryTrainingArguments(
            output_dir=str(train_dir), overwrite_output_dir=True, do_train=True, do_eval=False,
            max_steps=settings["max_steps"], num_train_epochs=settings["num_train_epochs"],
            learning_rate=settings["learning_rate"], per_device_train_batch_size=settings["per_device_train_batch_size"],
            gradient_accumulation_steps=settings["gradient_accumulation_steps"], warmup_steps=settings["warmup_steps"],
            logging_steps=settings["logging_steps"], save_strategy="no", report_to=[], seed=self.config.seed,
            disable_tqdm=not self.config.progress, use_cpu=self.device() == "cpu",
        )
        return model_args, data_args, recovery_args, training_args

    def _recover(self, directory: Path, pruned_dir: Path, method: str, settings: dict) -> dict:
        from prunetune.export import merge_adapter, save_merged
        from prunetune.loading import load_model
        from prunetune.masks import measure_sparsity
        from prunetune.memory import track_peak_memory
        from prunetune.recover.adapter import apply_adapter
        from prunetune.recover.recipe import recover

        train_dir = directory / "train"
        model_args, *other_args = self.recovery_arguments(train_dir, pruned_dir, method, settings)
        # The recipe measures training alone, but on CPU as the process's RSS (what earlier stages left
        # resident included); this block's increase is the stage's own: loading, training, saving.
        with track_peak_memory(self.device()) as peak:
            result = recover(model_args, *other_args)
        history = _loss_history(train_dir)
        summary = {"method": method, "dtype": model_args.dtype, "train_seconds": result.train_seconds, "tokens": result.tokens,
                   "tokens_per_second": result.tokens_per_second, "steps": result.steps, "train_loss": result.train_loss,
                   **_memory(peak), "loss_history": history}
        if model_args.dtype != self.config.dtype:
            summary["dtype_note"] = (f"config dtype {self.config.dtype}: {method} trained float32 master weights "
                                     "(dtype auto; bf16 autocast on CUDA)")
        if method == "full":
            model = load_model(str(train_dir), self.load_options())
            summary["evaluation"] = self.evaluate(model)
            summary["sparsity"] = summary["sparsity_after_merge"] = measure_sparsity(model).overall
            summary["export_dir"] = "train"
            return summary
        peft_model = apply_adapter(load_model(str(pruned_dir), self.load_options()), str(train_dir))
        summary["evaluation"] = self.evaluate(peft_model)  # the adapter applied, unmerged
        merged, report = merge_adapter(peft_model, method, remask=False)
        # The perplexity above saw W + BA (masked: W + BA * M), exactly the merged weights: their sparsity.
        summary["sparsity"] = summary["sparsity_after_merge"] = report.sparsity_after
        summary["base_sparsity"] = report.sparsity_before  # the frozen pruned weights under the adapter
        summary["merge_exact"] = report.exact
        if method == "lora":  # a plain LoRA merge densifies: show what re-masking it costs
            remasked, remask_report = merge_adapter(
                apply_adapter(load_model(str(pruned_dir), self.load_options()), str(train_dir)), method, remask=True)
            summary["remasked"] = {"evaluation": self.evaluate(remasked), "sparsity": remask_report.sparsity_after}
        else:
            save_merged(merged, self.tokenizer(), directory / "merged",
                        {"stage": "recover", "method": method, "pruned_model": str(pruned_dir)}, overwrite=True)
            summary["export_dir"] = "merged"
            summary["evaluation_merged"] = self.evaluate(merged)
        return summary

    # ---- the whole run
    def check_output_dir(self) -> None:
        """The run folder is new, empty, or an earlier run of a pipeline (stages are reused): never a foreign folder."""
        from prunetune.outputs import check_output_dir

        root = self.root
        if root.is_dir() and any(root.iterdir()) and not (root / RESOLVED_CONFIG).is_file():
            raise UsageError(f"output_dir {root} is not empty and holds no earlier pipeline run (no {RESOLVED_CONFIG}); "
                             "choose a new folder. A pipeline folder is reused (finished stages are kept), never replaced.")
        if not root.exists():
            check_output_dir(root, what="output_dir")  # not a symlink, not the current directory, writable

    def run(self) -> PipelineResult:
        """Check, then run every stage under a lock on the run folder (and on a shared stages folder)."""
        import contextlib

        from prunetune.outputs import output_lock

        self.check()  # before anything is written
        self.check_output_dir()
        stages_root = Path(os.path.normpath(self.config.stages_root().absolute()))  # may be shared: tiny-full reuses the demo's
        with contextlib.ExitStack() as locks:
            locks.enter_context(output_lock(self.root, "prunetune run"))
            locks.enter_context(output_lock(stages_root, "prunetune run"))
            return self._run()

    def _run(self) -> PipelineResult:
        import yaml

        from prunetune.outputs import atomic_write_text
        from prunetune.report import ReportData, ResultRow, terminal_table, write_report

        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / RESOLVED_CONFIG, yaml.safe_dump(asdict(self.config), sort_keys=False))
        rows: list[ResultRow] = []
        data = ReportData(title=self.config.title, rows=rows)
        self.fingerprint_inputs()
        dense = self.dense_stage()
        rows.append(ResultRow("dense", "dense", "-", perplexity=dense.result["evaluation"]["perplexity"],
                              sparsity=dense.result["sparsity"]["overall"]))
        pruned: dict[str, StageResult] = {}
        for spec in self.config.prune:
            stage = self.prune_stage(spec)
            pruned[spec.label()] = stage
            r = stage.result
            rows.append(ResultRow(spec.label(), "prune", spec.method, spec.sparsity_type,
                                  perplexity=r["evaluation"]["perplexity"], sparsity=r["prune"]["sparsity"]["overall"],
                                  seconds=r["prune"]["seconds"], peak_memory_mb=r["peak_memory_mb"],
                                  peak_memory_kind=r["peak_memory_kind"]))
            data.sparsity[spec.label()] = r["prune"]["sparsity"]["per_module"]
        for spec in self.config.recover:
            structure = next(p.sparsity_type for p in self.config.prune if p.label() == spec.prune)
            for method in spec.methods:
                stage = self.recover_stage(spec, method, pruned[spec.prune])
                r = stage.result
                name = f"{spec.prune} + {method}"
                note = r.get("dtype_note", "")
                if method == "lora":
                    note = (f"perplexity with the adapter unmerged: W + BA is {r['sparsity']:.2%} sparse "
                            f"over a {r['base_sparsity']:.2%} sparse base" + (f"; {note}" if note else ""))
                rows.append(ResultRow(name, "recover", method, structure, perplexity=r["evaluation"]["perplexity"],
                                      sparsity=r["sparsity"], seconds=r["train_seconds"], tokens_seen=r["tokens"],
                                      peak_memory_mb=r["peak_memory_mb"], peak_memory_kind=r["peak_memory_kind"],
                                      sparsity_after_merge=r["sparsity_after_merge"], note=note))
                if "remasked" in r:
                    rows.append(ResultRow(f"{name}, merged + remasked", "recover", method, structure,
                                          perplexity=r["remasked"]["evaluation"]["perplexity"],
                                          sparsity=r["remasked"]["sparsity"], sparsity_after_merge=r["remasked"]["sparsity"],
                                          note="plain LoRA merged, then pruned weights zeroed again"))
                data.loss_histories[name] = [tuple(p) for p in r["loss_history"]]
        data.facts = self._facts(dense)
        report_path = write_report(data, self.root)
        write_json(self.root / "results.json", {"rows": [row.to_dict() for row in rows], "facts": data.facts,
                                                "executed": self.stages.executed, "reused": self.stages.reused})
        return PipelineResult(self.root, report_path, rows, self.stages.executed, self.stages.reused, terminal_table(rows))

    def _facts(self, dense: StageResult) -> dict:
        import torch

        from prunetune.outputs import library_versions

        evaluation = dense.result["evaluation"]
        versions = library_versions()
        facts = {
            "model": self.config.model,
            "evaluation": f"{evaluation['dataset']} {self.config.evaluation.split}, {evaluation['windows']} windows x "
                          f"{evaluation['seqlen']} tokens (fingerprint {evaluation['fingerprint']})",
            "calibration": f"{self.config.calibration.dataset}, {self.config.calibration.nsamples} x "
                           f"{self.config.calibration.seqlen or 'model context'} tokens, seed {self.config.calibration.seed}",
            "machine": f"{self.device()}, {torch.get_num_threads()} threads, {platform.machine()}",
            "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        }
        if self.config.stages_dir is not None:
            facts["stages"] = str(self.config.stages_root())
        return facts


def _loss_history(train_dir: Path) -> list[tuple[int, float]]:
    state = train_dir / "trainer_state.json"
    if not state.exists():
        return []
    history = json.loads(state.read_text()).get("log_history", [])
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry and "step" in entry]


def run_pipeline(config: PipelineConfig) -> PipelineResult:
    return Pipeline(config).run()
