"""`prunetune recover` never damages what it reads or a finished result: output folders apart from inputs,
resume by the fresh-run rules, incomplete/damaged/finished checkpoints refused in one paragraph, honest
NaN advice, per-method learning rates, no leftover checkpoints."""

import json
import logging
import shutil

import pytest
import torch
from test_recover_cli import recover_args, workspace  # noqa: F401  (module fixture)
from test_recover_resume import run
from transformers import TrainerCallback

from prunetune.cli import main
from prunetune.commands.recover import parse
from prunetune.errors import UsageError
from prunetune.outputs import write_json
from prunetune.recipe import recover
from prunetune.recover.callbacks import TrainingStopped


def lora_run(ws, out, *extra):
    """A 2-step lora run that keeps a checkpoint at every step."""
    argv = recover_args(ws, "lora", out, "--max_steps", "2", "--lora_r", "4", *extra)
    argv[argv.index("--save_strategy") + 1] = "steps"
    return [*argv, "--save_steps", "1"]


@pytest.fixture(scope="module")
def finished(workspace, tmp_path_factory):  # noqa: F811
    """A finished 2-step lora run with checkpoint-1 and checkpoint-2 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(lora_run(workspace, out)) == 0
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()
    return out


def copy_run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def resume(ws, out, checkpoint, *extra):
    argv = lora_run(ws, out, "--resume_from_checkpoint", str(checkpoint), *extra)
    argv[argv.index("--max_steps") + 1] = "3"
    return argv


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


# ---- item: an explicit checkpoint without its completion marker


def test_an_explicit_checkpoint_without_its_marker_is_refused(workspace, finished, tmp_path, capsys):  # noqa: F811
    out = copy_run(finished, tmp_path)
    (out / "checkpoint-2" / "prunetune_checkpoint.json").unlink()
    adapter = (out / "adapter_model.safetensors").read_bytes()
    assert main(resume(workspace, out, out / "checkpoint-2")) == 2
    err = error_of(capsys)
    assert "prunetune_checkpoint.json" in err and "checkpoint-2" in err
    assert (out / "adapter_model.safetensors").read_bytes() == adapter


# ---- item: a resume into another folder follows the rules of a fresh run


def test_a_resume_into_a_users_folder_is_refused_and_leaves_it_alone(workspace, finished, tmp_path, capsys):  # noqa: F811
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    assert main(resume(workspace, mine, finished / "checkpoint-1")) == 2
    assert "not empty" in error_of(capsys)
    assert [p.name for p in mine.iterdir()] == ["README.md"] and (mine / "README.md").read_text() == "my notes"
    fresh = tmp_path / "fresh"  # a new folder is fine: the run continues there
    assert main(resume(workspace, fresh, finished / "checkpoint-1")) == 0
    assert json.loads((fresh / "recovery.json").read_text())["resumed_from"].endswith("checkpoint-1")


# ---- item: an output that is, contains or lies inside an input


@pytest.mark.parametrize("case", ["is_model", "inside_model", "contains_train_file"])
def test_an_output_overlapping_an_input_is_refused_before_anything_is_touched(case, workspace, tmp_path, capsys):  # noqa: F811
    model = tmp_path / "model"
    shutil.copytree(workspace / "pruned", model)
    write_json(model / "prunetune.json", {"complete": True, "pruning": {"method": "test"}})  # as prunetune prune writes
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(workspace / "text.txt", data / "text.txt")
    write_json(data / "prunetune.json", {"complete": True})
    out = {"is_model": model, "inside_model": model / "recovered", "contains_train_file": data}[case]
    argv = recover_args(workspace, "lora", out, "--max_steps", "1", "--overwrite_output_dir")
    argv[argv.index("--model_name_or_path") + 1] = str(model)
    argv[argv.index("--dataset_name"):argv.index("--dataset_name") + 2] = ["--train_file", str(data / "text.txt")]
    before = sorted(p.name for p in model.iterdir()), sorted(p.name for p in data.iterdir())
    assert main(argv) == 2
    err = error_of(capsys)
    assert "--output_dir" in err and ("--model_name_or_path" in err or "--train_file" in err)
    assert (sorted(p.name for p in model.iterdir()), sorted(p.name for p in data.iterdir())) == before


# ---- item: nothing to do, or a finished run


def test_resuming_a_finished_run_says_so_and_changes_nothing(workspace, finished, tmp_path, capsys):  # noqa: F811
    out = copy_run(finished, tmp_path)
    adapter = (out / "adapter_model.safetensors").read_bytes()
    argv = lora_run(workspace, out, "--resume_from_checkpoint", "latest")
    assert main(argv) == 2
    err = error_of(capsys)
    assert "already reached step 2" in err and "--max_steps" in err
    assert (out / "adapter_model.safetensors").read_bytes() == adapter


def test_neither_training_nor_evaluating_is_refused(workspace, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert main(recover_args(workspace, "lora", out, "--do_train", "false")) == 2
    assert "--do_eval" in error_of(capsys) and not out.exists()


class Diverge(TrainerCallback):
    """A weight that grows huge but finite at step 2 (saved in checkpoint-2), NaN at step 3."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        value = {1: 1.6e6, 2: float("nan")}.get(state.global_step)
        if value is not None:
            with torch.no_grad():
                model.lm_head.weight[0, 0] = value


def test_nan_advice_skips_a_checkpoint_that_had_already_diverged(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "nan"
    with pytest.raises(TrainingStopped) as stopped:
        run(workspace, out, callbacks=[Diverge()])
    message = " ".join(str(stopped.value).split())
    assert "step 3" in message and (out / "checkpoint-2").is_dir()
    assert "last good checkpoint is" not in message and "--resume_from_checkpoint" not in message
    assert "checkpoint-2" in message and "diverged" in message and "1.6e+06" in message


# ---- item: refused up front, in one paragraph


def test_fsdp_in_a_single_process_is_refused_up_front(workspace, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert main(recover_args(workspace, "lora", out, "--max_steps", "1", "--fsdp", "full_shard")) == 2
    assert "torchrun" in error_of(capsys) and not out.exists()


@pytest.mark.parametrize("case", ["lora_r", "optimizer", "adapter"])
def test_a_checkpoint_that_cannot_load_is_one_paragraph_naming_it(case, workspace, finished, tmp_path, capsys):  # noqa: F811
    out = copy_run(finished, tmp_path)
    checkpoint = out / "checkpoint-2"
    extra, expected = [], "adapter_model.safetensors is damaged"
    if case == "lora_r":
        extra, expected = ["--lora_r", "8"], "--lora_r 4"
    elif case == "optimizer":
        (checkpoint / "optimizer.pt").write_bytes(b"not a torch file")
        expected = "optimizer.pt is damaged"
    else:
        weights = checkpoint / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    argv = resume(workspace, out, "latest" if case == "adapter" else checkpoint)
    argv[argv.index("--lora_r"):argv.index("--lora_r") + 2] = extra or ["--lora_r", "4"]
    assert main(argv) == 2
    err = error_of(capsys)
    assert str(checkpoint) in err and expected in err


def test_distillation_settings_without_a_teacher_are_refused(workspace, tmp_path):  # noqa: F811
    for flag, value in (("--distill_kl_weight", "2"), ("--distill_temperature", "2")):
        with pytest.raises(UsageError, match=f"{flag}.*without --distill_from"):
            parse(recover_args(workspace, "lora", tmp_path / "out", flag, value)[1:])


@pytest.mark.parametrize("change, named", [("dataset", "training text"), ("teacher", "teacher")])
def test_a_resume_that_changes_the_text_or_adds_a_teacher_is_named(change, named, workspace, finished, tmp_path, caplog):  # noqa: F811
    out = copy_run(finished, tmp_path)
    argv = resume(workspace, out, "latest")[1:]
    if change == "dataset":
        other = tmp_path / "other.txt"
        other.write_text((workspace / "text.txt").read_text()[::-1])
        argv[argv.index("--dataset_name") + 1] = str(other)
    else:
        argv += ["--distill_from", str(workspace / "dense")]
    with caplog.at_level(logging.WARNING, logger="prunetune"):
        recover(*parse(argv))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and named in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint-2" in warnings[0]


def test_a_distilled_runs_results_name_the_teacher_and_its_loss_weights(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert main(recover_args(workspace, "lora", out, "--max_steps", "1", "--distill_from", str(workspace / "dense"),
                             "--distill_ce_weight", "0.5")) == 0
    distillation = json.loads((out / "recovery.json").read_text())["extra"]["distillation"]
    assert distillation["teacher"] == str(workspace / "dense")
    teacher = distillation["teacher_identity"]  # the one record of the teacher (recover.teacher.describe_teacher)
    assert teacher["path"] == str((workspace / "dense").resolve()) and len(teacher["weights_sha256"]) == 64
    assert teacher["loss_weights"] == {"ce": 0.5, "kl": 1.0, "hidden": 1.0} and teacher["bytes"] > 0
    assert not {"teacher_bytes", "teacher_dtype"} & set(distillation)
    assert (distillation["ce_weight"], distillation["kl_weight"], distillation["hidden_weight"]) == (0.5, 1.0, 1.0)


# ---- item: defaults that suit the method, and no leftovers


def test_the_learning_rate_follows_the_method_unless_given(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    argv = recover_args(workspace, "lora", out, "--max_steps", "1")
    del argv[argv.index("--learning_rate"):argv.index("--learning_rate") + 2]
    assert main(argv) == 0
    assert json.loads((out / "recovery.json").read_text())["learning_rate"] == 1e-4
    from prunetune.recipe.args import resolve_learning_rate

    for method, rate in (("full", 2e-5), ("masked_lora", 1e-4)):
        assert resolve_learning_rate(parse([*argv[1:], "--overwrite_output_dir"])[-1], method) == rate
    assert resolve_learning_rate(parse([*argv[1:], "--learning_rate", "3e-3"])[-1], "full") == 3e-3


def test_a_finished_run_keeps_checkpoints_only_when_asked(workspace, finished, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    argv = recover_args(workspace, "lora", out, "--max_steps", "2")
    del argv[argv.index("--save_strategy"):argv.index("--save_strategy") + 2]
    assert main(argv) == 0
    assert (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))
    assert (finished / "checkpoint-2" / "optimizer.pt").exists()  # --save_steps given: kept
