"""The README's zero-shot table: the demo pipeline with lm-eval accuracy on the offline next-line task.

Run from the repository root (needs ``pip install -e ".[zeroshot]"``; no network)::

    python benchmarks/zeroshot_tiny.py                 # ~15 min on 2 busy CPU cores
    python benchmarks/zeroshot_tiny.py --limit 200     # quicker, noisier (standard error ~0.035 instead of ~0.016)

Writes the ``builtin_next_line`` task (prunetune.zeroshot.write_next_line_task: given up to 8
lines of a held-out Python standard-library file, pick the true next line among 4) into
``<output_dir>-tasks``, then runs ``configs/demo.yaml`` with ``evaluation.tasks`` set, so every
configuration of the demo -- dense, six pruned, four recovered -- gets a column of accuracy
beside its perplexity. The report is ``<output_dir>/report.md`` (the zero-shot table under
"Zero-shot accuracy"); stages are reused on a re-run, as for any pipeline. Last, the masked_lora
stage's accuracy with its adapter unmerged is compared with that of its merged export (the same
weights, W + (BA) * M: they must agree).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prunetune.config import load_mapping
from prunetune.pipeline import load_config, run_pipeline
from prunetune.zeroshot import NEXT_LINE_TASK, write_next_line_task

DEMO = ROOT / "src" / "prunetune" / "configs" / "demo.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/zeroshot-tiny")
    parser.add_argument("--examples", type=int, default=1000, help="examples in the task's test split")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N (default: all)")
    args = parser.parse_args(argv)

    tasks = Path(f"{args.output_dir.rstrip('/')}-tasks")
    write_next_line_task(tasks, examples=args.examples)  # deterministic: rewriting gives the same files
    config = load_mapping(DEMO)
    config["title"] = f"demo + zero-shot accuracy ({NEXT_LINE_TASK}, lm-eval)"
    config["output_dir"] = args.output_dir
    config["evaluation"].update({"tasks": [NEXT_LINE_TASK], "include_path": str(tasks), "limit": args.limit})
    resolved = load_config(config)
    started = time.perf_counter()
    result = run_pipeline(resolved, listener=lambda event: print(event.line(), file=sys.stderr, flush=True))
    seconds = time.perf_counter() - started
    print(result.table)
    for stage in sorted(resolved.stages_root().glob("recover_*masked_lora/stage.json")):
        summary = json.loads(stage.read_text())["result"]
        scores = [summary.get(key, {}).get("zeroshot") for key in ("evaluation", "evaluation_merged")]
        if all(scores):  # the merged export is scored when the recovery stage evaluates it with the tasks
            unmerged, merged = (score["tasks"][NEXT_LINE_TASK]["metrics"]["acc"] for score in scores)
            print(f"{stage.parent.name}: acc {unmerged:.4f} with the adapter unmerged, {merged:.4f} merged")
    print(f"\nreport: {result.report_path}")
    print(f"wall time {seconds:.0f} s; stages run {len(result.executed)}, reused {len(result.reused)}; machine: "
          f"{os.cpu_count()} CPUs ({platform.machine()}), load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
