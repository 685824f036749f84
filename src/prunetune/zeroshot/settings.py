"""What a zero-shot run is asked to do, checked before lm-eval is imported or a model is loaded.

The same checks serve ``prunetune eval`` (keys named ``--tasks``, ``--limit``...) and a
pipeline file (``config.evaluation.tasks``...): ``prefix`` says which.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from prunetune.errors import UsageError, require

# The seven tasks whose mean accuracy Wanda's Table 2 (and SparseGPT's zero-shot table) report.
SEVEN_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
LM_EVAL_TESTED = "0.4.13"  # the release the adapter code and the tests were written against (pyproject pins it)
INSTALL_HINT = 'pip install "prunetune[zeroshot]" (in a checkout: pip install -e ".[zeroshot]")'
# lm-eval task names: letters, digits, '_', '-', '.', '+' (e.g. arc_easy, mmlu_high_school_physics, super-glue-lm-eval-v1)
_NAME = re.compile(r"^[A-Za-z0-9_.+\-]+$")


@dataclass
class ZeroShotSettings:
    """One zero-shot run: which lm-eval tasks, and how.

    ``limit`` is a whole number of examples per task (the first ``limit`` of each task's
    evaluation split); lm-eval's fractional limits are refused, since a share of each task
    is a different count per task and easy to mistake for a count.
    """

    tasks: list[str] = field(default_factory=list)  # lm-eval task, group or tag names
    num_fewshot: int | None = None  # None: each task's own default (0 for the seven)
    limit: int | None = None  # examples per task; None: all of them
    batch_size: int = 8  # requests per forward pass
    include_path: str | None = None  # a folder of task YAMLs, searched before lm-eval's own


def parse_tasks(value, key: str = "--tasks") -> list[str]:
    """Task names from ``"boolq,rte"`` or ``["boolq", "rte"]``: stripped, in order, each once.

    Raises:
        UsageError: no name at all, or a name that no lm-eval task could have.
    """
    if isinstance(value, str):
        names = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = list(value)
    else:
        raise UsageError(f"{key}: {value!r} is not accepted; give task names separated by commas (boolq,rte) "
                         "or, in a pipeline file, a list of names.")
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    require(bool(names), f"{key} {value!r} names no task; give lm-eval task or group names separated by commas, "
                         f"e.g. {','.join(SEVEN_TASKS)}.")
    for name in names:
        require(bool(_NAME.match(name)), f"{key}: {name!r} is not a task name (letters, digits, _ - . + only); give lm-eval "
                                         "task or group names separated by commas, e.g. boolq,arc_easy.")
    return names


def parse_limit(text: str, key: str = "--limit") -> int:
    """A ``--limit`` flag's text as a count of examples (see :func:`check_settings` for the rule)."""
    try:
        return int(text)
    except ValueError:
        raise _limit_error(text, key) from None


def _limit_error(value, key: str) -> UsageError:
    return UsageError(f"{key} {value} is not accepted; give a whole number of examples per task, 1 or more (or leave it "
                     "out to score every example). lm-eval's fractions (0.1 for a tenth of each task) are not accepted "
                     "here: they give each task a different count.")


def check_settings(settings: ZeroShotSettings, prefix: str = "--") -> None:
    """Check every value that needs neither lm-eval nor a model.

    Args:
        settings: the run's settings (``tasks`` already parsed).
        prefix: how keys are named in messages: ``"--"`` for flags, ``"config.evaluation."`` for a pipeline file.

    Raises:
        UsageError: naming the key, the value and what is accepted.
    """
    require(bool(settings.tasks), f"{prefix}tasks names no task; give lm-eval task or group names.")
    limit = settings.limit
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise _limit_error(limit, f"{prefix}limit")
    shots = settings.num_fewshot
    require(shots is None or (isinstance(shots, int) and not isinstance(shots, bool) and shots >= 0),
            f"{prefix}num_fewshot {shots} is not accepted; give 0 or more examples to put before each question "
            "(or leave it out for each task's own default, 0 for the seven tasks of Wanda's Table 2).")
    require(isinstance(settings.batch_size, int) and settings.batch_size >= 1,
            f"{prefix}batch_size {settings.batch_size} is not accepted; give 1 or more requests per forward pass.")
    if settings.include_path is not None:
        check_include_path(settings.include_path, f"{prefix}include_path")


def check_include_path(path: str, key: str = "--include_path") -> Path:
    """The folder of the user's task YAMLs: it exists and holds at least one ``.yaml`` file."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UsageError(f"{key} {path} does not exist; give a folder of lm-eval task YAML files (docs/zeroshot.md "
                         "shows one).")
    require(folder.is_dir(), f"{key} {path} is a file; give the folder that holds it (lm-eval reads every .yaml in it).")
    require(any(folder.rglob("*.yaml")), f"{key} {path} holds no .yaml file; give a folder of lm-eval task YAML files "
                                         "(docs/zeroshot.md shows one).")
    return folder
