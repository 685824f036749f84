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
