"""The README's figure: perplexity of SmolLM2-135M dense, pruned, and recovered by each method.

    python tools/plot_pruned_vs_recovered.py    # writes docs/smollm2/pruned_vs_recovered.png

Read from docs/smollm2-distill/results.json (which holds the plain recoveries it reuses beside
the distilled ones), so the figure shows the same numbers as the tables rendered from that file.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "docs" / "smollm2-distill" / "results.json"
OUT = ROOT / "docs" / "smollm2" / "pruned_vs_recovered.png"
BARS = [("pruned", "", "#dd8452"), ("lora", " + lora", "#8fb8de"), ("masked_lora", " + masked_lora", "#4c72b0"),
        ("full", " + full", "#55a868"), ("full, distilled", " + full + distill", "#2d6a3e")]


def main() -> None:
    rows = {row["name"]: row["perplexity"] for row in json.loads(SOURCE.read_text())["rows"]}
    pruned_models = ["wanda 50%", "wanda 2:4"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, base in zip(axes, pruned_models):
        values = [rows[base + suffix] for _, suffix, _ in BARS]
        bars = ax.bar(range(len(BARS)), values, color=[c for _, _, c in BARS])
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
        ax.axhline(rows["dense"], color="black", linestyle="--", linewidth=1)
        ax.text(len(BARS) - 0.5, rows["dense"], f"dense {rows['dense']:.1f}", ha="right", va="bottom", fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
        ax.set_xticks(range(len(BARS)), [label for label, _, _ in BARS], rotation=20, fontsize=8)
        ax.set_title(f"Wanda {base.split()[1]}", fontsize=10)
        ax.set_ylim(0, max(values) * 1.15)
    axes[0].set_ylabel("WikiText-2 perplexity (lower is better)", fontsize=9)
    fig.suptitle("SmolLM2-135M: pruned, then recovered with 16,384 tokens (WikiText-2 test, 12 x 512 tokens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
