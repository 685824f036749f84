"""Run lm-eval's harness on a model already in memory: the pruned base, with its adapter as prunetune applied it.

lm-eval can load a model by name (with ``peft=`` for an adapter), but PEFT alone would apply a
masked LoRA adapter unmasked (``W + BA`` instead of ``W + (BA) * M``). Here the model comes
from prunetune's loaders (:func:`prunetune.loading.load_model`,
:func:`prunetune.recover.adapter.apply_adapter`) and is wrapped as it is -- dtype, device and
adapter unchanged -- in lm-eval's ``HFLM``, then scored by ``lm_eval.evaluator.evaluate``.

The task setup is that of ``lm_eval.simple_evaluate`` (its few-shot rule and seeds; a test
checks the numbers agree), without what that function adds for its own command line: git and
environment probes, and seeds set for the whole process -- here they are set for the run and
restored after.
"""

from __future__ import annotations

import contextlib
import logging
import time

from prunetune.evaluate import autocast_for
from prunetune.zeroshot.results import TaskScore, ZeroShotResult, metrics_of
from prunetune.zeroshot.scope import kept_rng_states, quiet_lm_eval
from prunetune.zeroshot.settings import ZeroShotSettings, check_settings
from prunetune.zeroshot.tasks import (
    TaskCatalog,
    check_generation,
    dataset_of,
    require_lm_eval,
)

logger = logging.getLogger(__name__)


def evaluate_zeroshot(model, tokenizer, settings: ZeroShotSettings, *, catalog: TaskCatalog | None = None,
                      tasks: dict | None = None, prefix: str = "--") -> ZeroShotResult:
    """Zero-shot (or few-shot) accuracy of ``model`` on lm-eval tasks.

    Args:
        model: a causal LM, plain or a ``peft.PeftModel`` (as :func:`prunetune.recover.adapter.apply_adapter` returns).
        tokenizer: its tokenizer.
        settings: the tasks and how to run them.
        catalog: the task index to use (keep one across calls: indexing lm-eval's tasks takes seconds).
        tasks: tasks already loaded by ``catalog.load(settings.tasks)`` (loaded here when None). A task dict
            is used by one run: load it again for the next.
        prefix: how messages name the settings (``"--"`` flags, ``"config.evaluation."`` a pipeline file).

    Returns:
        The per-task metrics, their mean and the versions.

    Raises:
        UsageError: bad settings, an unknown task, data that cannot be loaded, or a generation task for a
            model that cannot generate.
    """
    check_settings(settings, prefix)
    require_lm_eval()
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    catalog = catalog or TaskCatalog(settings.include_path)
    if tasks is None:
        tasks = catalog.load(settings.tasks, f"{prefix}tasks")
    check_generation(tasks["tasks"], model, f"{prefix}tasks")
    was_training = model.training
    with quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size,
                  mixed_precision_dtype=autocast_for(model))  # half-precision models run as prunetune's perplexity runs them
    _set_fewshot(tasks["tasks"], settings.num_fewshot)
    started = time.perf_counter()
    try:
        with _seeded():
            raw = evaluate(lm=lm, task_dict=tasks, limit=settings.limit, log_samples=False)
    finally:
        model.train(was_training)  # HFLM switched it to eval mode
    return _result(raw, tasks, settings, time.perf_counter() - started)


def _set_fewshot(tasks: dict, num_fewshot: int | None) -> None:
    """simple_evaluate's rule: a task fixed at 0 shots stays there; otherwise the asked number, else the task's, else 0."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED

    for task in tasks.values():
        default = task.get_config("num_fewshot")
        if num_fewshot is not None and default != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif default is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)


@contextlib.contextmanager
def _seeded():
    """simple_evaluate's seeds (python 0, numpy and torch 1234) for this run only; the caller's RNG states come back after."""
    import random

    import numpy as np
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    with kept_rng_states():
        random.seed(DEFAULT_RANDOM_SEED)
        np.random.seed(DEFAULT_OTHER_SEED)
        torch.manual_seed(DEFAULT_OTHER_SEED)
        yield


def _result(raw: dict, tasks: dict, settings: ZeroShotSettings, seconds: float) -> ZeroShotResult:
    import lm_eval

    scores = {}
    for name in tasks["tasks"]:
        config = raw["configs"].get(name, {})
        counts = raw["n-samples"].get(name, {})
        split = config.get("test_split") or config.get("validation_split") or ""
        scores[name] = TaskScore(version=raw["versions"].get(name), n_shot=int(raw["n-shot"].get(name, 0)),
                                 examples=int(counts.get("effective", 0)), examples_total=int(counts.get("original", 0)),
                                 split=str(split), output_type=str(config.get("output_type", "")),
                                 data=dataset_of(config), metrics=metrics_of(raw["results"].get(name, {})))
    groups = {name: metrics_of(values) for name, values in raw.get("groups", {}).items()}
    groups = {name: metrics for name, metrics in groups.items() if metrics}
    return ZeroShotResult(tasks=scores, groups=groups, lm_eval_version=lm_eval.__version__,
                          num_fewshot=settings.num_fewshot, limit=settings.limit, batch_size=settings.batch_size,
                          seconds=seconds)
