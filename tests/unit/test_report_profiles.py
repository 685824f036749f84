"""The report's layer-wise sparsity plots: per-block sparsity of profiled prune entries, perplexity against target
sparsity when a method was pruned at several ratios; neither when the run has nothing to show in them."""

import json

import pytest

from prunetune.loading import TINY_PATH
from prunetune.report import PLOTS, ReportData, ResultRow, write_report
from prunetune.report.profile_plots import sweep_series


def _profile(method: str, target: float, kind: str, perplexity: float) -> tuple[ResultRow, dict]:
    name = f"{method} {target * 100:g}%" + ("" if kind == "uniform" else f" {kind}")
    if kind == "uniform":
        profile = {"kind": "uniform"}
    else:
        outliers = {"0": 0.012, "1": 0.004, "2": 0.02}
        ratios = {"0": target, "1": target + 0.05, "2": target - 0.05}
        profile = {"kind": kind, "target": target, "source": None, "block_ratios": ratios, "layer_ratios": {},
                   "owl": {"m": 5, "lambda": 0.08, "outlier_ratios": outliers}}
    entry = {"method": method, "target": target, "profile": kind, "sparsity": target, "sparsity_profile": profile}
    return ResultRow(name, "prune", method, "unstructured", perplexity=perplexity, sparsity=target), entry


def _data(*configs) -> ReportData:
    data = ReportData(title="profiles", rows=[ResultRow("dense", "dense", "dense", perplexity=10.0)])
    for config in configs:
        row, entry = _profile(*config)
        data.rows.append(row)
        data.profiles[row.name] = entry
    return data


def test_profiled_entries_at_two_ratios_write_both_plots(tmp_path):
    data = _data(("wanda", 0.5, "uniform", 14.0), ("wanda", 0.5, "owl", 13.5),
                 ("wanda", 0.7, "uniform", 80.0), ("wanda", 0.7, "owl", 40.0))
    report = write_report(data, tmp_path).read_text()
    for key in ("block_sparsity", "sweep"):
        assert (tmp_path / PLOTS[key]).stat().st_size > 0
        assert f"]({PLOTS[key]})" in report
    assert PLOTS["block_sparsity"] == "block_sparsity.png" and PLOTS["sweep"] == "perplexity_vs_sparsity.png"
    assert sweep_series(data.profiles, data.rows) == {("wanda", "owl"): [(0.5, 13.5), (0.7, 40.0)],
                                                      ("wanda", "uniform"): [(0.5, 14.0), (0.7, 80.0)]}


def test_uniform_entries_at_one_ratio_write_neither(tmp_path):
    (tmp_path / PLOTS["sweep"]).write_bytes(b"an earlier run's plot")  # a reused folder: removed, not left stale
    report = write_report(_data(("wanda", 0.5, "uniform", 14.0), ("sparsegpt", 0.5, "uniform", 13.0)), tmp_path).read_text()
    assert not (tmp_path / PLOTS["block_sparsity"]).exists() and not (tmp_path / PLOTS["sweep"]).exists()
    assert "block_sparsity" not in report and "perplexity_vs_sparsity" not in report


def test_one_ratio_with_a_profile_writes_only_the_block_plot(tmp_path):
    report = write_report(_data(("wanda", 0.5, "uniform", 14.0), ("wanda", 0.5, "owl", 13.5)), tmp_path).read_text()
    assert (tmp_path / PLOTS["block_sparsity"]).stat().st_size > 0 and "block_sparsity.png" in report
    assert not (tmp_path / PLOTS["sweep"]).exists()


@pytest.mark.skipif(not (TINY_PATH / "model.safetensors").exists(), reason="the bundled tiny model is missing")
def test_pipeline_with_an_owl_entry_writes_the_block_plot(tmp_path):
    import argparse

    from prunetune.pipeline import load_config, run_pipeline

    corpus = tmp_path / "corpus.txt"  # a small local file: quick to tokenize
    corpus.write_text(open(argparse.__file__).read())
    raw = {"title": "owl", "model": "tiny", "output_dir": str(tmp_path / "run"), "dtype": "float32", "device": "cpu",
           "progress": False, "calibration": {"dataset": str(corpus), "nsamples": 4, "seqlen": 32},
           "evaluation": {"dataset": str(corpus), "seqlen": 32, "max_windows": 2},
           "prune": [{"method": "wanda", "sparsity_ratio": 0.5},
                     {"method": "wanda", "sparsity_ratio": 0.5, "sparsity_profile": "owl"}]}
    result = run_pipeline(load_config(raw))
    out = tmp_path / "run"
    assert (out / "block_sparsity.png").stat().st_size > 0 and "block_sparsity.png" in result.report_path.read_text()
    assert not (out / "perplexity_vs_sparsity.png").exists()  # one ratio
    profiles = json.loads((out / "results.json").read_text())["sparsity_profiles"]
    assert profiles["wanda 50%"]["profile"] == "uniform" and profiles["wanda 50%"]["target"] == 0.5
    owl = profiles["wanda 50% owl"]
    assert owl["profile"] == "owl" and owl["method"] == "wanda" and len(set(owl["sparsity_profile"]["block_ratios"].values())) > 1
    assert owl["sparsity_profile"]["owl"]["outlier_ratios"].keys() == owl["sparsity_profile"]["block_ratios"].keys()
