"""One recovery stage: train with :func:`prunetune.recipe.recover`, evaluate, export, summarize.

The recovery recipe's Trainer writes ``trainer_state.json``; its ``log_history`` gives the
training loss at every ``logging_steps`` and, with ``eval_steps``, the held-out loss at step 0
and every ``eval_steps`` (the Trainer's own evaluation on the recipe's held-out blocks, text
the run never trains on). The report plots both against tokens trained.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from prunetune.loading import DTYPES, load_model
from prunetune.masks import measure_sparsity
from prunetune.memory import track_peak_memory
from prunetune.pipeline.stages import memory_figures

BLOCKWISE_REPORT = "blockwise.json"  # written by prunetune recover --recovery_method blockwise

logger = logging.getLogger(__name__)

# Settings that only add evaluation during training: left out of a stage's key while at their
# defaults, so runs finished before they existed stay valid.
EVAL_DEFAULTS = {"eval_steps": None, "max_eval_samples": None, "per_device_eval_batch_size": 8, "validation_file": None}


def recovery_dtype(method: str, dtype: str) -> str:
    """The dtype a recovery method loads its weights in, given the pipeline's ``dtype``.

    ``full`` trains every weight: an optimizer stepping on float16 master weights loses small
    updates to rounding and keeps AdamW's moments in float16 (underflow, overflow), so float16
    becomes ``auto``: float32 master weights, trained under bf16 autocast on CUDA. Adapters
    train float32 LoRA weights and may keep their frozen base in float16.
    """
    import torch

    if method in ("full", "blockwise") and DTYPES[dtype] is torch.float16:  # both step Adam on the weights
        return "auto"
    return dtype


# Distillation settings: left out of a stage's key while distillation is off (runs finished
# before distillation existed stay valid).
DISTILL_KEYS = ("distill_from", "distill_ce_weight", "distill_kl_weight", "distill_hidden_weight", "distill_temperature",
                "distill_dtype")


# What block-wise reconstruction reads; the other keys (block_size, LoRA, distillation weights, ...) do not change it.
BLOCKWISE_KEYS = ("dataset", "nsamples", "seqlen", "num_train_epochs", "learning_rate", "per_device_train_batch_size",
                  "blockwise_input", "blockwise_window", "distill_from", "distill_dtype")
# Block-wise settings: left out of the other methods' keys (runs finished before blockwise existed stay valid).
BLOCKWISE_ONLY = ("nsamples", "seqlen", "blockwise_input", "blockwise_window")


def hashed_settings(settings: dict, method: str = "") -> dict:
    """The recovery settings a stage key holds (evaluation-only settings at their defaults left out)."""
    if method == "blockwise":
        return {k: settings[k] for k in BLOCKWISE_KEYS}
    settings = {k: v for k, v in settings.items() if k not in BLOCKWISE_ONLY}
    distills = settings.get("distill_from") is not None
    return {k: v for k, v in settings.items()
            if not (k in EVAL_DEFAULTS and v == EVAL_DEFAULTS[k]) and (distills or k not in DISTILL_KEYS)}


def teacher_name(pipeline, settings: dict) -> str | None:
    """The teacher a stage distils from: ``dense`` is the pipeline's dense model (its safetensors copy for a GGUF)."""
    teacher = settings.get("distill_from")
    if teacher == "dense":
        return str(pipeline.dense_source())
    return teacher


def tokens_per_step(settings: dict, world_size: int = 1) -> int:
    """Tokens one optimizer step trains on: global batch x block size."""
    return settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"] * world_size * settings["block_size"]


def recovery_arguments(pipeline, train_dir: Path, pruned_dir: Path, method: str, settings: dict) -> tuple:
    """The four argument objects of :func:`prunetune.recipe.recover` for one stage."""
    # the recipe (Trainer, datasets, peft) loads only when a recover stage runs: prune-only configs start faster
    from prunetune.recipe.args import DataArguments, ModelArguments, RecoveryArguments, RecoveryTrainingArguments

    config = pipeline.config
    model_args = ModelArguments(model_name_or_path=str(pruned_dir), dtype=recovery_dtype(method, config.dtype),
                                trust_remote_code=config.trust_remote_code)
    data_args = DataArguments(dataset_name=settings["dataset"], block_size=settings["block_size"],
                              max_train_samples=settings["max_train_samples"], max_eval_samples=settings["max_eval_samples"],
                              validation_file=settings["validation_file"])
    recovery_args = RecoveryArguments(recovery_method=method, lora_r=settings["lora_r"], lora_alpha=settings["lora_alpha"],
                                      lora_dropout=settings["lora_dropout"],
                                      lora_target_modules=settings["lora_target_modules"], eval_before_training=False,
                                      distill_from=teacher_name(pipeline, settings),
                                      distill_ce_weight=settings["distill_ce_weight"],
                                      distill_kl_weight=settings["distill_kl_weight"],
                                      distill_hidden_weight=settings["distill_hidden_weight"],
                                      distill_temperature=settings["distill_temperature"],
                                      distill_dtype=settings["distill_dtype"],
                                      **_blockwise_arguments(method, settings))
    evaluation = {}
    if settings["eval_steps"]:  # the Trainer scores the recipe's held-out blocks before step 1 and every eval_steps
        evaluation = {"eval_strategy": "steps", "eval_steps": settings["eval_steps"], "eval_on_start": True,
                      "per_device_eval_batch_size": settings["per_device_eval_batch_size"]}
    training_args = RecoveryTrainingArguments(
        output_dir=str(train_dir), overwrite_output_dir=True, do_train=True, do_eval=bool(evaluation),
        max_steps=settings["max_steps"], num_train_epochs=settings["num_train_epochs"],
        learning_rate=settings["learning_rate"], per_device_train_batch_size=settings["per_device_train_batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"], warmup_steps=settings["warmup_steps"],
        logging_steps=settings["logging_steps"], save_strategy="no", report_to=[], seed=config.seed,
        disable_tqdm=not config.progress, use_cpu=pipeline.device() == "cpu", **evaluation,
    )
    return model_args, data_args, recovery_args, training_args


def _blockwise_arguments(method: str, settings: dict) -> dict:
    """The recipe's blockwise flags (left at their defaults for the other methods)."""
    if method != "blockwise":
        return {}
    return {name: settings[name] for name in BLOCKWISE_ONLY}


def run_recovery(pipeline, directory: Path, pruned_dir: Path, method: str, settings: dict) -> dict:
    """Train, evaluate the result as the report shows it, export it; returns the stage's summary."""
    # the recipe (Trainer, datasets, peft) loads only when a recover stage runs: prune-only configs start faster
    from prunetune.export import merge_adapter, save_merged
    from prunetune.recover.adapter import apply_adapter

    config = pipeline.config
    train_dir = directory / "train"
    # The recipe measures training alone, but on CPU as the process's RSS (what earlier stages left
    # resident included); this block's increase is the stage's own: loading, training, saving.
    with track_peak_memory(pipeline.device()) as peak:
        model_args, result, held_out = _train(pipeline, train_dir, pruned_dir, method, settings)
    # The Trainer's runtime includes its evaluations during training: the table's time is the training alone.
    eval_seconds = sum(entry.get("eval_runtime", 0.0) for entry in _log_history(train_dir)) if held_out else 0.0
    train_seconds = max(result.train_seconds - eval_seconds, 0.0)
    summary = {"method": method, "dtype": model_args.dtype, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
               "tokens": result.tokens, "tokens_per_second": result.tokens / train_seconds if train_seconds else 0.0,
               "steps": result.steps, "train_loss": result.train_loss,
               **memory_figures(peak), "tokens_per_step": tokens_per_step(settings), "loss_history": loss_history(train_dir),
               "eval_history": eval_history(train_dir) if held_out else []}
    distillation = _recipe_results(train_dir).get("extra", {}).get("distillation")
    if distillation:
        summary["distillation"] = {k: v for k, v in distillation.items() if k != "teacher"}
    if held_out is not None:  # which text the curve is on, where the recipe says (recovery.json)
        summary["eval_text"] = _recipe_results(train_dir).get("evaluation_text") or ""
    if held_out is not None and held_out.input_ids is not None:  # the reference: the dense model on the same blocks
        dense = pipeline.load_dense()
        summary["eval_dense_perplexity"] = held_out.perplexity(dense, settings["per_device_eval_batch_size"])
        del dense
    if model_args.dtype != config.dtype:
        summary["dtype_note"] = (f"config dtype {config.dtype}: {method} trained float32 master weights "
                                 "(dtype auto; bf16 autocast on CUDA)")
    label = f"recover {method}"
    if method == "blockwise":  # per-block losses before/after, kept in the stage's result for the report's plot
        summary["blockwise"] = json.loads((train_dir / BLOCKWISE_REPORT).read_text())
    if method in ("full", "blockwise"):  # a full model folder
        model = load_model(str(train_dir), pipeline.load_options())
        summary["evaluation"] = pipeline.evaluate(model, label)
        summary["sparsity"] = summary["sparsity_after_merge"] = measure_sparsity(model).overall
        summary["export_dir"] = "train"
        return summary
    peft_model = apply_adapter(load_model(str(pruned_dir), pipeline.load_options()), str(train_dir))
    summary["evaluation"] = pipeline.evaluate(peft_model, label)  # the adapter applied, unmerged
    merged, report = merge_adapter(peft_model, method, remask=False)
    # Masked LoRA: the perplexity above saw exactly the merged weights (merge_adapter rounds as the fused forward did).
    summary["sparsity"] = summary["sparsity_after_merge"] = report.sparsity_after
    summary["base_sparsity"] = report.sparsity_before  # the frozen pruned weights under the adapter
    summary["merge_exact"] = report.exact
    if method == "lora":  # a plain LoRA merge densifies: show what re-masking it costs
        remasked, remask_report = merge_adapter(
            apply_adapter(load_model(str(pruned_dir), pipeline.load_options()), str(train_dir)), method, remask=True)
        summary["remasked"] = {"evaluation": pipeline.evaluate(remasked, f"{label} remasked"),
                               "sparsity": remask_report.sparsity_after}
    else:
        save_merged(merged, pipeline.tokenizer(), directory / "merged",
                    {"stage": "recover", "method": method, "base_model": str(pruned_dir.absolute()),
                     "pruned_model": str(pruned_dir)}, overwrite=True)
        summary["export_dir"] = "merged"
        summary["evaluation_merged"] = pipeline.evaluate(merged, f"{label} merged", zeroshot=False)  # same weights (masked)
    return summary


def _train(pipeline, train_dir: Path, pruned_dir: Path, method: str, settings: dict):
    """(model arguments, the recipe's result, the held-out blocks callback or None when the Trainer did not evaluate)."""
    # the recipe (Trainer, datasets, peft) loads only when a recover stage runs: prune-only configs start faster
    from prunetune.pipeline.held_out import HeldOutBlocks
    from prunetune.recipe import recover

    if settings["eval_steps"] and not pipeline.trainer_cannot_evaluate:
        held_out = HeldOutBlocks()
        model_args, *other_args = recovery_arguments(pipeline, train_dir, pruned_dir, method, settings)
        try:
            return model_args, recover(model_args, *other_args, callbacks=[held_out]), held_out
        except ValueError as err:  # the Trainer refuses eval_steps when the recipe gives it no held-out data
            if "eval_dataset" not in str(err):
                raise
            logger.warning("eval_steps: the recovery recipe gives the Trainer no held-out data to evaluate on, so the "
                           "report has no perplexity curve (%s)", " ".join(str(err).split())[:200])
            pipeline.trainer_cannot_evaluate = True  # once per run: later stages train without trying
    model_args, *other_args = recovery_arguments(pipeline, train_dir, pruned_dir, method, {**settings, "eval_steps": None})
    return model_args, recover(model_args, *other_args), None


def _recipe_results(train_dir: Path) -> dict:
    # the recipe (Trainer, datasets, peft) loads only when a recover stage runs: prune-only configs start faster
    from prunetune.recipe import RESULTS_NAME

    path = train_dir / RESULTS_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def _log_history(train_dir: Path) -> list[dict]:
    state = train_dir / "trainer_state.json"
    if not state.exists():
        return []
    return json.loads(state.read_text()).get("log_history", [])


def loss_history(train_dir: Path) -> list[tuple[int, float]]:
    """(optimizer step, training loss) at every logging step."""
    return [(entry["step"], entry["loss"]) for entry in _log_history(train_dir) if "loss" in entry and "step" in entry]


def eval_history(train_dir: Path) -> list[tuple[int, float]]:
    """(optimizer step, held-out perplexity = exp(eval_loss)) at every evaluation, step 0 included."""
    points = {}
    for entry in _log_history(train_dir):
        if "eval_loss" in entry and "step" in entry:
            loss = entry["eval_loss"]
            points[entry["step"]] = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float above ~709
    return sorted(points.items())
