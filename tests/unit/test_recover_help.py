"""`prunetune recover --help` is a page a person reads: grouped, plain text, one screen; `--help-all` has the rest."""

import re

import pytest

from prunetune.cli import main


def help_text(flag, capsys, monkeypatch, columns=80):
    monkeypatch.setenv("COLUMNS", str(columns))  # a plain terminal: the narrowest the help must read well in
    with pytest.raises(SystemExit) as exit_info:
        main(["recover", flag])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_is_short_grouped_and_plain(capsys, monkeypatch):
    text = help_text("--help", capsys, monkeypatch)
    lines = text.splitlines()
    assert len(lines) <= 60, len(lines)
    headings = [line for line in lines if re.match(r"^[a-z][^ ].*:$", line)]
    titles = [h.split(" ")[0].rstrip(":") for h in headings]
    assert titles == ["model", "data", "recovery", "training", "examples"], headings  # prunetune's own first
    training = text[text.index("\ntraining"):text.index("\nexamples:")]
    for flag in ("--output_dir", "--learning_rate", "--per_device_train_batch_size", "--num_train_epochs", "--max_steps",
                 "--do_train", "--do_eval"):
        assert f"  {flag}" in training, flag
    assert "--adam_beta1" not in text and "--help-all" in text
    assert "``" not in text and "(default: None)" not in text
    for line in lines:  # nothing says "default: X" and then "(default: Y)"
        assert not ("default:" in line.lower().replace("(default:", "") and "(default:" in line), line
    # each example on its own lines, each continued with a trailing backslash only
    example = text[text.index("examples:"):].splitlines()[1:4]
    assert example[0].lstrip().startswith("prunetune recover") and all(line.endswith(" \\") for line in example[:2])
    assert all("\\" not in line.rstrip("\\") for line in lines)
    # how to get more or less output: in --help-all
    full = help_text("--help-all", capsys, monkeypatch)
    assert "-v" in full and "-q" in full and "progress bar" in full


def test_help_entries_state_their_default_once(capsys, monkeypatch):
    for flag in ("--help", "--help-all"):  # the same entries on both
        text = " ".join(help_text(flag, capsys, monkeypatch, columns=200).split())
        entry = lambda name: text[text.index(f" {name} ", text.index("model:")):].split(" --")[1]  # noqa: E731
        assert entry("--block_size") == "block_size N Training sequence length in tokens. Default: the model's context, capped at 1024."
        assert entry("--lora_r") == "lora_r N LoRA rank. (default: 8)"
    assert entry("--tokenizer_name") == "tokenizer_name PATH Tokenizer to use (default: the model's)."


def test_help_all_lists_every_trainer_option_in_plain_text(capsys, monkeypatch):
    text = help_text("--help-all", capsys, monkeypatch)
    assert "--adam_beta1" in text and "--torch_dtype" in text and "--streaming" in text
    assert "other Trainer options" in text
    assert "``" not in text and "(default: None)" not in text and "[`" not in text
    assert text.index("\nmodel:") < text.index("\ntraining") < text.index("\nother Trainer options")


def test_top_level_usage_mentions_verbose_and_quiet(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "-v" in out and "-q" in out
    assert main(["-q", "-v", "recover"]) == 2
    assert "contradict" in capsys.readouterr().err
