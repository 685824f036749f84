"""Argument groups shared by several subcommands, and the one ``--help`` / ``--help-all`` of every command.

``--help`` is a page: a paragraph, the flags of a first run (:data:`HELP_PAGES`), examples that run, and
the count of all flags; ``--help-all`` is argparse's (or the command's own) full help, so a flag added to a
parser shows there without any change here.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import re
import shutil
import sys
import textwrap
from typing import Callable

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


# --------------------------------------------------------------------------- help


@dataclasses.dataclass(frozen=True)
class HelpPage:
    """What ``prunetune COMMAND --help`` shows; everything else is in ``--help-all``.

    Args:
        summary: one paragraph: what the command does and writes.
        groups: (title, names) in order; a name is a flag (``--model``) or a positional's dest (``config``).
        examples: two or three invocations that run as written (tests parse each with the real parser).
        usage: the usage line (default: the command, its required flags and positionals, then [options]).
        brief: a shorter help for a flag whose own (in ``--help-all``) runs over several lines.
    """

    summary: str
    groups: tuple[tuple[str, tuple[str, ...]], ...]
    examples: tuple[str, ...]
    usage: str | None = None
    brief: dict[str, str] = dataclasses.field(default_factory=dict)


HELP_PAGES = {
    "prune": HelpPage(
        "Prune a model with magnitude, Wanda or SparseGPT, unstructured or N:M, calibrated on a few text windows; "
        "measures perplexity before and after (on the model's default evaluation text; --eval_dataset none skips "
        "it) and writes the pruned model with --save_model. Everything is checked before the weights load.",
        (("model", ("--model", "--dtype", "--device")),
         ("pruning", ("--prune_method", "--sparsity_ratio", "--sparsity_type", "--sparsity_profile")),
         ("calibration", ("--calib_dataset", "--nsamples", "--seqlen")),
         ("evaluation and outputs", ("--eval_dataset", "--save_model", "--overwrite_output_dir"))),
        ("prunetune prune --model tiny --prune_method wanda --sparsity_ratio 0.5 \\\n"
         "    --save_model out/tiny-wanda50",
         "prunetune prune --model smollm2-135m --prune_method sparsegpt \\\n"
         "    --sparsity_type 2:4 --nsamples 128 --seqlen 512 \\\n"
         "    --save_model out/smollm2-sparsegpt-2of4",
         "prunetune prune --model tiny --sparsity_ratio 0.7 --sparsity_profile owl \\\n"
         "    --eval_dataset none --save_model out/tiny-owl70"),
        brief={"--sparsity_profile": "uniform (default); owl: blocks with more outlier scores keep more weights; or "
                                     "a JSON/YAML file of per-block ratios (unstructured only)",
               "--calib_dataset": "calibration data: wikitext2, c4, ptb, builtin, or a local text file or folder "
                                  "(default: builtin for tiny and models made from it, else c4)",
               "--eval_dataset": "perplexity before and after pruning on this data, or none to skip (default: "
                                 "builtin for tiny and models made from it, else wikitext2)"}),
    "recover": HelpPage(
        "Recover a pruned model's accuracy without losing its sparsity: train a LoRA adapter (lora), an adapter "
        "confined to the kept weights (masked_lora) or the kept weights themselves (full), then check that every "
        "pruned weight is still zero. Perplexity is scored on text the model did not train on. Takes run_clm.py's "
        "flags, or one .yaml file of the same keys; switches take an optional true/false (--do_train false).",
        (("model", ("--model_name_or_path",)),
         ("data", ("--dataset_name", "--train_file", "--block_size", "--max_train_samples")),
         ("recovery", ("--recovery_method", "--lora_r", "--distill_from")),
         ("training", ("--output_dir", "--do_train", "--do_eval", "--learning_rate", "--per_device_train_batch_size",
                       "--max_steps", "--num_train_epochs"))),
        ("prunetune recover --model_name_or_path out/tiny-wanda50 \\\n"
         "    --recovery_method masked_lora --max_steps 20 --do_train --do_eval \\\n"
         "    --output_dir out/tiny-masked_lora",
         "prunetune recover --model_name_or_path out/smollm2-wanda50 \\\n"
         "    --recovery_method masked_lora --dataset_name c4 --block_size 512 \\\n"
         "    --max_train_samples 2000 --learning_rate 1e-4 --do_train --do_eval \\\n"
         "    --output_dir out/smollm2-masked_lora"),
        usage="prunetune recover --model_name_or_path PRUNED --output_dir OUT [options]\n"
              "       prunetune recover ARGS.yaml   (the same keys, without the leading --)",
        brief={"--dataset_name": "Training data: builtin, wikitext2, c4, ptb, or a local file or folder. Default: "
                                 "builtin for tiny and models pruned from it, else c4.",
               "--train_file": "A local training text, instead of --dataset_name; without --validation_file, part "
                               "of it is held out for evaluation.",
               "--recovery_method": "lora, masked_lora (merging keeps the sparsity exactly), full, or blockwise "
                                    "(from --distill_from). (default: lora)",
               "--distill_from": "Distil from the dense model the student was pruned from."}),
    "eval": HelpPage(
        "Perplexity of a model, optionally with a LoRA adapter, on text it did not train on (the result line "
        "says which text), and/or zero-shot accuracy on lm-eval tasks (--tasks).",
        (("model", ("--model", "--lora_weights", "--device")),
         ("perplexity", ("--dataset", "--split", "--seqlen", "--max_windows", "--batch_size")),
         ("zero-shot accuracy", ("--tasks", "--limit")),
         ("output", ("--json",))),
        ("prunetune eval --model tiny --dataset builtin --max_windows 8",
         "prunetune eval --model out/smollm2-wanda50 \\\n"
         "    --lora_weights out/smollm2-masked_lora --dataset wikitext2 --seqlen 512",
         "prunetune eval --model smollm2-135m --tasks boolq,rte --limit 200 \\\n"
         "    --json smollm2-zeroshot.json"),
        brief={"--dataset": "evaluation data: wikitext2, c4, ptb, builtin, or a local text file or folder (default: "
                            "builtin for tiny and models made from it, else wikitext2; with --tasks: none)",
               "--split": "split of builtin/wikitext2/ptb data (default: test)",
               "--tasks": "lm-eval tasks, comma-separated, e.g. boolq,rte,hellaswag (pip install \"prunetune[zeroshot]\")"}),
    "merge": HelpPage(
        "Fold a recovery adapter into its pruned model and save a plain model. A masked_lora adapter merges "
        "with the sparsity intact; a plain lora adapter densifies what it adapted, so merging it needs "
        "--allow_dense (keep the dense merge) or --remask (re-apply the pruned mask; its perplexity cost is "
        "measured).",
        (("model", ("--model", "--adapter", "--save_model")),
         ("plain LoRA", ("--allow_dense", "--remask")),
         ("output", ("--overwrite_output_dir", "--json"))),
        ("prunetune merge --model out/tiny-wanda50 --adapter out/tiny-masked_lora \\\n"
         "    --save_model out/tiny-recovered",
         "prunetune merge --model out/smollm2-wanda50 --adapter out/smollm2-lora \\\n"
         "    --remask --save_model out/smollm2-remasked"),
        usage="prunetune merge --model PRUNED --adapter DIR --save_model OUT [options]"),
    "sparsity": HelpPage(
        "Per-block, per-module and overall sparsity of a model, as a table or JSON; for a model pruned with a "
        "non-uniform --sparsity_profile, the per-block ratios asked for beside the measured ones.",
        (("arguments", ("model", "--json")),),
        ("prunetune sparsity out/tiny-wanda50",
         "prunetune sparsity out/smollm2-recovered --json -")),
    "run": HelpPage(
        "Run a pipeline from a YAML config: prune -> recover -> evaluate -> merge/export -> report. Stages whose "
        "outputs are complete and whose inputs are unchanged are reused, so a re-run only does what is missing.",
        (("arguments", ("config", "--output_dir", "--device", "--no_progress", "--quiet")),),
        ("prunetune run src/prunetune/configs/tiny-prune-table.yaml \\\n"
         "    --output_dir runs/table",
         "prunetune run src/prunetune/configs/smollm2-135m.yaml --no_progress")),
    "demo": HelpPage(
        "The whole workflow on the bundled tiny model and builtin text, offline: magnitude, Wanda and SparseGPT "
        "pruning, lora / masked_lora / full recovery, held-out perplexity, then the results table and "
        "report.md with plots (default folder runs/demo; a re-run reuses every finished stage).",
        (("arguments", ("--output_dir", "--device", "--no_progress", "--quiet")),),
        ("prunetune demo",
         "prunetune demo --output_dir runs/demo-cpu --device cpu --no_progress")),
}


def flag_action(parser: argparse.ArgumentParser, name: str) -> argparse.Action:
    """The action of a flag (``--model``) or of a positional (by its dest); KeyError if the parser has none."""
    if name.startswith("-"):
        return parser._option_string_actions[name]
    for action in parser._actions:
        if not action.option_strings and action.dest == name:
            return action
    raise KeyError(name)


def flag_count(parser: argparse.ArgumentParser) -> int:
    """Flags of a parser, an option and its aliases (--x, --x-dash, --no_x) counted once, help flags not at all."""
    return len({action.dest for action in parser._actions
                if action.option_strings and action.dest not in ("help", argparse.SUPPRESS)})


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Never breaks inside a flag, path or URL: help is copied from."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)


def help_width() -> int:
    return min(shutil.get_terminal_size((100, 24)).columns, 100)


def brief_metavar(action: argparse.Action) -> str | None:
    """A metavar short enough for the flag and its help to share a line: N, X, {a,b}, or the dest if short."""
    if action.metavar is not None or not action.option_strings or action.nargs == 0:
        return action.metavar
    if action.type is int:
        return "N"
    if action.type is float:
        return "X"
    if action.choices and len(",".join(map(str, action.choices))) <= 24:
        return "{" + ",".join(map(str, action.choices)) + "}"
    if action.dest.endswith(("_dir", "_file", "_path", "_weights", "_model")):
        return "PATH"
    return action.dest.upper() if len(action.dest) <= 10 else "VALUE"


def brief_action(action: argparse.Action, help_text: str | None = None) -> argparse.Action:
    """The action as ``--help`` shows it: a short metavar, and ``help_text`` instead of its own help if given."""
    shown = copy.copy(action)
    shown.metavar = brief_metavar(action)
    if help_text is not None:
        shown.help = help_text
    return shown


def short_help(parser: argparse.ArgumentParser, command: str,
               entry: Callable[[argparse.Action], argparse.Action] | None = None) -> str:
    """``prunetune COMMAND --help``: :data:`HELP_PAGES` [command] with each flag's help from ``parser``.

    ``entry`` turns a parser's action into the one shown (default: :func:`brief_action`; recover: plain text,
    its default stated once); a :attr:`HelpPage.brief` text replaces the help it gives.
    """
    page, width = HELP_PAGES[command], help_width()
    prog = f"prunetune {command}"
    if page.usage is None:
        required = [action for action in parser._actions if action.required or not action.option_strings]
        parts = [action.option_strings[0] + " " + brief_metavar(action) if action.option_strings
                 else (action.metavar or action.dest.upper()) for action in required]
        usage = " ".join([prog, *parts, "[options]"])
    else:
        usage = page.usage
    examples = "\n".join("  " + line for example in page.examples for line in example.splitlines())
    display = argparse.ArgumentParser(
        prog=prog, usage=usage, add_help=False,
        description=textwrap.fill(page.summary, width - 2, break_long_words=False, break_on_hyphens=False),
        epilog=f"examples:\n{examples}\n\nAll {flag_count(parser)} flags: {prog} --help-all",
        formatter_class=lambda prog: HelpFormatter(prog, max_help_position=30, width=width))
    for title, names in page.groups:
        group = display.add_argument_group(title)
        for name in names:
            shown = (entry or brief_action)(flag_action(parser, name))
            group._add_action(brief_action(shown, page.brief[name]) if name in page.brief else shown)
    return display.format_help()


class _HelpAll(argparse.Action):
    def __init__(self, option_strings, dest, full_help=None, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)
        self.full_help = full_help

    def __call__(self, parser, namespace, values, option_string=None):
        print(self.full_help())
        parser.exit()


def add_help_pages(parser: argparse.ArgumentParser, command: str, full_help: Callable[[], str] | None = None,
                   entry: Callable[[argparse.Action], argparse.Action] | None = None) -> argparse.ArgumentParser:
    """``--help``: the short page of :data:`HELP_PAGES`; ``--help-all``: ``full_help()`` (default: the parser's own
    argparse help, which lists every flag added to it, before or after this call)."""
    full_help = full_help or parser.format_help  # bound now: the class's method, before the override below
    parser.add_argument("--help-all", "--help_all", action=_HelpAll, full_help=full_help,
                        help="every option, with what each one does")
    parser.format_help = lambda: short_help(parser, command, entry)
    return parser
