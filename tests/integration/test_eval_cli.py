"""`prunetune eval` says which text it scored: a file named for evaluation whole, the ptb protocol for a local
PTB file, and base + adapter in the result line."""

import json
import random

import pytest

from prunetune.cli import main
from prunetune.data import load_documents
from prunetune.loading import load_tokenizer

WORDS = "the model prunes weights and recovers accuracy with low rank adapters sparse masks".split()


def write_lines(path, count, seed=0, indent=""):
    rng = random.Random(seed)
    path.write_text("".join(f"{indent}{' '.join(rng.choice(WORDS) for _ in range(10))} \n" for _ in range(count)))
    return path


def run_eval(capsys, *argv):
    assert main(["eval", "--model", "tiny", "--device", "cpu", "--seqlen", "32", *argv]) == 0
    out = capsys.readouterr().out
    return out.splitlines()[0], json.loads(out[out.index("{"):])


def test_a_file_named_for_a_split_is_scored_whole(tmp_path, capsys):
    named = write_lines(tmp_path / "test.txt", 200)
    line, result = run_eval(capsys, "--dataset", str(named), "--split", "test")
    assert "whole (200 lines" in line and "held-out" not in line
    other = write_lines(tmp_path / "notes.txt", 200)
    line, held = run_eval(capsys, "--dataset", str(other), "--split", "test")
    # a file that is not named for evaluation keeps its hold-out, and the line says exactly which part
    assert "held-out first 5% of lines (10 of 200)" in line
    assert held["windows"] < result["windows"]
    # a file that may also train (recover, a pipeline) keeps its hold-out: only evaluation-only callers read it whole
    assert "(190 of 200" in load_documents(str(named), "train").description
    assert "held-out first 5% of lines (10 of 200)" in load_documents(str(named), "test").description
    assert "whole (200 lines" in load_documents(str(named), "test", named_file_whole=True).description


def test_a_local_ptb_file_gets_the_papers_ptb_protocol(tmp_path, capsys):
    file = write_lines(tmp_path / "ptb.test.txt", 120, indent=" ")
    documents = load_documents(f"ptb:{file}", "test", named_file_whole=True)
    sentences = [line.strip() for line in file.read_text().splitlines()]
    assert documents.joined() == " ".join(sentences)  # ptb_text_only's sentences, joined as the papers do
    assert documents.joined() != load_documents(str(file), "test", named_file_whole=True).joined()  # as plain text
    # a caller that may train on it (recover, a pipeline) holds the first 5% out, as for any single file
    assert load_documents(f"ptb:{file}", "test").joined() == " ".join(sentences[:6])
    assert load_documents(f"ptb:{file}", "train").joined() == " ".join(sentences[6:])
    line, result = run_eval(capsys, "--dataset", f"ptb:{file}")
    assert "by the papers' ptb protocol" in line and "whole (120 lines" in line
    tokenizer = load_tokenizer("tiny")
    assert result["windows"] == len(tokenizer(" ".join(sentences)).input_ids) // 32


def test_the_ptb_route_is_documented_in_help_and_offline(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["eval", "--help-all"])
    assert "ptb:PATH/ptb.test.txt" in capsys.readouterr().out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "--model", "tiny", "--dataset", "ptb", "--cache_dir", str(tmp_path / "empty")]) == 2
    assert "give ptb:FILE, e.g. ptb:data/ptb.test.txt" in " ".join(capsys.readouterr().err.split())
    assert main(["eval", "--model", "tiny", "--dataset", f"ptb:{tmp_path / 'missing.txt'}"]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_the_result_line_names_base_and_adapter(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from prunetune.loading import load_model

    adapter = tmp_path / "adapter"
    get_peft_model(load_model("tiny"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    line, _ = run_eval(capsys, "--dataset", "builtin", "--max_windows", "2", "--lora_weights", str(adapter))
    assert line.startswith(f"tiny + adapter {adapter} on builtin")


def test_unavailable_default_data_is_refused_before_the_weights_load(tmp_path, capsys, monkeypatch):
    import prunetune.commands.eval
    from factories import save_model_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_model_folder(tmp_path / "model", "llama")

    def refuse(*args, **kwargs):
        raise AssertionError("the weights loaded before the data was checked")

    monkeypatch.setattr(prunetune.commands.eval, "load_model", refuse)
    assert main(["eval", "--model", str(tmp_path / "model"), "--cache_dir", str(tmp_path / "empty")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("prunetune: error: --dataset wikitext2: this dataset comes from the Hugging Face Hub")
    assert captured.out == ""
