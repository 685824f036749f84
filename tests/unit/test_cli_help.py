"""Every command's ``--help`` is one screen with examples that parse; ``--help-all`` lists every flag.

The page of a command is :data:`prunetune.commands.common.HELP_PAGES`; its flags' help comes from the
parser, so each name there must be a real flag, and each example must parse with the real parser.
"""

from __future__ import annotations

import importlib
import re
import shlex

import pytest

from prunetune.cli import COMMANDS, main
from prunetune.commands import recover
from prunetune.commands.common import HELP_PAGES, flag_action, flag_count

SCREEN = 60  # lines of one terminal screen


def parser_of(command: str):
    return importlib.import_module(COMMANDS[command][0]).build_parser()


def help_of(command: str, flag: str, capsys, monkeypatch, columns: int = 80) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))  # a plain terminal: the narrowest the page must fit in
    with pytest.raises(SystemExit) as exit_info:
        main([command, flag])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def examples_of(text: str) -> list[list[str]]:
    """The argv after ``prunetune`` of each invocation under ``examples:``, continuation lines joined."""
    block = text[text.index("\nexamples:\n") + len("\nexamples:\n"):].split("\n\n")[0]
    return [shlex.split(line)[1:] for line in block.replace("\\\n", " ").splitlines()]


def test_every_command_has_a_page():
    assert set(HELP_PAGES) == set(COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("columns", [80, 100])
def test_help_fits_one_screen_and_ends_with_the_way_to_all_flags(command, columns, capsys, monkeypatch):
    text = help_of(command, "--help", capsys, monkeypatch, columns)
    lines = text.rstrip("\n").splitlines()
    assert len(lines) <= SCREEN, f"prunetune {command} --help: {len(lines)} lines"
    assert all(len(line) <= columns for line in lines), [line for line in lines if len(line) > columns]
    count = flag_count(parser_of(command))
    assert lines[-1] == f"All {count} flags: prunetune {command} --help-all"
    assert "``" not in text and "%(" not in text


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_the_essential_flags_in_their_groups(command, capsys, monkeypatch):
    text = help_of(command, "--help", capsys, monkeypatch)
    position = 0
    for title, names in HELP_PAGES[command].groups:
        position = text.index(f"\n{title}:\n", position)
        for name in names:
            shown = name if name.startswith("-") else f"  {name} "
            assert shown in text[position:], (command, name)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_essential_name_is_a_flag_of_the_command(command):
    parser = parser_of(command)
    for _, names in HELP_PAGES[command].groups:
        for name in names:
            try:
                flag_action(parser, name)
            except KeyError:
                pytest.fail(f"HELP_PAGES[{command!r}] names {name}, which prunetune {command} does not take")
    for name in HELP_PAGES[command].brief:
        assert any(name in names for _, names in HELP_PAGES[command].groups), name


def parse_example(command: str, argv: list[str]):
    if command == "recover":
        return recover.parse(argv)
    return parser_of(command).parse_args(argv)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_examples_parse_with_the_real_parser(command, capsys, monkeypatch):
    text = help_of(command, "--help", capsys, monkeypatch)
    examples = examples_of(text)
    assert 2 <= len(examples) <= 3, examples
    for argv in examples:
        assert argv[0] == command, argv
        parse_example(command, argv[1:])  # an unknown flag or a bad value raises UsageError


def test_a_broken_example_would_be_caught():
    from prunetune.errors import UsageError

    with pytest.raises(UsageError, match="--sparsity_rato"):
        parse_example("prune", ["--model", "tiny", "--sparsity_rato", "0.5"])


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_all_lists_every_flag_of_the_parser(command, capsys, monkeypatch):
    """Each option by one of its names (recover: --x, not also --x-dash and --no_x, which its help explains)."""
    text = help_of(command, "--help-all", capsys, monkeypatch)
    names_of = {}
    for action in parser_of(command)._actions:
        names_of.setdefault(action.dest, []).extend(action.option_strings or [action.dest])
    missing = []
    for names in names_of.values():
        if not any(re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) for name in names):
            missing.append(names[0])
    assert not missing, f"prunetune {command} --help-all lacks {missing}"
    assert "--help-all" in text


def test_a_flag_added_to_a_parser_shows_in_help_all_not_in_help(capsys):
    parser = parser_of("prune")
    parser.add_argument("--brand_new_flag", help="added after the help pages")
    with pytest.raises(SystemExit):
        parser.parse_args(["--help-all"])
    assert "--brand_new_flag" in capsys.readouterr().out
    assert "--brand_new_flag" not in parser.format_help()
    assert parser.format_help().rstrip().endswith(f"All {flag_count(parser)} flags: prunetune prune --help-all")


def test_help_all_of_recover_keeps_the_trainer_options(capsys, monkeypatch):
    text = help_of("recover", "--help-all", capsys, monkeypatch)
    short = help_of("recover", "--help", capsys, monkeypatch)
    assert "--adam_beta1" in text and "--adam_beta1" not in short
    assert len(text.splitlines()) > 4 * SCREEN


def test_top_level_help_names_help_all(capsys):
    assert main(["--help"]) == 0
    assert "--help-all" in capsys.readouterr().out
