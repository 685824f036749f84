"""Block-wise reconstruction on toy Llama-like models: masks, losses, input modes, resume, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from factories import make_model, prune_half_rows, random_tokens
from safetensors.torch import load_file

from prunetune.errors import UsageError
from prunetune.masks import MaskSet
from prunetune.modules import find_decoder_blocks, prunable_layers, weight_matrix
from prunetune.pruning.selection import nm_mask, parse_structure
from prunetune.recover import blockwise
from prunetune.recover.blockwise import BlockwiseConfig, reconstruct

FAST = dict(nsamples=16, seqlen=32, epochs=3, learning_rate=1e-3, batch_size=4, held_out=0.25)


def pair(layers: int = 3, prune=prune_half_rows):
    teacher = make_model("llama", layers=layers)
    return prune(copy.deepcopy(teacher)), teacher


def prune_two_four(model):
    with torch.no_grad():
        for module in prunable_layers(model).values():
            weight = weight_matrix(module)
            weight.mul_(nm_mask(weight.abs(), parse_structure("2:4")))
    return model


def pruned_nonzeros(model, masks: MaskSet) -> int:
    return sum(int((weight_matrix(m)[~masks.masks[n]] != 0).sum()) for n, m in masks.layers(model).items())


def test_pruned_weights_exactly_zero_after_each_block_and_at_the_end(tmp_path):
    student, teacher = pair()
    masks = MaskSet.from_zeros(student)
    before = {name: weight_matrix(m).clone() for name, m in prunable_layers(student).items()}
    reconstruct(student, teacher, random_tokens(16, 32), BlockwiseConfig(**FAST), progress_dir=tmp_path)
    assert pruned_nonzeros(student, masks) == 0
    # each window's weights as written right after its training
    for block in find_decoder_blocks(student):
        saved = load_file(str(tmp_path / f"window-{block.index:03d}.safetensors"))
        for relative in block.linears:
            weight = saved[f"{block.index}.{relative}.weight"]
            name = block.qualified(relative)
            assert int((weight[~masks.masks[name]] != 0).sum()) == 0
            assert not torch.equal(weight, before[name])  # the kept weights did train


@pytest.mark.parametrize("mode, window", [("sparse", 1), ("dense", 1), ("mix", 2)])
def test_two_four_pattern_intact(mode, window):
    student, teacher = pair(prune=prune_two_four)
    masks = MaskSet.from_zeros(student)
    report = reconstruct(student, teacher, random_tokens(16, 32),
                         BlockwiseConfig(**FAST, input_mode=mode, window=window))
    assert pruned_nonzeros(student, masks) == 0
    for module in prunable_layers(student).values():
        groups = (weight_matrix(module) == 0).reshape(-1, 4).sum(dim=1)
        assert int(groups.min()) >= 2
    assert report.sparsity == pytest.approx(0.5)
    assert [w.blocks for w in report.windows] == ([[0], [1], [2]] if window == 1 else [[0, 1], [2]])


def test_held_out_error_goes_down_for_every_block():
    student, teacher = pair()
    report = reconstruct(student, teacher, random_tokens(32, 32), BlockwiseConfig(**{**FAST, "nsamples": 32, "epochs": 5}))
    assert len(report.windows) == 3
    for window in report.windows:
        assert window.held_after < window.held_before, window
        assert window.train_after < window.train_before, window


def recorded_inputs(module: torch.nn.Module, record: list):
    def hook(_, args, kwargs):
        record.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_dense_mode_feeds_the_teachers_activations(mode):
    student, teacher = pair(layers=2)
    seen, teacher_inputs = [], []
    handles = [recorded_inputs(find_decoder_blocks(student)[1].module, seen),
               recorded_inputs(find_decoder_blocks(teacher)[1].module, teacher_inputs)]
    try:
        reconstruct(student, teacher, random_tokens(16, 32), BlockwiseConfig(**FAST, input_mode=mode))
    finally:
        for handle in handles:
            handle.remove()
    from_teacher = [any(torch.equal(x, t) for t in teacher_inputs) for x in seen]
    assert seen and teacher_inputs
    # dense: every input block 1 trained or was measured on is one the teacher's block 1 received;
    # sparse: none is (the student's block 0 output differs from the teacher's)
    assert all(from_teacher) if mode == "dense" else not any(from_teacher)


class Killed(Exception):
    pass


def test_resume_after_a_kill_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    student, teacher = pair()
    pruned = copy.deepcopy(student)
    ids = random_tokens(16, 32)
    config = BlockwiseConfig(**FAST, seed=3)
    reconstruct(student, teacher, ids, config, progress_dir=tmp_path / "whole")

    trained = []
    original = blockwise.train_window

    def dies_at_the_third_window(*args, **kwargs):
        if len(trained) == 2:
            raise Killed()
        trained.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(blockwise, "train_window", dies_at_the_third_window)
    with pytest.raises(Killed):
        reconstruct(copy.deepcopy(pruned), teacher, ids, config, progress_dir=tmp_path / "killed")
    monkeypatch.setattr(blockwise, "train_window", original)

    resumed_student = copy.deepcopy(pruned)
    report = reconstruct(resumed_student, teacher, ids, config, progress_dir=tmp_path / "killed")
    assert [w.resumed for w in report.windows] == [True, True, False]
    expected, got = student.state_dict(), resumed_student.state_dict()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_progress_folder_of_other_settings_is_refused(tmp_path):
    student, teacher = pair(layers=1)
    reconstruct(student, teacher, random_tokens(16, 32), BlockwiseConfig(**FAST), progress_dir=tmp_path)
    with pytest.raises(UsageError, match="other settings"):
        reconstruct(student, teacher, random_tokens(16, 32), BlockwiseConfig(**{**FAST, "epochs": 4}), progress_dir=tmp_path)


@pytest.mark.parametrize("teacher_kwargs", [dict(layers=2), dict(layers=3, intermediate=96)])
def test_teacher_of_another_architecture_is_refused_before_any_work(tmp_path, monkeypatch, teacher_kwargs):
    student = prune_half_rows(make_model("llama", layers=3))
    teacher = make_model("llama", **teacher_kwargs)
    weights = copy.deepcopy(student.state_dict())

    def no_work(*args, **kwargs):
        raise AssertionError("captured activations before refusing the teacher")

    monkeypatch.setattr(blockwise, "capture_inputs", no_work)
    with pytest.raises(UsageError, match="dense model"):
        reconstruct(student, teacher, random_tokens(16, 32), BlockwiseConfig(**FAST), progress_dir=tmp_path / "progress")
    assert not (tmp_path / "progress").exists()
    assert all(torch.equal(weights[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize("bad", [dict(input_mode="teacher"), dict(window=0), dict(epochs=0), dict(held_out=1.0),
                                 dict(mix_alpha=1.5), dict(learning_rate=0.0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(UsageError, match=repr(next(iter(bad.values())))):
        BlockwiseConfig(**bad)


def test_too_few_calibration_ids_are_refused():
    student, teacher = pair(layers=1)
    with pytest.raises(UsageError, match="16 x 32"):
        reconstruct(student, teacher, random_tokens(8, 32), BlockwiseConfig(**FAST))


def test_token_normalised_error_is_the_mean_of_each_tokens_own_relative_error():
    from prunetune.recover.reconstruction import squared_errors, token_normalised_error

    torch.manual_seed(0)
    target = torch.randn(2, 5, 8)
    target[0, 0] *= 1000.0  # one token of huge norm, as a massive activation
    output = target + 0.1 * torch.randn(2, 5, 8)
    expected = sum(float((output[b, t] - target[b, t]).pow(2).sum() / target[b, t].pow(2).sum())
                   for b in range(2) for t in range(5)) / 10
    assert float(token_normalised_error(output, target)) == pytest.approx(expected, rel=1e-5)
    error, norm = squared_errors(output, target)
    assert float(error / norm) < expected / 100  # the batch-normalised error hardly sees the other nine tokens


def test_an_unknown_loss_is_refused_naming_it():
    with pytest.raises(UsageError, match="'mse'"):
        BlockwiseConfig(loss="mse")
