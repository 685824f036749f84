"""The report's plots, from plain data: PNG files, nothing printed, no model run.

* perplexity per configuration (bars, the dense perplexity as a dashed line);
* held-out perplexity against tokens trained, per recovery run: the curve to decide from
  (how many tokens a method needs, which method wins), the pruned model at 0 tokens and the
  dense model on the same held-out blocks as a reference;
* training loss against tokens trained;
* relative output error per decoder block and layer kind, one panel per configuration;
* block-wise reconstruction: each window of blocks' loss before and after training (train, held out).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prunetune.report.curves import RecoveryCurve
    from prunetune.report.tables import ResultRow

STAGE_COLORS = {"dense": "#4c72b0", "prune": "#dd8452", "recover": "#55a868"}
DENSE_COLOR = "#4c4c4c"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, plt) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_perplexity(rows: list[ResultRow], path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in rows if not math.isnan(r.perplexity)]
    fig, ax = plt.subplots(figsize=(max(6, 0.75 * len(rows) + 2), 4.2))
    bars = ax.bar(range(len(rows)), [r.perplexity for r in rows], color=[STAGE_COLORS.get(r.stage, "gray") for r in rows])
    for bar, row in zip(bars, rows):
        ax.annotate(f"{row.perplexity:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("perplexity (lower is better)")
    dense = [r.perplexity for r in rows if r.stage == "dense"]
    if dense:
        ax.axhline(dense[0], color=STAGE_COLORS["dense"], linestyle="--", linewidth=1, label="dense")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in STAGE_COLORS.values()]
    ax.legend(handles, list(STAGE_COLORS), loc="upper left", fontsize=8)
    ax.set_title("Perplexity per configuration")
    fig.tight_layout()
    _save(fig, path, plt)


def _colors(names: list[str]) -> dict[str, str]:
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
               "#393b79", "#637939", "#843c39", "#7b4173", "#e7ba52"]  # 14 before one repeats
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def plot_perplexity_curves(curves: dict[str, RecoveryCurve], path: Path) -> None:
    """Held-out perplexity against tokens trained; 0 tokens is the pruned model, dashed the dense one."""
    plt = _pyplot()
    shown = {name: curve for name, curve in curves.items() if curve.perplexity}
    colors = _colors(list(curves))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, curve in shown.items():
        tokens, values = zip(*curve.perplexity)
        ax.plot(tokens, values, marker="o", markersize=3, linewidth=1.5, color=colors[name], label=name)
    references = {round(c.dense_perplexity, 6) for c in shown.values() if c.dense_perplexity is not None}
    if len(references) == 1:  # every run scored the same held-out blocks: one line
        value = references.pop()
        ax.axhline(value, color=DENSE_COLOR, linestyle="--", linewidth=1, label=f"dense, same blocks ({value:.2f})")
    else:
        for name, curve in shown.items():
            if curve.dense_perplexity is not None:
                ax.axhline(curve.dense_perplexity, color=colors[name], linestyle=":", linewidth=1,
                           label=f"dense, {name}'s blocks ({curve.dense_perplexity:.2f})")
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("Recovery: held-out perplexity against tokens trained")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, plt)


def plot_loss_curves(curves: dict[str, RecoveryCurve], path: Path) -> None:
    """Training loss against tokens; beside it, when runs logged the same steps, each run's loss minus their
    mean: runs of one recovery entry see the same batches, whose differences in difficulty dwarf the methods'."""
    plt = _pyplot()
    colors = _colors(list(curves))
    logged = {name: dict(curve.loss) for name, curve in curves.items() if curve.loss}
    shared = sorted(set.intersection(*(set(points) for points in logged.values()))) if len(logged) > 1 else []
    fig, axes = plt.subplots(1, 2 if shared else 1, figsize=(12 if shared else 7, 4.2), squeeze=False)
    ax = axes[0][0]
    for name, points in logged.items():
        ax.plot(list(points), list(points.values()), label=name, linewidth=1.2, color=colors[name], alpha=0.9)
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("training loss (per logging interval)")
    ax.set_title("Recovery training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if shared:
        ax = axes[0][1]
        mean = {tokens: sum(points[tokens] for points in logged.values()) / len(logged) for tokens in shared}
        for name, points in logged.items():
            ax.plot(shared, [points[t] - mean[t] for t in shared], label=name, linewidth=1.2, color=colors[name])
        ax.axhline(0, color=DENSE_COLOR, linewidth=0.8)
        ax.set_xlabel("tokens trained")
        ax.set_ylabel("loss minus the mean of the runs (lower: ahead)")
        ax.set_title("The same batches: each run against the others")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path, plt)


def _grid(per_layer: dict[str, float]):
    """(blocks, kinds, values[block][kind]) of one configuration's per-layer figures."""
    import numpy as np

    kinds, blocks = [], []
    for qualified in per_layer:
        prefix, kind = _split_block(qualified)
        kinds += [kind] if kind not in kinds else []
        blocks += [prefix] if prefix not in blocks else []
    grid = np.full((len(blocks), len(kinds)), np.nan)
    for qualified, value in per_layer.items():
        prefix, kind = _split_block(qualified)
        grid[blocks.index(prefix), kinds.index(kind)] = value
    return blocks, kinds, grid


def plot_error_heatmaps(errors: dict[str, dict[str, float]], path: Path, source: str = "") -> None:
    """One panel per configuration: decoder blocks (rows) x layer kinds (columns), one colour scale."""
    import numpy as np

    plt = _pyplot()
    names = list(errors)
    columns = min(len(names), 4)
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns + 1, 3.1 * rows + 0.8), squeeze=False,
                             layout="constrained")
    finite = [v for per_layer in errors.values() for v in per_layer.values() if math.isfinite(v)]
    top = max(finite) if finite else 1.0
    image = None
    for index, ax in enumerate(axes.flat):
        if index >= len(names):
            ax.axis("off")
            continue
        blocks, kinds, grid = _grid(errors[names[index]])
        image = ax.imshow(grid, vmin=0, vmax=top, cmap="viridis", aspect="auto")
        if grid.size <= 64:  # small grids get their numbers written in
            for (r, c), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if value < 0.6 * top else "black")
        ax.set_xticks(range(len(kinds)), [k.rsplit(".", 1)[-1] for k in kinds], rotation=60, fontsize=7)
        ax.set_yticks(range(len(blocks)), [b.rsplit(".", 1)[-1] for b in blocks], fontsize=7)
        ax.set_title("\n".join(textwrap.wrap(names[index], 30)), fontsize=8)
        if index % columns == 0:
            ax.set_ylabel("block", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="relative output error", shrink=0.8)
    title = "Per-layer output error against the dense layer: ||XWᵀ − XW'ᵀ||_F / ||XWᵀ||_F"
    fig.suptitle(title + (f"\nX: the dense model's inputs on {source}" if source else ""), fontsize=9)
    _save(fig, path, plt)


def _split_block(qualified: str) -> tuple[str, str]:
    """'model.layers.3.self_attn.q_proj' -> ('model.layers.3', 'self_attn.q_proj')."""
    parts = qualified.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1]), ".".join(parts[i + 1 :])
    return "", qualified


def plot_blockwise_losses(reports: dict[str, dict], path: Path) -> None:
    """Per-window reconstruction loss before/after training, one panel per blockwise configuration.

    ``reports``: configuration -> its ``blockwise.json`` (``windows``: ``blocks``, ``train_before``,
    ``train_after``, ``held_before``, ``held_after``). Log scale: the first and last blocks differ by decades.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(reports), 1, figsize=(8, 3.2 * len(reports)), squeeze=False)
    styles = {"train_before": ("train, before", "#dd8452", "--"), "train_after": ("train, after", "#55a868", "-"),
              "held_before": ("held out, before", "#c44e52", ":"), "held_after": ("held out, after", "#4c72b0", "-.")}
    for ax, (name, report) in zip(axes[:, 0], reports.items()):
        windows = report.get("windows", [])
        ticks = [f"{w['blocks'][0]}-{w['blocks'][-1]}" if len(w["blocks"]) > 1 else str(w["blocks"][0]) for w in windows]
        for key, (label, color, style) in styles.items():
            values = [w.get(key) for w in windows]
            if values and all(v is not None for v in values):
                ax.plot(range(len(values)), values, style, marker="o", markersize=3, color=color, label=label)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_xlabel("decoder block")
        ax.set_ylabel("normalised MSE")
        if windows and all(w[k] and w[k] > 0 for w in windows for k in ("train_before", "train_after")):
            ax.set_yscale("log")
        ax.set_title(textwrap.shorten(name, 80), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, plt)
