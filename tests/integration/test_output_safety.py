"""Output folders: nothing of the user's is destroyed, two runs never mix, unfinished runs are recognisable.

Issue 9, items 1-5 and 8, and the resume rules (last *complete* checkpoint, a new learning rate
on resume really applies).
"""

import errno
import json
import os
import stat
import threading

import pytest
import torch
import transformers.modeling_utils
from safetensors import SafetensorError
from factories import lock_held_elsewhere
from test_recover_cli import recover_args, workspace  # noqa: F401  (module fixture)
from test_recover_resume import KillAfterSave, Killed, run

from prunetune.cli import main
from prunetune.outputs import MANIFEST_NAME, atomic_dir, check_output_dir, output_lock
from prunetune.errors import UsageError


def prune_args(out, *extra):
    # no perplexity: these tests are about the folder, and two evaluations per run cost most of their time
    return ["prune", "--model", "tiny", "--prune_method", "magnitude", "--eval_dataset", "none", "--save_model", str(out),
            *extra]


def err(capsys):
    """stderr with the line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- item 1: refuse, or replace only our own


def test_prune_refuses_a_non_empty_folder_and_never_replaces_a_foreign_one(tmp_path, capsys):
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "chapter1.tex").write_text("years of work")
    before = snapshot(user)
    assert main(prune_args(user)) == 2
    assert "not empty" in err(capsys)
    assert main(prune_args(user, "--overwrite_output_dir")) == 2  # the flag replaces only prunetune's folders
    assert "not written by prunetune" in err(capsys)
    assert snapshot(user) == before


def test_prune_replaces_its_own_folder_only_with_the_flag(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(prune_args(out)) == 0
    first = json.loads((out / MANIFEST_NAME).read_text())
    assert first["complete"] is True and first["trust_remote_code"] is False
    (out / "note.txt").write_text("mine")
    assert main(prune_args(out, "--sparsity_ratio", "0.6")) == 2
    assert (out / "note.txt").exists()
    capsys.readouterr()
    assert main(prune_args(out, "--sparsity_ratio", "0.6", "--overwrite_output_dir")) == 0
    assert json.loads((out / MANIFEST_NAME).read_text())["sparsity_ratio"] == 0.6
    assert not (out / "note.txt").exists()  # replaced whole: nothing of the old folder stays


def test_symlink_current_directory_and_parents_are_never_outputs(tmp_path, monkeypatch, capsys):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data.bin").write_bytes(b"\x01" * 10)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert main(prune_args(link, "--overwrite_output_dir")) == 2
    assert "symbolic link" in err(capsys)
    assert (target / "data.bin").read_bytes() == b"\x01" * 10
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    for path in (".", "..", str(tmp_path)):
        assert main(prune_args(path, "--overwrite_output_dir")) == 2
        assert "current directory" in err(capsys)
    assert (work / "keep.txt").exists()


def test_save_and_save_model_in_one_folder_keep_both(tmp_path, capsys):
    out = tmp_path / "both"
    assert main(prune_args(out, "--save", str(out))) == 0
    assert (out / "prune_report.json").exists() and (out / "model.safetensors").exists()
    inside = tmp_path / "m"
    assert main(prune_args(inside, "--save", str(inside / "logs"))) == 2
    assert "inside --save_model" in err(capsys) and not inside.exists()


def test_atomic_dir_checks_again_at_the_end(tmp_path):
    out = tmp_path / "late"
    with pytest.raises(UsageError, match="not empty"):
        with atomic_dir(out) as tmp:
            (tmp / "result.txt").write_text("new")
            out.mkdir()
            (out / "appeared.txt").write_text("someone else's")  # appeared while we worked
    assert (out / "appeared.txt").exists() and not list(tmp_path.glob(".late.tmp-*"))


# --------------------------------------------------------------------------- item 2: overwrite leaves nothing; unfinished is visible


def test_recover_overwrite_leaves_nothing_of_the_previous_run(workspace, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert main(recover_args(workspace, "lora", out, "--max_steps", "2")) == 0
    assert (out / "adapter_config.json").exists()
    assert main(recover_args(workspace, "full", out, "--max_steps", "2")) == 2
    assert "not empty" in err(capsys)
    assert main(recover_args(workspace, "full", out, "--max_steps", "2", "--overwrite_output_dir")) == 0
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["recovery_method"] == "full" and manifest["complete"] is True
    assert json.loads((out / "recovery.json").read_text())["method"] == "full"


def test_an_unfinished_run_is_refused_by_its_readers(workspace, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run(workspace, out, "--recovery_method", "masked_lora", callbacks=[KillAfterSave(2)])
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is False and manifest["recovery_method"] == "masked_lora"
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(workspace / "pruned"), "--adapter", str(out), "--save_model", str(merged)]) == 2
    assert "has not finished" in err(capsys) and not merged.exists()
    # the checkpoint itself is complete and usable; resuming finishes the run
    result = run(workspace, out, "--recovery_method", "masked_lora", "--resume_from_checkpoint", "latest")
    assert result.resumed_from.endswith("checkpoint-2")
    assert json.loads((out / MANIFEST_NAME).read_text())["complete"] is True


# --------------------------------------------------------------------------- item 3: one run per folder


def test_a_second_run_into_a_locked_folder_is_refused_and_names_the_first(tmp_path, capsys):
    out = tmp_path / "busy"
    with lock_held_elsewhere(out, "prunetune recover") as holder:
        assert main(prune_args(out)) == 2
        message = err(capsys)
        assert f"process {holder.pid}" in message and "prunetune recover" in message
        assert not out.exists()
    assert main(prune_args(out)) == 0  # released when its holder died
    assert not list(tmp_path.glob(".busy.lock*"))  # and no lock file is left behind


# --------------------------------------------------------------------------- item 4: leftovers of a killed save


def test_a_killed_save_leaves_no_hidden_copy_after_the_next_run(tmp_path):
    out = tmp_path / "model"
    stale = tmp_path / ".model.tmp-k1ll3d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    other = tmp_path / ".other.tmp-abc"  # another output's leftovers are not ours to judge
    other.mkdir()
    assert main(prune_args(out)) == 0
    assert not stale.exists() and other.exists()


# --------------------------------------------------------------------------- item 5: the umask


def wrong_modes(folder, umask=0o022):
    """Every entry of ``folder`` (itself included) whose permissions are not what ``umask`` gives."""
    entries = [folder, *sorted(folder.rglob("*"))]
    return {p.relative_to(folder.parent).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in entries
            if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~umask}


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "shared"
        assert main(prune_args(out, "--save", str(tmp_path / "logs"))) == 0
    finally:
        os.umask(old)
    assert (out / "model.safetensors").exists()
    assert wrong_modes(out) == {} and wrong_modes(tmp_path / "logs") == {}


def test_recover_outputs_follow_the_umask(workspace, tmp_path):  # noqa: F811
    """safetensors writes 0600 files: a finished adapter folder still has the umask's permissions."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "adapter"
        assert main(recover_args(workspace, "lora", out, "--max_steps", "1")) == 0
    finally:
        os.umask(old)
    assert (out / "adapter_model.safetensors").exists()
    assert wrong_modes(out) == {}


# --------------------------------------------------------------------------- item 8: no fp16 master weights


def test_full_refuses_float16_master_weights_before_any_work(workspace, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "fp16"
    assert main(recover_args(workspace, "full", out, "--dtype", "float16", "--max_steps", "1")) == 2
    message = err(capsys)
    assert "float16 master" in message and "--dtype" in message and not out.exists()


# --------------------------------------------------------------------------- resume


def test_latest_skips_a_checkpoint_killed_mid_save(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "partial"
    with pytest.raises(Killed):
        run(workspace, out, callbacks=[KillAfterSave(2)])
    torn = out / "checkpoint-4"  # what a kill during the next save leaves: some files, no marker
    torn.mkdir()
    (torn / "trainer_state.json").write_text("{}")
    (torn / "model.safetensors").write_bytes(b"\0" * 10)
    result = run(workspace, out, "--resume_from_checkpoint", "latest")
    assert result.resumed_from.endswith("checkpoint-2")


def test_a_new_learning_rate_on_resume_applies(workspace, tmp_path):  # noqa: F811
    straight = tmp_path / "straight"
    run(workspace, straight)
    out = tmp_path / "lower"
    with pytest.raises(Killed):
        run(workspace, out, callbacks=[KillAfterSave(2)])
    run(workspace, out, "--resume_from_checkpoint", "latest", "--learning_rate", "1e-4")

    def rates(folder):
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        return {h["step"]: h["learning_rate"] for h in history if "learning_rate" in h}

    old, new = rates(straight), rates(out)
    assert new[2] == pytest.approx(old[2])  # before the resume: the first run's rate
    assert new[3] == pytest.approx(old[3] / 10) and new[4] == pytest.approx(old[4] / 10)


def test_resume_refuses_a_checkpoint_of_another_method(workspace, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "fullrun"
    with pytest.raises(Killed):
        run(workspace, out, callbacks=[KillAfterSave(2)])
    with pytest.raises(UsageError, match="recovery_method full"):
        run(workspace, out, "--recovery_method", "masked_lora", "--resume_from_checkpoint", "latest")


def test_check_output_dir_is_free_of_side_effects(tmp_path):
    out = tmp_path / "a" / "b"
    check_output_dir(out)
    assert not (tmp_path / "a").exists()
    with output_lock(out):
        with output_lock(out):  # nested in one call chain: no self-deadlock
            pass


def test_another_thread_cannot_lock_a_held_folder(tmp_path):
    """Nesting is for the call chain that holds the lock; a second writer in another thread is refused."""
    out = tmp_path / "busy"
    refused = []

    def second_writer():
        try:
            with output_lock(out, "second"):
                pass
        except UsageError as error:
            refused.append(str(error))

    with output_lock(out, "first"):
        thread = threading.Thread(target=second_writer)
        thread.start()
        thread.join()
    assert len(refused) == 1 and "in use" in refused[0]
    with output_lock(out):  # released at the end of the block
        pass
    assert not list(tmp_path.glob(".busy.lock*"))


def test_resume_refuses_a_base_pruned_at_other_positions(workspace, tmp_path):  # noqa: F811
    from factories import make_tokenizer
    from transformers import AutoModelForCausalLM

    from prunetune.modules import prunable_layers, weight_matrix

    other = tmp_path / "other-base"  # same zero count in every layer, zeros one column to the right
    model = AutoModelForCausalLM.from_pretrained(workspace / "pruned")
    with torch.no_grad():
        for module in prunable_layers(model).values():
            weight = weight_matrix(module)
            weight.copy_(weight.roll(1, dims=1))
    model.save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run(workspace, out, "--recovery_method", "masked_lora", callbacks=[KillAfterSave(2)])
    with pytest.raises(UsageError, match="pruned differently"):
        run(workspace, out, "--recovery_method", "masked_lora", "--resume_from_checkpoint", "latest",
            "--model_name_or_path", str(other))


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno

    import prunetune.outputs

    real = prunetune.outputs.write_json

    def full_disk(path, payload):
        if path.name == MANIFEST_NAME:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, payload)

    monkeypatch.setattr(prunetune.outputs, "write_json", full_disk)
    out = tmp_path / "model"
    assert main(prune_args(out)) == 2
    message = err(capsys)
    assert "No space left on device" in message and "Traceback" not in message
    assert not out.exists() and not list(tmp_path.glob(".model.*"))


def test_eval_seqlen_beyond_the_model_is_refused_before_training(workspace, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "long"
    assert main(recover_args(workspace, "lora", out, "--max_steps", "1", "--do_eval", "--eval_seqlen", "100000")) == 2
    assert "--eval_seqlen 100000 exceeds" in err(capsys)
    assert not (out / "adapter_model.safetensors").exists() and not (out / "recovery.json").exists()


# --------------------------------------------------------------------------- a full disk while a model is saved


def full_disk(kind):
    """A safetensors writer that fails the way a full disk does: part of the file written, then an error."""
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 64)
        if kind == "OSError":
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return save_file


@pytest.mark.parametrize("kind", ["OSError", "SafetensorError"])
def test_a_full_disk_while_prune_saves_names_the_folder_and_leaves_nothing(tmp_path, monkeypatch, capsys, kind):
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk(kind))
    out = tmp_path / "pruned"
    assert main(prune_args(out)) == 2
    message = err(capsys)
    assert str(out) in message and "No space left on device" in message and "Traceback" not in message
    assert not out.exists() and not list(tmp_path.glob(".pruned.*"))  # no temporary sibling, no lock file


def test_a_full_disk_while_the_tokenizer_saves_is_a_usage_error(tmp_path, monkeypatch):
    """The tokenizers library reports a failed write as a bare Exception("... (os error 28)")."""
    from prunetune.loading import load_model, load_tokenizer
    from prunetune.outputs import save_model_dir

    tokenizer = load_tokenizer("tiny")

    def no_space(*args, **kwargs):
        raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", no_space)
    out = tmp_path / "model"
    with pytest.raises(UsageError, match="No space left on device") as caught:
        save_model_dir(load_model("tiny"), tokenizer, out, {"stage": "test"})
    assert str(out) in str(caught.value)
    assert not out.exists() and not list(tmp_path.glob(".model.*"))


def test_a_full_disk_while_merge_saves_names_the_folder_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    from peft import LoraConfig, get_peft_model

    from prunetune.loading import load_model

    adapter = tmp_path / "adapter"
    get_peft_model(load_model("tiny"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk("OSError"))
    out = tmp_path / "merged"
    assert main(["merge", "--model", "tiny", "--adapter", str(adapter), "--save_model", str(out), "--allow_dense"]) == 2
    message = err(capsys)
    assert str(out) in message and "No space left on device" in message and "Traceback" not in message
    assert not out.exists() and not list(tmp_path.glob(".merged.*"))


@pytest.mark.parametrize("method, writer", [("lora", "peft.peft_model"), ("full", "transformers.modeling_utils")])
def test_a_full_disk_while_recover_saves_is_a_usage_error_and_the_run_stays_unfinished(
        workspace, tmp_path, monkeypatch, capsys, method, writer):  # noqa: F811
    """recover writes in place (its checkpoints live there): the lock turns the failure into one paragraph, and the
    folder's manifest still says the run has not finished, so no reader takes it for a result."""
    import importlib

    monkeypatch.setattr(importlib.import_module(writer), "safe_save_file", full_disk("SafetensorError"))
    out = tmp_path / method
    assert main(recover_args(workspace, method, out, "--max_steps", "1")) == 2
    message = err(capsys)
    assert str(out) in message and "No space left on device" in message and "Traceback" not in message
    assert json.loads((out / MANIFEST_NAME).read_text())["complete"] is False
    assert not list(tmp_path.glob(f".{method}.lock*"))


# --------------------------------------------------------------------------- an output apart from the inputs


def _model_folder(folder):
    """A model folder as prunetune writes it (its manifest would let --overwrite_output_dir replace it)."""
    from prunetune.loading import load_model, load_tokenizer
    from prunetune.outputs import save_model_dir

    save_model_dir(load_model("tiny"), load_tokenizer("tiny"), folder, {"stage": "test"})
    return folder


@pytest.mark.parametrize("where", ["is_model", "inside_model"])
def test_prune_save_model_overlapping_its_model_is_refused(where, tmp_path, capsys):
    model = _model_folder(tmp_path / "model")
    before = snapshot(model)
    out = model if where == "is_model" else model / "pruned"
    argv = prune_args(out, "--overwrite_output_dir")
    argv[argv.index("--model") + 1] = str(model)
    assert main(argv) == 2
    message = err(capsys)
    assert "--save_model" in message and "--model" in message and "Traceback" not in message
    assert snapshot(model) == before


@pytest.mark.parametrize("where", ["is_model", "inside_model", "is_adapter", "inside_adapter"])
def test_merge_save_model_overlapping_its_inputs_is_refused(where, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from prunetune.loading import load_model

    model = _model_folder(tmp_path / "model")
    adapter = tmp_path / "adapter"
    get_peft_model(load_model("tiny"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    before = snapshot(model), snapshot(adapter)
    out = {"is_model": model, "inside_model": model / "merged", "is_adapter": adapter,
           "inside_adapter": adapter / "merged"}[where]
    argv = ["merge", "--model", str(model), "--adapter", str(adapter), "--save_model", str(out), "--allow_dense",
            "--no_eval", "--overwrite_output_dir"]
    assert main(argv) == 2
    message = err(capsys)
    assert "--save_model" in message and ("--model" in message if "model" in where else "--adapter" in message)
    assert "Traceback" not in message
    assert (snapshot(model), snapshot(adapter)) == before
