"""Argument groups shared by several subcommands."""

from __future__ import annotations

import argparse
import json

from prunetune.defaults import PAPER_DATA, default_data  # noqa: F401  (default_data: every command's data defaults)
from prunetune.loading import DTYPES, LoadOptions, check_device


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
