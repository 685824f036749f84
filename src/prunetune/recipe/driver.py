"""The recovery recipe, as a table of contents: check -> build -> setup -> train -> save.

``recover(model_args, data_args, recovery_args, training_args)`` is what ``prunetune recover``
runs; it knows nothing about any one method (those live behind
:data:`prunetune.recover.registry.SETUPS`). Runs under ``torchrun`` / ``accelerate launch`` as
is: the Trainer owns DDP, every rank checks its own masks, rank 0 writes the outputs.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from transformers import set_seed

from prunetune.data import training_blocks
from prunetune.export import merged_zero_fraction
from prunetune.outputs import output_lock, write_json
from prunetune.recipe.args import (
    DataArguments,
    ModelArguments,
    RecoveryArguments,
    RecoveryTrainingArguments,
    resolve_learning_rate,
)
from prunetune.recipe.blockwise import recover_blockwise
from prunetune.recipe.build import (
    check_config,
    check_eval_seqlen,
    check_sparsity,
    load,
    load_options,
    load_student_tokenizer,
    resolve_block_size,
    resolve_dtype,
)
from prunetune.recipe.data_plan import HeldOutText, check_held_out, evaluates_during_training, plan_data
from prunetune.recipe.memory_estimate import announce as announce_memory
from prunetune.recipe.result import RESULTS_NAME, RecoveryResult, eval_curve, write_manifest
from prunetune.recipe.resume import check_files, check_same_run
from prunetune.recipe.run_folder import check_output, prepare_output_dir, remove_checkpoints, resolve_resume
from prunetune.recipe.trainer import make_distiller, make_trainer, save, train
from prunetune.recover.adapter import check_base_manifest
from prunetune.recover.base import base_layers, zero_fraction
from prunetune.recover.callbacks import CheckpointMarker, LearningRateOverride, checkpoint_info
from prunetune.recover.distill import check_teacher
from prunetune.recover.optimizers import check_optimizer
from prunetune.recover.registry import SETUPS
from prunetune.recover.sharding import check_sharding
from prunetune.rng import kept_rng_states

logger = logging.getLogger(__name__)


def recover(model_args: ModelArguments, data_args: DataArguments, recovery_args: RecoveryArguments,
            training_args: RecoveryTrainingArguments, callbacks: list | None = None) -> RecoveryResult:
    """Recover a pruned model; write the adapter (or model) and ``recovery.json`` to ``--output_dir``.

    The output folder is checked before anything is loaded and locked for the whole run (main
    process); its ``prunetune.json`` says ``complete: false`` from the first step until the
    adapter or model, ``recovery.json`` and then the final manifest are written.

    Raises:
        UsageError: bad input (see the messages), and ``TrainingStopped`` when the guard stops the run.
    """
    method = recovery_args.recovery_method
    if method == "blockwise":  # no Trainer: each block against the dense model's (recipe/blockwise.py)
        return recover_blockwise(model_args, data_args, recovery_args, training_args)
    # Sharding: full follows FSDP2's DTensor shards; DeepSpeed ZeRO and FSDP1 flatten weights (sharding.py).
    check_sharding(method, training_args)
    check_optimizer(training_args)  # bitsandbytes present, CUDA for its paged optimizers
    announce_memory(model_args, data_args, recovery_args, training_args)  # CUDA full: the predicted peak, logged
    resolve_dtype(model_args, recovery_args, training_args.device)  # refuses fp16 master weights before any work
    is_main = training_args.process_index == 0
    resume_dir = resolve_resume(training_args, method)
    fresh = check_output(model_args, data_args, recovery_args, training_args, resume_dir)  # apart from the inputs
    if resume_dir is not None:
        check_files(resume_dir)  # weights and optimizer state open, before any work
    checkpoint = checkpoint_info(resume_dir) if resume_dir is not None else None
    resolve_learning_rate(training_args, method, (checkpoint or {}).get("learning_rate"))
    lock = output_lock(training_args.output_dir, "prunetune recover") if is_main else contextlib.nullcontext()
    with lock, kept_rng_states():  # the Trainer's set_seed must not change the caller's draws
        return _recover(model_args, data_args, recovery_args, training_args, callbacks, resume_dir, fresh)


def _recover(model_args: ModelArguments, data_args: DataArguments, recovery_args: RecoveryArguments,
             training_args: RecoveryTrainingArguments, callbacks: list | None, resume_dir: Path | None,
             fresh: bool) -> RecoveryResult:
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
    teacher_digests: dict = {}  # the teacher's files are hashed once: by the check, then for the results
    if distill is not None and training_args.do_train:  # before the student loads: configs and tokenizers only
        tokenizer = load_student_tokenizer(model_args, recovery_args, training_args)
        check_teacher(distill.teacher, model_args.model_name_or_path, distill,
                      load_options(model_args, recovery_args, training_args), tokenizer, teacher_digests)

    # build: the model, its checks, the data
    model, tokenizer = load(model_args, recovery_args, training_args, tokenizer)
    check_config(model, model_args)
    sparsity_before = zero_fraction(base_layers(model))
    check_sparsity(model_args.model_name_or_path, sparsity_before, recovery_args)
    block_size = resolve_block_size(model, data_args)
    if training_args.do_eval:
        check_eval_seqlen(model, recovery_args)
    result = RecoveryResult(method=method, model=model_args.model_name_or_path, output_dir=training_args.output_dir,
                            dataset=plan.train_source, block_size=block_size, sparsity_before=sparsity_before,
                            eval_dataset=plan.eval_source if training_args.do_eval else None,
                            validation_split_percentage=plan.train_percent,
                            resumed_from=str(resume_dir) if resume_dir else None,
                            learning_rate=training_args.learning_rate)
    checkpoint = checkpoint_info(resume_dir) if resume_dir is not None else None
    if checkpoint is not None and checkpoint.get("base_mask_digests"):
        check_base_manifest(model, checkpoint, str(resume_dir))  # the same pruned base, position by position
    train_data, held_out = None, None
    during = evaluates_during_training(training_args)
    # Under DDP the main process tokenizes first; the other ranks then read its token cache.
    with training_args.main_process_first(desc="training and evaluation data"):
        if training_args.do_train:
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

    # setup: the method, its callbacks, the teacher, the Trainer
    set_seed(training_args.seed)  # the adapter's random init: reproducible runs (scoped by recover(); the Trainer reseeds)
    setup = SETUPS[method](model, recovery_args, resume_dir)
    run_facts = {"training_source": plan.train_source, "distill_from": distill.teacher if distill is not None else None}
    if checkpoint is not None and training_args.do_train:
        check_same_run(resume_dir, checkpoint, setup.manifest, run_facts)
    # the marker goes after the method's callbacks (they add files to checkpoints), before the caller's
    own = [CheckpointMarker({"recovery_method": method, **setup.manifest, **run_facts})]
    if resume_dir is not None:
        own.append(LearningRateOverride((checkpoint or {}).get("learning_rate")))
    distiller = None
    if distill is not None and training_args.do_train:
        distiller = make_distiller(setup.model, distill, load_options(model_args, recovery_args, training_args),
                                   training_args, result, teacher_digests)
    trainer, guard = make_trainer(setup, training_args, train_data, tokenizer, [*own, *(callbacks or [])],
                                  eval_data=held_out.blocks() if during else None,
                                  label=f"recover {method}" + (" + distill" if distiller else ""),
                                  block_size=block_size, distiller=distiller)
    if is_main and (training_args.do_train or training_args.do_eval):
        if fresh:
            prepare_output_dir(training_args)
        if training_args.do_train:
            write_manifest(setup, model_args, result, complete=False)  # readers see an unfinished run

    # train
    if training_args.do_train:
        train(trainer, training_args, resume_dir, block_size, result)
        save(trainer, setup)

    # evaluate and save
    result.sparsity_after = guard.verify(trainer.state.global_step, training_args.output_dir)
    logger.info("rank %d: sparsity %.4f, no pruned weight nonzero in %d checked layers",
                training_args.process_index, result.sparsity_after, len(setup.check.layers))
    if setup.saves_adapter:
        result.merged_sparsity = merged_zero_fraction(setup.model)
    if held_out is not None and is_main:
        result.perplexity_after = held_out.perplexity(setup.model, training_args, "perplexity after")
    result.eval_curve = eval_curve(trainer.state.log_history, trainer.state.global_step, result, training_args)
    if is_main and (training_args.do_train or training_args.do_eval):
        write_json(Path(training_args.output_dir) / RESULTS_NAME, result.to_dict())
        if training_args.do_train:
            _settle_checkpoints(training_args)
            write_manifest(setup, model_args, result, complete=True)  # last: the run is whole
    return result


def _settle_checkpoints(training_args: RecoveryTrainingArguments) -> None:
    """A finished run's checkpoints (optimizer state included) go unless asked for; the log says which way and why."""
    if training_args.keep_checkpoints:
        logger.info("keeping the checkpoints in %s (asked for by --save_strategy / --save_steps / --keep_checkpoints): "
                    "--resume_from_checkpoint can continue from them", training_args.output_dir)
        return
    removed = remove_checkpoints(training_args.output_dir)
    if removed:
        logger.info("removed %d checkpoint folder(s) of the finished run (they only serve to resume an interrupted "
                    "run; --keep_checkpoints or --save_steps keeps them)", len(removed))
