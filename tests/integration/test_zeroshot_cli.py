"""``prunetune eval --tasks`` and ``evaluation: {tasks: ...}`` end to end on the bundled model, offline.

The task is prunetune's local next-line task (written by the tests into a temporary folder);
the model a 50%-pruned ``tiny`` with a masked LoRA adapter whose update is large enough to move
the accuracy. The adapter must be applied masked: its accuracy equals that of the merged model
(exactly, as both compute W + (BA) * M) and differs from the base's.

Run: ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q tests/integration/test_zeroshot_cli.py``
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from factories import prune_half_rows

from prunetune.cli import main
from prunetune.zeroshot import NEXT_LINE_TASK, write_next_line_task

pytest.importorskip("lm_eval")

LIMIT = 40


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A task folder, a pruned tiny model, its masked adapter (prunetune's manifest included) and the merged model."""
    from prunetune.export import merge_adapter, save_merged
    from prunetune.loading import load_model, load_tokenizer
    from prunetune.outputs import save_model_dir, write_json
    from prunetune.recover.adapter import apply_adapter
    from prunetune.recipe.args import RecoveryArguments
    from prunetune.recover.lora import setup_masked_lora

    root = tmp_path_factory.mktemp("zeroshot")
    write_next_line_task(root / "tasks", examples=60, fewshot_examples=8)
    tokenizer = load_tokenizer("tiny")
    model = prune_half_rows(load_model("tiny"))
    save_model_dir(model, tokenizer, root / "pruned", {"stage": "test: tiny, half of every row zeroed"})
    setup = setup_masked_lora(model, RecoveryArguments(recovery_method="masked_lora", lora_r=4, lora_target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero (no update); a random B moves the accuracy
        for name, param in setup.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    setup.model.save_pretrained(root / "adapter")
    write_json(root / "adapter" / "prunetune.json", {**setup.manifest, "complete": True})
    merged, report = merge_adapter(apply_adapter(load_model(str(root / "pruned")), root / "adapter"), "masked_lora")
    assert report.exact
    save_merged(merged, tokenizer, root / "merged", {"stage": "test: merged masked adapter"})
    return root


def run_eval(root, name, *extra) -> dict:
    out = root / f"{name}.json"
    argv = ["eval", "--tasks", NEXT_LINE_TASK, "--include_path", str(root / "tasks"), "--limit", str(LIMIT),
            "--json", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_the_adapter_is_scored_masked_base_adapter_merged(workspace, capsys):
    base = run_eval(workspace, "base", "--model", str(workspace / "pruned"))
    console = capsys.readouterr().out
    adapted = run_eval(workspace, "adapted", "--model", str(workspace / "pruned"), "--lora_weights", str(workspace / "adapter"))
    merged = run_eval(workspace, "merged", "--model", str(workspace / "merged"))

    def metrics(payload):
        return payload["zeroshot"]["tasks"][NEXT_LINE_TASK]["metrics"]

    assert metrics(adapted)["acc"] != metrics(base)["acc"]
    assert metrics(merged) == pytest.approx(metrics(adapted), abs=0)  # acc, acc_norm and their stderr: identical
    score = base["zeroshot"]["tasks"][NEXT_LINE_TASK]
    assert score["examples"] == LIMIT and score["examples_total"] == 60 and score["version"] == 1.0
    assert base["zeroshot"]["lm_eval_version"] and base["zeroshot"]["mean"]["label"] == "mean acc of the 1 task run"
    assert "perplexity" not in base  # --tasks alone: no perplexity
    assert adapted["lora_weights"] == str(workspace / "adapter")
    assert NEXT_LINE_TASK in console and "mean acc of the 1 task run" in console and "acc_norm" in console


def test_perplexity_and_tasks_together(workspace):
    payload = run_eval(workspace, "both", "--model", "tiny", "--dataset", "builtin", "--seqlen", "64", "--max_windows", "2",
                       "--num_fewshot", "1", "--limit", "8")
    assert payload["windows"] == 2 and payload["perplexity"] > 1
    score = payload["zeroshot"]["tasks"][NEXT_LINE_TASK]
    assert score["n_shot"] == 1 and score["examples"] == 8


def test_a_pipeline_reports_zero_shot_accuracy_per_configuration(workspace, tmp_path, capsys):
    config = {
        "title": "zero-shot pipeline", "model": "tiny", "output_dir": str(tmp_path / "run"), "dtype": "float32",
        "device": "cpu", "progress": False, "reconstruction_windows": 0,
        "calibration": {"dataset": "builtin", "nsamples": 4, "seqlen": 64},
        "evaluation": {"dataset": "builtin", "seqlen": 64, "max_windows": 2, "tasks": [NEXT_LINE_TASK],
                       "include_path": str(workspace / "tasks"), "limit": 16},
        "prune": [{"method": "magnitude", "sparsity_ratio": 0.5}],
        "recover": [{"prune": "magnitude 50%", "methods": ["masked_lora"], "dataset": "builtin", "block_size": 64,
                     "max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "-q"]) == 0
    console = capsys.readouterr().out
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    names = [row["name"] for row in rows]
    assert names == ["dense", "magnitude 50%", "magnitude 50% + masked_lora"]
    for row in rows:
        assert row["zeroshot"]["tasks"][NEXT_LINE_TASK]["examples"] == 16
    report = (tmp_path / "run" / "report.md").read_text()
    section = report.split("## Zero-shot accuracy", 1)[1]
    assert f"| configuration | {NEXT_LINE_TASK} | mean |" in section
    for row in rows:
        acc = row["zeroshot"]["tasks"][NEXT_LINE_TASK]["metrics"]["acc"]
        assert f"| {row['name']} | {acc:.4f} | {acc:.4f} |" in section
    assert "lm-eval" in section and f"{NEXT_LINE_TASK}: version 1.0, 0-shot, 16 of 60 examples" in section
    assert "zero-shot accuracy" in console and "magnitude 50% + masked_lora" in console.split("zero-shot accuracy")[1]
