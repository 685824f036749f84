"""The command line: ``python -m prunetune``, no prefix matching of flags, and a short message for a mistyped flag."""

import subprocess
import sys

import pytest

from prunetune.cli import main


def test_python_dash_m_prunetune_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "prunetune", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("prunetune ")
