"""The results table: one :class:`ResultRow` per configuration, as Markdown or for a terminal."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from prunetune.report.accuracy import accuracy_terminal


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
    zeroshot: dict | None = None  # lm-eval tasks' scores (prunetune.zeroshot.ZeroShotResult.to_dict()); None: not run
    # recovery rows: (pruned - this) / (pruned - dense) perplexity, against the prune entry at the root of its stack
    gap_won_back: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


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
    """The perplexity table, then the zero-shot table when any row has one (see prunetune.report.accuracy)."""
    accuracy = accuracy_terminal(rows)
    return _perplexity_terminal(rows) + (f"\n\n{accuracy}" if accuracy else "")


def _perplexity_terminal(rows: list[ResultRow]) -> str:
    names = headers(rows)
    cells = [names] + [_row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(names))]
    out = []
    for n, line in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
