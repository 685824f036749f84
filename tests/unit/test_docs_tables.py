"""Every table of figures in README.md and docs/ is what its source JSON renders to.

Tables sit between ``<!-- table:ID -->`` and ``<!-- /table -->``; tools/render_docs.py renders
each from its results.json / benchmark JSON (or, for the pipeline key reference, from the config
dataclasses). A number edited by hand, or a source replaced without re-rendering, fails here;
the fix is ``python tools/render_docs.py``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "render_docs.py"

if not TOOL.exists():  # an installed package without its source tree
    pytest.skip("not a source checkout", allow_module_level=True)


def _tool():
    spec = importlib.util.spec_from_file_location("render_docs", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_marked_table_matches_its_source():
    stale = _tool().differences()
    assert not stale, ("tables differ from the JSON they are rendered from (run `python tools/render_docs.py`, "
                       "or fix the source): " + "; ".join(stale))


def test_the_readme_and_the_results_pages_have_marked_tables():
    tool = _tool()
    marked = {str(p.relative_to(ROOT)) for p in tool.marked_files()}
    assert "README.md" in marked
    assert {"docs/smollm2/report.md", "docs/pipeline.md"} <= marked


def test_a_hand_edited_number_is_found(tmp_path, monkeypatch):
    tool = _tool()
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- table:gap-readme:smollm2 -->.*?<!-- /table -->", readme, re.S).group(0)
    edited = block.replace("| 18.3% |", "| 19.3% |", 1)
    assert edited != block
    copy = tmp_path / "README.md"
    copy.write_text(edited)
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    monkeypatch.setattr(tool, "FILES", ["README.md"])
    monkeypatch.setattr(tool, "_load", lambda path: __import__("json").loads((ROOT / path).read_text()))
    assert tool.differences() == ["README.md: table gap-readme:smollm2"]


FIGURE = re.compile(r"\|\s*\**~?\d[\d,]*(\.\d+)?\s*(%|s|min|GiB|GB|MB|x)?\**\s*(?=\|)")


def test_no_table_of_figures_outside_markers():
    """Tables of figures (a cell that is a measured number: 12.34, 18.3%, 8.2 min, 4.5 GB) are rendered, never typed in."""
    tool = _tool()
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    loose = []
    for path in files:
        text = tool.MARKER.sub("", path.read_text())
        for line in text.splitlines():
            if line.startswith("|") and FIGURE.search(line):
                loose.append(f"{path.relative_to(ROOT)}: {line[:80]}")
    assert not loose, "tables of figures outside <!-- table: --> markers: " + "; ".join(loose)


def _profile_results() -> dict:
    def entry(method, target, profile, sparsity, ratios=None):
        shape = {"kind": profile} if ratios is None else {"kind": profile, "target": target, "block_ratios": ratios}
        return {"method": method, "target": target, "profile": profile, "sparsity": sparsity, "sparsity_profile": shape}

    rows = [("dense", "dense", 10.0), ("wanda 70%", "prune", 80.0), ("wanda 70% owl", "prune", 40.0),
            ("sparsegpt 50%", "prune", 13.0), ("sparsegpt 50% owl", "prune", 13.26), ("wanda 50%", "prune", 14.0)]
    profiles = {"wanda 70%": entry("wanda", 0.7, "uniform", 0.7), "wanda 50%": entry("wanda", 0.5, "uniform", 0.5),
                "wanda 70% owl": entry("wanda", 0.7, "owl", 0.700049, {"0": 0.62, "1": 0.7, "2": 0.7812}),
                "sparsegpt 50%": entry("sparsegpt", 0.5, "uniform", 0.5),
                "sparsegpt 50% owl": entry("sparsegpt", 0.5, "owl", 0.49996, {"0": 0.45, "1": 0.55})}
    return {"rows": [{"name": n, "stage": s, "perplexity": p, "seconds": 10 * p} for n, s, p in rows],
            "facts": {"evaluation": "some text, 2 windows x 32 tokens"}, "sparsity_profiles": profiles}


def test_profile_table_pairs_uniform_and_owl_entries(monkeypatch):
    tool = _tool()
    provenance = {"docs/sweep/results.json": {"command": "prunetune run sweep.yaml", "commit": "abc1234", "machine": "cpu",
                                              "date": "2025-01-01", "wall_time": "1 min"}}
    sources = {"docs/sweep/results.json": _profile_results(), "docs/provenance.json": provenance}
    monkeypatch.setattr(tool, "_load", lambda path: sources[path])
    table = tool.render("profile-table:sweep")
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == ("| method | target sparsity | uniform perplexity | OWL perplexity | change | OWL overall sparsity "
                        "| OWL block ratios (min–max) | pruning time, uniform / OWL |")
    # by method, then ratio; wanda 50% has no OWL entry: no row
    assert lines[2:] == ["| sparsegpt | 50% | 13.00 | 13.26 | +2.0% | 50.00% | 45.0%–55.0% | 2.2 min / 2.2 min |",
                         "| wanda | 70% | 80.00 | 40.00 | -50.0% | 70.00% | 62.0%–78.1% | 13.3 min / 6.7 min |"]
    assert "dense 10.00" in table and "commit abc1234" in table
    readme = tool.render("profile-readme:sweep")  # the README's copy: the table alone, provenance on the results page
    assert readme.splitlines() == lines and "commit" not in readme
    sources["docs/sweep/results.json"] = dict(_profile_results(), sparsity_profiles={})  # a run before profiles
    assert "No method and target ratio" in tool.render("profile-table:sweep")
