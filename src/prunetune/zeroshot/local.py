"""Task definitions whose data lives in local files, for machines without the Hub.

* :func:`write_next_line_task`: an offline multiple-choice task made from the ``builtin``
  corpus (Python standard-library sources, held-out split): given a few lines of a file, pick
  the true next line among four (three are lines of other files). It needs no download, so
  the whole zero-shot path runs in CI on the bundled ``tiny`` model, which writes Python.
* :func:`write_local_task`: one of lm-eval's own tasks (boolq, arc_easy, ...) on your copy of
  its data: a YAML that includes lm-eval's definition unchanged (prompt, choices, metrics,
  version) and only points ``dataset_path`` / ``data_files`` at local files.

Either goes in a folder passed as ``--include_path`` (``include_path:`` in a pipeline file).
lm-eval reads ``data_files`` relative to the working directory, so both write absolute paths.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from prunetune.data.builtin import builtin_documents
from prunetune.errors import UsageError, require
from prunetune.zeroshot.tasks import SINGLE_TASK_KINDS, TaskCatalog

NEXT_LINE_TASK = "builtin_next_line"
CHOICES = 4
CONTEXT_LINES = 8  # at most, before the line to predict
MIN_CHARS = 16  # lines shorter than this (after stripping) are neither asked nor used as distractors
MAX_CHARS = 100
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _dump_yaml(definition: dict) -> str:
    """YAML with multi-line strings double-quoted (``"\\n"``, not a folded block with a blank line)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def string(dumper, value: str):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)

    Dumper.add_representer(str, string)
    return yaml.dump(definition, Dumper=Dumper, sort_keys=False, allow_unicode=True)


def _usable(line: str) -> bool:
    return MIN_CHARS <= len(line.strip()) <= MAX_CHARS


def next_line_examples(texts: list[str], count: int, seed: int) -> list[dict]:
    """``count`` examples ``{"context", "choices", "label"}`` from ``texts`` (one source file each).

    The line to predict has at least 3 lines of its file before it; the three distractors are
    usable lines of *other* files, distinct from the answer and each other; the answer's
    position is uniform. Deterministic for a given ``texts`` and ``seed``.
    """
    rng = random.Random(seed)
    files = [text.splitlines() for text in texts]
    pool = [(index, line) for index, lines in enumerate(files) for line in lines if _usable(line)]
    candidates = [(index, row) for index, lines in enumerate(files) for row in range(3, len(lines)) if _usable(lines[row])]
    require(len(candidates) >= count and len({i for i, _ in pool}) > 1,
            f"{count} next-line examples need more text: {len(candidates)} usable lines in {len(files)} files.")
    examples = []
    for index, row in rng.sample(candidates, count):
        lines = files[index]
        answer = lines[row]
        context = "\n".join(lines[max(0, row - CONTEXT_LINES):row])
        distractors: list[str] = []
        while len(distractors) < CHOICES - 1:
            other, line = pool[rng.randrange(len(pool))]
            if other != index and line.strip() != answer.strip() and line not in distractors:
                distractors.append(line)
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [answer] + distractors[label:]
        examples.append({"context": context, "choices": choices, "label": label})
    return examples


def write_next_line_task(folder: str | Path, examples: int = 200, fewshot_examples: int = 20, seed: int = 0) -> Path:
    """Write the ``builtin_next_line`` task (YAML + JSONL data) into ``folder``; returns the YAML's path.

    Scored examples come from the ``builtin`` test split (files the bundled model never trained
    on), few-shot examples (``--num_fewshot``) from its validation split. Metrics: acc and
    acc_norm (likelihood per byte of the line).
    """
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, source, count in (("test", "test", examples), ("validation", "validation", fewshot_examples)):
        texts = list(builtin_documents(source).rows["text"])
        path = folder / f"{NEXT_LINE_TASK}.{split}.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in next_line_examples(texts, count, seed)), encoding="utf-8")
        files[split] = str(path)
    definition = {
        "task": NEXT_LINE_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        "fewshot_split": "validation",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "target_delimiter": "\n",  # the answer is the next line of code, not a word after a space
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0, "seed": seed,
                     "description": "pick the true next line of a Python standard-library file among 4 (prunetune)"},
    }
    path = folder / f"{NEXT_LINE_TASK}.yaml"
    path.write_text(_dump_yaml(definition), encoding="utf-8")
    return path


def write_local_task(folder: str | Path, task: str, data_files: dict[str, str], catalog=None) -> Path:
    """Write ``folder/<task>.yaml``: lm-eval's ``task`` with its examples read from ``data_files``.

    The task keeps its name, so ``--tasks boolq --include_path folder`` runs it (the folder's
    definition replaces lm-eval's); prompt, choices, metrics and version are lm-eval's own.

    Args:
        folder: where to write the YAML (the folder to pass as --include_path).
        task: an lm-eval task name, e.g. ``boolq``.
        data_files: split name -> local file (.jsonl/.json/.parquet/.csv/.arrow) holding the columns of the
            task's Hub dataset. Must include the split the task scores (its test_split, else validation_split).
        catalog: a :class:`~prunetune.zeroshot.tasks.TaskCatalog` (made here when None).

    Raises:
        UsageError: an unknown task, a group or tag, missing files, mixed file kinds, or no file for the scored split.
    """
    manager = (catalog or TaskCatalog()).full_manager()
    entry = manager.task_index.get(task)
    if entry is None or entry.kind.name not in SINGLE_TASK_KINDS or entry.yaml_path is None:
        raise UsageError(f"{task!r} is not one of lm-eval's YAML-defined tasks; give a task name such as boolq or "
                         "arc_easy (a group or tag: one call per task in it).")
    config = entry.cfg or {}
    scored = config.get("test_split") or config.get("validation_split")
    require(bool(data_files) and scored in data_files,
            f"data_files {data_files!r}: {task} scores its {scored!r} split; give a file for it, e.g. {{{scored!r}: "
            f"'{task}/{scored}.jsonl'}} (and optionally the few-shot split, {config.get('training_split')!r}).")
    paths = {}
    for split, file in data_files.items():
        path = Path(file).expanduser().resolve()
        require(path.is_file(), f"data_files[{split!r}]: {file} is not a file.")
        paths[split] = str(path)
    kinds = {BUILDERS.get(Path(p).suffix.lower()) for p in paths.values()}
    require(len(kinds) == 1 and None not in kinds,
            f"data_files {data_files!r}: give files of one kind among {', '.join(sorted(BUILDERS))}.")
    definition = {"include": str(entry.yaml_path), "task": task, "dataset_path": kinds.pop(), "dataset_name": None,
                  "dataset_kwargs": {"data_files": paths}}
    for key in SPLIT_KEYS:  # a split given no file is switched off (lm-eval would look for it and fail)
        if config.get(key) is not None and config[key] not in paths:
            definition[key] = None
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task}.yaml"
    path.write_text(_dump_yaml(definition), encoding="utf-8")
    return path
