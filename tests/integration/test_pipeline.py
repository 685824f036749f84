"""A reduced pipeline end to end: report files and numbers, and a second run reuses every stage."""

import json

import pytest
import yaml
from factories import save_model_folder

from prunetune.cli import main
from prunetune.pipeline import load_config, run_pipeline


@pytest.fixture(scope="module")
def small_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    save_model_folder(root / "model", "llama")
    text = root / "text.txt"
    text.write_text("".join(chr(32 + (i * i * 7 + i) % 90) for i in range(12000)))
    config = {
        "title": "reduced pipeline",
        "model": str(root / "model"),
        "output_dir": str(root / "run"),
        "dtype": "float32",
        "device": "cpu",
        "progress": False,
        "calibration": {"dataset": str(text), "nsamples": 4, "seqlen": 32},
        "evaluation": {"dataset": str(text), "seqlen": 32, "max_windows": 8},
        "prune": [{"method": "magnitude", "sparsity_ratio": 0.5}, {"method": "wanda", "sparsity_ratio": 0.5}],
        "recover": [{"prune": "wanda 50%", "methods": ["lora", "masked_lora", "full"], "dataset": str(text),
                     "block_size": 32, "max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1,
                     "learning_rate": 1e-3}],
    }
    return root, config


def test_pipeline_report_and_reuse(small_setup):
    root, raw = small_setup
    first = run_pipeline(load_config(raw))
    assert len(first.executed) == 6 and not first.reused  # dense, 2 prunes, 3 recoveries
    out = root / "run"
    for name in ("report.md", "perplexity.png", "loss_curves.png", "sparsity_heatmap.png", "results.json", "config.resolved.yaml"):
        assert (out / name).stat().st_size > 0, name
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"dense", "magnitude 50%", "wanda 50%", "wanda 50% + lora", "wanda 50% + lora, merged + remasked",
                         "wanda 50% + masked_lora", "wanda 50% + full"}
    pruned = rows["wanda 50%"]["sparsity"]
    assert pruned == pytest.approx(0.5, abs=1e-6)
    assert rows["wanda 50% + masked_lora"]["sparsity_after_merge"] == pruned  # exact, not approximately
    assert rows["wanda 50% + full"]["sparsity_after_merge"] == pruned
    assert rows["wanda 50% + lora, merged + remasked"]["sparsity_after_merge"] == pruned
    assert rows["wanda 50% + lora"]["sparsity_after_merge"] < pruned - 0.05  # a plain LoRA merge densifies q/v
    # each row's sparsity is that of the weights its perplexity was computed with: lora's W + BA
    for name in ("wanda 50% + lora", "wanda 50% + masked_lora", "wanda 50% + full"):
        assert rows[name]["sparsity"] == rows[name]["sparsity_after_merge"], name
    # peak memory is each stage's own: on CPU the RSS increase, not the process's RSS (hundreds of MB here)
    for name in ("magnitude 50%", "wanda 50%", "wanda 50% + lora", "wanda 50% + masked_lora", "wanda 50% + full"):
        assert rows[name]["peak_memory_kind"] == "rss", name
        assert 0 <= rows[name]["peak_memory_mb"] < 150, (name, rows[name]["peak_memory_mb"])
    assert rows["wanda 50% + lora"]["tokens_seen"] == 3 * 4 * 32
    report = (out / "report.md").read_text()
    assert "wanda 50% + masked_lora" in report and "![perplexity" in report
    assert "peak memory (CPU: RSS increase)" in report and "above the RSS when the stage began" in report
    # the exported masked-LoRA model on disk has exactly the pruned sparsity
    stage_dirs = {json.loads(p.read_text())["stage"]: p.parent for p in (out / "stages").glob("*/stage.json")}
    from prunetune.loading import load_model
    from prunetune.masks import measure_sparsity

    merged = load_model(str(stage_dirs["recover wanda 50% + masked_lora"] / "merged"))
    assert measure_sparsity(merged).overall == pruned

    second = run_pipeline(load_config(raw))
    assert second.executed == [] and len(second.reused) == 6
    assert [r.perplexity for r in second.rows] == [r.perplexity for r in first.rows]

    # adding a method reruns only that stage
    raw_more = {**raw, "prune": raw["prune"] + [{"method": "magnitude", "sparsity_type": "2:4"}]}
    third = run_pipeline(load_config(raw_more))
    assert third.executed == ["prune magnitude 2:4"]


@pytest.mark.parametrize("change, message", [
    ({"learning_rat": 1}, "unknown key 'learning_rat'"),
    ({"seed": "zero"}, "config.seed: 'zero' is not a int"),
    ({"prune": [{"method": "obs"}]}, "config.prune[0].method: 'obs' is not accepted"),
    ({"prune": [{"method": "wanda", "sparsity_type": "4:2"}]}, "4:2"),
    ({"recover": [{"prune": "nope"}]}, "names no prune entry"),
    ({"prune": [{"method": "magnitude", "true_sequential": True}]}, "the magnitude pruner uses none"),
])
def test_bad_config_fails_before_work(small_setup, tmp_path, capsys, change, message):
    _, raw = small_setup
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**raw, "output_dir": str(tmp_path / "out"), **change}))
    assert main(["run", str(path)]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()
