"""`prunetune eval` and `prunetune sparsity` end to end on a saved random model; bad input exits 2."""

import json

import pytest
import torch
from factories import save_model_folder

from prunetune.cli import main
from prunetune.masks import measure_sparsity


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    save_model_folder(path, "llama")
    return path


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("".join(chr(32 + (i * 13) % 90) for i in range(3000)))
    return path


def test_eval_writes_json(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert main(["eval", "--model", str(model_dir), "--dataset", str(text_file), "--seqlen", "64", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["windows"] == 3001 // 64 and result["perplexity"] > 1
    assert "perplexity" in capsys.readouterr().out


def test_sparsity_reports_exact_zero_counts(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, :64] = 0  # (64, 128): half the columns
    model.save_pretrained(tmp_path / "sparse")
    assert main(["sparsity", str(tmp_path / "sparse"), "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["per_module"]["model.layers.1.mlp.down_proj"] == 0.5
    assert report["zeros"] == measure_sparsity(model).zeros == 64 * 64
    assert main(["sparsity", str(tmp_path / "sparse")]) == 0
    assert "overall" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "/nonexistent/model"], "does not exist"),
    (["eval", "--model", "MODEL", "--dataset", "wikitext3"], "Accepted: one of wikitext2"),
    (["eval", "--model", "MODEL", "--dataset", "EMPTY", "--seqlen", "16"], "empty"),
    (["eval", "--model", "MODEL", "--dataset", "TEXT", "--seqlen", "4096"], "exceeds the model's maximum of 256"),
    (["frobnicate"], "unknown command"),
])
def test_bad_input_exits_2_with_a_message(argv, message, model_dir, text_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    substitutions = {"MODEL": str(model_dir), "EMPTY": str(empty), "TEXT": str(text_file)}
    argv = [substitutions.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err
