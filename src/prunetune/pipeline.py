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
    max_steps: int = -1
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
        if duplicates:
            raise UsageError(f"config.prune: two entries are both named {sorted(duplicates)[0]!r}; give one a distinct 'name'.")
        for spec in self.prune:  # validates method, ratio and N:M before any work
            from prunetune.pruning import PruneConfig

            PruneConfig(method=spec.method, sparsity_ratio=spec.sparsity_ratio, sparsity_type=spec.sparsity_type,
                        use_variant=spec.use_variant, calib_dataset=self.calibration.dataset,
                        true_sequential=spec.true_sequential)
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
        self.stages = StageRunner(self.root)
        self._tokenizer = None

    # ---- helpers shared by the stages
    def device(self) -> str:
        if self.config.device:
            return self.config.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def load_options(self):
        from prunetune.loading import LoadOptions

        return LoadOptions(dtype=self.config.dtype, device=self.device())

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

    def base_inputs(self) -> dict:
        from prunetune.loading import resolve_model_path

        model_path = resolve_model_path(self.config.model)
        identity = self.config.model
        config_file = Path(model_path) / "config.json"
        weights = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
        if config_file.exists():  # local folders: hash what defines the model, not just its name
            digest = hashlib.sha256(config_file.read_bytes())
            for file in weights:
                digest.update(f"{file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())
            identity = f"{self.config.model}@{digest.hexdigest()[:16]}"
        return {"model": identity, "dtype": self.config.dtype, "device": self.device(),
                "evaluation": asdict(self.config.evaluation)}

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
        if not settings["true_sequential"]:  # off: hashed as before the option existed (stages stay reusable)
            del settings["true_sequential"]
        inputs = {**self.base_inputs(), "prune": settings, "calibration": asdict(self.config.calibration)}

        def work(directory: Path) -> dict:
            from prunetune.loading import load_model
            from prunetune.memory import track_peak_memory
            from prunetune.outputs import save_model_dir
            from prunetune.pruning import PruneConfig, prune

            calibration = self.config.calibration
            model = load_model(self.config.model, self.load_options())
            config = PruneConfig(method=spec.method, sparsity_ratio=spec.sparsity_ratio, sparsity_type=spec.sparsity_type,
                                 use_variant=spec.use_variant, nsamples=calibration.nsamples, seqlen=calibration.seqlen,
                                 seed=calibration.seed, calib_dataset=calibration.dataset,
                                 true_sequential=spec.true_sequential, progress=self.config.progress)
            with track_peak_memory(self.device()) as peak:
                report = prune(model, self.tokenizer(), config)
            evaluation = self.evaluate(model)
            summary = {k: v for k, v in report.to_dict().items() if k != "block_timings"}
            save_model_dir(model, self.tokenizer(), directory / "model",
                           {"stage": "prune", "base_model": self.config.model, **summary})
            return {"label": spec.label(), "evaluation": evaluation, "prune": summary,
                    "peak_memory_mb": peak.peak_mb, "model_dir": "model"}

        return self.stages.run(f"prune {spec.label()}", inputs, work)

    def recover_stage(self, spec: RecoverySpec, method: str, pruned: StageResult) -> StageResult:
        settings = spec.for_method(method)
        inputs = {**self.base_inputs(), "pruned": pruned.key, "method": method, "recovery": settings, "seed": self.config.seed}

        def work(directory: Path) -> dict:
            return self._recover(directory, pruned.directory / pruned.result["model_dir"], method, settings)

        return self.stages.run(f"recover {spec.prune} + {method}", inputs, work)

    def _recover(self, directory: Path, pruned_dir: Path, method: str, settings: dict) -> dict:
        from prunetune.export import merge_adapter, save_merged
        from prunetune.loading import load_model
        from prunetune.masks import measure_sparsity
        from prunetune.recover.adapter import apply_adapter
        from prunetune.recover.args import DataArguments, ModelArguments, RecoveryArguments, RecoveryTrainingArguments
        from prunetune.recover.recipe import recover

        train_dir = directory / "train"
        model_args = ModelArguments(model_name_or_path=str(pruned_dir), dtype=self.config.dtype)
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
        result = recover(model_args, data_args, recovery_args, training_args)
        history = _loss_history(train_dir)
        summary = {"method": method, "train_seconds": result.train_seconds, "tokens": result.tokens,
                   "tokens_per_second": result.tokens_per_second, "steps": result.steps, "train_loss": result.train_loss,
                   "peak_memory_mb": result.peak_memory_bytes / 2**20, "loss_history": history}
        if method == "full":
            model = load_model(str(train_dir), self.load_options())
            summary["evaluation"] = self.evaluate(model)
            summary["sparsity"] = summary["sparsity_after_merge"] = measure_sparsity(model).overall
            summary["export_dir"] = "train"
            return summary
        peft_model = apply_adapter(load_model(str(pruned_dir), self.load_options()), str(train_dir))
        summary["evaluation"] = self.evaluate(peft_model)  # the adapter applied, unmerged
        merged, report = merge_adapter(peft_model, method, remask=False)
        summary["sparsity"] = report.sparsity_before
        summary["sparsity_after_merge"] = report.sparsity_after
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
    def run(self) -> PipelineResult:
        import yaml

        from prunetune.outputs import atomic_write_text
        from prunetune.report import ReportData, ResultRow, terminal_table, write_report

        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "config.resolved.yaml", yaml.safe_dump(asdict(self.config), sort_keys=False))
        rows: list[ResultRow] = []
        data = ReportData(title=self.config.title, rows=rows)
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
                                  seconds=r["prune"]["seconds"], peak_memory_mb=r["peak_memory_mb"]))
            data.sparsity[spec.label()] = r["prune"]["sparsity"]["per_module"]
        for spec in self.config.recover:
            structure = next(p.sparsity_type for p in self.config.prune if p.label() == spec.prune)
            for method in spec.methods:
                stage = self.recover_stage(spec, method, pruned[spec.prune])
                r = stage.result
                name = f"{spec.prune} + {method}"
                rows.append(ResultRow(name, "recover", method, structure, perplexity=r["evaluation"]["perplexity"],
                                      sparsity=r["sparsity"], seconds=r["train_seconds"], tokens_seen=r["tokens"],
                                      peak_memory_mb=r["peak_memory_mb"], sparsity_after_merge=r["sparsity_after_merge"]))
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
        import platform

        import torch

        from prunetune.outputs import library_versions

        evaluation = dense.result["evaluation"]
        versions = library_versions()
        return {
            "model": self.config.model,
            "evaluation": f"{evaluation['dataset']} {self.config.evaluation.split}, {evaluation['windows']} windows x "
                          f"{evaluation['seqlen']} tokens (fingerprint {evaluation['fingerprint']})",
            "calibration": f"{self.config.calibration.dataset}, {self.config.calibration.nsamples} x "
                           f"{self.config.calibration.seqlen or 'model context'} tokens, seed {self.config.calibration.seed}",
            "machine": f"{self.device()}, {torch.get_num_threads()} threads, {platform.machine()}",
            "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        }


def _loss_history(train_dir: Path) -> list[tuple[int, float]]:
    state = train_dir / "trainer_state.json"
    if not state.exists():
        return []
    history = json.loads(state.read_text()).get("log_history", [])
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry and "step" in entry]


def run_pipeline(config: PipelineConfig) -> PipelineResult:
    return Pipeline(config).run()
