"""Default data follows the model, not its name: models and adapters made from the bundled
model get ``builtin`` (offline) in every command; other models get the papers' data."""

import json
import shutil

import pytest

from prunetune.cli import main
from prunetune.defaults import default_data, from_bundled
from prunetune.loading import TINY_PATH
from prunetune.outputs import MANIFEST_NAME


def _folder(path, base=None, tokenizer_of=None):
    """A folder with a prunetune.json naming ``base`` (None: no manifest), optionally a copied tokenizer."""
    path.mkdir(parents=True)
    if base is not None:
        (path / MANIFEST_NAME).write_text(json.dumps({"stage": "prune", "base_model": str(base)}))
    if tokenizer_of is not None:
        shutil.copy(tokenizer_of / "tokenizer.json", path / "tokenizer.json")
    return path


@pytest.mark.parametrize("role, paper", [("calibration", "c4"), ("evaluation", "wikitext2"), ("training", "c4")])
def test_each_role_has_one_default_per_kind_of_model(tmp_path, role, paper):
    pruned = _folder(tmp_path / "pruned", base="tiny")
    assert default_data(role, "tiny") == default_data(role, str(TINY_PATH)) == default_data(role, str(pruned)) == "builtin"
    assert default_data(role, "meta-llama/Llama-2-7b-hf") == paper  # a hub id: never looked up
    assert default_data(role, str(_folder(tmp_path / "other"))) == paper
    assert default_data(role, str(tmp_path / "other"), None, str(pruned)) == "builtin"  # e.g. --model X --lora_weights A


def test_manifest_chains_are_followed(tmp_path, monkeypatch):
    pruned = _folder(tmp_path / "runs" / "pruned", base="tiny")
    # the adapter's manifest names its base relative to where `recover` ran (tmp_path)
    adapter = _folder(tmp_path / "runs" / "adapter", base="runs/pruned")
    merged = _folder(tmp_path / "runs" / "merged", base=adapter)
    monkeypatch.chdir(tmp_path)
    assert from_bundled(str(merged)) and from_bundled("runs/adapter")
    monkeypatch.chdir(pruned)  # elsewhere: the relative name is found from the folders above the adapter
    assert from_bundled(str(adapter))
    hub_based = _folder(tmp_path / "hub-pruned", base="meta-llama/Llama-2-7b-hf")
    assert not from_bundled(str(hub_based))


def test_a_loop_of_manifests_ends(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    _folder(first, base=second)
    _folder(second, base=first)
    assert default_data("evaluation", str(first)) == "wikitext2"


def test_a_copy_of_the_bundled_folder_and_a_damaged_manifest(tmp_path):
    assert from_bundled(str(_folder(tmp_path / "copy", tokenizer_of=TINY_PATH)))  # no manifest: its tokenizer says so
    damaged = _folder(tmp_path / "damaged")
    (damaged / MANIFEST_NAME).write_text("{not json")
    assert not from_bundled(str(damaged))


def test_eval_and_prune_of_a_model_pruned_from_tiny_default_to_builtin_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", "tiny", "--prune_method", "magnitude", "--eval_dataset", "none",
                 "--device", "cpu", "--save_model", str(pruned)]) == 0
    capsys.readouterr()
    # evaluate_ppl.py's command line, translated: no dataset flag
    assert main(["eval", "--model", str(pruned), "--max_windows", "2", "--seqlen", "64", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"{pruned} on builtin" in out and json.loads(out[out.index("{"):])["dataset"] == "builtin"
    # pruning it again calibrates (and evaluates) on builtin too, without a --calib_dataset
    assert main(["prune", "--model", str(pruned), "--prune_method", "wanda", "--sparsity_type", "2:4", "--nsamples", "2",
                 "--seqlen", "64", "--eval_max_windows", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "perplexity on builtin" in out
