"""Pipeline safety: stage reuse keyed on file contents, checks before any work, recovery dtype,
trust_remote_code, and runs that share stages without sharing a report."""

import json
import logging
import os
import shutil
import time

import pytest
import yaml
from factories import lock_held_elsewhere, save_model_folder

from prunetune.cli import main
from prunetune.pipeline import (
    FingerprintCache,
    Pipeline,
    RecoverySpec,
    StageResult,
    load_config,
    recovery_dtype,
    run_pipeline,
)

HOUR_AGO_NS = (time.time() - 3600) * 10**9


def _text(seed: int, length: int = 8000) -> str:
    chars = "".join(chr(32 + (i * i * 7 + i * seed + seed) % 90) for i in range(length))
    return "\n".join(chars[i : i + 100] for i in range(0, length, 100))  # lines: a held-out part splits off


def _age(*paths):
    """Give files an old mtime, as files that were not just written have (so the cache keeps them)."""
    for path in paths:
        os.utime(path, ns=(int(HOUR_AGO_NS), int(HOUR_AGO_NS)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model"
    save_model_folder(path, "llama")
    _age(*path.iterdir())
    return path


@pytest.fixture()
def setup(model_dir, tmp_path):
    """A reduced pipeline reading three separate local files, and its config."""
    files = {}
    for seed, name in enumerate(("calibration", "evaluation", "training"), 1):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text(_text(seed))
    _age(*files.values())
    config = {
        "title": "safety", "model": str(model_dir), "output_dir": str(tmp_path / "run"), "dtype": "float32",
        "device": "cpu", "progress": False,
        "calibration": {"dataset": str(files["calibration"]), "nsamples": 4, "seqlen": 32},
        "evaluation": {"dataset": str(files["evaluation"]), "seqlen": 32, "max_windows": 4},
        "prune": [{"method": "magnitude", "sparsity_ratio": 0.5}, {"method": "wanda", "sparsity_ratio": 0.5}],
        "recover": [{"prune": "wanda 50%", "methods": ["lora"], "dataset": str(files["training"]), "block_size": 32,
                     "max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-2}],
    }
    return files, config


ALL_STAGES = ["dense", "prune magnitude 50%", "prune wanda 50%", "recover wanda 50% + lora", "per-layer error"]


def _perplexities(result) -> dict:
    return {row.name: row.perplexity for row in result.rows}


# --------------------------------------------------------------------------- reuse keyed on content


@pytest.mark.parametrize("edited, rerun, changed_row", [
    ("training", ["recover wanda 50% + lora", "per-layer error"], "wanda 50% + lora"),
    # magnitude reads no data; the per-layer error runs on calibration windows
    ("calibration", ["prune wanda 50%", "recover wanda 50% + lora", "per-layer error"], "wanda 50%"),
    ("evaluation", ALL_STAGES, "dense"),
])
def test_editing_a_data_file_reruns_the_stages_that_read_it(setup, edited, rerun, changed_row):
    files, raw = setup
    first = run_pipeline(load_config(raw))
    assert first.executed == ALL_STAGES

    unchanged = Pipeline(load_config(raw))
    again = unchanged.run()
    assert again.executed == [] and again.reused == ALL_STAGES
    assert unchanged.fingerprints.hashed == []  # every digest came from the cache: nothing was re-read

    files[edited].write_text(_text(7))  # same length, other text: only the contents differ
    edited_run = run_pipeline(load_config(raw))
    assert edited_run.executed == rerun
    assert _perplexities(edited_run)[changed_row] != _perplexities(first)[changed_row]


def test_editing_a_tokenizer_file_of_the_model_reruns_everything(setup, tmp_path):
    _, raw = setup
    model = tmp_path / "model-copy"
    shutil.copytree(raw["model"], model)  # this test edits it
    raw = {**raw, "model": str(model)}
    assert run_pipeline(load_config(raw)).executed == ALL_STAGES
    assert run_pipeline(load_config(raw)).executed == []
    tokenizer = model / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))  # same tokenizer, other bytes
    assert run_pipeline(load_config(raw)).executed == ALL_STAGES


def test_fingerprint_cache_keys_on_the_files_stat(tmp_path):
    data, store = tmp_path / "data.txt", tmp_path / "fingerprints.json"
    data.write_text("first text")
    _age(data)
    cache = FingerprintCache(store)
    digest = cache.file(data)
    cache.save()

    reloaded = FingerprintCache(store)
    assert reloaded.file(data) == digest and reloaded.hashed == []  # unchanged: not read again

    data.write_text("other text")  # same size; the write sets a new mtime
    changed = FingerprintCache(store)
    assert changed.file(data) != digest and changed.hashed == [str(data.resolve())]

    # An edit that keeps size and mtime_ns (restored on purpose) changes the ctime: it is seen too.
    _age(data)
    aged = FingerprintCache(store)
    other = aged.file(data)
    aged.save()
    data.write_text("third text")
    _age(data)
    assert FingerprintCache(store).file(data) != other


def test_fingerprint_cache_skips_files_written_just_now(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("just written")
    cache = FingerprintCache(tmp_path / "fingerprints.json")
    cache.file(data)
    cache.save()
    assert json.loads((tmp_path / "fingerprints.json").read_text())["files"] == {}


# --------------------------------------------------------------------------- checks before any work


@pytest.mark.parametrize("change, message", [
    ({"calibration": {"nsamples": 0}}, "config.calibration.nsamples: 0"),
    ({"calibration": {"seqlen": 1}}, "config.calibration.seqlen: 1"),
    ({"evaluation": {"seqlen": 1}}, "config.evaluation.seqlen: 1"),
    ({"evaluation": {"batch_size": 0}}, "config.evaluation.batch_size: 0"),
    ({"evaluation": {"max_windows": 0}}, "config.evaluation.max_windows: 0"),
    ({"evaluation": {"split": "dev"}}, "config.evaluation.split: 'dev'"),
    ({"recover": {"block_size": 1}}, "config.recover[0].block_size: 1"),
    ({"recover": {"max_steps": -1, "num_train_epochs": 0}}, "config.recover[0].max_steps: -1"),
    ({"recover": {"num_train_epochs": float("nan")}}, "config.recover[0].num_train_epochs: nan"),
    ({"recover": {"learning_rate": 0}}, "config.recover[0].learning_rate: 0.0"),
    ({"recover": {"learning_rate": float("inf")}}, "config.recover[0].learning_rate: inf"),
    ({"recover": {"learning_rate": float("nan")}}, "config.recover[0].learning_rate: nan"),
    ({"recover": {"per_device_train_batch_size": 0}}, "config.recover[0].per_device_train_batch_size: 0"),
    ({"recover": {"gradient_accumulation_steps": 0}}, "config.recover[0].gradient_accumulation_steps: 0"),
    ({"recover": {"max_train_samples": 0}}, "config.recover[0].max_train_samples: 0"),
    ({"recover": {"lora_r": 0}}, "config.recover[0].lora_r: 0"),
    ({"recover": {"lora_target_modules": " , "}}, "config.recover[0].lora_target_modules: ' , ' names no layer"),
    ({"recover": {"method_overrides": {"lora": {"learning_rate": -1.0}}}},
     "config.recover[0].method_overrides.lora.learning_rate: -1.0"),
    ({"recover": {"method_overrides": {"lora": {"learning_rate": "fast"}}}},
     "config.recover[0].method_overrides.lora.learning_rate: 'fast' is not accepted; expected: number"),
    ({"prune": [{"method": "wanda", "sparsity_ratio": 0.5}, {"method": "magnitude", "sparsity_type": "2:3"}]},
     "config.prune[1].sparsity_type: Layer model.layers.0.self_attn.q_proj has 64 input features, not divisible by M=3"),
    ({"evaluation": {"seqlen": 512}}, "config.evaluation.seqlen: 512 tokens exceed the 256 positions"),
    ({"calibration": {"seqlen": 512}}, "config.calibration.seqlen: 512 tokens exceed the 256 positions"),
    ({"recover": {"block_size": 512}}, "config.recover[0].block_size: 512 tokens exceed the 256 positions"),
])
def test_bad_values_fail_before_any_stage(setup, tmp_path, capsys, change, message):
    _, raw = setup
    raw = {**raw, "output_dir": str(tmp_path / "out")}
    for key, value in change.items():
        if key == "recover":
            raw["recover"] = [{**raw["recover"][0], **value}]
        elif isinstance(value, dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()  # no stage directory, no report: nothing was run


# --------------------------------------------------------------------------- recovery dtype, trust_remote_code


@pytest.mark.parametrize("method, dtype, expected", [
    ("full", "float16", "auto"), ("full", "fp16", "auto"),  # never an optimizer on fp16 master weights
    ("full", "float32", "float32"), ("full", "auto", "auto"), ("full", "bfloat16", "bfloat16"),
    ("lora", "float16", "float16"), ("masked_lora", "fp16", "fp16"),  # a frozen fp16 base is fine
])
def test_recovery_dtype(method, dtype, expected):
    assert recovery_dtype(method, dtype) == expected


def _fake_pruned(tmp_path) -> StageResult:
    return StageResult("prune wanda 50%", tmp_path / "pruned", "0123", {"model_dir": "model"}, False)


def test_full_recovery_in_a_float16_pipeline_gets_float32_master_weights(setup, tmp_path, caplog):
    _, raw = setup
    pipeline = Pipeline(load_config({**raw, "dtype": "float16"}))
    spec = RecoverySpec(prune="wanda 50%", dataset=raw["recover"][0]["dataset"], block_size=32)
    settings = spec.for_method("full")
    model_args, *_ = pipeline.recovery_arguments(tmp_path / "train", tmp_path / "pruned", "full", settings)
    assert model_args.dtype == "auto"
    model_args, *_ = pipeline.recovery_arguments(tmp_path / "train", tmp_path / "pruned", "masked_lora", settings)
    assert model_args.dtype == "float16"

    recorded = []
    pipeline.stages.run = lambda name, inputs, work: recorded.append(inputs)
    with caplog.at_level(logging.WARNING, logger="prunetune.pipeline"):
        for method in ("full", "lora", "full"):
            pipeline.recover_stage(spec, method, _fake_pruned(tmp_path))
    assert [inputs["recovery_dtype"] for inputs in recorded] == ["auto", "float16", "auto"]  # part of the stage key
    assert sum("float32 master weights" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_float16_pipeline_records_the_full_recovery_dtype(setup):
    _, raw = setup
    raw = {**raw, "dtype": "float16", "prune": raw["prune"][:1],
           "recover": [{**raw["recover"][0], "prune": "magnitude 50%", "methods": ["full"]}]}
    result = run_pipeline(load_config(raw))
    manifest = json.loads((result.output_dir / "stages" / "recover_magnitude_50pct_-_full" / "stage.json").read_text())
    assert manifest["inputs"]["recovery_dtype"] == "auto" and manifest["result"]["dtype"] == "auto"
    assert "float32 master weights" in manifest["result"]["dtype_note"]
    trained = json.loads((result.output_dir / "stages" / "recover_magnitude_50pct_-_full" / "train" / "config.json").read_text())
    assert trained["dtype"] == "float32"
    assert "float32 master weights" in (result.output_dir / "report.md").read_text()


def test_trust_remote_code_reaches_loading_recovery_and_the_stage_key(setup, tmp_path):
    _, raw = setup
    plain, trusting = Pipeline(load_config(raw)), Pipeline(load_config({**raw, "trust_remote_code": True}))
    assert plain.load_options().trust_remote_code is False and trusting.load_options().trust_remote_code is True
    assert trusting.base_inputs()["trust_remote_code"] is True and plain.base_inputs()["trust_remote_code"] is False
    spec = RecoverySpec(prune="wanda 50%", dataset=raw["recover"][0]["dataset"], block_size=32)
    model_args, *_ = trusting.recovery_arguments(tmp_path / "train", tmp_path / "pruned", "lora", spec.for_method("lora"))
    assert model_args.trust_remote_code is True


# --------------------------------------------------------------------------- shared stages, own reports


def test_runs_sharing_stages_keep_their_own_reports(setup, tmp_path):
    _, raw = setup
    base = {**raw, "recover": [], "prune": raw["prune"][:1], "output_dir": str(tmp_path / "first")}
    first = run_pipeline(load_config(base))
    assert first.executed == ["dense", "prune magnitude 50%", "per-layer error"]
    extended = {**base, "title": "extended", "output_dir": str(tmp_path / "second"), "stages_dir": "../first/stages",
                "prune": raw["prune"]}
    second = run_pipeline(load_config(extended))
    assert second.executed == ["prune wanda 50%", "per-layer error"] and second.reused == ["dense", "prune magnitude 50%"]
    assert run_pipeline(load_config(base)).executed == []  # each set of configurations keeps its own per-layer error
    assert not (tmp_path / "second" / "stages").exists() and (tmp_path / "first" / "stages" / "prune_wanda_50pct").is_dir()
    assert "wanda 50%" not in (tmp_path / "first" / "report.md").read_text()  # not overwritten
    assert "wanda 50%" in (tmp_path / "second" / "report.md").read_text()


def test_run_folder_is_never_a_foreign_folder_and_is_locked(setup, tmp_path, capsys):
    _, config = setup
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "draft.tex").write_text("mine")
    assert main(["run", _write(tmp_path, {**config, "output_dir": str(foreign)})]) == 2
    assert "holds no earlier pipeline run" in " ".join(capsys.readouterr().err.split())
    assert sorted(p.name for p in foreign.iterdir()) == ["draft.tex"]
    run_dir = tmp_path / "locked"
    with lock_held_elsewhere(run_dir, "prunetune run") as holder:
        assert main(["run", _write(tmp_path, {**config, "output_dir": str(run_dir)})]) == 2
        assert f"process {holder.pid}" in " ".join(capsys.readouterr().err.split())

def _write(folder, config):
    path = folder / f"config-{len(list(folder.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("damage", [b"{not json", b"\xff\xfe", b"[1, 2]"])
def test_a_damaged_stage_manifest_reruns_that_stage_only(setup, damage, caplog):
    _, config = setup
    config = {**config, "recover": [], "prune": config["prune"][:1]}
    first = run_pipeline(load_config(config))
    manifest = first.output_dir / "stages" / "prune_magnitude_50pct" / "stage.json"
    manifest.write_bytes(damage)
    second = run_pipeline(load_config(config))
    assert second.executed == ["prune magnitude 50%"] and "dense" in second.reused
    assert "unreadable" in caplog.text or damage == b"[1, 2]"
    assert _perplexities(second) == _perplexities(first)
    assert json.loads(manifest.read_text())["complete"] is True
