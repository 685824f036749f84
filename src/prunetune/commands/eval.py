"""``prunetune eval``: perplexity by the papers' protocol, optionally with a LoRA adapter.

Accepts the seed's evaluate_ppl.py flags (``--model``, ``--lora_weights``, ``--ctx_length``).
"""

from __future__ import annotations

import argparse
import logging

from prunetune.commands.common import DEFAULT_DATA_HELP, add_model_arguments, default_data, load_options, print_json
from prunetune.data import describe_sources
from prunetune.errors import UsageError
from prunetune.outputs import check_output_file

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunetune eval", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--dataset", default=None, help=f"evaluation data: {describe_sources()} ({DEFAULT_DATA_HELP['evaluation']})")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"], help="split of builtin/local/wikitext2/ptb data (C4 always uses its validation shard)")
    parser.add_argument("--seqlen", "--ctx_length", dest="seqlen", type=int, default=None, help="window length (default: the model's context, capped at 2048)")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--max_windows", type=int, default=None, help="score only the first N windows")
    parser.add_argument("--lora_weights", default=None, help="a PEFT adapter folder to apply before evaluating")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the result as JSON to this file")
    return parser


def _validate(args: argparse.Namespace):
    """Every check that needs no model: the data, window sizes, device, adapter and --json path."""
    from prunetune.data import check_source
    from prunetune.evaluate import check_window_options

    check_window_options(args.seqlen, args.batch_size, args.max_windows, flags=True)
    dataset = args.dataset or default_data("evaluation", args.model, args.lora_weights)
    check_source(dataset)
    if args.lora_weights:
        from prunetune.recover.adapter import read_adapter_config

        read_adapter_config(args.lora_weights)
    if args.json_path:
        check_output_file(args.json_path, "--json")
    return dataset, load_options(args)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    dataset, options = _validate(args)
    from prunetune.evaluate import autocast_for, check_seqlen, default_seqlen, evaluate_dataset
    from prunetune.loading import load_model, load_tokenizer
    from prunetune.outputs import write_json

    tokenizer = load_tokenizer(args.model, options)
    model = load_model(args.model, options)
    seqlen = default_seqlen(model) if args.seqlen is None else args.seqlen  # 0 is rejected above, not a default
    check_seqlen(model, seqlen)
    if args.lora_weights:
        from prunetune.recover.adapter import apply_adapter

        model = apply_adapter(model, args.lora_weights)
    result = evaluate_dataset(model, tokenizer, dataset, seqlen, batch_size=args.batch_size, split=args.split,
                              max_windows=args.max_windows, progress=True, autocast_dtype=autocast_for(model),
                              cache_dir=args.cache_dir)
    payload = {"model": args.model, "lora_weights": args.lora_weights, **result.to_dict()}
    print(f"{args.model} on {dataset} ({result.windows} x {seqlen} tokens): perplexity {result.perplexity:.4f}")
    if not args.json_path:
        print_json(payload)
        return 0
    try:
        write_json(args.json_path, payload)
    except OSError as err:
        print_json(payload)  # the numbers cost a full evaluation: show them before failing
        raise UsageError(f"Could not write --json {args.json_path!r}: {err.strerror or err}. The result is printed "
                         "above; give a file path in a writable folder with free space.") from err
    return 0
