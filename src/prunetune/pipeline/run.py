"""The run: dense -> prune -> recover -> per-layer error -> report, each stage through the stage cache.

:meth:`Pipeline.run` reads as the table of contents: check everything the config and the
model's shapes reveal, lock the run folder, then run (or reuse) each stage in order and
write the report. Progress is announced to an optional listener (the CLI prints it).
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from prunetune.errors import UsageError
from prunetune.evaluate import autocast_for, default_seqlen, evaluate_dataset
from prunetune.loading import LoadOptions, is_gguf_model, load_model, load_tokenizer, resolve_model_path
from prunetune.masks import measure_sparsity
from prunetune.memory import track_peak_memory
from prunetune.outputs import (
    atomic_write_text,
    check_output_dir,
    library_versions,
    output_lock,
    save_model_dir,
    write_json,
)
from prunetune.pipeline import layer_error
from prunetune.pipeline.checks import check_inputs, check_model_shapes
from prunetune.pipeline.config import PipelineConfig, PruneSpec, RecoverySpec
from prunetune.pipeline.fingerprints import FingerprintCache, data_identity, model_identity
from prunetune.pipeline.recovery import hashed_settings, recovery_arguments, recovery_dtype, run_recovery
from prunetune.pipeline.results import ReportCollector
from prunetune.pipeline.stages import StageEvent, StageResult, StageRunner, memory_figures
from prunetune.pruning import prune
from prunetune.report import terminal_table, write_report
from prunetune.zeroshot import TaskCatalog, evaluate_zeroshot

logger = logging.getLogger(__name__)

RESOLVED_CONFIG = "config.resolved.yaml"  # marks a pipeline run folder
FINGERPRINT_CACHE = "fingerprints.json"
AUTO_RECONSTRUCTION_WINDOWS = 4  # reconstruction_windows: null, for a model whose Gram matrices fit
AUTO_GRAM_LIMIT_BYTES = 2 * 2**30


@dataclass
class PipelineResult:
    output_dir: Path
    report_path: Path
    rows: list
    executed: list[str]
    reused: list[str]
    table: str


class Pipeline:
    """Runs one :class:`PipelineConfig`; each stage goes through :class:`StageRunner`.

    Args:
        config: the validated config.
        listener: called with a :class:`StageEvent` as each stage starts and ends (the CLI prints them).
    """

    def __init__(self, config: PipelineConfig, listener: Callable[[StageEvent], None] | None = None):
        self.config = config
        self.root = Path(config.output_dir).expanduser()
        # its total is counted by run(), after check(); a stages_dir may hold other configs' stages: never replace them
        self.stages = StageRunner(config.stages_root(), listener, shared=config.stages_dir is not None)
        self.fingerprints = FingerprintCache(self.root / FINGERPRINT_CACHE)
        self._identities: dict[tuple[str, str], str | dict] = {}
        self._tokenizer = None
        self._dtype_logged = False
        self._gram_bytes = 0  # set by check(): what the per-layer error's Gram matrices take
        self.trainer_cannot_evaluate = False  # set when the recipe's Trainer had no held-out data (eval_steps)
        self._windows: int | None = None
        self._dense_copy: Path | None = None  # a safetensors copy of a GGUF model, saved by the dense stage
        self._task_catalog = None  # lm-eval's task index, built once (by check() when the config names tasks)

    # ---- helpers shared by the stages
    def device(self) -> str:
        if self.config.device:
            return self.config.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def load_options(self):
        return LoadOptions(dtype=self.config.dtype, device=self.device(), trust_remote_code=self.config.trust_remote_code)

    def load_dense(self):
        """The dense model: from the dense stage's safetensors copy when the model is a GGUF file.

        Dequantizing a GGUF takes ~25 s for a 135M model and a run loads the dense weights once
        per stage; the copy holds the same tensors (saved in the run's dtype) and loads in ~1 s.
        """
        return load_model(str(self.dense_source()), self.load_options())

    def dense_source(self) -> str | Path:
        """Where the dense weights load from (after the dense stage): its safetensors copy, else the model."""
        return self._dense_copy or self.config.model

    def _is_gguf(self) -> bool:
        return is_gguf_model(resolve_model_path(self.config.model))

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.model, self.load_options())
        return self._tokenizer

    def evaluate(self, model, label: str = "", zeroshot: bool = True) -> dict:
        """Perplexity on the config's evaluation text (``label``: what the progress bar is for), and the
        zero-shot accuracy on its tasks (``"zeroshot"``) when it names some, unless ``zeroshot`` is False."""
        spec = self.config.evaluation
        seqlen = spec.seqlen or default_seqlen(model)
        result = evaluate_dataset(model, self.tokenizer(), spec.dataset, seqlen, batch_size=spec.batch_size,
                                  split=spec.split, max_windows=spec.max_windows, progress=self.config.progress,
                                  autocast_dtype=autocast_for(model), flag="config.evaluation.dataset",
                                  desc=f"perplexity {label}".strip()).to_dict()
        if zeroshot and spec.tasks:
            result["zeroshot"] = self.zeroshot(model)
        return result

    def zeroshot(self, model) -> dict:
        """Zero-shot accuracy of ``model`` on the config's lm-eval tasks (``evaluation.tasks``), as plain data.

        The task index is built once per run; each call loads the tasks afresh (lm-eval's task objects
        carry one run's requests), from the datasets cache after the first.
        """
        spec = self.config.evaluation
        if self._task_catalog is None:
            self._task_catalog = TaskCatalog(spec.include_path)
        return evaluate_zeroshot(model, self.tokenizer(), spec.zeroshot_settings(), catalog=self._task_catalog,
                                 prefix="config.evaluation.").to_dict()

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
        evaluation = asdict(self.config.evaluation)
        if not evaluation["tasks"]:  # no zero-shot tasks: hashed as before those keys existed
            for key in ("tasks", "num_fewshot", "limit", "include_path", "task_identity"):
                evaluation.pop(key, None)
        return {"model": self.identity("model", self.config.model), "dtype": self.config.dtype, "device": self.device(),
                "trust_remote_code": self.config.trust_remote_code, "evaluation": evaluation,
                "evaluation_data": self.identity("data", self.config.evaluation.dataset)}

    def recovery_file_inputs(self, settings: dict) -> dict:
        """A recovery's other files, by content: its validation text and its teacher (``dense`` is the
        pipeline's own model, already in every key). Absent while unset, so older stages stay valid."""
        inputs = {}
        if settings["validation_file"] is not None:
            inputs["validation_data"] = self.identity("data", settings["validation_file"])
        if settings["distill_from"] not in (None, "dense"):
            inputs["teacher"] = self.identity("model", settings["distill_from"])
        return inputs

    def fingerprint_inputs(self) -> None:
        """Hash every local file the stages read, once, and keep the digests for the next run."""
        self.identity("model", self.config.model)
        sources = [self.config.evaluation.dataset, self.config.calibration.dataset]
        for spec in self.config.recover:
            for method in spec.methods:
                settings = spec.for_method(method)
                sources.append(settings["dataset"])
                self.recovery_file_inputs(settings)
        for source in dict.fromkeys(sources):
            self.identity("data", source)
        self.fingerprints.save()

    # ---- checks before any work
    def check(self) -> None:
        """Everything the model's config and the inputs reveal, before any stage runs (see :mod:`checks`)."""
        self._gram_bytes = check_model_shapes(self.config)
        check_inputs(self.config)
        spec = self.config.evaluation
        if spec.tasks:  # every task loads (its data found) before any stage runs, not after the dense perplexity
            self._task_catalog = TaskCatalog(spec.include_path)
            self._task_catalog.load(list(spec.tasks), "config.evaluation.tasks")

    def reconstruction_windows(self) -> int:
        """Calibration windows for the per-layer error stage; 0: no such stage (see the config key)."""
        if self._windows is None:
            self._windows = self.config.reconstruction_windows
            if self._windows is None:
                self._windows = AUTO_RECONSTRUCTION_WINDOWS
                if self._gram_bytes > AUTO_GRAM_LIMIT_BYTES:
                    logger.warning("per-layer reconstruction error skipped: its Gram matrices would take %.1f GiB of CPU "
                                   "memory (set reconstruction_windows to run it anyway, or 0 to silence this)",
                                   self._gram_bytes / 2**30)
                    self._windows = 0
        return self._windows

    def stage_count(self) -> int:
        """Stages a run walks through: dense, each prune, each recovery, the per-layer error (after :meth:`check`)."""
        recoveries = sum(len(spec.methods) for spec in self.config.recover)
        return 1 + len(self.config.prune) + recoveries + (1 if self.config.prune and self.reconstruction_windows() else 0)

    # ---- stages
    def dense_stage(self) -> StageResult:
        def work(directory: Path) -> dict:
            model = load_model(self.config.model, self.load_options())
            evaluation = self.evaluate(model, "dense")
            result = {"evaluation": evaluation, "sparsity": measure_sparsity(model).to_dict()}
            if self._is_gguf():  # later stages load this copy instead of dequantizing the file again
                save_model_dir(model, self.tokenizer(), directory / "model",
                               {"stage": "dense", "base_model": self.config.model,
                                "base_model_identity": self.identity("model", self.config.model),
                                "dtype": self.config.dtype})
                result["model_dir"] = "model"
            return result

        stage = self.stages.run("dense", self.base_inputs(), work)
        copy = stage.directory / stage.result.get("model_dir", "")
        if stage.result.get("model_dir") and (copy / "prunetune.json").is_file():
            self._dense_copy = copy
        return stage

    def prune_stage(self, spec: PruneSpec) -> StageResult:
        settings = asdict(spec)
        if not settings["true_sequential"]:  # off: hashed as before the option existed
            del settings["true_sequential"]
        if settings["sparsity_profile"] in (None, "uniform"):  # uniform: hashed as before profiles existed
            for key in ("sparsity_profile", "owl_m", "owl_lambda"):
                del settings[key]
        if not settings["reconstruct"]:  # off: hashed as before the option existed
            for key in ("reconstruct", "reconstruct_epochs", "reconstruct_lr", "reconstruct_batch_size"):
                del settings[key]
        config = self.config.prune_config(spec)
        inputs = {**self.base_inputs(), "prune": settings}
        if config.needs_calibration:  # magnitude reads no data (unless OWL measures outliers)
            inputs["calibration"] = asdict(self.config.calibration)
            inputs["calibration_data"] = self.identity("data", self.config.calibration.dataset)
        if config.profile.source:  # a profile file: its content, not its name
            inputs["sparsity_profile_file"] = self.fingerprints.file(Path(config.profile.source).expanduser())

        def work(directory: Path) -> dict:
            with track_peak_memory(self.device()) as peak:  # loading and pruning; not the evaluation
                model = self.load_dense()
                report = prune(model, self.tokenizer(), config)
            evaluation = self.evaluate(model, spec.label())
            summary = {k: v for k, v in report.to_dict().items() if k != "block_timings"}
            save_model_dir(model, self.tokenizer(), directory / "model",
                           {"stage": "prune", "base_model": self.config.model,
                            "base_model_identity": self.identity("model", self.config.model), **summary})
            return {"label": spec.label(), "evaluation": evaluation, "prune": summary, **memory_figures(peak),
                    "model_dir": "model"}

        return self.stages.run(f"prune {spec.label()}", inputs, work)

    def recover_stage(self, spec: RecoverySpec, method: str, pruned: StageResult, label: str | None = None) -> StageResult:
        """One recovery of ``pruned``: a prune stage, or (stacked) the recovery stage it continues; ``label``: its row."""
        settings = spec.for_method(method)
        dtype = recovery_dtype(method, self.config.dtype)
        if dtype != self.config.dtype and not self._dtype_logged:
            logger.warning("full recovery trains float32 master weights (dtype %s -> auto): an optimizer must not step "
                           "on %s weights; lora/masked_lora keep their frozen base in %s", self.config.dtype,
                           self.config.dtype, self.config.dtype)
            self._dtype_logged = True
        inputs = {**self.base_inputs(), "pruned": pruned.key, "method": method, "recovery": hashed_settings(settings, method),
                  "recovery_dtype": dtype, "recovery_data": self.identity("data", settings["dataset"]),
                  "seed": self.config.seed, **self.recovery_file_inputs(settings)}

        def work(directory: Path) -> dict:
            return run_recovery(self, directory, model_folder(pruned), method, settings)

        return self.stages.run(f"recover {label or spec.label(method)}", inputs, work)

    def recovery_arguments(self, train_dir: Path, pruned_dir: Path, method: str, settings: dict) -> tuple:
        """The four argument objects of :func:`prunetune.recipe.recover` for one stage."""
        return recovery_arguments(self, train_dir, pruned_dir, method, settings)

    def error_stage(self, configurations: dict[str, tuple[str, Callable]]) -> StageResult | None:
        """Per-layer relative output error of each configuration against the dense weights (see layer_error)."""
        return layer_error.error_stage(self, configurations)

    # ---- the whole run
    def check_output_dir(self) -> None:
        """The run folder is new, empty, or an earlier run of a pipeline (stages are reused): never a foreign folder."""
        root = self.root
        stages_key = "stages_dir" if self.config.stages_dir is not None else "output_dir"
        for key, folder in (("output_dir", root), (stages_key, self.config.stages_root())):
            folder = Path(os.path.normpath(folder.absolute()))  # as the locks take it: "run/../x" is x
            existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
            if not existing.is_dir():  # mkdir would fail with a traceback after the checks
                raise UsageError(f"{key} {self.config.stages_dir if key == 'stages_dir' else self.config.output_dir}: "
                                 f"{existing} is a file, not a folder; choose a new folder, an empty one, or the "
                                 "folder of an earlier run of this pipeline.")
        if root.is_dir() and any(root.iterdir()) and not (root / RESOLVED_CONFIG).is_file():
            raise UsageError(f"output_dir {root} is not empty and holds no earlier pipeline run (no {RESOLVED_CONFIG}); "
                             "choose a new folder. A pipeline folder is reused (finished stages are kept), never replaced.")
        if not root.exists():
            check_output_dir(root, what="output_dir")  # not a symlink, not the current directory, writable

    def run(self) -> PipelineResult:
        """Check, then run every stage under a lock on the run folder (and on a shared stages folder)."""
        import contextlib

        self.check()  # before anything is written
        self.check_output_dir()
        stages_root = Path(os.path.normpath(self.config.stages_root().absolute()))  # may be shared: tiny-full reuses the demo's
        self.stages.total = self.stage_count()
        with contextlib.ExitStack() as locks:
            locks.enter_context(output_lock(self.root, "prunetune run"))
            locks.enter_context(output_lock(stages_root, "prunetune run"))
            return self._run()

    def _run(self) -> PipelineResult:
        import yaml

        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / RESOLVED_CONFIG, yaml.safe_dump(asdict(self.config), sort_keys=False))
        report = ReportCollector(self.config.title)
        self.fingerprint_inputs()
        dense = self.dense_stage()
        report.add_dense(dense.result)
        weights: dict[str, tuple[str, Callable]] = {}  # configuration -> (stage key, loader), for the error stage
        pruned: dict[str, StageResult] = {}
        for spec in self.config.prune:
            stage = pruned[spec.label()] = self.prune_stage(spec)
            report.add_pruned(spec, stage.result)
            weights[spec.label()] = (stage.key, layer_error.weights_loader(self, stage.directory / stage.result["model_dir"]))
        recovered: dict[str, StageResult] = {}
        for step in self.config.recovery_steps():  # a stacked step after the one it continues
            structure = next(p.sparsity_type for p in self.config.prune if p.label() == step.prune)
            base = pruned[step.prune] if step.base is None else recovered[step.base]
            stage = recovered[step.label] = self.recover_stage(step.spec, step.method, base, step.label)
            name = report.add_recovered(step, structure, stage.result,
                                        pruned[step.prune].result["prune"]["sparsity"]["overall"])
            weights.update(layer_error.recovered_weights(self, name, step.method, base, stage))
        errors = self.error_stage(weights)
        if errors is not None:
            report.add_errors(errors.result)
        report.data.facts = self._facts(dense)
        report_path = write_report(report.data, self.root)
        write_json(self.root / "results.json", {"rows": [row.to_dict() for row in report.rows], "facts": report.data.facts,
                                                "curves": {name: asdict(c) for name, c in report.data.curves.items()},
                                                "per_layer_error": report.data.errors,
                                                "sparsity_profiles": report.data.profiles,
                                                "executed": self.stages.executed, "reused": self.stages.reused})
        return PipelineResult(self.root, report_path, report.rows, self.stages.executed, self.stages.reused,
                              terminal_table(report.rows))

    def _facts(self, dense: StageResult) -> dict:
        import torch

        evaluation = dense.result["evaluation"]
        versions = library_versions()
        facts = {
            "model": self.config.model,
            "evaluation": (evaluation.get("text") or f"{evaluation['dataset']} {self.config.evaluation.split}, "
                           f"{evaluation['windows']} windows x {evaluation['seqlen']} tokens")
                          + f" (fingerprint {evaluation['fingerprint']})",
            "calibration": f"{self.config.calibration.dataset}, {self.config.calibration.nsamples} x "
                           f"{self.config.calibration.seqlen or 'model context'} tokens, seed {self.config.calibration.seed}",
            "machine": f"{self.device()}, {torch.get_num_threads()} threads, {platform.machine()}",
            "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        }
        if self.config.stages_dir is not None:
            facts["stages"] = str(self.config.stages_root())
        return facts


def model_folder(stage: StageResult) -> Path:
    """The model folder a stage wrote: a prune stage's model, a recovery's export (full, blockwise, merged masked_lora)."""
    return stage.directory / (stage.result.get("model_dir") or stage.result["export_dir"])


def run_pipeline(config: PipelineConfig, listener: Callable[[StageEvent], None] | None = None) -> PipelineResult:
    """Run (or reuse) every stage of ``config`` and write its report; ``listener`` hears each stage start and end."""
    return Pipeline(config, listener).run()
