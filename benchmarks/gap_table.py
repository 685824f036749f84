"""The share of the pruning gap each recovery won back, from a pipeline run's results.json.

    python benchmarks/gap_table.py runs/smollm2-135m/results.json [more results.json ...]

For every recovery row ``P + method`` (P a pruned configuration of the same run):
``(ppl_P - ppl_row) / (ppl_P - ppl_dense)``, printed as a Markdown table beside the seed's
reference fractions for Llama-7B at 50% unstructured (WikiText-2: dense 5.12, Wanda 6.42,
+ LoRA ~5.8, + full fine-tuning ~5.6, i.e. ~48% and ~63%). Several files: rows are merged by
name (the first file's value wins), so a run that shares stages with another adds its rows.
"""

from __future__ import annotations

import json
import sys

SEED = {"lora": "~48% (LoRA)", "full": "~63% (full fine-tuning)"}


def main(paths: list[str]) -> int:
    rows: dict[str, dict] = {}
    for path in paths:
        with open(path) as handle:
            for row in json.load(handle)["rows"]:
                rows.setdefault(row["name"], row)
    dense = rows["dense"]["perplexity"]
    print("| recovery | tokens | perplexity | pruned perplexity | gap won back | sparsity (merged) | seed, Llama-7B 50% |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        if row["stage"] != "recover" or "merged + remasked" in name:
            continue
        pruned = rows[name.split(" + ")[0]]["perplexity"]
        gap = (pruned - row["perplexity"]) / (pruned - dense)
        merged = row.get("sparsity_after_merge")
        seed = SEED.get(row["method"], "-") if "50%" in name and "distill" not in name else "-"
        print(f"| {name} | {row['tokens_seen']:,} | {row['perplexity']:.3f} | {pruned:.3f} | {gap:.1%} | "
              f"{'-' if merged is None else f'{merged:.2%}'} | {seed} |")
    print(f"\ndense perplexity {dense:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
