"""The report's table: what the memory column measures, which sparsity sits next to a perplexity."""

import pytest

from prunetune.report import RecoveryCurve, ReportData, ResultRow, markdown_table, terminal_table, write_report


def _rows(kind="rss"):
    return [
        ResultRow("dense", "dense", "-", perplexity=10.0, sparsity=0.0),
        ResultRow("wanda 50%", "prune", "wanda", "unstructured", perplexity=12.0, sparsity=0.5, seconds=1.0,
                  peak_memory_mb=0.0, peak_memory_kind=kind),
        ResultRow("wanda 50% + lora", "recover", "lora", "unstructured", perplexity=11.0, sparsity=0.004,
                  seconds=2.0, tokens_seen=100, peak_memory_mb=300.0, peak_memory_kind=kind,
                  sparsity_after_merge=0.004, note="perplexity with the adapter unmerged"),
    ]


def _header(table: str) -> list[str]:
    return [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]


@pytest.mark.parametrize("kind, label", [("rss", "peak memory (CPU: RSS increase)"),
                                         ("cuda_allocated", "peak memory (CUDA: peak allocated)")])
def test_memory_column_says_what_it_measures(kind, label):
    table = markdown_table(_rows(kind))
    assert label in _header(table)
    assert label in terminal_table(_rows(kind)).splitlines()[0]
    assert ("above the RSS when the stage began" in table) == (kind == "rss")


def test_memory_column_plain_when_nothing_was_measured():
    rows = [ResultRow("dense", "dense", "-", perplexity=10.0)]
    assert "peak memory" in _header(markdown_table(rows))


def test_a_measured_zero_increase_is_shown_as_a_figure():
    table = markdown_table(_rows())
    prune_line = next(line for line in table.splitlines() if line.startswith("| wanda 50% |"))
    assert "| 0 MB |" in prune_line
    dense_line = next(line for line in table.splitlines() if line.startswith("| dense |"))
    assert "| - |" in dense_line  # not measured


def test_sparsity_column_is_the_evaluated_weights_and_notes_are_shown():
    table = markdown_table(_rows())
    header = _header(table)
    lora_line = next(line for line in table.splitlines() if line.startswith("| wanda 50% + lora |"))
    cells = [cell.strip() for cell in lora_line.strip("|").split("|")]
    assert cells[header.index("sparsity")] == "0.40%"
    assert "sparsity after merge" not in header  # it would repeat the sparsity column
    assert "- wanda 50% + lora: perplexity with the adapter unmerged" in table


def test_write_report(tmp_path):
    path = write_report(ReportData("t", rows=_rows()), tmp_path)
    assert "peak memory (CPU: RSS increase)" in path.read_text()


def _curve(start: float, dense: float | None) -> RecoveryCurve:
    return RecoveryCurve(loss=[(512 * step, 3.0 - 0.01 * step) for step in range(1, 31)],
                         perplexity=[(512 * step, start - 0.1 * step) for step in range(0, 31, 5)],
                         dense_perplexity=dense, text="builtin validation split; 32 windows of 256 tokens")


def test_report_plots_what_varies(tmp_path):
    """Held-out perplexity against tokens (pruned at 0, dense on the same blocks) and per-layer errors, not sparsity."""
    (tmp_path / "sparsity_heatmap.png").write_bytes(b"from an earlier version")
    errors = {name: {f"model.layers.{b}.{kind}": 0.1 * (b + 1) + shift for b in range(2) for kind in ("self_attn.q_proj", "mlp.down_proj")}
              for shift, name in enumerate(["wanda 50%", "wanda 50% + lora", "wanda 50% + masked_lora"])}
    data = ReportData("t", rows=_rows(), curves={"wanda 50% + lora": _curve(30, 25), "wanda 50% + masked_lora": _curve(31, 25)},
                      errors=errors, error_source="4 calibration windows x 256 tokens of builtin")
    report = write_report(data, tmp_path).read_text()
    for name in ("perplexity.png", "perplexity_curve.png", "loss_curves.png", "reconstruction_error.png"):
        assert (tmp_path / name).stat().st_size > 10_000 and f"]({name})" in report, name
    assert not (tmp_path / "sparsity_heatmap.png").exists()
    assert "builtin validation split; 32 windows of 256 tokens" in report and "dense model on the same blocks" in report
    assert "4 calibration windows x 256 tokens of builtin" in report

    # different held-out blocks per run (dense lines of their own), a run without a curve, no errors: still a report
    data = ReportData("t", rows=_rows(), curves={"a": _curve(30, 25), "b": _curve(31, 26), "c": RecoveryCurve()})
    report = write_report(data, tmp_path).read_text()
    assert "perplexity_curve.png" in report and not (tmp_path / "reconstruction_error.png").exists()
