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


# --------------------------------------------------------------------------- blockwise and stacked recoveries

BLOCKWISE = {"prune": "magnitude 50%", "methods": ["blockwise"], "name": "bw", "nsamples": 8, "seqlen": 32,
             "num_train_epochs": 1, "learning_rate": 5.0e-4, "per_device_train_batch_size": 2}


def step_key(raw: dict, index: int = 0, base: StageResult | None = None) -> tuple[str, dict]:
    """The key (and inputs) of the config's ``index``-th recovery step, started from ``base`` (nothing runs)."""
    pipeline = Pipeline(load_config(raw))
    recorded = {}
    pipeline.stages.run = lambda name, stage_inputs, work, folder=None: recorded.setdefault("inputs", stage_inputs)
    step = pipeline.config.recovery_steps()[index]
    base = base or StageResult("prune magnitude 50%", pipeline.root / "stages" / "prune", "prunekey", {"model_dir": "model"},
                               False)
    pipeline.recover_stage(step.spec, step.method, base, step.label)
    return stage_hash(recorded["inputs"]), recorded["inputs"]


def _blockwise_raw(tmp_path, **changes) -> dict:
    return {"model": "tiny", "output_dir": str(tmp_path / "run"), "device": "cpu", "prune": [{"method": "magnitude"}],
            "recover": [{**BLOCKWISE, **changes}]}


@pytest.mark.parametrize("key, value", [("blockwise_input", "dense"), ("blockwise_window", 2), ("nsamples", 16),
                                        ("seqlen", 64), ("num_train_epochs", 2), ("learning_rate", 1.0e-3),
                                        ("per_device_train_batch_size", 4), ("distill_from", "tiny-teacher")])
def test_every_blockwise_setting_is_in_the_stage_key(tmp_path, key, value):
    if key == "distill_from":  # another teacher (a copy of tiny), keyed by content
        shutil.copytree(TINY_PATH, tmp_path / value)
        value = str(tmp_path / value)
    before, inputs = step_key(_blockwise_raw(tmp_path))
    assert inputs["recovery"]["distill_from"] == "dense"  # the teacher defaults to the pipeline's dense model
    assert step_key(_blockwise_raw(tmp_path))[0] == before
    assert step_key(_blockwise_raw(tmp_path, **{key: value}))[0] != before


def test_settings_blockwise_does_not_read_leave_its_key_alone(tmp_path):
    before, _ = step_key(_blockwise_raw(tmp_path))
    assert step_key(_blockwise_raw(tmp_path, block_size=64, lora_r=4))[0] == before


def test_blockwise_keys_leave_the_other_methods_keys_as_they_were(tmp_path):
    raw = {"model": "tiny", "output_dir": str(tmp_path / "run"), "device": "cpu", "prune": [{"method": "magnitude"}],
           "recover": [{"prune": "magnitude 50%", "methods": ["lora"], "block_size": 64}]}
    before, inputs = step_key(raw)
    assert not {"nsamples", "seqlen", "blockwise_input", "blockwise_window"} & set(inputs["recovery"])
    raw["recover"][0].update(nsamples=8, blockwise_window=3)
    assert step_key(raw)[0] == before


def test_a_stacked_stage_is_keyed_on_its_base_stage(tmp_path):
    raw = _blockwise_raw(tmp_path)
    raw["recover"].append({"after": "bw", "methods": ["full"], "block_size": 64})
    steps = load_config(raw).recovery_steps()
    assert [(s.label, s.base, s.prune) for s in steps] == [
        ("magnitude 50% + blockwise + bw", None, "magnitude 50%"),
        ("magnitude 50% + blockwise + bw + full", "magnitude 50% + blockwise + bw", "magnitude 50%")]
    base = StageResult("recover bw", tmp_path, "basekey", {"export_dir": "train"}, False)
    key, inputs = step_key(raw, 1, base)
    assert inputs["pruned"] == "basekey"
    assert step_key(raw, 1, StageResult("recover bw", tmp_path, "otherkey", {"export_dir": "train"}, False))[0] != key


def test_stacked_entries_run_after_their_base_whatever_the_file_order(tmp_path):
    raw = _blockwise_raw(tmp_path)
    raw["recover"].insert(0, {"after": "bw", "methods": ["full"], "block_size": 64})
    assert [s.label for s in load_config(raw).recovery_steps()] == [
        "magnitude 50% + blockwise + bw", "magnitude 50% + blockwise + bw + full"]


@pytest.mark.parametrize("entry, message", [
    ({"after": "nobody", "methods": ["full"]}, "'nobody' names no recover entry"),
    ({"after": "loop", "name": "loop", "methods": ["full"]}, "in a loop"),
    ({"after": "bw", "prune": "wanda 50%", "methods": ["full"]}, "drop 'prune' from a stacked entry"),
    ({"methods": ["full"]}, "give 'prune'"),
])
def test_bad_stacks_are_refused_when_the_config_loads(tmp_path, entry, message):
    raw = _blockwise_raw(tmp_path)
    raw["prune"].append({"method": "wanda"})
    raw["recover"].append(entry)
    with pytest.raises(UsageError, match=message):
        load_config(raw)


def test_a_teacher_that_is_a_copy_of_the_pipelines_dense_model_passes_the_checks(inputs):
    # the fixture's teacher is a copy of "tiny", the pipeline's model: the right teacher for its pruned copies
    from prunetune.pipeline.checks import check_inputs

    raw, _, _ = inputs
    check_inputs(load_config(raw))
    raw["recover"][0]["distill_from"] = str(TINY_PATH)  # the very folder the pipeline loads
    check_inputs(load_config(raw))
