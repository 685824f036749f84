"""The output folder of a recovery run: a new run's folder, or the checkpoint a resume continues from.

The recipe (:mod:`prunetune.recipe.driver`) calls these before any work.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from prunetune.errors import UsageError, require
from prunetune.outputs import check_output_dir, current_umask
from prunetune.recipe.args import RecoveryTrainingArguments
from prunetune.recover.callbacks import checkpoint_info, last_checkpoint
from prunetune.recover.masked_lora import is_masked_config

logger = logging.getLogger(__name__)

def resolve_resume(args: RecoveryTrainingArguments, method: str) -> Path | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names (``latest``: the last complete one), checked.

    Raises:
        UsageError: no such checkpoint, an incomplete one, or one written by another recovery method.
    """
    resume = args.resume_from_checkpoint
    if not resume:
        return None
    output_dir = Path(args.output_dir)
    if resume.lower() in ("true", "latest", "last"):
        found = last_checkpoint(output_dir)
        require(found is not None, f"--resume_from_checkpoint {resume}: no complete {PREFIX_CHECKPOINT_DIR}-N folder in {output_dir}.")
        resume = found
    resume_dir = Path(resume)
    require((resume_dir / "trainer_state.json").exists(),
            f"--resume_from_checkpoint {resume_dir} is not a Trainer checkpoint (no trainer_state.json in it).")
    info = checkpoint_info(resume_dir)
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


def prepare_output_dir(args: RecoveryTrainingArguments, method: str) -> Path | None:
    """Check ``--output_dir`` and resolve ``--resume_from_checkpoint``; return the checkpoint folder.

    A new run needs an empty or missing folder; ``--overwrite_output_dir`` replaces a folder a
    prunetune run wrote, leaving nothing of the old run (adapter, model, manifests, checkpoints).
    Only the main process acts; call it under :func:`prunetune.outputs.output_lock`.
    """
    resume_dir = resolve_resume(args, method)
    if resume_dir is not None or args.process_index != 0:
        return resume_dir
    output_dir = check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir)
    if output_dir.is_dir() and any(output_dir.iterdir()):
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        logger.warning("--overwrite_output_dir: replacing %s (the previous run's files are removed)", output_dir)
        os.replace(output_dir, old)
        shutil.rmtree(old, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True, mode=0o777 & ~current_umask())
    return None
