"""A killed `full` run resumes from its checkpoint (masks + optimizer) and loses no step; NaN keeps the last good checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file
from factories import Killed, kill_after_save
from test_recover_cli import workspace  # noqa: F401  (module fixture)
from transformers import TrainerCallback

from prunetune.commands.recover import parse
from prunetune.masks import MaskSet
from prunetune.recover.callbacks import TrainingStopped
from prunetune.recipe import recover



def KillAfterSave(step):  # noqa: N802 (kept as the name the tests use)
    return kill_after_save(step)


class PoisonWeights(TrainerCallback):
    """A diverging optimizer step: after the update that makes step ``step``, a weight is NaN."""

    def __init__(self, step):
        self.step = step

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                model.lm_head.weight[0, 0] = float("nan")


def run(ws, out, *extra, callbacks=None):
    argv = ["--model_name_or_path", str(ws / "pruned"), "--dataset_name", str(ws / "text.txt"), "--block_size", "32",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
            "--weight_decay", "0.1", "--recovery_method", "full", "--max_steps", "4", "--save_steps", "2",
            "--logging_steps", "1", "--output_dir", str(out), "--disable_tqdm", "true", "--seed", "3", *extra]
    return recover(*parse(argv), callbacks=callbacks)


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_resume_restores_masks_and_optimizer_and_loses_no_step(workspace, tmp_path):  # noqa: F811
    straight = tmp_path / "straight"
    run(workspace, straight)
    resumed = tmp_path / "resumed"
    with pytest.raises(Killed):
        run(workspace, resumed, callbacks=[KillAfterSave(2)])
    assert (resumed / "checkpoint-2" / "masks.safetensors").exists() and (resumed / "checkpoint-2" / "optimizer.pt").exists()
    result = run(workspace, resumed, "--resume_from_checkpoint", "latest")
    assert result.resumed_from.endswith("checkpoint-2") and result.steps == 2
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    # same weights as the uninterrupted run: optimizer moments, schedule and data order were restored
    for name, tensor in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[name], tensor, rtol=1e-5, atol=1e-6)
    masks = MaskSet.load(resumed / "masks.safetensors")
    assert masks.sparsity() == pytest.approx(0.5) and result.sparsity_after == pytest.approx(0.5)
    final = weights(resumed)
    for name, kept in masks.masks.items():
        assert not final[name + ".weight"][~kept].any(), name


def test_nan_loss_stops_before_saving_and_keeps_the_last_good_checkpoint(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "nan"
    with pytest.raises(TrainingStopped, match=r"step 3.*checkpoint-2"):
        run(workspace, out, callbacks=[PoisonWeights(3)])
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    assert torch.isfinite(weights(out / "checkpoint-2")["lm_head.weight"]).all()
