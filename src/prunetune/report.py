"""Results tables and plots: a report people would rather look at than read.

Input is plain data gathered by the pipeline (one :class:`ResultRow` per configuration, the
loss history of each recovery run, the per-module sparsity of each pruned model); output is a
terminal table, ``report.md`` and PNG plots. Nothing here runs a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prunetune.outputs import atomic_write_text


@dataclass
class ResultRow:
    """One configuration in the comparison (the seed's columns).

    ``sparsity`` is that of the weights the perplexity was computed with: for an adapter
    evaluated unmerged, of W + BA (plain LoRA fills the pruned weights: about 0%).
    ``peak_memory_mb`` is the stage's own figure, of kind ``peak_memory_kind``: ``rss`` (CPU:
    the rise of the process's resident set during the stage) or ``cuda_allocated`` (the peak
    allocated on the device during the stage, weights included); see :mod:`prunetune.memory`.
    """

    name: str
    stage: str  # dense | prune | recover
    method: str
    structure: str = "-"
    perplexity: float = float("nan")
    sparsity: float = 0.0
    seconds: float = 0.0  # pruning or training wall time
    tokens_seen: int = 0
    peak_memory_mb: float = 0.0
    peak_memory_kind: str = ""  # rss | cuda_allocated; "" when not measured
    sparsity_after_merge: float | None = None  # of the exported model, after merging an adapter
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReportData:
    title: str
    rows: list[ResultRow] = field(default_factory=list)
    loss_histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    sparsity: dict[str, dict[str, float]] = field(default_factory=dict)  # config -> qualified module -> sparsity
    facts: dict[str, str] = field(default_factory=dict)  # model, data fingerprints, machine, ...


def _fmt_time(seconds: float) -> str:
    if not seconds:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _fmt_mem(mb: float) -> str:
    return f"{mb:.0f} MB" if mb < 4096 else f"{mb / 1024:.1f} GB"


def _row_cells(row: ResultRow) -> list[str]:
    return [
        row.name,
        row.method,
        row.structure,
        f"{row.perplexity:.3f}" if not math.isnan(row.perplexity) else "-",
        _fmt_time(row.seconds),
        f"{row.tokens_seen:,}" if row.tokens_seen else "-",
        _fmt_mem(row.peak_memory_mb) if row.peak_memory_kind or row.peak_memory_mb else "-",  # 0 MB is a figure
        f"{row.sparsity:.2%}",
    ]


# The sparsity column is that of the evaluated weights, which for every recovery row are the
# merged ones, so a separate "sparsity after merge" column would repeat it (results.json keeps it).
HEADERS = ["configuration", "method", "structure", "perplexity", "time", "tokens seen", "peak memory", "sparsity"]

# What each kind of memory figure is, for the column header and the note under the table.
MEMORY_LABELS = {"rss": "CPU: RSS increase", "cuda_allocated": "CUDA: peak allocated"}
MEMORY_NOTES = {
    "rss": "CPU rows: the highest rise of the process's resident memory (RSS) during the stage -- loading the "
           "model, then pruning or training it; evaluation excluded -- above the RSS when the stage began "
           "(the absolute RSS would count whatever earlier stages left resident). The first stage to read a data "
           "source also pays for tokenizing it; later stages reuse the tokens.",
    "cuda_allocated": "CUDA rows: the peak of memory allocated by torch during the stage -- loading the model, "
                      "then pruning or training it; evaluation excluded -- weights included.",
}


def _memory_kinds(rows: list[ResultRow]) -> list[str]:
    return sorted({r.peak_memory_kind for r in rows if r.peak_memory_kind})


def headers(rows: list[ResultRow]) -> list[str]:
    """The column headers; the memory column says what its figures are."""
    labels = [MEMORY_LABELS.get(kind, kind) for kind in _memory_kinds(rows)]
    memory = f"peak memory ({'; '.join(labels)})" if labels else "peak memory"
    return [memory if h == "peak memory" else h for h in HEADERS]


def table_notes(rows: list[ResultRow]) -> list[str]:
    """Footnotes under the table: what the memory figures measure, then each row's note."""
    notes = [MEMORY_NOTES[kind] for kind in _memory_kinds(rows) if kind in MEMORY_NOTES]
    notes += [f"{row.name}: {row.note}" for row in rows if row.note]
    return notes


def markdown_table(rows: list[ResultRow]) -> str:
    names = headers(rows)
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in names) + "|"]
    lines += ["| " + " | ".join(_row_cells(r)) + " |" for r in rows]
    notes = table_notes(rows)
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines)


def terminal_table(rows: list[ResultRow]) -> str:
    names = headers(rows)
    cells = [names] + [_row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(names))]
    out = []
    for n, line in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STAGE_COLORS = {"dense": "#4c72b0", "prune": "#dd8452", "recover": "#55a868"}


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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_curves(histories: dict[str, list[tuple[int, float]]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in histories.items():
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, label=name, linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Recovery training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sparsity_heatmap(sparsity: dict[str, dict[str, float]], path: Path) -> None:
    """One panel per configuration: decoder blocks (rows) x module kinds (columns)."""
    import numpy as np

    plt = _pyplot()
    names = list(sparsity)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1, 3.6), squeeze=False)
    image = None
    for ax, name in zip(axes[0], names):
        per_module = sparsity[name]
        kinds, blocks = [], []
        for qualified in per_module:
            prefix, kind = _split_block(qualified)
            if kind not in kinds:
                kinds.append(kind)
            if prefix not in blocks:
                blocks.append(prefix)
        grid = np.full((len(blocks), len(kinds)), np.nan)
        for qualified, value in per_module.items():
            prefix, kind = _split_block(qualified)
            grid[blocks.index(prefix), kinds.index(kind)] = value
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        if grid.size <= 64:  # small grids get their numbers written in
            for (r, c), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if value < 0.6 else "black")
        ax.set_xticks(range(len(kinds)), [k.rsplit(".", 1)[-1] for k in kinds], rotation=60, fontsize=7)
        ax.set_yticks(range(len(blocks)), [b.rsplit(".", 1)[-1] for b in blocks], fontsize=7)
        ax.set_title(name, fontsize=8)
    axes[0][0].set_ylabel("block")
    fig.colorbar(image, ax=axes[0].tolist(), label="sparsity", shrink=0.8)
    fig.suptitle("Sparsity per block and module", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _split_block(qualified: str) -> tuple[str, str]:
    """'model.layers.3.self_attn.q_proj' -> ('model.layers.3', 'self_attn.q_proj')."""
    parts = qualified.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1]), ".".join(parts[i + 1 :])
    return "", qualified


PLOTS = {"perplexity": "perplexity.png", "loss": "loss_curves.png", "sparsity": "sparsity_heatmap.png"}


def write_report(data: ReportData, out_dir: Path) -> Path:
    """Write report.md and the PNG plots into ``out_dir``; returns the report path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_perplexity(data.rows, out_dir / PLOTS["perplexity"])
    sections = [f"# {data.title}", "", markdown_table(data.rows), ""]
    if data.facts:
        sections += ["| fact | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in data.facts.items()] + [""]
    sections += [f"![perplexity per configuration]({PLOTS['perplexity']})", ""]
    if any(data.loss_histories.values()):
        plot_loss_curves(data.loss_histories, out_dir / PLOTS["loss"])
        sections += [f"![training loss per recovery method]({PLOTS['loss']})", ""]
    if data.sparsity:
        plot_sparsity_heatmap(data.sparsity, out_dir / PLOTS["sparsity"])
        sections += [f"![sparsity per block and module]({PLOTS['sparsity']})", ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(sections))
    return path
