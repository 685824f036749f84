"""``prunetune eval``: perplexity by the papers' protocol, optionally with a LoRA adapter.

Accepts the seed's evaluate_ppl.py flags (``--model``, ``--lora_weights``, ``--ctx_length``).
"""

from __future__ import annotations

import argparse
import logging

from prunetune.commands.common import add_model_arguments, default_dataset, load_options, print_json
from prunetune.data import describe_sources

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunetune eval", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--dataset", default=None, help=f"evaluation data: {describe_sources()} (default: builtin for tiny, else wikitext2)")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"], help="split of builtin/local/wikitext2/ptb data (C4 always uses its validation shard)")
    parser.add_argument("--seqlen", "--ctx_length", dest="seqlen", type=int, default=None, help="window length (default: the model's context, capped at 2048)")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--max_windows", type=int, default=None, help="score only the first N windows")
    parser.add_argument("--lora_weights", default=None, help="a PEFT adapter folder to apply before evaluating")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the result as JSON to this file")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from prunetune.data import check_source
    from prunetune.evaluate import autocast_for, default_seqlen, evaluate_dataset
    from prunetune.loading import load_model, load_tokenizer
    from prunetune.outputs import write_json

    dataset = args.dataset or default_dataset(args.model)
    check_source(dataset)
    options = load_options(args)
    tokenizer = load_tokenizer(args.model, options)
    model = load_model(args.model, options)
    if args.lora_weights:
        from prunetune.recover.adapter import apply_adapter

        model = apply_adapter(model, args.lora_weights)
    seqlen = args.seqlen or default_seqlen(model)
    result = evaluate_dataset(model, tokenizer, dataset, seqlen, batch_size=args.batch_size, split=args.split,
                              max_windows=args.max_windows, progress=True, autocast_dtype=autocast_for(model),
                              cache_dir=args.cache_dir)
    payload = {"model": args.model, "lora_weights": args.lora_weights, **result.to_dict()}
    print(f"{args.model} on {dataset} ({result.windows} x {seqlen} tokens): perplexity {result.perplexity:.4f}")
    if args.json_path:
        write_json(args.json_path, payload)
    else:
        print_json(payload)
    return 0
