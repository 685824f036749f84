"""A reduced pipeline end to end: report files and numbers, and a second run reuses every stage."""

import json
import re

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
    chars = "".join(chr(32 + (i * i * 7 + i) % 90) for i in range(12000))
    text.write_text("\n".join(chars[i : i + 100] for i in range(0, len(chars), 100)))  # lines: a held-out part splits off
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
                     "learning_rate": 1e-3, "eval_steps": 1, "max_eval_samples": 4}],
    }
    return root, config


def test_pipeline_report_and_reuse(small_setup):
    root, raw = small_setup
    first = run_pipeline(load_config(raw))
    assert len(first.executed) == 7 and not first.reused  # dense, 2 prunes, 3 recoveries, the per-layer error
    out = root / "run"
    for name in ("report.md", "perplexity.png", "perplexity_curve.png", "loss_curves.png", "reconstruction_error.png",
                 "results.json", "config.resolved.yaml"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "sparsity_heatmap.png").exists()  # uniform 0.50 everywhere: replaced by the per-layer error
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

    # held-out perplexity against tokens: the pruned model at 0 tokens, then every eval_steps; the dense reference
    pruned_point = None
    for method in ("lora", "masked_lora", "full"):
        result = json.loads((stage_dirs[f"recover wanda 50% + {method}"] / "stage.json").read_text())["result"]
        steps = [step for step, _ in result["eval_history"]]
        assert steps == [0, 1, 2, 3], method
        pruned_point = pruned_point or result["eval_history"][0][1]
        assert result["eval_history"][0][1] == pytest.approx(pruned_point), method  # every run starts from one model
        assert 1 < result["eval_dense_perplexity"] != pruned_point  # the dense model on the very same blocks
        assert result["tokens_per_step"] == 4 * 32 and len(result["loss_history"]) == 3
    assert "Held-out perplexity" in report and "the dense model on the same blocks" in report
    # the per-layer error: every configuration, every prunable layer; the dense-equal masked merge keeps wanda's zeros
    errors = json.loads((stage_dirs["per-layer error"] / "stage.json").read_text())["result"]["errors"]
    assert set(errors) == set(rows) - {"dense"}
    assert all(len(per_layer) == 14 and all(0 < e < 2 for e in per_layer.values()) for per_layer in errors.values())

    second = run_pipeline(load_config(raw))
    assert second.executed == [] and len(second.reused) == 7
    assert [r.perplexity for r in second.rows] == [r.perplexity for r in first.rows]

    # adding a method reruns only that stage
    raw_more = {**raw, "prune": raw["prune"] + [{"method": "magnitude", "sparsity_type": "2:4"}]}
    third = run_pipeline(load_config(raw_more))
    assert third.executed == ["prune magnitude 2:4", "per-layer error"]


@pytest.mark.parametrize("change, message", [
    ({"learning_rat": 1}, "unknown key 'learning_rat'"),
    ({"seed": "zero"}, "config.seed: 'zero' is not accepted; expected: integer"),
    ({"prune": [{"method": "obs"}]}, "config.prune[0].method: 'obs' is not accepted"),
    ({"prune": [{"method": "wanda", "sparsity_type": "4:2"}]}, "4:2"),
    ({"recover": [{"prune": "nope"}]}, "names no prune entry"),
    ({"prune": [{"method": "magnitude", "true_sequential": True}]}, "the magnitude pruner uses none"),
    ({"recover": [{"prune": "wanda 50%", "methods": ["full"]}, {"prune": "wanda 50%", "methods": ["full"]}]},
     "give one of the two entries a distinct 'name'"),
    ({"recover": [{"prune": "wanda 50%", "distill_from": "dense", "distill_temperature": 0}]},
     "config.recover[0].distill_temperature: 0.0 is not accepted"),
    ({"recover": [{"prune": "wanda 50%", "validation_file": "/nonexistent/wiki.txt", "eval_steps": 1}]},
     "/nonexistent/wiki.txt"),
    ({"recover": [{"prune": "wanda 50%", "validation_file": "c4", "eval_steps": 1}]},
     "config.recover[0].validation_file: 'c4' names a dataset, not a file"),
    ({"recover": [{"prune": "wanda 50%", "validation_file": __file__}]},
     "config.recover[0].validation_file: " + repr(__file__) + " is only scored during training, every eval_steps steps"),
])
def test_bad_config_fails_before_work(small_setup, tmp_path, capsys, change, message):
    _, raw = small_setup
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**raw, "output_dir": str(tmp_path / "out"), **change}))
    assert main(["run", str(path)]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()


def test_stage_lines_and_labelled_bars(small_setup, tmp_path, capsys):
    """One line per stage as it starts and ends (reused ones too); bars follow --no_progress, -q silences both."""
    _, raw = small_setup
    config = {**raw, "output_dir": str(tmp_path / "run"), "progress": True, "recover": [], "prune": raw["prune"][:1]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("[")]
    assert lines[:2] == ["[1/3] dense: running…", lines[1]] and lines[1].startswith("[1/3] dense: done in ")
    assert "[2/3] prune magnitude 50%: running…" in lines and "[3/3] per-layer error: running…" in lines
    assert "perplexity" in err  # a bar, with progress on

    assert main(["run", str(path), "--no_progress"]) == 0
    err = capsys.readouterr().err
    assert "[1/3] dense: reused (ran " in err and "[3/3] per-layer error: reused" in err and "win/s" not in err

    assert main(["run", str(path), "-q"]) == 0
    captured = capsys.readouterr()
    assert "[1/3]" not in captured.err and "win/s" not in captured.err and "magnitude 50%" in captured.out


def test_a_tiny_pipeline_without_data_keys_runs_offline_on_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raw = {"model": "tiny", "output_dir": str(tmp_path / "run"), "device": "cpu", "progress": False,
           "evaluation": {"seqlen": 32, "max_windows": 1}}
    result = run_pipeline(load_config(raw))
    resolved = yaml.safe_load((result.output_dir / "config.resolved.yaml").read_text())
    assert resolved["calibration"]["dataset"] == resolved["evaluation"]["dataset"] == "builtin"
    assert result.rows[0].name == "dense" and result.rows[0].perplexity > 1


def test_eval_history_is_read_from_the_trainer_log(tmp_path):
    from prunetune.pipeline.recovery import eval_history, loss_history

    log = [{"eval_loss": 3.0, "step": 0}, {"loss": 2.9, "step": 1}, {"loss": 2.8, "step": 2}, {"eval_loss": 2.5, "step": 2},
           {"train_runtime": 1.0, "step": 2}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    assert eval_history(tmp_path) == [(0, pytest.approx(20.0855, rel=1e-4)), (2, pytest.approx(12.1825, rel=1e-4))]
    assert loss_history(tmp_path) == [(1, 2.9), (2, 2.8)]
    assert eval_history(tmp_path / "missing") == []


def test_the_dense_reference_scores_the_trainers_blocks_as_the_trainer_does():
    """HeldOutBlocks' perplexity on the blocks the Trainer evaluated equals exp(the Trainer's eval_loss) for a model."""
    import math

    import torch
    from factories import make_model, random_tokens

    from prunetune.pipeline.held_out import HeldOutBlocks

    model, blocks = make_model("llama"), random_tokens(6, 16)
    batches = [{"input_ids": blocks[i : i + 2], "labels": blocks[i : i + 2].clone()} for i in range(0, 6, 2)]
    held_out = HeldOutBlocks()
    held_out.on_evaluate(None, None, None, eval_dataloader=batches)
    assert torch.equal(held_out.input_ids, blocks)
    with torch.no_grad():  # the Trainer's eval_loss: the mean of the per-batch losses (equal batches)
        eval_loss = sum(float(model(**batch).loss) for batch in batches) / len(batches)
    assert held_out.perplexity(model, batch_size=4) == pytest.approx(math.exp(eval_loss), rel=1e-5)

    masked = HeldOutBlocks()  # labels that differ from the inputs: no reference rather than a wrong one
    masked.on_evaluate(None, None, None, eval_dataloader=[{"input_ids": blocks, "labels": torch.full_like(blocks, -100)}])
    assert masked.input_ids is None


def test_a_recipe_whose_trainer_cannot_evaluate_trains_without_the_curve(small_setup, tmp_path, monkeypatch, caplog):
    """eval_steps with a recipe that gives its Trainer no held-out data: a warning, training as before, no curve."""
    import logging

    import prunetune.recipe as recipe

    real, calls = recipe.recover, []

    def recover_without_eval_data(model_args, data_args, recovery_args, training_args, callbacks=None):
        calls.append(training_args.eval_strategy)
        if training_args.eval_strategy != "no":  # what transformers' Trainer raises without an eval_dataset
            raise ValueError("You have set `args.eval_strategy` to steps but you didn't pass an `eval_dataset` to `Trainer`.")
        return real(model_args, data_args, recovery_args, training_args, callbacks)

    monkeypatch.setattr(recipe, "recover", recover_without_eval_data)
    _, raw = small_setup
    raw = {**raw, "output_dir": str(tmp_path / "run"), "prune": raw["prune"][1:], "reconstruction_windows": 0,
           "recover": [{**raw["recover"][0], "methods": ["lora", "masked_lora"], "max_steps": 1}]}
    with caplog.at_level(logging.WARNING, logger="prunetune.pipeline"):
        result = run_pipeline(load_config(raw))
    assert [str(c).split(".")[-1].lower() for c in calls] == ["steps", "no", "no"]  # tried once, then never again
    assert sum("no held-out data" in r.getMessage() for r in caplog.records) == 1
    assert not (result.output_dir / "perplexity_curve.png").exists() and (result.output_dir / "loss_curves.png").exists()


def test_a_distilled_entry_beside_the_plain_one_reuses_the_plain_stages(small_setup, tmp_path):
    """Adding distillation rows changes no existing stage key; the new rows are named and noted."""
    _, raw = small_setup
    plain = {**raw["recover"][0], "methods": ["masked_lora"], "max_steps": 2, "eval_steps": None}
    config = {**raw, "output_dir": str(tmp_path / "run"), "prune": raw["prune"][1:], "recover": [plain],
              "reconstruction_windows": 0}
    first = run_pipeline(load_config(config))
    distilled = {**plain, "distill_from": "dense"}  # the defaults: KL 1 + SquareHead 1
    second = run_pipeline(load_config({**config, "recover": [plain, distilled]}))
    assert second.executed == ["recover wanda 50% + masked_lora + distill"]
    assert set(first.executed) <= set(second.reused)
    rows = {row.name: row for row in second.rows}
    row = rows["wanda 50% + masked_lora + distill"]
    assert row.note.startswith("distilled from the dense model (KL 1, SquareHead 1, T 1)")
    assert row.sparsity_after_merge == pytest.approx(rows["wanda 50%"].sparsity)  # exact, as without distillation
    assert row.perplexity != rows["wanda 50% + masked_lora"].perplexity


def test_a_curve_on_another_text_adds_a_stage_and_changes_no_other(small_setup, tmp_path):
    """validation_file: the curve is scored on that text; entries without it keep their stage keys."""
    root, raw = small_setup
    other = tmp_path / "other.txt"
    other.write_text("\n".join("the quick brown fox jumps over the lazy dog " * 3 for _ in range(200)))
    plain = {**raw["recover"][0], "methods": ["masked_lora"], "max_steps": 2, "eval_steps": 1}
    config = {**raw, "output_dir": str(tmp_path / "run"), "prune": raw["prune"][1:], "recover": [plain],
              "reconstruction_windows": 0}
    first = run_pipeline(load_config(config))
    elsewhere = {**plain, "validation_file": str(other), "name": "other text"}
    second = run_pipeline(load_config({**config, "recover": [plain, elsewhere]}))
    assert second.executed == ["recover wanda 50% + masked_lora + other text"]
    assert set(first.executed) <= set(second.reused)
    stage_dirs = {json.loads(p.read_text())["stage"]: p.parent for p in (tmp_path / "run" / "stages").glob("*/stage.json")}
    results = {name: json.loads((stage_dirs[f"recover wanda 50% + masked_lora{suffix}"] / "stage.json").read_text())["result"]
               for name, suffix in (("plain", ""), ("other", " + other text"))}
    assert "other.txt" in results["other"]["eval_text"] and "other.txt" not in results["plain"]["eval_text"]
    assert [step for step, _ in results["other"]["eval_history"]] == [0, 1, 2]
    # the same pruned model at step 0, scored on a different text
    assert results["other"]["eval_history"][0][1] != pytest.approx(results["plain"]["eval_history"][0][1], rel=1e-3)
    assert results["other"]["eval_dense_perplexity"] != pytest.approx(results["plain"]["eval_dense_perplexity"], rel=1e-3)


def test_two_configs_sharing_a_stages_dir_keep_each_others_stages(small_setup, tmp_path):
    """A second config with other settings for the same row never replaces the first config's finished stage."""
    _, raw = small_setup
    entry = {**raw["recover"][0], "methods": ["full"], "max_steps": 1, "eval_steps": None}
    base = {**raw, "prune": raw["prune"][1:], "reconstruction_windows": 0, "stages_dir": "../shared_stages"}
    first = {**base, "output_dir": str(tmp_path / "a"), "recover": [entry]}
    second = {**base, "output_dir": str(tmp_path / "b"), "recover": [{**entry, "max_steps": 2}]}
    one = run_pipeline(load_config(first))
    two = run_pipeline(load_config(second))
    assert two.executed == ["recover wanda 50% + full"] and "prune wanda 50%" in two.reused
    again = run_pipeline(load_config(first))
    assert again.executed == []  # the first config's row is still there
    rows = [{r.name: r.perplexity for r in result.rows}["wanda 50% + full"] for result in (one, two, again)]
    assert rows[0] == rows[2] != rows[1]
    folders = sorted(p.name for p in (tmp_path / "shared_stages").iterdir() if p.name.startswith("recover"))
    assert len(folders) == 2 and folders[0] == "recover_wanda_50pct_-_full"
    assert re.fullmatch(r"recover_wanda_50pct_-_full-[0-9a-f]{8}", folders[1])  # the second config's, beside it
