"""``prunetune recover``: win back a pruned model's accuracy without losing its sparsity.

Takes the Wanda LoRA recipe's and run_clm.py's flags (HfArgumentParser over model / data /
recovery / TrainingArguments dataclasses), or one .yaml/.json file of the same keys::

    prunetune recover --model_name_or_path PRUNED --train_file docs.txt --block_size 1024 \\
        --do_train --do_eval --max_train_samples 30000 --learning_rate 1e-4 \\
        --recovery_method masked_lora --output_dir OUT
    prunetune recover recover.yaml

``--help`` lists prunetune's options and the Trainer's few that matter, ``--help-all`` every one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import enum
import re
import typing

from prunetune import recipe
from prunetune.cli import configure_logging, progress_bars
from prunetune.commands.common import HELP_PAGES, HelpFormatter, add_help_pages, help_width
from prunetune.config import coerce, load_mapping
from prunetune.errors import UsageError
from prunetune.recipe.args import (
    ARGUMENT_CLASSES,
    TRAINER_OPTIONS,
    DataArguments,
    ModelArguments,
    RecoveryArguments,
    RecoveryTrainingArguments,
)
from prunetune.recipe.memory_estimate import report

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")

USAGE = HELP_PAGES["recover"].usage

DESCRIPTION = """\
Recover a pruned model's accuracy without losing its sparsity: train a LoRA
adapter (lora), an adapter confined to the kept weights (masked_lora) or the
kept weights themselves (full) with the transformers Trainer, then check that
every pruned weight is still zero. Takes the flags of the Wanda LoRA recipe and
of run_clm.py. Perplexity is always scored on text the model did not train on.

example:
  prunetune recover --model_name_or_path PRUNED --train_file docs.txt \\
      --block_size 1024 --max_train_samples 30000 --do_train --do_eval \\
      --learning_rate 1e-4 --recovery_method masked_lora --output_dir OUT"""

EPILOG = """\
output: a progress bar per training run (loss, tokens/s, time left) and per
  evaluation, then a summary. More: -v (prunetune -v recover ...) also logs the
  Trainer's metrics at every logging step (-vv: debug). Less: -q hides the bars
  and the warnings.
switches (--do_eval, --fp16, ...) take an optional true/false: --do_train false
  (or --no_do_train); every --snake_case flag is also accepted as --kebab-case.
run_clm.py's other flags work too: --torch_dtype (same as --dtype), --streaming;
  --dataset_config_name, --preprocessing_num_workers, --low_cpu_mem_usage,
  --overwrite_cache, --use_fast_tokenizer and --keep_linebreaks change nothing
  here (--help-all says why for each).
--help-all lists every option, the {others} other Trainer options included."""


def build_parser():
    from transformers import HfArgumentParser


    parser = HfArgumentParser(ARGUMENT_CLASSES, prog="prunetune recover", usage=USAGE, description=DESCRIPTION,
                              allow_abbrev=False)  # --learning_rat is a typo, not --learning_rate
    parser.error = _argument_error  # one paragraph instead of argparse's 150-line usage dump
    # --help: a page (commands/common.py's HELP_PAGES); --help-all: every dataclass field, grouped, below
    return add_help_pages(parser, "recover", full_help=lambda: format_help(parser), entry=shown_action)


# --------------------------------------------------------------------------- help


def help_groups() -> list[tuple[str, list[str]]]:
    """(title, field names) of --help-all: prunetune's options first, then the Trainer's."""
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    featured = set(TRAINER_OPTIONS)
    return [
        ("model", names(ModelArguments)),
        ("data", names(DataArguments)),
        ("recovery", names(RecoveryArguments)),
        ("training (the Trainer's options that matter here)", list(TRAINER_OPTIONS)),
        ("other Trainer options (transformers.TrainingArguments)",
         [n for n in names(RecoveryTrainingArguments) if n not in featured]),
    ]


def _plain(text: str) -> str:
    """Help text without reStructuredText / Markdown markup: ``x``, `x`, [`~a.b.X`] -> x, X."""
    text = re.sub(r"\[`~?([\w.]+)`\]", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    return re.sub(r"`([^`]*)`", r"\1", text)


def _default_text(value) -> str | None:
    """How a default reads in the help, or None when there is nothing to say."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or value is False or value == "" or value == [] or value is argparse.SUPPRESS:
        return None
    return str(value).replace("%", "%%")


def _metavar(action) -> str | None:
    if action.nargs == "?" and action.const is True:  # HfArgumentParser's booleans: --flag [true|false]
        return None if action.default in (False, None) else "BOOL"
    if getattr(action.type, "__name__", "") == "string_to_bool":
        return "BOOL"
    if action.choices and len(action.choices) <= 6:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    if action.type is int:
        return "N"
    if action.type is float:
        return "X"
    if action.dest.endswith(("_dir", "_file", "_or_path", "_name", "_checkpoint")):
        return "PATH" if not action.dest.startswith(("dataset", "run", "hub", "project")) else "NAME"
    return "VALUE"


def shown_action(action: argparse.Action) -> argparse.Action:
    """An option as the help shows it: its --snake_case name, plain text, its default stated once, a metavar
    saying its type (none for a switch)."""
    shown = copy.copy(action)
    shown.option_strings = [f"--{action.dest}"]
    shown.help = _plain(action.help or "")
    default = _default_text(action.default)
    if default is not None and "default" not in shown.help.lower():
        shown.help += f" (default: {default})"
    shown.metavar = _metavar(action)
    shown.nargs = 0 if shown.metavar is None else None  # a switch; else one value (true/false is optional)
    return shown


def format_help(parser) -> str:
    """``prunetune recover --help-all``: every option as plain text, grouped by purpose."""
    actions = {a.dest: a for a in parser._actions if f"--{a.dest}" in a.option_strings}
    featured_and_ours = {name for _, names in help_groups()[:4] for name in names}
    width = help_width()
    display = argparse.ArgumentParser(
        prog="prunetune recover", usage=USAGE, description=DESCRIPTION, add_help=False,
        epilog=EPILOG.format(others=sum(1 for d in actions if d not in featured_and_ours)),
        formatter_class=lambda prog: HelpFormatter(prog, max_help_position=30, width=width))
    for title, names in help_groups():
        group = display.add_argument_group(title)
        for name in names:
            if name in actions:
                group._add_action(shown_action(actions[name]))
    group = display.add_argument_group("help")
    group.add_argument("-h", "--help", action="store_true", help="A page: the flags of a first run, and examples.")
    group.add_argument("--help-all", action="store_true", help="Every option (this list).")
    return display.format_help()


def _argument_error(message: str):
    raise UsageError(f"{message} (prunetune recover --help lists the options and their types).")


def parse(argv: list[str]):
    """The four argument dataclasses from flags or from a single .yaml/.json file.

    Raises:
        UsageError: an unknown flag or key (naming the closest known ones), a value of the
            wrong type (argparse's message for flags), a file that is not a mapping or
            refers to itself, or a value out of range.
    """
    parser = build_parser()
    if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES):
        mapping = load_mapping(argv[0])
        if isinstance(mapping, dict) and mapping.get("memory_estimate") is True and not mapping.get("output_dir"):
            mapping = {**mapping, "output_dir": DRY_RUN_OUTPUT}
        parsed = parse_mapping(parser, mapping, argv[0])
    else:
        argv = _with_dry_run_output(argv)
        # Unknown flags first: otherwise a misspelt --output_dir reads as a missing one.
        _, remaining = parser.parse_known_args(args=argv)
        if remaining:
            raise UsageError(_unknown_argument(parser, remaining))
        parsed = parser.parse_args_into_dataclasses(args=argv)
    training = parsed[-1]
    if training.do_train and training.max_steps == 0:
        # The Trainer reads 0 as "no step limit" and trains every epoch: never what --max_steps 0 means.
        raise UsageError("--max_steps 0 is not accepted: the Trainer would read it as no limit and train "
                         f"--num_train_epochs {training.num_train_epochs:g} epochs. Give the number of steps to train "
                         "(1 or more), -1 to train by epochs, or --do_train false --do_eval to evaluate only.")
    return parsed


# A --memory_estimate dry run writes nothing, so it needs no --output_dir; the arguments still require one.
DRY_RUN_OUTPUT = "(--memory_estimate: nothing is written)"


def _flag_value(argv: list[str], names: tuple[str, ...]) -> bool | None:
    """The value of a boolean flag as HfArgumentParser reads it (``--x``, ``--x true``, ``--x=false``); None if absent."""
    from transformers.hf_argparser import string_to_bool

    value = None
    for i, item in enumerate(argv):
        flag, _, inline = item.partition("=")
        if flag not in names:
            continue
        given = inline or (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else "true")
        try:
            value = string_to_bool(given)
        except Exception:  # argparse reports the bad value itself
            return None
    return value


def _with_dry_run_output(argv: list[str]) -> list[str]:
    dry_run = _flag_value(argv, ("--memory_estimate", "--memory-estimate"))
    has_output = any(item.partition("=")[0] in ("--output_dir", "--output-dir") for item in argv)
    return [*argv, "--output_dir", DRY_RUN_OUTPUT] if dry_run and not has_output else argv


def _option_strings(parser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings]


def _unknown_argument(parser, remaining: list[str]) -> str:
    flags = [item for item in remaining if item.startswith("-")]
    if not flags:
        return (f"Unexpected argument {remaining[0]!r}: prunetune recover takes --flags, or a single .yaml/.json "
                "file of the same keys (see prunetune recover --help).")
    flag = flags[0].split("=", 1)[0]
    # Suggest in the user's spelling: every --snake_case flag also has a --kebab-case alias.
    dashed = "-" in flag.lstrip("-")
    options = [o for o in _option_strings(parser) if ("-" in o.lstrip("-")) == dashed] or _option_strings(parser)
    hint = _did_you_mean(difflib.get_close_matches(flag, options, n=3))
    return f"Unknown option {flag!r} for prunetune recover; {hint}prunetune recover --help lists the accepted options."


def _did_you_mean(names: list[str]) -> str:
    if not names:
        return ""
    return f"did you mean {names[0] if len(names) == 1 else ', '.join(names[:-1]) + ' or ' + names[-1]}? "


def parse_mapping(parser, data: dict, source: str):
    """The four dataclasses from an argument file's mapping, types checked per key first."""
    fields = {}
    for cls in parser.dataclass_types:
        hints = typing.get_type_hints(cls)
        fields.update({f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls) if f.init})
    for key in data:
        if key not in fields:
            hint = _did_you_mean([repr(name) for name in difflib.get_close_matches(str(key), list(fields), n=3)])
            raise UsageError(f"{source}: unknown key {key!r}; {hint}the keys are the flags of prunetune recover "
                             "without their leading -- (prunetune recover --help lists them).")
    # HfArgumentParser hands file values to the dataclasses unchecked: lora_r: "eight" would surface deep inside
    values = {key: coerce(value, fields[key], f"{source}: key {key!r}", others_pass=True) for key, value in data.items()}
    try:
        return parser.parse_dict(values)
    except ValueError as err:
        if isinstance(err, UsageError):
            raise
        raise UsageError(f"{source}: {err}") from err


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def summary(result) -> str:
    lines = [f"recovery_method {result.method} on {result.model} -> {result.output_dir}"]
    if result.steps:
        steps = "1 step" if result.steps == 1 else f"{result.steps} steps"
        lines.append(f"trained {steps} on {result.training_text or result.dataset}, {result.tokens:,} tokens in "
                     f"{result.train_seconds:.1f} s: "
                     f"{result.tokens_per_second:,.0f} tokens/s, peak memory {_gib(result.peak_memory_bytes)} "
                     f"({result.peak_memory_kind}), train loss {result.train_loss:.4f}")
    distillation = result.extra.get("distillation")
    if distillation:
        teacher = distillation["teacher_identity"]
        weights = ", ".join(f"{label} {distillation[key]:g}" for label, key in
                            (("CE", "ce_weight"), ("KL", "kl_weight"), ("SquareHead", "hidden_weight")) if distillation[key])
        lines.append(f"distilled from {distillation['teacher']} ({weights}; T {distillation['temperature']:g}; teacher "
                     f"{teacher['bytes'] / 2**20:,.0f} MiB in {teacher['dtype']})")
    lines.append(f"sparsity {result.sparsity_before:.4f} before, {result.sparsity_after:.4f} after"
                 + (f", {result.merged_sparsity:.4f} if merged" if result.merged_sparsity is not None else ""))
    if result.perplexity_before is not None or result.perplexity_after is not None:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"perplexity on {result.evaluation_text or result.eval_dataset}: {fmt(result.perplexity_before)} "
                     f"before, {fmt(result.perplexity_after)} after")
    if result.method not in ("full", "blockwise") and result.steps:
        lines.append(f"merge: prunetune merge --model {result.model} --adapter {result.output_dir} --save_model MERGED"
                     + (" (plain LoRA densifies: add --remask or --allow_dense)" if result.method == "lora" else ""))
    return "\n".join(lines)


QUIET = ("-q", "--quiet")


def main(argv: list[str]) -> int:
    if any(flag in QUIET for flag in argv):  # prunetune recover -q ..., as prunetune -q recover ...
        argv = [flag for flag in argv if flag not in QUIET]
        configure_logging(-1)
    model_args, data_args, recovery_args, training_args = parse(argv)
    if recovery_args.memory_estimate:  # a dry run: the shape only, no weights, no output folder
        bf16 = None if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES) else _flag_value(argv, ("--bf16",))
        print(report(model_args, data_args, recovery_args, training_args, bf16=bf16))
        return 0
    if not progress_bars():
        training_args.disable_tqdm = True
    from tqdm.contrib.logging import logging_redirect_tqdm


    with logging_redirect_tqdm():  # log lines (-v) above the bars instead of through them
        result = recipe.recover(model_args, data_args, recovery_args, training_args)
    if training_args.process_index == 0:
        print(summary(result))
    return 0
