"""The output folder of a recovery run: a new run's folder, or the checkpoint a resume continues from.

The recipe (:mod:`prunetune.recipe.driver`) calls these before any work. A resume follows the
rules of a fresh run unless it writes into the folder of the run it continues: the output must
be missing or empty, or (with ``--overwrite_output_dir``) a folder prunetune wrote; and it never
is, contains or lies inside an input (:func:`prunetune.outputs.check_apart`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from prunetune.errors import UsageError, require
from prunetune.outputs import check_apart, check_output_dir, current_umask
from prunetune.recipe.args import DataArguments, ModelArguments, RecoveryArguments, RecoveryTrainingArguments
from prunetune.recover.callbacks import CHECKPOINT_MARKER, checkpoint_info, checkpoints, last_checkpoint
from prunetune.recover.masked_lora import is_masked_config

logger = logging.getLogger(__name__)


def resolve_resume(args: RecoveryTrainingArguments, method: str) -> Path | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names (``latest``: the last complete one), checked.

    Raises:
        UsageError: no such checkpoint, an incomplete one (no completion marker), one written by another
            recovery method, or one of a run that already reached ``--max_steps``.
    """
    resume = args.resume_from_checkpoint
    if not resume:
        return None
    output_dir = Path(args.output_dir)
    explicit = resume.lower() not in ("true", "latest", "last")
    if not explicit:
        found = last_checkpoint(output_dir)
        require(found is not None, f"--resume_from_checkpoint {resume}: no complete {PREFIX_CHECKPOINT_DIR}-N folder in {output_dir}.")
        resume = found
    resume_dir = Path(resume)
    require((resume_dir / "trainer_state.json").exists(),
            f"--resume_from_checkpoint {resume_dir} is not a Trainer checkpoint (no trainer_state.json in it).")
    info = checkpoint_info(resume_dir)
    if explicit and info is None:
        raise UsageError(
            f"--resume_from_checkpoint {resume_dir} has no {CHECKPOINT_MARKER}, the file prunetune writes last into a "
            "complete checkpoint: it was not written completely (killed during the save, or the disk filled up). "
            f"Resume from an earlier checkpoint (--resume_from_checkpoint latest picks the last complete one).")
    check_not_finished(resume_dir, args)
    if info is not None and info.get("recovery_method", method) != method:
        raise UsageError(f"--resume_from_checkpoint {resume_dir} was written by --recovery_method {info['recovery_method']}, "
                         f"not {method}; resume with --recovery_method {info['recovery_method']} or start a new run.")
    has_adapter = (resume_dir / "adapter_config.json").exists()
    has_model = (resume_dir / "config.json").exists()
    if method == "full" and has_adapter and not has_model:
        raise UsageError(f"--resume_from_checkpoint {resume_dir} holds a LoRA adapter, but --recovery_method full resumes "
                         "from a full model checkpoint; give the --recovery_method the run was started with.")
    if method != "full" and has_model and not has_adapter:
        raise UsageError(f"--resume_from_checkpoint {resume_dir} holds a full model (recovery_method full), but "
                         f"--recovery_method {method} resumes from an adapter checkpoint; give --recovery_method full.")
    if method != "full" and has_adapter:
        saved = json.loads((resume_dir / "adapter_config.json").read_text(encoding="utf-8"))
        saved_method = "masked_lora" if is_masked_config(saved) else "lora"
        require(saved_method == method, f"--resume_from_checkpoint {resume_dir} holds a {saved_method} adapter; resume it with "
                                        f"--recovery_method {saved_method}.")
    return resume_dir


def check_not_finished(resume_dir: Path, args: RecoveryTrainingArguments) -> None:
    """Refuse to resume a run that already reached ``--max_steps``: another step would replace its result."""
    try:
        step = json.loads((resume_dir / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--resume_from_checkpoint {resume_dir}: its trainer_state.json is damaged ({err}); resume from "
                         "an earlier checkpoint.") from err
    if args.do_train and args.max_steps > 0 and isinstance(step, int) and step >= args.max_steps:
        raise UsageError(
            f"--resume_from_checkpoint {resume_dir}: that run already reached step {step} of --max_steps "
            f"{args.max_steps}, so there is nothing to train (its result is left as it is). To train further, give a "
            "larger --max_steps.")


def in_run_folder(resume_dir: Path | None, output_dir: str | Path) -> bool:
    """Whether a resume writes into the folder of the run it continues (the checkpoint's parent)."""
    return resume_dir is not None and resume_dir.absolute().resolve().parent == Path(output_dir).expanduser().absolute().resolve()


def check_output(model_args: ModelArguments, data_args: DataArguments, recovery_args: RecoveryArguments,
                 args: RecoveryTrainingArguments, resume_dir: Path | None) -> bool:
    """Check ``--output_dir`` before any work; True when the run needs a fresh folder (:func:`prepare_output_dir`).

    Every run's output is apart from its inputs; only a resume into its own run folder skips the
    fresh-folder rules. Changes nothing.
    """
    fresh = not in_run_folder(resume_dir, args.output_dir)
    inputs = {"--model_name_or_path": model_args.model_name_or_path, "--tokenizer_name": model_args.tokenizer_name,
              "--config_name": model_args.config_name, "--dataset_name": data_args.dataset_name,
              "--train_file": data_args.train_file, "--validation_file": data_args.validation_file,
              "--distill_from": recovery_args.distill_from,
              "--resume_from_checkpoint": resume_dir if fresh else None}
    check_apart(args.output_dir, inputs)
    if fresh and args.process_index == 0:
        check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir)
    return fresh


def remove_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete a finished run's ``checkpoint-N`` folders, each marker first (a half-removed one is never resumed)."""
    removed = []
    for folder in checkpoints(output_dir):
        if folder.is_symlink():
            continue
        (folder / CHECKPOINT_MARKER).unlink(missing_ok=True)
        shutil.rmtree(folder)
        removed.append(folder)
    return removed


def prepare_output_dir(args: RecoveryTrainingArguments) -> None:
    """Create a new run's ``--output_dir`` (checked by :func:`check_output`).

    ``--overwrite_output_dir`` replaces a folder a prunetune run wrote, leaving nothing of the old
    run (adapter, model, manifests, checkpoints). Only the main process acts; call it under
    :func:`prunetune.outputs.output_lock`.
    """
    if args.process_index != 0:
        return
    output_dir = check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir)
    if output_dir.is_dir() and any(output_dir.iterdir()):
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        logger.warning("--overwrite_output_dir: replacing %s (the previous run's files are removed)", output_dir)
        os.replace(output_dir, old)
        shutil.rmtree(old, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True, mode=0o777 & ~current_umask())
