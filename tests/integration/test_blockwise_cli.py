"""`prunetune recover --recovery_method blockwise` end to end on the bundled tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from factories import prune_half_rows, save_model_folder
from safetensors.torch import load_file

from prunetune import load_model_and_tokenizer
from prunetune.cli import main
from prunetune.masks import MaskSet
from prunetune.recover import blockwise


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tiny model pruned 50% (a folder), and a random model of another shape."""
    root = tmp_path_factory.mktemp("blockwise")
    model, tokenizer = load_model_and_tokenizer("tiny")
    prune_half_rows(model).save_pretrained(root / "pruned")
    tokenizer.save_pretrained(root / "pruned")
    save_model_folder(root / "other", "llama")
    return root


def blockwise_args(ws, out, *extra, teacher="tiny"):
    return ["recover", "--model_name_or_path", str(ws / "pruned"), "--distill_from", teacher,
            "--recovery_method", "blockwise", "--dataset_name", "builtin", "--nsamples", "8", "--seqlen", "32",
            "--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--output_dir", str(out), "--disable_tqdm", "true", *extra]


def test_blockwise_keeps_the_exact_sparsity_and_writes_a_model_eval_loads(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(blockwise_args(workspace, out, "--do_eval", "--max_eval_samples", "2")) == 0
    masks = MaskSet.from_zeros(load_model_and_tokenizer(str(workspace / "pruned"))[0])
    recovered, _ = load_model_and_tokenizer(str(out))
    for name, module in masks.layers(recovered).items():
        assert int(module.weight[~masks.masks[name]].ne(0).sum()) == 0, name
    result = json.loads((out / "recovery.json").read_text())
    assert result["method"] == "blockwise" and result["sparsity_after"] == pytest.approx(result["sparsity_before"])
    report = json.loads((out / "blockwise.json").read_text())
    assert [w["blocks"] for w in report["windows"]] == [[0], [1], [2], [3]]
    assert all(w["train_after"] < w["train_before"] for w in report["windows"])
    manifest = json.loads((out / "prunetune.json").read_text())
    assert manifest["complete"] is True and manifest["recovery_method"] == "blockwise"
    assert not (out / "checkpoint-blockwise").exists()
    ppl = tmp_path / "ppl.json"
    assert main(["eval", "--model", str(out), "--dataset", "builtin", "--seqlen", "32", "--max_windows", "2",
                 "--json", str(ppl)]) == 0
    assert json.loads(ppl.read_text())["perplexity"] > 0


class Killed(Exception):
    pass


def test_a_killed_run_resumes_from_the_last_finished_block(workspace, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert main(blockwise_args(workspace, whole)) == 0
    original, trained = blockwise.train_window, []

    def dies_at_the_third_block(*args, **kwargs):
        if len(trained) == 2:
            raise Killed()
        trained.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(blockwise, "train_window", dies_at_the_third_block)
    out = tmp_path / "out"
    with pytest.raises(Killed):
        main(blockwise_args(workspace, out))
    monkeypatch.setattr(blockwise, "train_window", original)
    assert json.loads((out / "prunetune.json").read_text())["complete"] is False
    assert main(blockwise_args(workspace, out)) == 2  # a fresh run refuses the unfinished folder
    assert main(blockwise_args(workspace, out, "--resume_from_checkpoint", "latest")) == 0
    assert [w["resumed"] for w in json.loads((out / "blockwise.json").read_text())["windows"]] == [True, True, False, False]
    expected, got = load_file(str(whole / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_teacher_of_another_architecture_is_refused(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(blockwise_args(workspace, out, teacher=str(workspace / "other"))) == 2
    err = capsys.readouterr().err
    assert "dense model" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--blockwise_input", "teacher", "'teacher'"),
    ("--blockwise_window", "0", "--blockwise_window 0"),
    ("--num_train_epochs", "1.5", "--num_train_epochs 1.5"),
    ("--nsamples", "0", "--nsamples 0"),
])
def test_bad_flags_exit_2_naming_the_value(flag, value, message, workspace, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(blockwise_args(workspace, out, flag, value)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_blockwise_needs_the_dense_model(workspace, tmp_path, capsys):
    args = blockwise_args(workspace, tmp_path / "out")
    position = args.index("--distill_from")
    del args[position: position + 2]
    assert main(args) == 2
    assert "--distill_from" in capsys.readouterr().err
