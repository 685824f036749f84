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
import yaml

from prunetune.errors import UsageError
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
           "recover": [{"prune": "magnitude 50%", "methods": ["lora"], "block_size": 64, "eval_steps": 1, "validation_file": str(validation),
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


# --------------------------------------------------------------------------- every input checked before any stage


def _no_stage_runs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a stage ran before the bad input was refused")

    monkeypatch.setattr(Pipeline, "dense_stage", refuse)


@pytest.mark.parametrize("change, message", [
    ({"distill_from": "{tmp}/no-such-teacher"}, r"config\.recover\[0\]\.distill_from: .*no-such-teacher"),
    ({"distill_from": "{tmp}/other-model"}, r"config\.recover\[0\]\.distill_from: .*cannot teach"),
    ({"validation_file": "{tmp}/records.jsonl"}, r"config\.recover\[0\]\.validation_file: .*'text' field"),
    ({"dataset": "{tmp}/records.jsonl"}, r"config\.recover\[0\]\.dataset: .*'text' field"),
], ids=["missing teacher", "teacher of another vocabulary", "unreadable validation_file", "unreadable training data"])
def test_a_bad_recovery_input_is_refused_before_any_stage_runs(inputs, tmp_path, monkeypatch, change, message):
    from factories import save_model_folder

    save_model_folder(tmp_path / "other-model", "llama")
    (tmp_path / "records.jsonl").write_text('{"body": "a record without text"}\n' * 4)
    raw, _, _ = inputs
    raw["recover"][0].update({k: v.format(tmp=tmp_path) for k, v in change.items()})
    _no_stage_runs(monkeypatch)
    with pytest.raises(UsageError, match=message):
        Pipeline(load_config(raw)).run()
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("device", ["cuda:7", "tpu"])
def test_a_device_this_machine_lacks_is_refused_before_any_stage_runs(inputs, tmp_path, monkeypatch, device):
    raw, _, _ = inputs
    raw["device"] = device
    _no_stage_runs(monkeypatch)
    with pytest.raises(UsageError, match=rf"config\.device {device!r}"):
        Pipeline(load_config(raw)).run()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value", [
    ("output_dir", "{tmp}/a-file"),
    ("output_dir", "{tmp}/a-file/run"),
    ("stages_dir", "{tmp}/a-file"),
    ("stages_dir", "{tmp}/a-file/stages"),
    ("stages_dir", "../a-file/stages"),  # relative: taken from output_dir ({tmp}/run)
])
def test_an_output_folder_that_is_a_file_is_a_usage_error(inputs, tmp_path, monkeypatch, capsys, key, value):
    from prunetune.cli import main

    raw, _, _ = inputs
    (tmp_path / "a-file").write_text("not a folder")
    raw[key] = value.format(tmp=tmp_path)
    _no_stage_runs(monkeypatch)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config)]) == 2
    err = " ".join(capsys.readouterr().err.split())  # the CLI wraps its message
    assert f"{key} " in err and "is a file" in err and "Traceback" not in err
    assert (tmp_path / "a-file").read_text() == "not a folder"


@pytest.mark.parametrize("setting", [{"distill_kl_weight": 0.5}, {"distill_temperature": 2.0},
                                     {"method_overrides": {"lora": {"distill_ce_weight": 1.0}}}])
def test_a_distillation_setting_without_a_teacher_is_refused(inputs, setting):
    raw, _, _ = inputs
    del raw["recover"][0]["distill_from"]
    raw["recover"][0].update(setting)
    name = next(iter(setting)) if "method_overrides" not in setting else "method_overrides.lora.distill_ce_weight"
    with pytest.raises(UsageError, match=rf"config\.recover\[0\]\.{name}: .* without distill_from"):
        load_config(raw)


def test_distillation_defaults_without_a_teacher_and_an_opted_out_method_are_accepted(inputs):
    raw, _, _ = inputs
    entry = raw["recover"][0]
    entry.update(methods=["lora", "full"], distill_kl_weight=0.5, method_overrides={"full": {"distill_from": None}})
    load_config(raw)  # the weights are for lora, the method that distils
    del entry["distill_from"], entry["distill_kl_weight"], entry["method_overrides"]
    entry.update(distill_ce_weight=0.0, distill_temperature=1.0)  # the defaults, written out
    load_config(raw)
