"""Results tables and plots: a report people would rather look at than read.

Input is plain data gathered by the pipeline (:class:`ReportData`: one :class:`ResultRow` per
configuration, the curves of each recovery run, the per-layer output error of each
configuration); output is a terminal table, ``report.md`` and PNG plots. Nothing here runs a
model. ``tables`` builds the table, ``accuracy`` the zero-shot table (lm-eval tasks, when the
pipeline ran some), ``plots`` draws the figures, ``profile_plots`` those of layer-wise sparsity profiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prunetune.outputs import atomic_write_text
from prunetune.report import plots, profile_plots
from prunetune.report.curves import RecoveryCurve
from prunetune.report.accuracy import accuracy_markdown, accuracy_terminal
from prunetune.report.tables import (
    ResultRow,
    headers,
    markdown_table,
    table_notes,
    terminal_table,
)


@dataclass
class ReportData:
    title: str
    rows: list[ResultRow] = field(default_factory=list)
    curves: dict[str, RecoveryCurve] = field(default_factory=dict)  # recovery configuration -> its curves
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # configuration -> qualified layer -> error
    error_source: str = ""  # the inputs the errors were measured on
    facts: dict[str, str] = field(default_factory=dict)  # model, data fingerprints, machine, ...
    blockwise: dict[str, dict] = field(default_factory=dict)  # blockwise configuration -> its blockwise.json
    # prune configuration -> {method, target, profile, sparsity, sparsity_profile} (pipeline.results.prune_profile)
    profiles: dict[str, dict] = field(default_factory=dict)


PLOTS = {"perplexity": "perplexity.png", "curve": "perplexity_curve.png", "loss": "loss_curves.png",
         "errors": "reconstruction_error.png", "blockwise": "blockwise_losses.png",
         "block_sparsity": "block_sparsity.png", "sweep": "perplexity_vs_sparsity.png"}
OLD_PLOTS = ("sparsity_heatmap.png",)  # written by earlier versions; removed from a reused run folder


def _curve_caption(curves: dict[str, RecoveryCurve]) -> str:
    texts = sorted({c.text for c in curves.values() if c.perplexity and c.text})
    on = f" on {'; '.join(texts)}" if texts else " on held-out blocks of the recovery data"
    return (f"Held-out perplexity (exp of the Trainer's eval_loss){on}, text no run trains on: at 0 tokens the pruned "
            "model, then every eval_steps optimizer steps. Dashed: the dense model on the same blocks. "
            "Tokens trained = steps x global batch x block size.")


def _profile_sections(data: ReportData, out_dir: Path) -> list[str]:
    """The plots of layer-wise sparsity profiles and of the sparsity sweep, each when the run has what it shows."""
    sections = []
    if profile_plots.profiled(data.profiles):
        profile_plots.plot_block_sparsity(data.profiles, out_dir / PLOTS["block_sparsity"])
        sections += ["## Layer-wise sparsity", "", f"![sparsity of each decoder block]({PLOTS['block_sparsity']})", "",
                     "Each decoder block's sparsity (its layers' ratios weighted by their weight counts) in every prune "
                     "entry with a non-uniform profile, against block index; right axis, where OWL set the profile, the "
                     "block's outlier ratio it was derived from; dashed, the uniform entry of the same method and target.",
                     ""]
    if profile_plots.sweep_series(data.profiles, data.rows):
        profile_plots.plot_perplexity_vs_sparsity(data.profiles, data.rows, out_dir / PLOTS["sweep"])
        sections += ["## Perplexity against sparsity", "", f"![perplexity against target sparsity]({PLOTS['sweep']})",
                     "", "Each prune entry's perplexity (log scale) against its target sparsity, one line per method and "
                     "profile (solid: uniform, dash-dotted: a layer-wise profile); dashed, the dense model.", ""]
    return sections


def write_report(data: ReportData, out_dir: Path) -> Path:
    """Write report.md and the PNG plots into ``out_dir``; returns the report path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots.plot_perplexity(data.rows, out_dir / PLOTS["perplexity"])
    sections = [f"# {data.title}", "", markdown_table(data.rows), ""]
    if data.facts:
        sections += ["| fact | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in data.facts.items()] + [""]
    sections += [f"![perplexity per configuration]({PLOTS['perplexity']})", ""]
    accuracy = accuracy_markdown(data.rows)
    if accuracy:
        sections += ["## Zero-shot accuracy", "", accuracy, ""]
    if any(curve.perplexity for curve in data.curves.values()):
        plots.plot_perplexity_curves(data.curves, out_dir / PLOTS["curve"])
        sections += [f"![held-out perplexity against tokens trained]({PLOTS['curve']})", "", _curve_caption(data.curves), ""]
    if any(curve.loss for curve in data.curves.values()):
        plots.plot_loss_curves(data.curves, out_dir / PLOTS["loss"])
        sections += [f"![training loss against tokens trained]({PLOTS['loss']})", ""]
    if data.errors:
        plots.plot_error_heatmaps(data.errors, out_dir / PLOTS["errors"], data.error_source)
        sections += [f"![per-layer output error of each configuration]({PLOTS['errors']})", "",
                     "Per-layer relative output error ||XWᵀ − XW'ᵀ||_F / ||XWᵀ||_F of each configuration's weights W' "
                     "against the dense weights W, X being the dense model's inputs to the layer"
                     + (f" ({data.error_source})" if data.error_source else "")
                     + "; recovered models as evaluated (lora: W + BA merged).", ""]
    if data.blockwise:
        plots.plot_blockwise_losses(data.blockwise, out_dir / PLOTS["blockwise"])
        sections += ["## Block-wise reconstruction", "",
                     f"![per-block reconstruction loss before and after training]({PLOTS['blockwise']})", "",
                     "Each decoder block's (or window of blocks') normalised output error against the dense block, "
                     "before and after its training: on the calibration windows it trained on, and on the held-out "
                     "ones (blockwise.json in each stage's train folder).", ""]
    sections += _profile_sections(data, out_dir)
    path, report = out_dir / "report.md", "\n".join(sections)
    atomic_write_text(path, report)
    for name in (*PLOTS.values(), *OLD_PLOTS):  # plots of an earlier run that this one has no data for
        if f"]({name})" not in report:
            (out_dir / name).unlink(missing_ok=True)
    return path


__all__ = ["PLOTS", "RecoveryCurve", "ReportData", "ResultRow", "accuracy_markdown", "accuracy_terminal", "headers",
           "markdown_table", "table_notes", "terminal_table", "write_report"]
