"""What a recovery run did: :class:`RecoveryResult` (``recovery.json``), its evaluation curve, and the
output folder's manifest (``prunetune.json``, ``complete: true`` only once everything else is written)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prunetune.errors import UsageError
from prunetune.loading import model_identity, resolve_model_path
from prunetune.outputs import MANIFEST_NAME, library_versions, read_manifest, write_json
from prunetune.recipe.args import ModelArguments, RecoveryTrainingArguments

RESULTS_NAME = "recovery.json"


@dataclass
class RecoveryResult:
    """What a recovery run did, as written to ``recovery.json``."""

    method: str
    model: str
    output_dir: str
    dataset: str  # the training source (--dataset_name / --train_file, or the model's default)
    block_size: int
    eval_dataset: str | None = None  # the evaluation source (--validation_file, else the training source)
    validation_split_percentage: float = 0.0  # held out of a local training text without split files
    training_text: str | None = None  # exactly which text trained (the data layer's description)
    evaluation_text: str | None = None  # exactly which text each perplexity is on
    steps: int = 0
    tokens: int = 0  # steps x global batch x block size, this run only
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""  # cuda_allocated | rss_increase (during training; see prunetune.memory)
    train_loss: float | None = None
    sparsity_before: float = 0.0
    sparsity_after: float = 0.0  # of the trained/frozen weights
    merged_sparsity: float | None = None  # adapters: what `prunetune merge --allow_dense` would give
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    # held-out perplexity during training: [{step, tokens, perplexity}], tokens trained since step 0
    # (global batch x block size per step); step 0 is perplexity_before, the last step perplexity_after
    eval_curve: list = field(default_factory=list)
    resumed_from: str | None = None
    learning_rate: float | None = None  # the peak rate used (the method's default when none was given)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def eval_curve(log_history: list[dict], last_step: int, result: RecoveryResult, args: RecoveryTrainingArguments) -> list[dict]:
    """Held-out perplexity against tokens trained: the Trainer's evaluations (``eval_loss``, resumed
    runs' included) plus the recipe's own before (step 0) and after (last step), on the same windows."""
    tokens_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size * result.block_size
    points = {entry["step"]: entry["eval_loss"] for entry in log_history if "eval_loss" in entry and "step" in entry}
    curve = {step: math.exp(loss) if loss < 700 else math.inf for step, loss in points.items()}  # exp overflows above ~709
    if result.perplexity_before is not None:
        curve[0] = result.perplexity_before
    if result.perplexity_after is not None and (result.steps or curve):
        curve[last_step] = result.perplexity_after
    return [{"step": step, "tokens": step * tokens_per_step, "perplexity": ppl} for step, ppl in sorted(curve.items())]


def write_manifest(setup, model_args: ModelArguments, result: RecoveryResult, complete: bool) -> None:
    """``prunetune.json`` of the output folder; ``complete`` is true only once everything else is written."""
    base_manifest = read_manifest(_model_path(model_args.model_name_or_path)) or {}
    manifest = {
        "kind": "adapter" if setup.saves_adapter else "model",
        "complete": complete,
        "base_model": model_args.model_name_or_path,
        "base_model_identity": model_identity(model_args.model_name_or_path),
        "base_config": model_args.config_name,
        "trust_remote_code": model_args.trust_remote_code,
        "pruning": base_manifest.get("pruning", {k: v for k, v in base_manifest.items() if k not in ("versions", "complete")}),
        **setup.manifest,
        "distillation": result.extra.get("distillation"),
        "training": {"steps": result.steps, "tokens": result.tokens, "dataset": result.dataset, "text": result.training_text,
                     "block_size": result.block_size},
        "versions": library_versions(),
    }
    write_json(Path(result.output_dir) / MANIFEST_NAME, manifest)


def _model_path(name: str) -> str:
    try:
        return resolve_model_path(name)
    except UsageError:
        return name
