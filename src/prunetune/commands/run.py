"""prunetune run CONFIG.yaml: prune -> recover -> evaluate -> merge/export -> report.

Stages whose outputs are complete and whose inputs are unchanged are reused, so a re-run
after a crash, or after adding a method to the config, only does what is missing. A line
per stage says what runs (stderr); --no_progress hides the bars, -q both.
"""

from __future__ import annotations

import argparse
import sys

from prunetune.commands.common import CommandParser, add_help_pages
from prunetune.pipeline import load_config, run_pipeline


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default=None, help="override the config's output_dir")
    parser.add_argument("--device", default=None, help="override the config's device (cpu, cuda, ...)")
    parser.add_argument("--no_progress", action="store_true",
                        help="hide progress bars (one line per stage is still printed, to stderr)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the results table: no stage lines, no bars")


def overrides(args: argparse.Namespace) -> dict:
    values = {"output_dir": args.output_dir, "device": args.device}
    result = {k: v for k, v in values.items() if v is not None}
    if args.no_progress or args.quiet:
        result["progress"] = False
    return result


def print_stage(event) -> None:
    """One line per stage as it starts and ends (``[3/11] prune wanda 50%: running…``), on stderr with the bars."""
    print(event.line(), file=sys.stderr, flush=True)


def execute(config, quiet: bool = False) -> int:
    result = run_pipeline(config, listener=None if quiet else print_stage)
    print(result.table)
    print()
    print(f"stages run: {len(result.executed)}, reused: {len(result.reused)}")
    print(f"report: {result.report_path}")
    return 0


def build_parser() -> CommandParser:
    parser = CommandParser(prog="prunetune run", description=__doc__)
    parser.add_argument("config", help="a YAML or JSON pipeline config (see src/prunetune/configs/)")
    add_run_arguments(parser)
    return add_help_pages(parser, "run")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    return execute(load_config(args.config, overrides(args)), quiet=args.quiet)
