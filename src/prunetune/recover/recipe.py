"""The recovery recipe: load -> check -> data -> set up the method -> train -> evaluate -> save.

``recover(model_args, data_args, recovery_args, training_args)`` is what ``prunetune recover``
runs; it reads top to bottom like the steps above and knows nothing about any one method
(those live behind :data:`SETUPS`). Runs under ``torchrun`` / ``accelerate launch`` as is:
the Trainer owns DDP, every rank checks its own masks, rank 0 writes the outputs.

Perplexity is only ever computed on text the run does not train on (:func:`plan_data`): a
``--validation_file``, a source's own validation/test split, or the held-out part of a local
text (``--validation_split_percentage``); ``recovery.json`` says which text each number is on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import Trainer, default_data_collator
from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from prunetune.errors import UsageError, require
from prunetune.recover.args import DataArguments, ModelArguments, RecoveryArguments, RecoveryTrainingArguments
from prunetune.recover.base import base_layers, zero_fraction
from prunetune.recover.callbacks import SparsityGuard, TrainingProgress
from prunetune.recover.distill import DistillTrainer
from prunetune.recover.full import setup_full
from prunetune.recover.lora import setup_lora, setup_masked_lora
from prunetune.recover.memory_estimate import announce as announce_memory, check_optimizer
from prunetune.recover.sharding import check_sharding
from prunetune.recover.data_plan import DataPlan, HeldOutText, check_held_out, evaluates_during_training, plan_data  # noqa: F401
from prunetune.recover.run_folder import prepare_output_dir, resolve_resume  # noqa: F401
from prunetune.rng import kept_rng_states

logger = logging.getLogger(__name__)

SETUPS = {"lora": setup_lora, "masked_lora": setup_masked_lora, "full": setup_full}
MIN_SPARSITY = 0.01  # below this a model counts as unpruned
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
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_dtype(model_args: ModelArguments, recovery_args: RecoveryArguments, device: torch.device) -> str:
    from prunetune.loading import torch_dtype

    if model_args.dtype != "auto":
        if recovery_args.recovery_method == "full" and torch_dtype(model_args.dtype) == torch.float16:
            raise UsageError(
                f"--recovery_method full with --dtype {model_args.dtype} would step the optimizer on float16 master "
                "weights (updates below fp16's resolution are lost, AdamW's state underflows). Use --dtype auto or "
                "float32 (fp32 master weights; add --fp16 or --bf16 for mixed precision on a GPU), or --dtype bfloat16."
            )
        return model_args.dtype
    # frozen adapter bases train fine in bf16; full fine-tuning keeps fp32 master weights
    return "bfloat16" if device.type == "cuda" and recovery_args.uses_adapter else "float32"


def check_config(model, model_args: ModelArguments) -> None:
    """``--config_name`` as a local folder must describe the same architecture as the model."""
    if not model_args.config_name:
        return
    path = Path(model_args.config_name).expanduser()
    if not (path / "config.json").exists():
        logger.info("--config_name %s is not a local folder; recorded only (the model folder's config is used)", model_args.config_name)
        return
    given = json.loads((path / "config.json").read_text(encoding="utf-8"))
    own = model.config.to_dict()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if key in given and key in own and given[key] != own[key]:
            raise UsageError(f"--config_name {model_args.config_name} has {key}={given[key]} but the model has {own[key]}; give the config of the model that was pruned.")


def check_sparsity(model_name: str, sparsity: float, recovery_args: RecoveryArguments) -> None:
    if sparsity >= MIN_SPARSITY or recovery_args.allow_dense_finetune:
        return
    plain = "plain fine-tuning" if recovery_args.recovery_method == "full" else "plain LoRA"
    raise UsageError(
        f"{model_name} has no sparsity ({sparsity:.2%} of its prunable weights are zero): there is nothing to recover. "
        f"Prune it first (prunetune prune ...), or pass --allow_dense_finetune to run {plain} on the dense model."
    )


def load_options(model_args: ModelArguments, recovery_args: RecoveryArguments, training_args: RecoveryTrainingArguments):
    from prunetune.loading import LoadOptions

    return LoadOptions(dtype=resolve_dtype(model_args, recovery_args, training_args.device),
                       trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir,
                       flag="--model_name_or_path")


def load_student_tokenizer(model_args: ModelArguments, recovery_args: RecoveryArguments,
                           training_args: RecoveryTrainingArguments):
    from prunetune.loading import load_tokenizer

    options = load_options(model_args, recovery_args, training_args)
    tokenizer_options = replace(options, flag="--tokenizer_name") if model_args.tokenizer_name else options
    return load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path, tokenizer_options)


def load(model_args: ModelArguments, recovery_args: RecoveryArguments, training_args: RecoveryTrainingArguments,
         tokenizer=None):
    from prunetune.loading import load_model

    options = load_options(model_args, recovery_args, training_args)
    if tokenizer is None:
        tokenizer = load_student_tokenizer(model_args, recovery_args, training_args)
    model = load_model(model_args.model_name_or_path, options)
    model.config.use_cache = False  # no KV cache while training
    return model.to(training_args.device), tokenizer


def resolve_block_size(model, data_args: DataArguments) -> int:
    from prunetune.loading import max_positions

    limit = max_positions(model)
    block_size = data_args.block_size or min(1024, limit or 1024)
    require(limit is None or block_size <= limit, f"--block_size {block_size} exceeds the model's {limit} positions; use {limit} or less.")
    return block_size


def make_trainer(setup, training_args: RecoveryTrainingArguments, train_data, tokenizer=None,
                 callbacks: list | None = None, *, eval_data=None, label: str = "recover",
                 block_size: int | None = None, distiller=None) -> tuple[Trainer, SparsityGuard]:
    """A ``Trainer`` for a method's setup, with the sparsity guard first among prunetune's callbacks.

    The Trainer's own progress bar and log printer give way to :class:`TrainingProgress`: one bar
    labelled ``label`` (loss, tokens/s, time left), the metrics logged at INFO (``-v``).
    """
    if training_args.ddp_broadcast_buffers is None:
        # masks are identical on every rank by construction; broadcasting them each step costs GBs
        training_args.ddp_broadcast_buffers = False
    guard = SparsityGuard(setup.check, [p for p in setup.model.parameters() if p.requires_grad])
    kind, extra = (Trainer, {}) if distiller is None else (DistillTrainer, {"distiller": distiller})
    trainer = kind(model=setup.model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
                   data_collator=default_data_collator, processing_class=tokenizer,
                   callbacks=[guard, *setup.callbacks, *(callbacks or [])], **extra)
    for replaced in (PrinterCallback, ProgressCallback, DEFAULT_PROGRESS_CALLBACK):  # the last: notebooks' bar
        trainer.remove_callback(replaced)
    block_size = block_size or (train_data[0]["input_ids"].shape[-1] if train_data is not None and len(train_data) else 0)
    global_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size
    trainer.add_callback(TrainingProgress(label, global_batch * block_size))
    return trainer, guard


def recover(model_args: ModelArguments, data_args: DataArguments, recovery_args: RecoveryArguments,
            training_args: RecoveryTrainingArguments, callbacks: list | None = None) -> RecoveryResult:
    """Recover a pruned model; write the adapter (or model) and ``recovery.json`` to ``--output_dir``.

    The output folder is checked before anything is loaded and locked for the whole run (main
    process); its ``prunetune.json`` says ``complete: false`` from the first step until the
    adapter or model, ``recovery.json`` and then the final manifest are written.

    Raises:
        UsageError: bad input (see the messages), and ``TrainingStopped`` when the guard stops the run.
    """
    from prunetune.outputs import check_output_dir, output_lock

    method = recovery_args.recovery_method
    # Sharding: full follows FSDP2's DTensor shards; DeepSpeed ZeRO and FSDP1 flatten weights (sharding.py).
    check_sharding(method, training_args)
    check_optimizer(training_args)  # bitsandbytes present, CUDA for its paged optimizers
    announce_memory(model_args, data_args, recovery_args, training_args)  # CUDA full: the predicted peak, logged
    resolve_dtype(model_args, recovery_args, training_args.device)  # refuses fp16 master weights before any work
    is_main = training_args.process_index == 0
    resume_dir = resolve_resume(training_args, method)
    if is_main and resume_dir is None:
        check_output_dir(training_args.output_dir, overwrite=training_args.overwrite_output_dir)
    lock = output_lock(training_args.output_dir, "prunetune recover") if is_main else contextlib.nullcontext()
    with lock, kept_rng_states():  # the Trainer's set_seed must not change the caller's draws
        return _recover(model_args, data_args, recovery_args, training_args, callbacks, resume_dir)


def _recover(model_args: ModelArguments, data_args: DataArguments, recovery_args: RecoveryArguments,
             training_args: RecoveryTrainingArguments, callbacks: list | None, resume_dir: Path | None) -> RecoveryResult:
    from prunetune.recover.callbacks import CheckpointMarker, LearningRateOverride, checkpoint_info

    method = recovery_args.recovery_method
    is_main = training_args.process_index == 0
    plan = plan_data(model_args, data_args)
    if training_args.do_eval and training_args.do_train:
        check_held_out(plan)  # before the model loads
    if data_args.dataset_config_name:
        logger.warning("--dataset_config_name %s ignored: prunetune's %r source fixes its files", data_args.dataset_config_name,
                       plan.train_source)
    distill = recovery_args.distill_settings()
    tokenizer = None
    if distill is not None and training_args.do_train:  # before the student loads: configs and tokenizers only
        from prunetune.recover.distill import check_teacher

        tokenizer = load_student_tokenizer(model_args, recovery_args, training_args)
        check_teacher(distill.teacher, model_args.model_name_or_path, distill,
                      load_options(model_args, recovery_args, training_args), tokenizer)
    model, tokenizer = load(model_args, recovery_args, training_args, tokenizer)
    check_config(model, model_args)
    sparsity_before = zero_fraction(base_layers(model))
    check_sparsity(model_args.model_name_or_path, sparsity_before, recovery_args)
    block_size = resolve_block_size(model, data_args)
    if training_args.do_eval and recovery_args.eval_seqlen:  # before training, not after it
        from prunetune.loading import max_positions

        limit = max_positions(model)
        require(limit is None or recovery_args.eval_seqlen <= limit,
                f"--eval_seqlen {recovery_args.eval_seqlen} exceeds the model's {limit} positions; use {limit} or less.")
    result = RecoveryResult(method=method, model=model_args.model_name_or_path, output_dir=training_args.output_dir,
                            dataset=plan.train_source, block_size=block_size, sparsity_before=sparsity_before,
                            eval_dataset=plan.eval_source if training_args.do_eval else None,
                            validation_split_percentage=plan.train_percent,
                            resumed_from=str(resume_dir) if resume_dir else None)
    checkpoint = checkpoint_info(resume_dir) if resume_dir is not None else None
    if checkpoint is not None and checkpoint.get("base_mask_digests"):
        from prunetune.recover.adapter import check_base_manifest

        check_base_manifest(model, checkpoint, str(resume_dir))  # the same pruned base, position by position

    train_data, held_out = None, None
    during = evaluates_during_training(training_args)
    # Under DDP the main process tokenizes first; the other ranks then read its token cache.
    with training_args.main_process_first(desc="training and evaluation data"):
        if training_args.do_train:
            from prunetune.data import training_blocks

            streaming = {"streaming": True} if data_args.streaming else {}
            train_data = training_blocks(tokenizer, plan.train_source, block_size, split="train",
                                         max_samples=data_args.max_train_samples, cache_dir=model_args.cache_dir,
                                         validation_percent=plan.train_percent, flag=plan.train_flag, **streaming)
            result.training_text = getattr(train_data, "description", None) or plan.train_source
        if training_args.do_eval and (is_main or during):
            held_out = HeldOutText(tokenizer, plan, data_args, recovery_args.eval_seqlen or block_size, model_args.cache_dir)
            result.evaluation_text = held_out.description
    if held_out is not None and recovery_args.eval_before_training and resume_dir is None and is_main:
        result.perplexity_before = held_out.perplexity(model, training_args, "perplexity before")

    from transformers import set_seed

    set_seed(training_args.seed)  # the adapter's random init: reproducible runs (scoped by recover(); the Trainer reseeds)
    setup = SETUPS[method](model, recovery_args, resume_dir)
    # the marker goes after the method's callbacks (they add files to checkpoints), before the caller's
    own = [CheckpointMarker({"recovery_method": method, **setup.manifest})]
    if resume_dir is not None:
        own.append(LearningRateOverride((checkpoint or {}).get("learning_rate")))
    distiller = None
    if distill is not None and training_args.do_train:
        distiller = _distiller(setup.model, distill, load_options(model_args, recovery_args, training_args),
                               training_args, result)
    trainer, guard = make_trainer(setup, training_args, train_data, tokenizer, [*own, *(callbacks or [])],
                                  eval_data=held_out.blocks() if during else None,
                                  label=f"recover {method}" + (" + distill" if distiller else ""),
                                  block_size=block_size, distiller=distiller)
    if is_main and (training_args.do_train or training_args.do_eval):
        if resume_dir is None:
            prepare_output_dir(training_args, method)
        if training_args.do_train:
            _write_manifest(setup, model_args, result, complete=False)  # readers see an unfinished run
    if training_args.do_train:
        _train(trainer, training_args, resume_dir, block_size, result)
        _save(trainer, setup)
    result.sparsity_after = guard.verify(trainer.state.global_step, training_args.output_dir)
    logger.info("rank %d: sparsity %.4f, no pruned weight nonzero in %d checked layers",
                training_args.process_index, result.sparsity_after, len(setup.check.layers))
    if setup.saves_adapter:
        from prunetune.export import merged_zero_fraction

        result.merged_sparsity = merged_zero_fraction(setup.model)
    if held_out is not None and is_main:
        result.perplexity_after = held_out.perplexity(setup.model, training_args, "perplexity after")
    result.eval_curve = eval_curve(trainer.state.log_history, trainer.state.global_step, result, training_args)
    if is_main and (training_args.do_train or training_args.do_eval):
        from prunetune.outputs import write_json

        write_json(Path(training_args.output_dir) / RESULTS_NAME, result.to_dict())
        if training_args.do_train:
            _write_manifest(setup, model_args, result, complete=True)  # last: the run is whole
    return result


def _distiller(student, settings, options, training_args: RecoveryTrainingArguments, result: RecoveryResult):
    """Load the frozen teacher and the loss around it; records the settings and the teacher's memory."""
    from dataclasses import asdict

    from prunetune.recover.distill import Distiller, load_teacher, model_bytes

    teacher = load_teacher(settings, options, training_args.device)
    size = model_bytes(teacher)
    logger.info("distillation teacher %s: %.1f MiB in %s on %s", settings.teacher, size / 2**20,
                next(teacher.parameters()).dtype, training_args.device)
    result.extra["distillation"] = {**asdict(settings), "teacher_bytes": size,
                                    "teacher_dtype": str(next(teacher.parameters()).dtype).removeprefix("torch.")}
    return Distiller(student, teacher, settings)


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


def _train(trainer: Trainer, args: RecoveryTrainingArguments, resume_dir: Path | None, block_size: int,
           result: RecoveryResult) -> None:
    from prunetune.memory import track_peak_memory

    first_step = 0
    if resume_dir is not None:
        first_step = json.loads((resume_dir / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
    with track_peak_memory(args.device) as peak:
        output = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    result.steps = output.global_step - first_step
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    result.tokens = result.steps * global_batch * block_size
    result.train_seconds = float(output.metrics.get("train_runtime", 0.0))
    result.tokens_per_second = result.tokens / result.train_seconds if result.train_seconds else 0.0
    result.train_loss = output.training_loss
    # CUDA: peak allocated during training; CPU: how far the resident set rose above its level
    # when training started (the absolute RSS would count whatever the process held before)
    result.peak_memory_bytes = int(peak.block_mb * 2**20)
    result.peak_memory_kind = peak.kind if peak.kind != "rss" else "rss_increase"


def _save(trainer: Trainer, setup) -> None:
    output_dir = Path(trainer.args.output_dir)
    trainer.save_model(str(output_dir))  # every rank: sharded strategies gather here
    if trainer.args.process_index != 0:
        return
    trainer.save_state()
    setup.save_extra(output_dir)


def _write_manifest(setup, model_args: ModelArguments, result: RecoveryResult, complete: bool) -> None:
    """``prunetune.json`` of the output folder; ``complete`` is true only once everything else is written."""
    from prunetune.loading import model_identity
    from prunetune.outputs import MANIFEST_NAME, library_versions, read_manifest, write_json

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
    from prunetune.loading import resolve_model_path

    try:
        return resolve_model_path(name)
    except UsageError:
        return name
