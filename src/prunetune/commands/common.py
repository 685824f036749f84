"""Argument groups shared by several subcommands."""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys

from prunetune.defaults import PAPER_DATA, default_data  # noqa: F401  (default_data: every command's data defaults)
from prunetune.errors import UsageError
from prunetune.loading import DTYPES, LoadOptions, check_device

_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+(\.\d*)?e[-+]?\d+$", re.IGNORECASE)  # a negative value, not a flag


class CommandParser(argparse.ArgumentParser):
    """The parser of every prunetune command: whole flag names only, and one short paragraph on a mistake.

    argparse's prefix matching (``--learning_rat`` read as ``--learning_rate``) is off, an unknown
    flag is named with the closest accepted ones, and any other parse error is a :class:`UsageError`
    (exit 2, no usage dump) instead of argparse's usage block.
    """

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        # Unknown flags first: otherwise a misspelt --model reads as a missing one.
        for token in args:
            if token == "--":
                break
            flag = token.split("=", 1)[0]
            if token.startswith("-") and len(token) > 1 and not _NUMBER.match(token) and flag not in self._option_string_actions:
                raise UsageError(unknown_flag(self.prog, flag, list(self._option_string_actions)))
        return super().parse_args(args, namespace)

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}. {self.prog} --help lists the options.")


def unknown_flag(prog: str, flag: str, options: list[str]) -> str:
    """The message for a flag ``prog`` does not take, naming the closest ones it does."""
    close = difflib.get_close_matches(flag, options, n=3)
    hint = ""
    if close:
        hint = f"did you mean {close[0] if len(close) == 1 else ', '.join(close[:-1]) + ' or ' + close[-1]}? "
    return f"Unknown option {flag!r} for {prog}; {hint}{prog} --help lists the accepted options."


def add_model_arguments(parser: argparse.ArgumentParser, dtype_default: str = "auto") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="hub id, local model folder, or 'tiny' (the bundled model)")
    group.add_argument("--dtype", default=dtype_default, choices=sorted(DTYPES), help="weights dtype (default: %(default)s)")
    group.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    group.add_argument("--device_map", default=None, help="from_pretrained device_map, e.g. 'auto' for models larger than one GPU")
    group.add_argument("--cache_dir", default=None, help="Hugging Face cache folder")
    group.add_argument("--trust_remote_code", action="store_true", help="allow code shipped with a hub model to run (off by default)")


def load_options(args: argparse.Namespace) -> LoadOptions:
    """LoadOptions from the model flags; a --device this machine lacks is a UsageError here, before loading."""
    device = check_device(args.device, "--device")
    if device is None and args.device_map is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return LoadOptions(dtype=args.dtype, device=device, device_map=args.device_map,
                       trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir)


# What --help says of a default data flag: the rule of prunetune.defaults.default_data.
DEFAULT_DATA_HELP = {role: f"default: builtin for tiny and for models and adapters made from it (their prunetune.json "
                            f"says so), else {paper}" for role, paper in PAPER_DATA.items()}


def print_json(payload) -> None:
    print(json.dumps(payload, indent=2, default=str))
