"""What a pipeline stage's key holds, and what is checked before the first stage runs.

A recovery stage reads its training text, its ``validation_file`` and its teacher
(``distill_from``): each must be keyed by content, so an edited file or replaced weights rerun
the stage instead of reusing curves and recoveries made from the old inputs. No stage runs here:
the stage runner is replaced by one that records the inputs it is given.
"""

import os
import shutil
import time

import pytest

from prunetune.loading import TINY_PATH
from prunetune.pipeline import Pipeline, StageResult, load_config
from prunetune.pipeline.stages import stage_hash

HOUR_AGO_NS = int((time.time() - 3600) * 10**9)


def _write_old(path, data: bytes) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(HOUR_AGO_NS, HOUR_AGO_NS))  # as a file that was not just written


@pytest.fixture()
def inputs(tmp_path):
    validation, teacher = tmp_path / "validation.txt", tmp_path / "teacher"
    _write_old(validation, b"held-out text\n" * 20)
    shutil.copytree(TINY_PATH, teacher)
    raw = {"model": "tiny", "output_dir": str(tmp_path / "run"), "device": "cpu", "prune": [{"method": "magnitude"}],
           "recover": [{"prune": "magnitude 50%", "methods": ["lora"], "eval_steps": 1, "validation_file": str(validation),
                        "distill_from": str(teacher)}]}
    return raw, validation, teacher


def recover_key(raw: dict) -> str:
    """The key the config's first recovery stage would run under (nothing runs)."""
    pipeline = Pipeline(load_config(raw))
    recorded = {}
    pipeline.stages.run = lambda name, stage_inputs, work, folder=None: recorded.setdefault("inputs", stage_inputs)
    pruned = StageResult("prune magnitude 50%", pipeline.root / "stages" / "prune", "prunekey", {"model_dir": "model"},
                         False)
    pipeline.recover_stage(pipeline.config.recover[0], "lora", pruned)
    return stage_hash(recorded["inputs"])


def test_editing_the_validation_text_changes_the_recovery_key(inputs):
    raw, validation, _ = inputs
    before = recover_key(raw)
    assert recover_key(raw) == before
    _write_old(validation, b"HELD-OUT TEXT\n" * 20)  # same path, same size: only the text differs
    assert recover_key(raw) != before


def test_replacing_the_teachers_weights_changes_the_recovery_key(inputs):
    raw, _, teacher = inputs
    before = recover_key(raw)
    weights = teacher / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # other weights under the same path
    _write_old(weights, bytes(data))
    assert recover_key(raw) != before


def test_a_dense_teacher_is_keyed_by_the_pipelines_own_model(inputs):
    raw, _, _ = inputs
    raw["recover"][0]["distill_from"] = "dense"
    pipeline = Pipeline(load_config(raw))
    recorded = {}
    pipeline.stages.run = lambda name, stage_inputs, work, folder=None: recorded.setdefault("inputs", stage_inputs)
    pipeline.recover_stage(pipeline.config.recover[0], "lora", StageResult("p", pipeline.root, "k", {}, False))
    assert "teacher" not in recorded["inputs"] and recorded["inputs"]["model"] == pipeline.identity("model", "tiny")
