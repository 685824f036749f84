"""Which text a recovery run trains on and which held-out text it is scored on.

Perplexity is only ever computed on text the run does not train on: a ``--validation_file``, a
source's own validation/test split, or the held-out part of a local text
(``--validation_split_percentage``); ``recovery.json`` says which text each number is on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.trainer_utils import IntervalStrategy

from prunetune.data import BlockDataset, _split_path_field, eval_stream, resolve
from prunetune.data.local import SPLIT_STEMS, file_kind
from prunetune.defaults import default_data
from prunetune.errors import UsageError, require
from prunetune.evaluate import perplexity
from prunetune.recipe.args import DataArguments, ModelArguments, RecoveryTrainingArguments

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class DataPlan:
    """Which text trains and which text is scored, and the options that named them (for messages).

    ``*_percent`` is the ``validation_percent`` of :mod:`prunetune.data`: the part of a local
    source without split files that is held out (validation/test) and never trained on.
    """

    train_source: str
    train_flag: str
    train_percent: float
    eval_source: str
    eval_flag: str
    eval_percent: float


def plan_data(model_args: ModelArguments, data_args: DataArguments) -> DataPlan:
    """``--train_file`` / ``--dataset_name`` (default: the model's, see :mod:`prunetune.defaults`) trains;
    ``--validation_file`` is scored whole, else the training source's held-out part or own split."""
    train = data_args.training_source or default_data("training", model_args.model_name_or_path)
    percent = float(data_args.validation_split_percentage)
    if data_args.validation_file:
        return DataPlan(train, data_args.training_flag, 0.0, data_args.validation_file, "--validation_file", 0.0)
    return DataPlan(train, data_args.training_flag, percent, train, data_args.training_flag, percent)


def check_held_out(plan: DataPlan) -> None:
    """Refuse to score the text the run trains on: a local source without split files and nothing held
    out (--validation_split_percentage 0), or --validation_file naming the training text. Reads no data."""
    if plan.eval_percent > 0:
        return  # the held-out part is never trained on
    refs = resolve(plan.train_source, plan.train_flag), resolve(plan.eval_source, plan.eval_flag)
    if any(ref.kind != "local" or ref.protocol is not None for ref in refs):
        return  # builtin, the hub sources and local copies in their layout keep their splits apart
    path = _split_path_field(plan.train_source)[0].resolve()
    if path != _split_path_field(plan.eval_source)[0].resolve():
        return
    split_names = sum(SPLIT_STEMS.values(), ())
    if path.is_dir() and any(file_kind(p) and p.name.lower().split(".")[0] in split_names for p in path.iterdir()):
        return  # train.* / validation.* files
    raise UsageError(
        f"--do_eval would score {plan.eval_source}, the text the run trains on (nothing of it is held out): a "
        "perplexity on training text says nothing about the model. Hold part of it out with "
        "--validation_split_percentage (e.g. 5), or give other text with --validation_file."
    )


class HeldOutText:
    """The evaluation windows, built once: scored by :func:`prunetune.evaluate.perplexity` before and
    after training and, with ``--eval_strategy``, by the Trainer during training (the same windows,
    so the curve and the two numbers agree)."""

    def __init__(self, tokenizer, plan: DataPlan, data_args: DataArguments, seqlen: int, cache_dir: str | None):
        self.stream, documents = eval_stream(tokenizer, plan.eval_source, seqlen=seqlen, split=data_args.validation_split,
                                             cache_dir=cache_dir, validation_percent=plan.eval_percent, flag=plan.eval_flag)
        self.seqlen = seqlen
        self.windows = self.stream.shape[-1] // seqlen
        if data_args.max_eval_samples is not None:
            self.windows = min(self.windows, data_args.max_eval_samples)
        require(self.windows > 0, f"The evaluation text ({documents.description}) holds {self.stream.shape[-1]} tokens, "
                                  f"fewer than one window of {seqlen}; lower --eval_seqlen / --block_size or give more text.")
        self.fingerprint = documents.fingerprint
        self.description = f"{documents.description}; {self.windows:,} windows of {seqlen} tokens"

    def perplexity(self, model, training_args: RecoveryTrainingArguments, label: str) -> float:
        result = perplexity(model, self.stream, self.seqlen, batch_size=training_args.per_device_eval_batch_size,
                            max_windows=self.windows, progress=not training_args.disable_tqdm,
                            autocast_dtype=torch.bfloat16 if training_args.bf16 else None, desc=label)
        logger.info("%s: %.4f on %s", label, result.perplexity, self.description)
        return result.perplexity

    def blocks(self):
        """The windows as a dataset for the Trainer's ``eval_dataset`` (labels = inputs, like training blocks)."""
        windows = self.stream.reshape(-1)[: self.windows * self.seqlen].view(self.windows, self.seqlen)
        return BlockDataset(windows.contiguous(), self.fingerprint, self.description)


def evaluates_during_training(args: RecoveryTrainingArguments) -> bool:
    return args.do_train and IntervalStrategy(args.eval_strategy) != IntervalStrategy.NO
