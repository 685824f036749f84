"""The pipeline file's schema: dataclasses read by :func:`load_config`, every value checked.

Data that a file leaves out follows the model (:func:`prunetune.defaults.default_data`): the
bundled ``tiny`` model and models made from it use ``builtin``, any other model the papers'
data. The resolved values are what the stages hash and what ``config.resolved.yaml`` shows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from prunetune.config import from_mapping, load_mapping
from prunetune.data import SPLITS, check_local_file, check_source
from prunetune.defaults import default_data
from prunetune.errors import UsageError, require
from prunetune.loading import DTYPES
from prunetune.pipeline.plan import RecoveryStep, plan_recoveries
from prunetune.pruning import PruneConfig
from prunetune.zeroshot import TaskCatalog, ZeroShotSettings, check_settings, parse_tasks
from prunetune.zeroshot.tasks import task_identity


@dataclass
class CalibrationSpec:
    dataset: str | None = None  # None: builtin for tiny (and models made from it), else C4 as the papers
    nsamples: int = 128
    seqlen: int | None = None  # None: the model's context, capped at 2048
    seed: int = 0


@dataclass
class EvaluationSpec:
    dataset: str | None = None  # None: builtin for tiny (and models made from it), else WikiText-2
    seqlen: int | None = None  # None: the model's context, capped at 2048
    batch_size: int = 8  # windows per forward pass; for tasks, requests per forward pass
    max_windows: int | None = None  # score only the first windows (quick runs)
    split: str = "test"
    # Zero-shot accuracy on lm-eval tasks for every configuration in the report (pip install "prunetune[zeroshot]"):
    # a list (or "a,b") of task names, e.g. [boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa].
    # None: perplexity only. See docs/zeroshot.md.
    tasks: list[str] | str | None = None
    num_fewshot: int | None = None  # None: each task's own default (0 for the seven)
    limit: int | float | None = None  # examples per task, a whole number >= 1 (floats are refused); None: all
    include_path: str | None = None  # a folder of task YAMLs searched before lm-eval's (tasks on local data)
    # Computed, not set (a value given, as in a copied config.resolved.yaml, is replaced): lm-eval's version and the
    # content of include_path and of the data files its YAMLs name. Hashed with these keys into every stage's key,
    # so stages re-run when the task definitions or their data change.
    task_identity: str | None = None

    def __post_init__(self):
        """Checks the zero-shot keys: values, then the task names against lm-eval's index (seconds, only with tasks)."""
        self.task_identity = None
        if self.tasks is None:
            for key in ("num_fewshot", "limit", "include_path"):
                require(getattr(self, key) is None, f"config.evaluation.{key} applies to zero-shot tasks, and "
                                                    "config.evaluation.tasks is not set; add tasks (e.g. [boolq, arc_easy]) "
                                                    f"or drop {key}.")
            return
        self.tasks = parse_tasks(self.tasks, "config.evaluation.tasks")
        check_settings(self.zeroshot_settings(), "config.evaluation.")
        TaskCatalog(self.include_path).check_names(self.tasks, "config.evaluation.tasks")
        self.task_identity = task_identity(self.include_path)

    def zeroshot_settings(self):
        """The :class:`prunetune.zeroshot.ZeroShotSettings` of these keys (None without tasks)."""
        if not self.tasks:
            return None
        return ZeroShotSettings(tasks=list(self.tasks), num_fewshot=self.num_fewshot, limit=self.limit,
                                batch_size=self.batch_size, include_path=self.include_path)


@dataclass
class PruneSpec:
    method: Literal["magnitude", "wanda", "sparsegpt"]
    sparsity_ratio: float | None = None  # None with N:M means N/M
    sparsity_type: str = "unstructured"
    use_variant: bool = False
    true_sequential: bool = False  # one block forward; each layer sees the block as pruned so far
    sparsity_profile: str | None = None  # uniform (None), owl, or a JSON/YAML file: block index or layer glob -> ratio
    owl_m: float = 5.0  # OWL: outlier above this multiple of the block's mean Wanda score
    owl_lambda: float = 0.08  # OWL: largest deviation of a block's ratio from sparsity_ratio
    reconstruct: bool = False  # train each pruned block to the dense block's outputs before they propagate
    reconstruct_epochs: int | None = None  # reconstruct: passes per block (None: 3)
    reconstruct_lr: float | None = None  # reconstruct: Adam's learning rate (None: 1e-3)
    reconstruct_batch_size: int | None = None  # reconstruct: windows per step and per calibration forward (None: 8)
    name: str | None = None  # default: "<method>-<ratio|N:M>"

    def target(self) -> float | None:
        """The unstructured target ratio (0.5 when left out); None for N:M."""
        if self.sparsity_type != "unstructured":
            return None
        return 0.5 if self.sparsity_ratio is None else self.sparsity_ratio

    def _modifiers(self) -> str:
        return (" (true sequential)" if self.true_sequential else "") + (" reconstructed" if self.reconstruct else "")

    def series(self) -> str:
        """The pruner with what else sets the entry apart but its ratio and profile: ``wanda-variant reconstructed``."""
        return f"{self.method}{'-variant' if self.use_variant else ''}{self._modifiers()}"

    def label(self) -> str:
        if self.name:
            return self.name
        target = self.target()
        structure = self.sparsity_type if target is None else f"{target * 100:g}%"
        profile = ""
        if self.sparsity_profile not in (None, "uniform"):
            profile = f" {Path(self.sparsity_profile).name}"  # "wanda 70% owl", "wanda 70% alpha.yaml"
        return f"{self.method}{'-variant' if self.use_variant else ''} {structure}{profile}{self._modifiers()}"


@dataclass
class RecoverySpec:
    prune: str | None = None  # the label of a prune entry (e.g. "wanda 50%"); may be left out with after
    methods: list[Literal["lora", "masked_lora", "full", "blockwise"]] = field(
        default_factory=lambda: ["lora", "masked_lora", "full"])
    # Stacking: the name of another recover entry (one method, full or blockwise) whose output model this
    # entry starts from instead of the pruned one, e.g. blockwise, then full with distillation. null: the pruned model.
    after: str | None = None
    dataset: str | None = None  # None: builtin for tiny (and models made from it), else C4 as the LoRA recipe
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
    # Held-out perplexity every eval_steps optimizer steps, and once before the first: the report's
    # perplexity-vs-tokens curve. None: no evaluation during training (it costs a pass each time).
    eval_steps: int | None = None
    max_eval_samples: int | None = None  # held-out blocks scored each time (None: all of them)
    per_device_eval_batch_size: int = 8
    # The text the curve is scored on: a local file (prunetune recover --validation_file), e.g.
    # WikiText-2 validation while training on C4. Then all of ``dataset`` trains (nothing of it is
    # held out). null: the training data's held-out part (or its own validation split).
    validation_file: str | None = None
    # Distillation from a dense teacher (prunetune recover --distill_from): "dense" is this
    # pipeline's own dense model; any other value a model path or name. null: none.
    distill_from: str | None = None
    distill_ce_weight: float = 0.0  # the defaults of prunetune recover (see its --help)
    distill_kl_weight: float = 1.0
    distill_hidden_weight: float = 1.0
    distill_temperature: float = 1.0
    distill_dtype: str = "auto"
    # blockwise (each decoder block trains its kept weights to reproduce the dense block's output; the
    # teacher is distill_from, default this pipeline's dense model). It also reads num_train_epochs (whole
    # passes), learning_rate and per_device_train_batch_size (windows per step); block_size and max_steps are unused.
    nsamples: int = 128  # blockwise: calibration windows drawn from dataset (a tenth held out)
    seqlen: int = 128  # blockwise: tokens per window (as recover --seqlen)
    blockwise_input: str = "sparse"  # blockwise: what feeds each block: sparse (the pruned model's activations), dense, mix
    blockwise_window: int = 1  # blockwise: consecutive blocks trained together
    # A name for this entry's rows and stages ("wanda 50% + full + NAME"): needed when two
    # entries recover the same pruned model with the same method (e.g. with and without distillation).
    name: str | None = None
    # Per-method overrides of the keys above, e.g. {full: {learning_rate: 2.0e-5}}.
    method_overrides: dict = field(default_factory=dict)

    def label(self, method: str, base: str | None = None) -> str:
        """The configuration's name in the report: ``wanda 50% + masked_lora`` (+ name, or + distill);
        a stacked entry's starts with the label of the recovery it continues (``base``)."""
        distills = method != "blockwise" and self.for_method(method)["distill_from"]  # blockwise always has a teacher
        suffix = self.name or ("distill" if distills else None)
        return f"{base or self.prune} + {method}" + (f" + {suffix}" if suffix else "")

    def for_method(self, method: str, where: str = "config.recover") -> dict:
        """The settings ``method`` trains with: the keys above, then its ``method_overrides``.

        Raises:
            UsageError: an override names an unknown key or holds a value of the wrong type.
        """
        settings = {k: v for k, v in asdict(self).items()
                    if k not in ("prune", "methods", "method_overrides", "name", "after")}
        overrides = self.method_overrides.get(method, {}) or {}
        place = f"{where}.method_overrides.{method}"
        require(isinstance(overrides, dict), f"{place}: {overrides!r} is not a mapping of keys to values.")
        unknown = [k for k in overrides if k not in settings]
        if unknown:
            raise UsageError(f"{place}: unknown key {unknown[0]!r}. Accepted keys: {', '.join(settings)}.")
        typed = from_mapping(RecoverySpec, {"prune": self.prune, **overrides}, place)  # types, as for the keys above
        settings.update({k: getattr(typed, k) for k in overrides})
        if settings["dataset"] is None:  # an override of null: the entry's (resolved) data
            settings["dataset"] = self.dataset
        if method == "blockwise" and settings["distill_from"] is None:  # its teacher: the pipeline's dense model
            settings["distill_from"] = "dense"
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
    # Calibration windows on which the report measures each layer's output error against the dense
    # layer (see prunetune.analysis). None: 4 when the Gram matrices fit in 2 GiB, else skipped;
    # 0: skipped. Each distinct layer input keeps an (in, in) float64 matrix in CPU memory.
    reconstruction_windows: int | None = None
    progress: bool = True  # progress bars (stage lines are printed by the CLI either way, unless -q)

    def __post_init__(self):
        require(self.dtype in DTYPES, f"config.dtype: {self.dtype!r} is not accepted; use one of {', '.join(DTYPES)}.")
        calibration, evaluation = self.calibration, self.evaluation
        if calibration.dataset is None:
            calibration.dataset = default_data("calibration", self.model)
        if evaluation.dataset is None:
            evaluation.dataset = default_data("evaluation", self.model)
        for spec in self.recover:
            if spec.dataset is None:
                spec.dataset = default_data("training", self.model)
        check_source(calibration.dataset)
        check_source(evaluation.dataset)
        _check_count("config.calibration.nsamples", calibration.nsamples, "calibration windows")
        _check_seqlen("config.calibration.seqlen", calibration.seqlen)
        _check_seqlen("config.evaluation.seqlen", evaluation.seqlen)
        _check_count("config.evaluation.batch_size", evaluation.batch_size, "windows per forward")
        if evaluation.max_windows is not None:
            _check_count("config.evaluation.max_windows", evaluation.max_windows, "windows (or null: all)")
        require(evaluation.split in SPLITS, f"config.evaluation.split: {evaluation.split!r} is not accepted; use one of {', '.join(SPLITS)}.")
        require(self.reconstruction_windows is None or self.reconstruction_windows >= 0,
                f"config.reconstruction_windows: {self.reconstruction_windows} is not accepted; give 0 (skip), a number "
                "of calibration windows, or null (4 when the model is small enough).")
        labels = [p.label() for p in self.prune]
        duplicates = {x for x in labels if labels.count(x) > 1}
        if duplicates:
            raise UsageError(f"config.prune: two entries are both named {sorted(duplicates)[0]!r}; give one a distinct 'name'.")
        for spec in self.prune:  # validates method, ratio and N:M before any work
            self.prune_config(spec)
        seen: dict[str, str] = {}
        for step in self.recovery_steps():
            spec, method, where = step.spec, step.method, step.where
            settings = spec.for_method(method, where)
            check_source(settings["dataset"])
            if settings["validation_file"] is not None:
                key = setting_key(spec, method, "validation_file", where)
                require(settings["eval_steps"] is not None,
                        f"{key}: {settings['validation_file']!r} is only scored during training, every eval_steps "
                        f"steps; set {setting_key(spec, method, 'eval_steps', where)} (e.g. 5) or drop validation_file.")
                check_local_file(settings["validation_file"], f"{key}:")
            _check_recovery(settings, functools.partial(setting_key, spec, method, where=where))
            if method == "blockwise":
                _check_blockwise(settings, functools.partial(setting_key, spec, method, where=where))
            label = step.label
            require(label not in seen, f"{where}: {label!r} is also what {seen.get(label)} recovers; give one of "
                                       "the two entries a distinct 'name' (its rows are named after it).")
            seen[label] = where

    def prune_config(self, spec: PruneSpec):
        """The :class:`prunetune.pruning.PruneConfig` of one prune entry (validates it)."""
        calibration = self.calibration
        return PruneConfig(method=spec.method, sparsity_ratio=spec.sparsity_ratio, sparsity_type=spec.sparsity_type,
                           use_variant=spec.use_variant, nsamples=calibration.nsamples, seqlen=calibration.seqlen,
                           seed=calibration.seed, calib_dataset=calibration.dataset,
                           true_sequential=spec.true_sequential, progress=self.progress,
                           sparsity_profile=spec.sparsity_profile, owl_m=spec.owl_m, owl_lambda=spec.owl_lambda,
                           reconstruct=spec.reconstruct, reconstruct_epochs=spec.reconstruct_epochs,
                           reconstruct_lr=spec.reconstruct_lr, reconstruct_batch_size=spec.reconstruct_batch_size)

    def recovery_steps(self) -> list[RecoveryStep]:
        """Every recovery stage, each after the one it starts from (see :mod:`prunetune.pipeline.plan`)."""
        return plan_recoveries(self.recover, [p.label() for p in self.prune])

    def stages_root(self) -> Path:
        output_dir = Path(self.output_dir).expanduser()
        return output_dir / "stages" if self.stages_dir is None else output_dir / Path(self.stages_dir).expanduser()


def _check_count(key: str, value: int, what: str) -> None:
    require(value >= 1, f"{key}: {value} is not accepted; give 1 or more {what}.")


def _check_seqlen(key: str, value: int | None) -> None:
    require(value is None or value >= 2,
            f"{key}: {value} is not accepted; give 2 or more tokens (a window predicts its tokens after the first), "
            "or null for the model's context (capped at 2048).")


def setting_key(spec: RecoverySpec, method: str, key: str, where: str) -> str:
    """The config key a recovery setting came from: an override, or the recover entry itself."""
    overrides = spec.method_overrides.get(method) or {}
    return f"{where}.method_overrides.{method}.{key}" if key in overrides else f"{where}.{key}"


def _check_recovery(settings: dict, key: Callable[[str], str]) -> None:
    """Recovery numbers a Trainer would reject (or silently misuse) only after pruning ran."""
    require(settings["block_size"] >= 2, f"{key('block_size')}: {settings['block_size']} is not accepted; give 2 or more tokens per block.")
    counts = {"per_device_train_batch_size": "blocks per device and step", "gradient_accumulation_steps":
              "batches per optimizer step", "lora_r": "as the adapter's rank", "logging_steps": "steps between logs",
              "per_device_eval_batch_size": "blocks per device and evaluation step"}
    for name, what in counts.items():
        _check_count(key(name), settings[name], what)
    optional = {"max_train_samples": "training blocks (or null: all)", "max_eval_samples": "held-out blocks (or null: all)",
                "eval_steps": "steps between held-out evaluations (or null: none during training)"}
    for name, what in optional.items():
        if settings[name] is not None:
            _check_count(key(name), settings[name], what)
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
    for name in ("distill_ce_weight", "distill_kl_weight", "distill_hidden_weight"):
        value = settings[name]
        require(math.isfinite(value) and value >= 0, f"{key(name)}: {value} is not accepted; give a number of 0 or more.")
    temperature = settings["distill_temperature"]
    require(math.isfinite(temperature) and temperature > 0,
            f"{key('distill_temperature')}: {temperature} is not accepted; give a positive number.")
    require(settings["distill_dtype"] in ("auto", "bfloat16", "float16", "float32"),
            f"{key('distill_dtype')}: {settings['distill_dtype']!r} is not accepted; use auto, bfloat16, float16 or float32.")
    if settings["distill_from"] is None:
        # a method an entry's override opts out of distilling keeps the entry's weights (they are for the others)
        opted_out = ".method_overrides." in key("distill_from")
        given = [f"{key(name)}: {settings[name]}" for name in DISTILL_ONLY if settings[name] != DISTILL_ONLY[name]
                 and (not opted_out or ".method_overrides." in key(name))]
        require(not given, f"{', '.join(given)} set without distill_from: distillation settings apply only with a "
                           "teacher. Add distill_from (dense, this pipeline's own dense model, or a model path or name) "
                           f"to the entry, or drop {'them' if len(given) > 1 else 'it'}.")
    if settings["distill_from"] is not None:
        require(settings["distill_ce_weight"] + settings["distill_kl_weight"] + settings["distill_hidden_weight"] > 0,
                f"{key('distill_kl_weight')}: the three distill_*_weight keys are all 0: nothing to train on.")


def _check_blockwise(settings: dict, key: Callable[[str], str]) -> None:
    """What block-wise reconstruction cannot use, refused before the first stage (as the recipe would after pruning)."""
    epochs = settings["num_train_epochs"]
    require(float(epochs).is_integer() and epochs >= 1,
            f"{key('num_train_epochs')}: {epochs:g} with blockwise: give a whole number of passes (1 or more).")
    require(settings["max_steps"] <= 0, f"{key('max_steps')}: {settings['max_steps']} is not used by blockwise (it trains "
                                        "every block num_train_epochs passes over the windows); leave it at -1.")
    for name in ("eval_steps", "validation_file"):
        require(settings[name] is None, f"{key(name)}: {settings[name]!r} does not apply to blockwise (it reports each "
                                        "block's held-out loss in blockwise.json); set it to null for this method.")
    require(settings["nsamples"] >= 2, f"{key('nsamples')}: {settings['nsamples']} is not accepted; give 2 or more "
                                       "calibration windows (one is held out).")
    _check_seqlen(key("seqlen"), settings["seqlen"])
    require(settings["seqlen"] is not None, f"{key('seqlen')}: give a number of tokens per window.")
    require(settings["blockwise_input"] in ("sparse", "dense", "mix"),
            f"{key('blockwise_input')}: {settings['blockwise_input']!r} is not accepted; use sparse, dense or mix.")
    _check_count(key("blockwise_window"), settings["blockwise_window"], "consecutive blocks")


# The recover keys that mean something only with distill_from, and their defaults (those of prunetune recover).
DISTILL_ONLY = {name: RecoverySpec.__dataclass_fields__[name].default
                for name in ("distill_ce_weight", "distill_kl_weight", "distill_hidden_weight", "distill_temperature")}


def load_config(path_or_mapping, overrides: dict | None = None) -> PipelineConfig:
    """A validated :class:`PipelineConfig` from a YAML/JSON file or a mapping; data left out follows the model."""
    data = load_mapping(path_or_mapping) if not isinstance(path_or_mapping, dict) else dict(path_or_mapping)
    data.update(overrides or {})
    return from_mapping(PipelineConfig, data)
