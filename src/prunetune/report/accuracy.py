"""The zero-shot table: one row per configuration, one column per lm-eval task, then their mean.

Reads the ``zeroshot`` dict of each :class:`~prunetune.report.tables.ResultRow` (what
:meth:`prunetune.zeroshot.ZeroShotResult.to_dict` returns); rows without one are left out.
"""

from __future__ import annotations

from prunetune.zeroshot.results import MEAN_METRIC, describe_run, headline


def _scored(rows) -> list:
    return [row for row in rows if row.zeroshot]


def _columns(rows) -> list[tuple[str, str]]:
    """(task, metric shown) in the order tasks ran, over every row."""
    columns: dict[str, str] = {}
    for row in rows:
        for task, score in row.zeroshot["tasks"].items():
            shown = headline(score["metrics"])
            columns.setdefault(task, shown[0] if shown else MEAN_METRIC)
    return list(columns.items())


def _cells(row, columns) -> list[str]:
    tasks = row.zeroshot["tasks"]
    cells = [row.name]
    for task, metric in columns:
        value = tasks.get(task, {}).get("metrics", {}).get(metric)
        cells.append("-" if value is None else f"{value:.4f}")
    mean = row.zeroshot["mean"]["value"]
    return cells + ["-" if mean is None else f"{mean:.4f}"]


def _headers(columns) -> list[str]:
    return ["configuration"] + [task if metric == MEAN_METRIC else f"{task} ({metric})" for task, metric in columns] + ["mean"]


def accuracy_notes(rows) -> list[str]:
    """What the numbers are: the metric, lm-eval's version and settings, each task's version, shots, examples and data."""
    scored = _scored(rows)
    if not scored:
        return []
    first = scored[0].zeroshot
    notes = [(f"Accuracy (acc) per task, {describe_run(first)}; mean: {first['mean']['label']}. acc_norm (where a "
              "task reports it), standard errors and group scores: results.json.")]
    for task, score in first["tasks"].items():
        notes.append(f"{task}: version {score['version']}, {score['n_shot']}-shot, {score['examples']} of "
                     f"{score['examples_total']} examples of the {score['split']} split ({score['data']}).")
    return notes


def accuracy_markdown(rows) -> str:
    """The Markdown table with its notes; "" when no row has zero-shot results."""
    scored = _scored(rows)
    if not scored:
        return ""
    columns = _columns(scored)
    names = _headers(columns)
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in names) + "|"]
    lines += ["| " + " | ".join(_cells(row, columns)) + " |" for row in scored]
    return "\n".join(lines + [""] + [f"- {note}" for note in accuracy_notes(scored)])


def accuracy_terminal(rows) -> str:
    """The same table aligned for a terminal; "" when no row has zero-shot results."""
    scored = _scored(rows)
    if not scored:
        return ""
    columns = _columns(scored)
    cells = [_headers(columns)] + [_cells(row, columns) for row in scored]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    out = [f"zero-shot accuracy ({describe_run(scored[0].zeroshot)}; mean: {scored[0].zeroshot['mean']['label']})"]
    for index, line in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
