"""Every ``prunetune ...`` command shown in README.md and docs/ parses with the real CLI.

Running them all would take hours, so each is checked against the command's own parser instead:
the subcommand exists, every ``--flag`` is one it accepts, and a shipped config it names exists.
A renamed or removed flag then fails here, not in a reader's terminal.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from prunetune.cli import COMMANDS
from prunetune.commands.common import CommandParser

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
LAUNCH = re.compile(r"(?:^|\s)(?:prunetune|-m prunetune\.cli)\s")

if not (ROOT / "README.md").exists():
    pytest.skip("not a source checkout", allow_module_level=True)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def shown_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after ``prunetune``) for every prunetune command in a code block."""
    found = []
    for path in doc_files():
        for block in FENCE.findall(path.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                if not LAUNCH.search(line):
                    continue
                try:
                    tokens = shlex.split(line, comments=True)
                except ValueError:  # an unterminated quote: a python -c "..." block spanning lines
                    continue
                for segment in " ".join(shlex.quote(t) for t in tokens).split(" '&&' "):
                    words = shlex.split(segment)
                    if "prunetune" in words:
                        argv = words[words.index("prunetune") + 1:]
                    elif "prunetune.cli" in words:
                        argv = words[words.index("prunetune.cli") + 1:]
                    else:
                        continue
                    found.append((f"{path.relative_to(ROOT)}: {line.strip()[:90]}", argv))
    return found


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(command: str):
    """The command's argparse parser, without running the command."""
    module = importlib.import_module(COMMANDS[command][0])
    if hasattr(module, "build_parser"):
        return module.build_parser()

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    original = CommandParser.parse_args
    CommandParser.parse_args = capture
    try:
        module.main([])
    except _Captured as captured:
        return captured.parser
    finally:
        CommandParser.parse_args = original
    raise AssertionError(f"prunetune {command} built no parser")


def test_the_docs_show_commands():
    commands = {argv[0] for _, argv in shown_commands() if argv}
    assert {"prune", "recover", "eval", "merge", "run", "demo", "sparsity"} <= commands


def test_every_shown_command_uses_a_known_subcommand_and_known_flags():
    parsers, problems = {}, []
    for where, argv in shown_commands():
        while argv and argv[0] in ("-v", "-vv", "-q", "--verbose", "--quiet"):
            argv = argv[1:]
        if not argv or argv[0] in ("--help", "-h", "--version", "COMMAND"):
            continue
        command, rest = argv[0], argv[1:]
        if command not in COMMANDS:
            problems.append(f"{where}: unknown command {command!r}")
            continue
        if command not in parsers:
            parsers[command] = set(parser_of(command)._option_string_actions)
        for token in rest:
            if token.startswith("-") and token not in ("-", "...") and not re.fullmatch(r"-\d.*", token):
                flag = token.split("=", 1)[0]
                if flag not in parsers[command]:
                    problems.append(f"{where}: prunetune {command} has no flag {flag}")
            elif command == "run" and token.startswith("src/") and not (ROOT / token).exists():
                problems.append(f"{where}: {token} does not exist")
    assert not problems, "\n".join(problems)


def test_a_wrong_flag_is_caught():
    flags = set(parser_of("eval")._option_string_actions)
    assert "--seqlen" in flags and "--max_window" not in flags
