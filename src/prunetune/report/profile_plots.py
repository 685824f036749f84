"""The report's plots of layer-wise sparsity profiles, from plain data: PNG files, nothing printed, no model run.

* per-block sparsity of each prune entry with a non-uniform profile (OWL, a profile file) against block index,
  its blocks' OWL outlier ratios on a second axis, the uniform entry of the same method and target as a flat line;
* perplexity against target sparsity, one line per (method, profile), when a method was pruned at two or more
  ratios: where a profile starts to pay.

Input: ``ReportData.profiles`` (prune configuration -> ``method``, ``target``, ``profile``, ``sparsity``,
``sparsity_profile``; see :func:`prunetune.pipeline.results.prune_profile`) and the table rows.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from prunetune.report.plots import DENSE_COLOR, _colors, _pyplot, _save

if TYPE_CHECKING:
    from prunetune.report.tables import ResultRow

UNIFORM = "uniform"


def profiled(profiles: dict[str, dict]) -> dict[str, dict]:
    """The configurations whose profile is not uniform and that recorded their block ratios."""
    return {name: p for name, p in profiles.items()
            if p.get("profile", UNIFORM) != UNIFORM and (p.get("sparsity_profile") or {}).get("block_ratios")}


def sweep_series(profiles: dict[str, dict], rows: list[ResultRow]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(method, profile) -> sorted (target, perplexity) points of the unstructured prune entries, or {} when no
    method was pruned at two or more target ratios."""
    perplexity = {row.name: row.perplexity for row in rows}
    series: dict[tuple[str, str], dict[float, float]] = {}
    for name, p in profiles.items():
        value = perplexity.get(name, math.nan)
        if p.get("target") is not None and math.isfinite(value):
            series.setdefault((p["method"], p["profile"]), {})[p["target"]] = value
    targets: dict[str, set[float]] = {}
    for (method, _), points in series.items():
        targets.setdefault(method, set()).update(points)
    if not any(len(values) >= 2 for values in targets.values()):
        return {}
    return {key: sorted(points.items()) for key, points in sorted(series.items())}


def plot_block_sparsity(profiles: dict[str, dict], path: Path) -> None:
    """One panel per profiled configuration: each block's sparsity (weighted by weight counts) against block index;
    right axis, when OWL measured them, the blocks' outlier ratios; dashed, the uniform entry of the same method
    and target."""
    plt = _pyplot()
    shown = profiled(profiles)
    uniform = {(p["method"], p["target"]) for p in profiles.values() if p.get("profile") == UNIFORM}
    columns = min(len(shown), 2)
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.6 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(shown):
            ax.axis("off")
            continue
        name, p = list(shown.items())[index]
        profile = p["sparsity_profile"]
        blocks = sorted(int(b) for b in profile["block_ratios"])
        ratios = [profile["block_ratios"][str(b)] for b in blocks]
        lines = ax.plot(blocks, ratios, marker="o", markersize=4, color="#dd8452", label=f"{p['profile']}: block sparsity")
        if (p["method"], p["target"]) in uniform:
            lines += [ax.axhline(p["target"], color=DENSE_COLOR, linestyle="--", linewidth=1,
                                 label=f"uniform {p['method']} {p['target']:.0%}")]
        ax.set_xlabel("decoder block")
        ax.set_ylabel("sparsity of the block")
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
        outliers = ((profile.get("owl") or {}).get("outlier_ratios")) or {}
        if outliers:
            twin = ax.twinx()
            keys = sorted(int(b) for b in outliers)
            lines += twin.plot(keys, [outliers[str(b)] for b in keys], marker="s", markersize=3, linestyle=":",
                               color="#4c72b0", label="outlier ratio (right)")
            twin.set_ylabel("OWL outlier ratio", color="#4c72b0")
            twin.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.2%}"))
        ax.set_xticks(blocks)
        ax.grid(alpha=0.3)
        ax.set_title(textwrap.shorten(f"{name}: overall {p['sparsity']:.2%}", 70), fontsize=9)
        ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path, plt)


def plot_perplexity_vs_sparsity(profiles: dict[str, dict], rows: list[ResultRow], path: Path) -> None:
    """Perplexity (log scale) against target sparsity, one line per (method, profile); dashed, the dense model."""
    plt = _pyplot()
    series = sweep_series(profiles, rows)
    colors = _colors(sorted({method for method, _ in series}))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (method, profile), points in series.items():
        targets, values = zip(*points)
        ax.plot(targets, values, marker="o" if profile == UNIFORM else "s", markersize=5, color=colors[method],
                linestyle="-" if profile == UNIFORM else "-.", label=f"{method}, {profile}")
    dense = [r.perplexity for r in rows if r.stage == "dense" and math.isfinite(r.perplexity)]
    if dense:
        ax.axhline(dense[0], color=DENSE_COLOR, linestyle="--", linewidth=1, label=f"dense ({dense[0]:.2f})")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    # between the decades, 2, 3 and 5 (x 10^k) only: every minor tick labelled crowds a wide range
    ax.yaxis.set_minor_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "235" else ""))
    targets = sorted({target for points in series.values() for target, _ in points})
    ax.set_xticks(targets, [f"{target:.0%}" for target in targets])
    ax.set_xlabel("target sparsity")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title("Perplexity against target sparsity, per method and profile")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, plt)
