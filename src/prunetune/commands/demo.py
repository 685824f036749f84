"""prunetune demo: the whole workflow on the bundled tiny model and the builtin corpus, offline.

Dense; magnitude, Wanda and SparseGPT at 50% unstructured and 2:4; then lora, masked_lora
and full recovery of the Wanda 50% model, and full distilled from the dense model, with
held-out perplexity every 5 steps; then each
configuration's per-layer output error. Prints a line per stage as it starts and ends, then
the results table, and writes report.md with plots (default folder runs/demo; re-running
reuses every finished stage). About 2 minutes on 2 idle CPU cores.
"""

from __future__ import annotations

from pathlib import Path

from prunetune.commands.common import CommandParser, add_help_pages
from prunetune.commands.run import add_run_arguments, execute, overrides
from prunetune.pipeline import load_config

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def build_parser() -> CommandParser:
    parser = CommandParser(prog="prunetune demo", description=__doc__)
    add_run_arguments(parser)
    return add_help_pages(parser, "demo")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    return execute(load_config(DEMO_CONFIG, overrides(args)), quiet=args.quiet)
