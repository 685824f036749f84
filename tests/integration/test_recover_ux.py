"""`prunetune recover` as a run_clm user meets it: their flags and files, held-out evaluation, defaults that
follow the model, visible progress, and a library call that leaves the process's RNG alone (issue 10)."""

import json
import logging
import math
import random
import shutil

import numpy as np
import pytest
import torch
from test_recover_cli import recover_args, workspace  # noqa: F401  (module fixture)

from prunetune.cli import main


def seed_line(ws, out, data_flags):
    """The seed's finetune_lm.py command line, numbers scaled to the small test model."""
    return ["recover", "--model_name_or_path", str(ws / "pruned"), "--config_name", str(ws / "dense"), *data_flags,
            "--num_train_epochs", "1", "--block_size", "64", "--per_device_train_batch_size", "1",
            "--per_device_eval_batch_size", "8", "--do_train", "--do_eval", "--max_train_samples", "6",
            "--max_eval_samples", "4", "--learning_rate", "1e-4", "--overwrite_output_dir", "--output_dir", str(out)]


def test_seed_command_line_with_train_file_trains_on_the_rest_and_scores_the_held_out_part(workspace, tmp_path, capsys):  # noqa: F811
    from prunetune.data import eval_stream
    from prunetune.evaluate import perplexity
    from prunetune.loading import load_model, load_tokenizer

    text = str(workspace / "text.txt")
    out = tmp_path / "out"
    assert main(seed_line(workspace, out, ["--train_file", text])) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "recovery.json").read_text())
    assert result["steps"] == 6 and result["dataset"] == text and result["validation_split_percentage"] == 5
    assert "lines 21-400" in result["training_text"]  # 400 lines: the first 20 are held out
    assert "held-out first 5% of lines (20 of 400); 4 windows of 64 tokens" in result["evaluation_text"]
    assert f"perplexity on {result['evaluation_text']}:" in printed  # the output says which text

    # the number is the pruned model's perplexity on exactly the held-out lines, none of which trained
    tokenizer, model = load_tokenizer(str(workspace / "pruned")), load_model(str(workspace / "pruned"))
    stream, documents = eval_stream(tokenizer, text, split="validation", validation_percent=5)
    lines = (workspace / "text.txt").read_text().splitlines(keepends=True)
    assert documents.joined() == "".join(lines[:20])
    expected = perplexity(model, stream, 64, max_windows=4).perplexity
    assert result["perplexity_before"] == pytest.approx(expected, rel=1e-6)


def test_validation_file_is_scored_and_all_of_the_train_file_trains(workspace, tmp_path):  # noqa: F811
    validation = tmp_path / "val.txt"
    validation.write_text("\n".join(["sparse masks keep the pruned weights at zero"] * 40))
    out = tmp_path / "out"
    flags = ["--train_file", str(workspace / "text.txt"), "--validation_file", str(validation)]
    assert main(seed_line(workspace, out, flags)) == 0
    result = json.loads((out / "recovery.json").read_text())
    assert result["validation_split_percentage"] == 0 and "whole" in result["training_text"]
    assert result["eval_dataset"] == str(validation) and result["evaluation_text"].startswith(str(validation))


@pytest.mark.parametrize("flags", [
    ["--train_file", "TEXT", "--validation_split_percentage", "0"],
    ["--train_file", "TEXT", "--validation_file", "TEXT"],
    ["--dataset_name", "TEXT", "--validation_split_percentage", "0"],
])
def test_scoring_the_training_text_is_refused(flags, workspace, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    flags = [str(workspace / "text.txt") if flag == "TEXT" else flag for flag in flags]
    assert main(seed_line(workspace, out, flags)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "would score" in err and "--validation_split_percentage" in err and "--validation_file" in err
    assert not (out / "recovery.json").exists()


def test_eval_strategy_gives_the_trainer_held_out_windows_and_records_the_curve(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    argv = recover_args(workspace, "masked_lora", out, "--max_steps", "4", "--do_eval", "--max_eval_samples", "2",
                        "--eval_strategy", "steps", "--eval_steps", "2", "--logging_steps", "1")
    assert main(argv) == 0
    result = json.loads((out / "recovery.json").read_text())
    curve = result["eval_curve"]
    assert [p["step"] for p in curve] == [0, 2, 4]
    assert [p["tokens"] for p in curve] == [0, 2 * 4 * 64, 4 * 4 * 64]  # steps x batch 4 x block 64
    assert curve[0]["perplexity"] == result["perplexity_before"] and curve[-1]["perplexity"] == result["perplexity_after"]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    eval_losses = {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}
    assert set(eval_losses) == {2, 4}
    assert curve[1]["perplexity"] == pytest.approx(math.exp(eval_losses[2]))
    # the Trainer scored the very windows of the before/after numbers: at step 4 they agree
    assert math.exp(eval_losses[4]) == pytest.approx(result["perplexity_after"], rel=1e-4)


def test_default_data_follows_the_model_it_was_pruned_from(tmp_path, capsys):
    from prunetune.loading import TINY_PATH

    pruned = tmp_path / "pruned-from-tiny"
    shutil.copytree(TINY_PATH, pruned, ignore=shutil.ignore_patterns("*.py", "*.md", "__pycache__", "train_log.json"))
    (pruned / "prunetune.json").write_text(json.dumps({"stage": "prune", "base_model": "tiny", "complete": True}))
    out = tmp_path / "out"
    argv = ["recover", "--model_name_or_path", str(pruned), "--do_train", "false", "--do_eval", "--eval_before_training",
            "false", "--allow_dense_finetune", "--block_size", "64", "--max_eval_samples", "1", "--output_dir", str(out)]
    assert main(argv) == 0, capsys.readouterr().err  # offline: c4 would fail here
    result = json.loads((out / "recovery.json").read_text())
    assert result["dataset"] == result["eval_dataset"] == "builtin"
    assert result["evaluation_text"].startswith("builtin validation split")


@pytest.fixture
def datasets_bars(monkeypatch):
    """-q switches off datasets' bars for the process: give them back afterwards."""
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "0")
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    yield
    if was_enabled:
        datasets.enable_progress_bars()


def test_progress_bar_by_default_logs_with_v_silence_with_q(workspace, tmp_path, capsys, caplog, datasets_bars):  # noqa: F811
    def run(name, *flags):
        argv = [a for a in recover_args(workspace, "lora", tmp_path / name, "--max_steps", "2", "--logging_steps", "1")
                if a not in ("--disable_tqdm", "true")]
        assert main([*flags, *argv]) == 0
        return capsys.readouterr()

    shown = run("default")
    assert "recover lora: 100%" in shown.err and "loss=" in shown.err and "tokens/s=" in shown.err
    assert "step 1: loss" not in shown.err + shown.out  # the metrics dicts are not printed by default

    with caplog.at_level(logging.INFO, logger="prunetune"):
        run("verbose", "-v")
    assert any(r.getMessage().startswith("step 1: loss") for r in caplog.records)

    for flags in (["-q"], []):
        argv_out = tmp_path / f"quiet{len(flags)}"
        argv = [a for a in recover_args(workspace, "lora", argv_out, "--max_steps", "2") if a not in ("--disable_tqdm", "true")]
        assert main([*flags, *argv] if flags else [*argv, "-q"]) == 0  # prunetune -q recover / prunetune recover -q
        quiet = capsys.readouterr()
        assert "recover lora" not in quiet.err and "%|" not in quiet.err
        assert "trained 2 steps" in quiet.out


def test_recover_leaves_the_process_random_state_alone(workspace, tmp_path):  # noqa: F811
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(2)
    with torch.random.fork_rng():
        expected = torch.rand(3)
    python_state, numpy_state = random.getstate(), np.random.get_state()[1].copy()
    assert main(recover_args(workspace, "lora", tmp_path / "out", "--max_steps", "1")) == 0
    assert torch.equal(torch.rand(3), expected)
    assert random.getstate() == python_state and np.array_equal(np.random.get_state()[1], numpy_state)
