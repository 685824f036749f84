"""``prunetune recover``: win back a pruned model's accuracy without losing its sparsity.

Takes the Wanda LoRA recipe's flags (HfArgumentParser over model / data / recovery /
TrainingArguments dataclasses), or one .yaml/.json file of the same keys::

    prunetune recover --model_name_or_path PRUNED --dataset_name c4 --block_size 1024 \\
        --do_train --do_eval --max_train_samples 30000 --learning_rate 1e-4 \\
        --recovery_method masked_lora --output_dir OUT
    prunetune recover recover.yaml
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Union, get_args, get_origin

from prunetune.errors import UsageError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def build_parser():
    from transformers import HfArgumentParser

    from prunetune.recover.args import ARGUMENT_CLASSES

    parser = HfArgumentParser(ARGUMENT_CLASSES, prog="prunetune recover", description=__doc__)
    parser.error = _argument_error  # one paragraph instead of argparse's 150-line usage dump
    return parser


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
        from prunetune.config import load_mapping

        return parse_mapping(parser, load_mapping(argv[0]), argv[0])
    # Unknown flags first: otherwise a misspelt --output_dir reads as a missing one.
    _, remaining = parser.parse_known_args(args=argv)
    if remaining:
        raise UsageError(_unknown_argument(parser, remaining))
    return parser.parse_args_into_dataclasses(args=argv)


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
    values = {key: _coerce(value, fields[key], f"{source}: key {key!r}") for key, value in data.items()}
    try:
        return parser.parse_dict(values)
    except ValueError as err:
        if isinstance(err, UsageError):
            raise
        raise UsageError(f"{source}: {err}") from err


def _type_name(tp) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(option) for option in get_args(tp))
    names = {type(None): "null", bool: "true or false", int: "integer", float: "number", str: "string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp, where: str):
    """``value`` as type ``tp`` for the plain types (bool, int, float, str, their unions); other types pass.

    HfArgumentParser hands file values to the dataclasses unchecked, so ``lora_r: "eight"``
    would surface as a TypeError deep in validation. YAML reads ``1e-4`` as a string: floats
    accept numeric strings.
    """
    if get_origin(tp) in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except UsageError:
                continue
        raise UsageError(f"{where}: {value!r} is not accepted; expected: {_type_name(tp)}.")
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                ok = False
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:  # enums, lists, dicts: the dataclass and TrainingArguments check these themselves
        return value
    if not ok:
        raise UsageError(f"{where}: {value!r} is not accepted; expected: {_type_name(tp)}.")
    return value


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def summary(result) -> str:
    lines = [f"recovery_method {result.method} on {result.model} -> {result.output_dir}"]
    if result.steps:
        lines.append(f"trained {result.steps} steps, {result.tokens:,} tokens in {result.train_seconds:.1f} s: "
                     f"{result.tokens_per_second:,.0f} tokens/s, peak memory {_gib(result.peak_memory_bytes)} "
                     f"({result.peak_memory_kind}), train loss {result.train_loss:.4f}")
    lines.append(f"sparsity {result.sparsity_before:.4f} before, {result.sparsity_after:.4f} after"
                 + (f", {result.merged_sparsity:.4f} if merged" if result.merged_sparsity is not None else ""))
    if result.perplexity_before is not None or result.perplexity_after is not None:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"perplexity ({result.dataset}): {fmt(result.perplexity_before)} before, {fmt(result.perplexity_after)} after")
    if result.method != "full" and result.steps:
        lines.append(f"merge: prunetune merge --model {result.model} --adapter {result.output_dir} --save_model MERGED"
                     + (" (plain LoRA densifies: add --remask or --allow_dense)" if result.method == "lora" else ""))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    model_args, data_args, recovery_args, training_args = parse(argv)
    from prunetune.recover.recipe import recover

    result = recover(model_args, data_args, recovery_args, training_args)
    if training_args.process_index == 0:
        print(summary(result))
    return 0
