"""StageRunner: reuse by key; a shared stages folder never loses another config's finished stage."""

import json

import pytest

from prunetune.pipeline.stages import STAGE_MANIFEST, StageRunner


def _work(value, calls):
    def work(tmp):
        calls.append(value)
        (tmp / "out.txt").write_text(str(value))
        return {"value": value}
    return work


def _stage_folders(root):
    return sorted(p.name for p in root.iterdir() if (p / STAGE_MANIFEST).exists())


def test_a_private_folder_replaces_a_stale_stage(tmp_path):
    calls = []
    StageRunner(tmp_path).run("recover x", {"steps": 8}, _work(8, calls))
    result = StageRunner(tmp_path).run("recover x", {"steps": 49}, _work(49, calls))
    assert calls == [8, 49] and not result.reused
    assert _stage_folders(tmp_path) == ["recover_x"] and (tmp_path / "recover_x" / "out.txt").read_text() == "49"


def test_a_shared_folder_keeps_the_other_configs_stage(tmp_path):
    calls = []
    first = StageRunner(tmp_path, shared=True).run("recover x", {"steps": 8}, _work(8, calls))
    second = StageRunner(tmp_path, shared=True).run("recover x", {"steps": 49}, _work(49, calls))
    assert first.directory.name == "recover_x" and second.directory.name == f"recover_x-{second.key[:8]}"
    assert (first.directory / "out.txt").read_text() == "8" and (second.directory / "out.txt").read_text() == "49"
    # both are found again, each by its own key, without running
    again = [StageRunner(tmp_path, shared=True).run("recover x", {"steps": n}, _work(n, calls)) for n in (8, 49)]
    assert calls == [8, 49] and all(r.reused for r in again)
    assert [r.result["value"] for r in again] == [8, 49]
    assert [r.directory for r in again] == [first.directory, second.directory]


def test_a_damaged_stage_is_replaced_in_place_even_when_shared(tmp_path):
    calls = []
    StageRunner(tmp_path, shared=True).run("recover x", {"steps": 8}, _work(8, calls))
    (tmp_path / "recover_x" / STAGE_MANIFEST).write_text("{not json")
    result = StageRunner(tmp_path, shared=True).run("recover x", {"steps": 8}, _work(8, calls))
    assert calls == [8, 8] and result.directory.name == "recover_x"
    assert json.loads((tmp_path / "recover_x" / STAGE_MANIFEST).read_text())["complete"]


@pytest.mark.parametrize("shared", [False, True])
def test_an_unchanged_stage_is_reused(tmp_path, shared):
    calls = []
    StageRunner(tmp_path, shared=shared).run("prune y", {"ratio": 0.5}, _work(1, calls))
    result = StageRunner(tmp_path, shared=shared).run("prune y", {"ratio": 0.5}, _work(2, calls))
    assert calls == [1] and result.reused and result.result == {"value": 1}
