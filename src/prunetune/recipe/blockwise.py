"""``prunetune recover --recovery_method blockwise``: block-wise reconstruction, without the Trainer.

The recipe around :func:`prunetune.recover.blockwise.reconstruct`, as a table of contents::

    check    the flags, --distill_from, the output folder (before anything loads)
    build    the pruned model and the dense one (same architecture, else refused), calibration windows
             drawn from the training text (--dataset_name / --train_file / the model's default)
    train    reconstruct block after block; each finished block is written to
             <output_dir>/checkpoint-blockwise, so --resume_from_checkpoint continues a killed run
    save     a full model folder (safetensors), blockwise.json (per-block losses), recovery.json,
             and prunetune.json last (complete: true)

The output folder follows the recipe's rules (:mod:`prunetune.recipe.run_folder`): refused when
not empty unless --overwrite_output_dir, locked for the run, ``complete: false`` in its manifest
until everything else is written.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch

from prunetune.data import calibration_samples
from prunetune.errors import require
from prunetune.loading import load_model, torch_dtype
from prunetune.memory import track_peak_memory
from prunetune.outputs import output_lock, write_json
from prunetune.recipe.args import DataArguments, ModelArguments, RecoveryArguments, RecoveryTrainingArguments
from prunetune.recipe.build import check_sparsity, load_options, load_student_tokenizer
from prunetune.recipe.data_plan import HeldOutText, check_held_out, plan_data
from prunetune.recipe.result import RESULTS_NAME, RecoveryResult, write_manifest
from prunetune.recipe.run_folder import check_output, prepare_output_dir
from prunetune.recover.base import Setup, base_layers, zero_fraction
from prunetune.recover.blockwise import RUN_FILE, BlockwiseConfig, check_same_architecture, reconstruct
from prunetune.rng import kept_rng_states

logger = logging.getLogger(__name__)

PROGRESS_DIR = "checkpoint-blockwise"
REPORT_NAME = "blockwise.json"
# Measured on SmolLM2-135M after Wanda 50% (benchmarks/results/blockwise_*.json): 1e-3 won back more
# of the gap than 5e-4 in the few steps a CPU budget allows (the paper's 2e-4 is for ~10x more steps).
DEFAULT_LEARNING_RATE = BlockwiseConfig.learning_rate


def blockwise_config(recovery_args: RecoveryArguments, training_args: RecoveryTrainingArguments) -> BlockwiseConfig:
    """The reconstruction's settings from the flags; refuses values it cannot use, naming the flag."""
    epochs = training_args.num_train_epochs
    require(float(epochs).is_integer() and epochs >= 1,
            f"--num_train_epochs {epochs:g} with --recovery_method blockwise: give a whole number of passes (1 or more).")
    require(training_args.max_steps is None or training_args.max_steps <= 0,
            f"--max_steps {training_args.max_steps} is not used by --recovery_method blockwise (it trains every block "
            "for --num_train_epochs passes over the calibration windows); leave it out.")
    require(training_args.world_size == 1,
            f"--recovery_method blockwise runs in one process (this launch has {training_args.world_size}); start it "
            "without torchrun / accelerate launch.")
    device = training_args.device
    return BlockwiseConfig(
        nsamples=recovery_args.nsamples, seqlen=recovery_args.seqlen, epochs=int(epochs),
        learning_rate=training_args.learning_rate or DEFAULT_LEARNING_RATE,
        batch_size=training_args.per_device_train_batch_size, input_mode=recovery_args.blockwise_input,
        window=recovery_args.blockwise_window, compute_device=None if device.type == "cpu" else str(device),
        seed=training_args.seed)


def _progress_dir(training_args: RecoveryTrainingArguments) -> Path | None:
    """The progress folder to continue (``--resume_from_checkpoint``: latest, true or its path), else None."""
    resume = training_args.resume_from_checkpoint
    if not resume:
        return None
    own = Path(training_args.output_dir) / PROGRESS_DIR
    folder = own if resume.lower() in ("true", "latest", "last") else Path(resume)
    require((folder / RUN_FILE).exists(),
            f"--resume_from_checkpoint {resume}: {folder} is not the progress folder of a block-wise run "
            f"(no {RUN_FILE}); a run keeps it in <output_dir>/{PROGRESS_DIR} until it finishes.")
    require(folder.absolute().resolve() == own.absolute().resolve(),
            f"--resume_from_checkpoint {resume}: a block-wise run continues in its own folder; give "
            f"--output_dir {folder.parent}.")
    return folder


def recover_blockwise(model_args: ModelArguments, data_args: DataArguments, recovery_args: RecoveryArguments,
                      training_args: RecoveryTrainingArguments) -> RecoveryResult:
    """Reconstruct every block of the pruned model from the dense one; write the recovered model folder.

    Raises:
        UsageError: bad flags, no or another architecture's --distill_from, an output folder that is
            not empty -- all before any training.
    """
    # check
    config = blockwise_config(recovery_args, training_args)
    require(recovery_args.distill_from is not None,
            "--recovery_method blockwise trains each block to reproduce the dense model's: name the dense model the "
            "pruned one was made from with --distill_from.")
    options = load_options(model_args, recovery_args, training_args)
    require(torch_dtype(options.dtype) != torch.float16,
            f"--dtype {model_args.dtype} with --recovery_method blockwise would step Adam on float16 weights; use "
            "float32 (default) or bfloat16.")
    progress = _progress_dir(training_args)
    fresh = check_output(model_args, data_args, recovery_args, training_args, progress)
    plan = plan_data(model_args, data_args)
    if training_args.do_eval:
        check_held_out(plan)
    with output_lock(training_args.output_dir, "prunetune recover"), kept_rng_states():
        # build
        tokenizer = load_student_tokenizer(model_args, recovery_args, training_args)
        student = load_model(model_args.model_name_or_path, options)
        teacher = load_model(recovery_args.distill_from, dataclasses.replace(options, flag="--distill_from"))
        check_same_architecture(student, teacher)
        sparsity_before = zero_fraction(base_layers(student))
        check_sparsity(model_args.model_name_or_path, sparsity_before, recovery_args)
        ids = calibration_samples(tokenizer, plan.train_source, config.nsamples, config.seqlen, seed=training_args.seed,
                                  cache_dir=model_args.cache_dir, validation_percent=plan.train_percent, flag=plan.train_flag)
        result = RecoveryResult(method="blockwise", model=model_args.model_name_or_path,
                                output_dir=training_args.output_dir, dataset=plan.train_source, block_size=config.seqlen,
                                sparsity_before=sparsity_before, validation_split_percentage=plan.train_percent,
                                eval_dataset=plan.eval_source if training_args.do_eval else None,
                                resumed_from=str(progress) if progress else None, learning_rate=config.learning_rate)
        held_out = None
        if training_args.do_eval:
            held_out = HeldOutText(tokenizer, plan, data_args, recovery_args.eval_seqlen or config.seqlen, model_args.cache_dir)
            result.evaluation_text = held_out.description
            if recovery_args.eval_before_training:
                result.perplexity_before = held_out.perplexity(student, training_args, "perplexity before")
        setup = Setup(model=student, check=None, saves_adapter=False,
                      manifest={"recovery_method": "blockwise", "blockwise": dataclasses.asdict(config),
                                "distill_from": recovery_args.distill_from})
        if fresh:
            prepare_output_dir(training_args)
        write_manifest(setup, model_args, result, complete=False)  # readers see an unfinished run

        # train
        output_dir = Path(training_args.output_dir)
        with track_peak_memory(config.compute_device) as peak:
            report = reconstruct(student, teacher, ids, config, progress_dir=output_dir / PROGRESS_DIR)
        trained = config.nsamples - config.held_out_count
        windows = sum(not w.resumed for w in report.windows)  # trained by this run
        result.steps = windows * config.epochs * -(-trained // config.batch_size)
        result.tokens = windows * config.epochs * trained * config.seqlen  # each window's passes, summed
        result.train_seconds = report.seconds
        result.tokens_per_second = result.tokens / report.seconds if report.seconds else 0.0
        result.peak_memory_bytes = int(peak.block_mb * 2**20)
        result.peak_memory_kind = peak.kind if peak.kind != "rss" else "rss_increase"
        result.train_loss = sum(w.epoch_losses[-1] for w in report.windows) / len(report.windows)
        result.sparsity_after = report.sparsity
        result.training_text = f"{config.nsamples} x {config.seqlen} calibration tokens of {plan.train_source}"
        if held_out is not None:
            result.perplexity_after = held_out.perplexity(student, training_args, "perplexity after")

        # save
        student.save_pretrained(output_dir, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
        write_json(output_dir / REPORT_NAME, report.to_dict())
        write_json(output_dir / RESULTS_NAME, result.to_dict())
        if not training_args.keep_checkpoints:
            shutil.rmtree(output_dir / PROGRESS_DIR)
        write_manifest(setup, model_args, result, complete=True)  # last: the run is whole
    logger.info("block-wise reconstruction: %d windows, %.1f s, sparsity %.4f", len(report.windows), report.seconds,
                report.sparsity)
    return result

