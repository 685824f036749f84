"""``prunetune recover``: win back a pruned model's accuracy without losing its sparsity.

Takes the Wanda LoRA recipe's flags (HfArgumentParser over model / data / recovery /
TrainingArguments dataclasses), or one .yaml/.json file of the same keys::

    prunetune recover --model_name_or_path PRUNED --dataset_name c4 --block_size 1024 \\
        --do_train --do_eval --max_train_samples 30000 --learning_rate 1e-4 \\
        --recovery_method masked_lora --output_dir OUT
    prunetune recover recover.yaml
"""

from __future__ import annotations

from pathlib import Path

from prunetune.errors import UsageError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def build_parser():
    from transformers import HfArgumentParser

    from prunetune.recover.args import ARGUMENT_CLASSES

    return HfArgumentParser(ARGUMENT_CLASSES, prog="prunetune recover", description=__doc__)


def parse(argv: list[str]):
    """The four argument dataclasses from flags or from a single .yaml/.json file."""
    parser = build_parser()
    if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES):
        path = Path(argv[0]).expanduser()
        if not path.is_file():
            raise UsageError(f"Argument file {argv[0]} does not exist.")
        try:
            if path.suffix == ".json":
                return parser.parse_json_file(str(path))
            return parser.parse_yaml_file(str(path))
        except ValueError as err:  # unknown keys
            raise UsageError(f"{argv[0]}: {err}") from err
    return parser.parse_args_into_dataclasses(args=argv)


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
