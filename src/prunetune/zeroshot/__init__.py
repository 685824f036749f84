"""Zero-shot accuracy through lm-evaluation-harness (``pip install "prunetune[zeroshot]"``).

Pruning papers report perplexity and, beside it, accuracy on lm-eval tasks -- Wanda's Table 2
the mean over BoolQ, RTE, HellaSwag, WinoGrande, ARC-easy, ARC-challenge and OpenBookQA. This
package scores the model as prunetune loaded it (a pruned base with a masked LoRA adapter
applied masked) with lm-eval's own harness::

    from prunetune.zeroshot import ZeroShotSettings, evaluate_zeroshot
    result = evaluate_zeroshot(model, tokenizer, ZeroShotSettings(tasks=["boolq", "arc_easy"], limit=100))
    print(format_table(result.to_dict()))

``settings`` (what to run, checked without lm-eval), ``tasks`` (finding and loading lm-eval's
tasks, offline errors), ``harness`` (the run), ``results`` (numbers and tables), ``local``
(task definitions on local files). CLI: ``prunetune eval --tasks ...``; pipelines:
``evaluation: {tasks: [...]}``. docs/zeroshot.md has the details.
"""

from prunetune.zeroshot.harness import evaluate_zeroshot
from prunetune.zeroshot.local import (
           NEXT_LINE_TASK,
           write_local_task,
           write_next_line_task,
)
from prunetune.zeroshot.results import TaskScore, ZeroShotResult, format_table, mean_of
from prunetune.zeroshot.settings import (
           SEVEN_TASKS,
           ZeroShotSettings,
           check_settings,
           parse_limit,
           parse_tasks,
)
from prunetune.zeroshot.tasks import TaskCatalog

__all__ = ["NEXT_LINE_TASK", "SEVEN_TASKS", "TaskCatalog", "TaskScore", "ZeroShotResult", "ZeroShotSettings",
           "check_settings", "evaluate_zeroshot", "format_table", "mean_of", "parse_limit", "parse_tasks",
           "write_local_task", "write_next_line_task"]
