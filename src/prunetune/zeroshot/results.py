"""A zero-shot run's numbers: per task, their mean, the versions, and the console table.

Everything here works on plain data (:meth:`ZeroShotResult.to_dict`), so the pipeline's report
can read results stored by earlier runs without importing lm-eval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from prunetune.zeroshot.settings import SEVEN_TASKS

MEAN_METRIC = "acc"  # averaged over tasks; acc_norm, where a task reports it, is shown beside it


@dataclass
class TaskScore:
    """One lm-eval task's result."""

    version: float | str | None  # the task definition's version (metadata.version)
    n_shot: int  # examples shown before each question
    examples: int  # examples scored (after --limit)
    examples_total: int  # examples in the evaluation split
    split: str  # the split scored
    output_type: str  # multiple_choice | loglikelihood | generate_until | ...
    data: str  # where the examples came from (a Hub dataset or local files)
    metrics: dict[str, float] = field(default_factory=dict)  # acc, acc_stderr, acc_norm, ...; "metric,filter" past the first filter


@dataclass
class ZeroShotResult:
    tasks: dict[str, TaskScore]  # leaf tasks, in the order they ran
    groups: dict[str, dict[str, float]]  # a group's own aggregate metrics, where it defines them
    lm_eval_version: str
    num_fewshot: int | None  # as asked (None: each task's default)
    limit: int | None
    batch_size: int
    seconds: float

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean"] = mean_of(data["tasks"])
        return data


def metrics_of(raw: dict) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.6, "alias": ...}`` as ``{"acc": 0.6}`` (other filters keep ``metric,filter``)."""
    metrics = {}
    for name, value in raw.items():
        if "," not in name or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue  # alias, name, sample_len
        metric, filter_name = name.split(",", 1)
        metrics[metric if filter_name == "none" else name] = float(value)
    return metrics


def headline(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The metric a table shows for a task: acc when it has one, else its first non-stderr metric."""
    if MEAN_METRIC in metrics:
        return MEAN_METRIC, metrics[MEAN_METRIC]
    for name, value in metrics.items():
        if "_stderr" not in name:
            return name, value
    return None


def mean_of(tasks: dict[str, dict]) -> dict:
    """The mean acc: over the seven tasks of Wanda's Table 2 when all ran, else over every task that reports acc."""
    with_acc = {name: score["metrics"][MEAN_METRIC] for name, score in tasks.items() if MEAN_METRIC in score["metrics"]}
    if all(name in with_acc for name in SEVEN_TASKS):
        names = list(SEVEN_TASKS)
        label = "mean acc of the 7 tasks of Wanda's Table 2"
    else:
        names = list(with_acc)
        label = f"mean acc of the {len(names)} task{'s' if len(names) != 1 else ''} run" if names else "no task reports acc"
    value = sum(with_acc[n] for n in names) / len(names) if names else None
    return {"metric": MEAN_METRIC, "value": value, "tasks": names, "label": label}


def _number(value: float | None, stderr: float | None = None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None and not math.isnan(stderr) else "")


def describe_run(result: dict) -> str:
    """``lm-eval 0.4.13; each task's default shots; at most 50 examples per task``."""
    shots = "each task's default shots" if result["num_fewshot"] is None else f"{result['num_fewshot']}-shot where the task allows"
    limit = "every example" if result["limit"] is None else f"at most {result['limit']} examples per task"
    return f"lm-eval {result['lm_eval_version']}; {shots}; {limit}"


def format_table(result: dict) -> str:
    """The console table of one run: a row per task (acc and acc_norm with their standard errors), then the mean."""
    header = ["task", "version", "shots", "examples", "acc", "acc_norm", "other metric"]
    lines = []
    for name, score in result["tasks"].items():
        metrics = score["metrics"]
        other = headline(metrics) if MEAN_METRIC not in metrics else None
        lines.append([name, str(score["version"]), str(score["n_shot"]),
                      f"{score['examples']} of {score['examples_total']}",
                      _number(metrics.get("acc"), metrics.get("acc_stderr")),
                      _number(metrics.get("acc_norm"), metrics.get("acc_norm_stderr")),
                      f"{other[0]} {_number(other[1])}" if other else ""])
    for name, metrics in result.get("groups", {}).items():
        lines.append([f"{name} (group)", "", "", "", _number(metrics.get("acc"), metrics.get("acc_stderr")),
                      _number(metrics.get("acc_norm"), metrics.get("acc_norm_stderr")), ""])
    if not any(row[-1] for row in lines):
        header, lines = header[:-1], [row[:-1] for row in lines]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    out = [f"zero-shot accuracy ({describe_run(result)})",
           "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    mean = result["mean"]
    out.append(f"{mean['label']}: {_number(mean['value'])}")
    return "\n".join(out)
