"""Block-wise reconstruction in a pipeline, and recover entries stacked on one another (``after``).

One run on the bundled tiny model with tiny budgets: Wanda 50%, then block-wise reconstruction,
then ``full`` training with distillation and ``masked_lora`` each starting from the block-wise
output. Every stage must keep exactly the pruned model's sparsity, and the report must show each
stage's row and the per-block loss plot. Bad stacks are refused before anything is written.
"""

import json

import pytest
import yaml

from prunetune.cli import main
from prunetune.pipeline import load_config, run_pipeline

BLOCKWISE = {"prune": "wanda 50%", "methods": ["blockwise"], "name": "bw", "nsamples": 4, "seqlen": 32,
             "num_train_epochs": 1, "learning_rate": 5.0e-4, "per_device_train_batch_size": 2}
TRAINING = {"max_steps": 2, "block_size": 32, "per_device_train_batch_size": 2}


def _config(tmp_path, recover: list) -> dict:
    return {"model": "tiny", "output_dir": str(tmp_path / "run"), "device": "cpu", "progress": False,
            "calibration": {"nsamples": 4, "seqlen": 32}, "evaluation": {"seqlen": 64, "max_windows": 2},
            "reconstruction_windows": 0, "prune": [{"method": "wanda", "sparsity_ratio": 0.5}], "recover": recover}


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("stacked")
    recover = [BLOCKWISE, {"after": "bw", "methods": ["full"], "distill_from": "dense", **TRAINING},
               {"after": "bw", "methods": ["masked_lora"], **TRAINING}]
    return run_pipeline(load_config(_config(tmp_path, recover)))


def test_blockwise_then_full_and_masked_lora_keep_the_pruned_sparsity(stacked):
    rows = {row.name: row for row in stacked.rows}
    pruned = rows["wanda 50%"].sparsity
    assert pruned == pytest.approx(0.5, abs=0.01)
    stack = ["wanda 50% + blockwise + bw", "wanda 50% + blockwise + bw + full + distill",
             "wanda 50% + blockwise + bw + masked_lora"]
    assert [name for name in rows if name not in ("dense", "wanda 50%")] == stack
    for name in stack:
        assert rows[name].sparsity == pruned, name  # exactly: every stage trains the kept weights only
        assert "differs from the pruned model" not in rows[name].note
        assert rows[name].gap_won_back is not None  # against wanda 50%, the root of the stack


def test_a_stacked_stage_starts_from_its_base_stages_output(stacked):
    stages = stacked.output_dir / "stages"
    manifests = {m["stage"]: m for m in (json.loads(p.read_text()) for p in stages.glob("*/stage.json"))}
    blockwise = manifests["recover wanda 50% + blockwise + bw"]
    full = manifests["recover wanda 50% + blockwise + bw + full + distill"]
    assert full["inputs"]["pruned"] == blockwise["key"]  # keyed on the block-wise stage, not the pruned model
    assert blockwise["inputs"]["pruned"] == manifests["prune wanda 50%"]["key"]
    windows = blockwise["result"]["blockwise"]["windows"]
    assert windows and all(w["train_after"] is not None for w in windows)


def test_a_finished_blockwise_stage_keeps_no_progress_checkpoints(stacked):
    """The per-window progress files (a copy of every block) go once the stage has finished."""
    stages = stacked.output_dir / "stages"
    (folder,) = [p.parent for p in stages.glob("*/stage.json")
                 if json.loads(p.read_text())["stage"] == "recover wanda 50% + blockwise + bw"]
    assert (folder / "train" / "model.safetensors").is_file()
    assert not list(folder.rglob("checkpoint-*"))


def test_the_report_has_every_row_and_the_blockwise_plot(stacked):
    report = (stacked.output_dir / "report.md").read_text()
    for name in ("| wanda 50% + blockwise + bw |", "| wanda 50% + blockwise + bw + full + distill |",
                 "| wanda 50% + blockwise + bw + masked_lora |"):
        assert name in report
    assert "](blockwise_losses.png)" in report
    assert (stacked.output_dir / "blockwise_losses.png").stat().st_size > 0
    assert "gap to dense won back" in report


def _refused(tmp_path, capsys, recover: list) -> str:
    path = tmp_path / "config.yaml"
    config = _config(tmp_path, recover)
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 2
    assert not (tmp_path / "run").exists()  # nothing written
    return " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("recover, message", [
    ([{"after": "nobody", "methods": ["full"], **TRAINING}], "config.recover[0].after: 'nobody' names no recover entry"),
    ([{"after": "b", "name": "a", "methods": ["full"], **TRAINING}, {"after": "a", "name": "b", "methods": ["full"], **TRAINING}],
     "start from each other in a loop"),
    ([{"after": "a", "name": "a", "methods": ["full"], **TRAINING}], "start from each other in a loop"),
    ([{"prune": "wanda 50%", "name": "ad", "methods": ["masked_lora"], **TRAINING}, {"after": "ad", "methods": ["full"], **TRAINING}],
     "'ad' recovers with masked_lora, which writes an adapter, not a model"),
    ([{"prune": "wanda 50%", "name": "two", "methods": ["full", "blockwise"], **TRAINING},
      {"after": "two", "methods": ["full"], **TRAINING}], "'two' recovers with 2 methods"),
    ([{**BLOCKWISE, "blockwise_input": "both"}], "config.recover[0].blockwise_input: 'both' is not accepted"),
    ([{**BLOCKWISE, "num_train_epochs": 1.5}], "config.recover[0].num_train_epochs: 1.5 with blockwise"),
    ([{**BLOCKWISE, "eval_steps": 2}], "config.recover[0].eval_steps: 2 does not apply to blockwise"),
])
def test_bad_stacks_and_blockwise_settings_are_refused_before_anything_is_written(tmp_path, capsys, recover, message):
    assert message in _refused(tmp_path, capsys, recover)
