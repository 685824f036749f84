"""Arguments of ``prunetune recover``: model and data, recovery method, and Trainer settings.

Parsed by ``transformers.HfArgumentParser`` so the Wanda LoRA recipe's command line works
unchanged (``--model_name_or_path ... --config_name ... --dataset_name c4 --block_size 1024
--do_train --do_eval --max_train_samples ... --overwrite_output_dir --output_dir OUT``), and a
single ``.yaml`` / ``.json`` file of the same keys works too. ``run_clm.py``'s data and model
flags (``--train_file``, ``--validation_split_percentage``, ``--torch_dtype``, ...) keep their
meaning; the few that cannot apply here are refused by name. One module per group:
:mod:`.model_data`, :mod:`.recovery`, :mod:`.training`.
"""

from prunetune.recipe.args.model_data import EVAL_SPLITS, RUN_CLM_ONLY, DataArguments, ModelArguments
from prunetune.recipe.args.recovery import DISTILL_DEFAULTS, RecoveryArguments
from prunetune.recipe.args.training import LEARNING_RATES, TRAINER_OPTIONS, RecoveryTrainingArguments, resolve_learning_rate
from prunetune.recover.registry import METHODS

__all__ = ["ARGUMENT_CLASSES", "DISTILL_DEFAULTS", "EVAL_SPLITS", "LEARNING_RATES", "METHODS", "RUN_CLM_ONLY",
           "TRAINER_OPTIONS", "DataArguments", "ModelArguments", "RecoveryArguments", "RecoveryTrainingArguments",
           "resolve_learning_rate"]

ARGUMENT_CLASSES = (ModelArguments, DataArguments, RecoveryArguments, RecoveryTrainingArguments)
