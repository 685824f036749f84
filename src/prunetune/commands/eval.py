"""``prunetune eval``: perplexity by the papers' protocol and/or zero-shot accuracy, optionally with a LoRA adapter.

Accepts the seed's evaluate_ppl.py flags (``--model``, ``--lora_weights``, ``--ctx_length``).
A local file named for evaluation (test.txt, ptb.valid.txt) is scored whole; any other single
file on its held-out first 5% (the part a recovery run on it does not train on); the result
line says which text was scored (docs/evaluation.md). For the papers' PTB numbers from a local
copy of the PTB test file, give --dataset ptb:PATH/ptb.test.txt (the ptb protocol: each line
stripped, joined with " "); the same file as a plain path is scored as text, with other numbers.
``--tasks`` scores lm-eval tasks on the model as loaded here (a masked LoRA adapter applied
masked); with ``--tasks`` alone only they run, with ``--dataset`` too both do.
"""

from __future__ import annotations

import argparse
import logging

from prunetune.commands.common import (
    DEFAULT_DATA_HELP,
    CommandParser,
    add_help_pages,
    add_model_arguments,
    default_data,
    load_options,
    print_json,
)
from prunetune.data import check_source, describe_sources, load_documents, resolve
from prunetune.errors import UsageError
from prunetune.evaluate import autocast_for, check_seqlen, check_window_options, default_seqlen, evaluate_dataset
from prunetune.loading import load_model, load_tokenizer, resolve_model_path
from prunetune.outputs import check_output_file, write_json
from prunetune.zeroshot import (
    TaskCatalog,
    ZeroShotSettings,
    check_settings,
    evaluate_zeroshot,
    format_table,
    parse_limit,
    parse_tasks,
)

logger = logging.getLogger(__name__)

SEVEN = "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="prunetune eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--dataset", default=None, help=f"evaluation data: {describe_sources()} ({DEFAULT_DATA_HELP['evaluation']}; "
                                                        "with --tasks: no perplexity unless given)")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"],
                        help="split of builtin/wikitext2/ptb data, or of a local folder with split files; a local file "
                             "named for evaluation is scored whole, any other local file on its held-out first 5%% "
                             "(C4 always uses its validation shard)")
    parser.add_argument("--seqlen", "--ctx_length", dest="seqlen", type=int, default=None, help="window length (default: the model's context, capped at 2048)")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass (perplexity); requests per forward pass (--tasks)")
    parser.add_argument("--max_windows", type=int, default=None, help="score only the first N windows")
    parser.add_argument("--lora_weights", default=None, help="a PEFT adapter folder to apply before evaluating")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the result as JSON to this file")
    zeroshot = parser.add_argument_group("zero-shot accuracy (lm-evaluation-harness: pip install \"prunetune[zeroshot]\")")
    zeroshot.add_argument("--tasks", default=None, help=f"lm-eval task, group or tag names separated by commas; Wanda's "
                                                        f"Table 2: {SEVEN} (their data comes from the Hugging Face Hub, or "
                                                        "from local files through --include_path)")
    zeroshot.add_argument("--num_fewshot", type=int, default=None, help="examples shown before each question (default: each task's own, 0 for the seven)")
    zeroshot.add_argument("--limit", default=None, help="score only the first N examples of each task (a whole number, 1 or more)")
    zeroshot.add_argument("--include_path", default=None, help="a folder of your own task YAMLs, searched before lm-eval's (docs/zeroshot.md)")
    return add_help_pages(parser, "eval")


def _zeroshot_settings(args: argparse.Namespace):
    """The zero-shot settings (None without --tasks); a zero-shot flag without --tasks is refused."""
    if args.tasks is None:
        given = [flag for flag, value in (("--num_fewshot", args.num_fewshot), ("--limit", args.limit),
                                          ("--include_path", args.include_path)) if value is not None]
        if given:
            raise UsageError(f"{given[0]} applies to zero-shot tasks, and no --tasks was given; add --tasks (e.g. "
                             f"--tasks {SEVEN}) or drop {given[0]}.")
        return None
    settings = ZeroShotSettings(tasks=parse_tasks(args.tasks), num_fewshot=args.num_fewshot,
                                limit=None if args.limit is None else parse_limit(args.limit),
                                batch_size=args.batch_size, include_path=args.include_path)
    check_settings(settings)
    return settings


def _validate(args: argparse.Namespace):
    """Every check that needs no model: the data, window sizes, tasks, device, adapter and --json path."""
    zeroshot = _zeroshot_settings(args)
    resolve_model_path(args.model)  # a missing model path before anything about the data
    dataset = None
    if zeroshot is None or args.dataset is not None:
        check_window_options(args.seqlen, args.batch_size, args.max_windows, flags=True)
        dataset = args.dataset or default_data("evaluation", args.model, args.lora_weights)
        check_source(dataset)
    else:
        given = [flag for flag, value in (("--seqlen", args.seqlen), ("--max_windows", args.max_windows)) if value is not None]
        if given:
            raise UsageError(f"{given[0]} sets the perplexity windows, and with --tasks alone no perplexity runs; add "
                             "--dataset (e.g. --dataset wikitext2) to get both, or drop it.")
    if args.lora_weights:
        # peft loads only with an adapter (slow to import; plain eval needs none)
        from prunetune.recover.adapter import read_adapter_config

        read_adapter_config(args.lora_weights)
    if args.json_path:
        check_output_file(args.json_path, "--json")
    return dataset, zeroshot, load_options(args)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    dataset, zeroshot, options = _validate(args)

    if zeroshot is not None:  # names and data before the model loads: a bad task costs no model load
        catalog = TaskCatalog(zeroshot.include_path)
        tasks = catalog.load(zeroshot.tasks)
    if dataset is not None:  # the text before the weights: a hub dataset that cannot be had here costs no model load
        protocol = resolve(dataset, "--dataset").protocol
        load_documents(dataset, protocol.eval_split if protocol is not None and protocol.eval_split else args.split,
                       args.cache_dir, flag="--dataset", named_file_whole=True)
    tokenizer = load_tokenizer(args.model, options)
    model = load_model(args.model, options)
    if dataset is not None:
        seqlen = default_seqlen(model) if args.seqlen is None else args.seqlen  # 0 is rejected above, not a default
        check_seqlen(model, seqlen)
    if args.lora_weights:
        # peft loads only with an adapter (slow to import; plain eval needs none)
        from prunetune.recover.adapter import apply_adapter

        model = apply_adapter(model, args.lora_weights)
    payload = {"model": args.model, "lora_weights": args.lora_weights}
    evaluated = args.model + (f" + adapter {args.lora_weights}" if args.lora_weights else "")
    if dataset is not None:
        result = evaluate_dataset(model, tokenizer, dataset, seqlen, batch_size=args.batch_size, split=args.split,
                                  max_windows=args.max_windows, progress=True, autocast_dtype=autocast_for(model),
                                  cache_dir=args.cache_dir, named_file_whole=True)
        payload.update(result.to_dict())
        print(f"{evaluated} on {dataset} ({result.text}; {result.windows} x {seqlen} tokens): "
              f"perplexity {result.perplexity:.4f}")
    if zeroshot is not None:
        scores = evaluate_zeroshot(model, tokenizer, zeroshot, catalog=catalog, tasks=tasks).to_dict()
        payload["zeroshot"] = scores
        print(f"{evaluated}: {format_table(scores)}")
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
