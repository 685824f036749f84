"""The command line: ``python -m prunetune``, no prefix matching of flags, and a short message for a mistyped flag."""

import subprocess
import sys

import pytest

from prunetune.cli import main


def test_python_dash_m_prunetune_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "prunetune", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("prunetune ")


@pytest.mark.parametrize("argv, typo, meant", [
    (["prune", "--model", "tiny", "--sparsity_rat", "0.5"], "--sparsity_rat", "--sparsity_ratio"),
    (["eval", "--model", "tiny", "--max_window", "2"], "--max_window", "--max_windows"),
    (["merge", "--model", "tiny", "--adapter", "a", "--save_model", "m", "--allow_dens"], "--allow_dens", "--allow_dense"),
    (["sparsity", "tiny", "--jso", "-"], "--jso", "--json"),
    (["run", "config.yaml", "--output_di", "x"], "--output_di", "--output_dir"),
    (["demo", "--no_progres"], "--no_progres", "--no_progress"),
    (["recover", "--model_name_or_path", "tiny", "--output_dir", "o", "--learning_rat", "1e-4"], "--learning_rat",
     "--learning_rate"),
])
def test_a_prefix_of_a_flag_is_not_taken_for_the_flag(capsys, argv, typo, meant):
    """argparse would read --learning_rat as --learning_rate, silently; every command refuses it, naming the flag."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"Unknown option '{typo}' for prunetune {argv[0]}; did you mean {meant}" in err
    assert "usage:" not in err and len(err.splitlines()) <= 3


@pytest.mark.parametrize("command", ["prune", "eval", "merge", "sparsity", "run"])
def test_a_mistyped_flag_gets_a_suggestion_not_a_usage_dump(capsys, command):
    assert main([command, "--modle", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prunetune: error: Unknown option '--modle' for prunetune {command}")
    assert "usage:" not in err and len(err.splitlines()) <= 3


def test_other_parse_errors_are_one_paragraph_too(capsys):
    assert main(["prune", "--sparsity_ratio", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: --model" in err and "usage:" not in err
    assert main(["eval", "--model", "tiny", "--dtype", "float8"]) == 2
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_negative_numbers_are_values_not_flags(capsys):
    assert main(["prune", "--model", "tiny", "--sparsity_ratio", "-0.5", "--eval_dataset", "none"]) == 2
    err = capsys.readouterr().err
    assert "Unknown option" not in err and "-0.5" in err
