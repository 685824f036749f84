"""``prunetune merge``: fold a recovery adapter into its pruned model and save a plain model.

A masked LoRA adapter merges with the pruned sparsity intact (verified layer by layer). A
plain LoRA adapter densifies the layers it adapted: the command shows the sparsity before
and after and refuses unless you choose ``--allow_dense`` (keep the dense merge) or
``--remask`` (re-apply the pruned mask after merging; the perplexity cost is measured).
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
from prunetune.data import check_source
from prunetune.errors import UsageError
from prunetune.evaluate import autocast_for, default_seqlen, evaluate_dataset
from prunetune.loading import load_model, load_tokenizer, model_identity, resolve_model_path
from prunetune.outputs import (
    check_apart,
    check_output_dir,
    check_output_file,
    output_lock,
    read_manifest,
    require_complete,
    write_json,
)

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="prunetune merge", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--adapter", "--lora_weights", dest="adapter", required=True, help="the adapter folder written by `prunetune recover`")
    parser.add_argument("--save_model", required=True, help="folder for the merged model")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--allow_dense", action="store_true", help="plain LoRA: save the dense merge")
    choice.add_argument("--remask", action="store_true", help="plain LoRA: re-apply the pruned mask after merging")
    parser.add_argument("--overwrite_output_dir", "--overwrite", dest="overwrite", action="store_true",
                        help="replace an existing --save_model folder written by prunetune")
    parser.add_argument("--dataset", default=None, help=f"data for the --remask perplexity check ({DEFAULT_DATA_HELP['evaluation']})")
    parser.add_argument("--seqlen", type=int, default=None, help="window length for the perplexity check (default: the model's context, capped at 2048)")
    parser.add_argument("--max_windows", type=int, default=None, help="score only the first N windows")
    parser.add_argument("--no_eval", action="store_true", help="skip the --remask perplexity check")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the merge report as JSON to this file")
    return add_help_pages(parser, "merge")


def _dataset(args: argparse.Namespace) -> str:
    return args.dataset or default_data("evaluation", args.model, args.adapter)


def _perplexity(model, tokenizer, args) -> float:
    result = evaluate_dataset(model, tokenizer, _dataset(args), args.seqlen or default_seqlen(model),
                              max_windows=args.max_windows, autocast_dtype=autocast_for(model), cache_dir=args.cache_dir)
    return result.perplexity


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    check_apart(args.save_model, {"--model": args.model, "--adapter": args.adapter}, flag="--save_model")
    check_output_dir(args.save_model, overwrite=args.overwrite, what="--save_model folder")
    if args.json_path and args.json_path != "-":
        check_output_file(args.json_path)
    require_complete(resolve_model_path(args.model), "model folder")
    require_complete(args.adapter, "adapter folder")
    with output_lock(args.save_model, "prunetune merge"):
        return _merge(args)


def _merge(args: argparse.Namespace) -> int:
    # peft loads here, after the checks: --help and a refused input answer without its seconds of import
    from prunetune.export import merge_adapter, save_merged
    from prunetune.recover.adapter import apply_adapter, read_adapter_config
    from prunetune.recover.masked_lora import is_masked_config

    method = "masked_lora" if is_masked_config(read_adapter_config(args.adapter)) else "lora"
    if args.remask and not args.no_eval:
        check_source(_dataset(args))
    options = load_options(args)
    tokenizer = load_tokenizer(args.model, options)
    model = apply_adapter(load_model(args.model, options), args.adapter)

    ppl_adapter = _perplexity(model, tokenizer, args) if method == "lora" and args.remask and not args.no_eval else None
    merged, report = merge_adapter(model, method, remask=args.remask)
    print(report.table())
    if report.pruned_nonzero and (method == "masked_lora" or args.remask):
        raise RuntimeError(f"bug: {report.pruned_nonzero} pruned weights are nonzero after a {method} merge")
    if method == "lora" and not (args.allow_dense or args.remask):
        raise UsageError(
            f"Merging this plain LoRA adapter densifies the model: sparsity {report.sparsity_before:.4f} -> "
            f"{report.sparsity_after:.4f} (table above). Nothing was saved. Pass --allow_dense to keep the dense merge, "
            "--remask to re-apply the pruned mask (perplexity cost is measured), or recover with "
            "--recovery_method masked_lora, whose merge keeps the sparsity exactly."
        )
    if report.kept_zeroed:
        logger.warning("%d kept weights rounded to exactly zero when merged in %s (W + delta == 0); no pruned weight "
                       "was revived", report.kept_zeroed, next(merged.parameters()).dtype)
    payload = {"model": args.model, "adapter": args.adapter, "save_model": args.save_model, **report.to_dict()}
    if ppl_adapter is not None:
        ppl_remasked = _perplexity(merged, tokenizer, args)
        payload.update(perplexity_adapter=ppl_adapter, perplexity_remasked=ppl_remasked)
        print(f"--remask perplexity cost: {ppl_adapter:.4f} with the adapter -> {ppl_remasked:.4f} remasked "
              f"({ppl_remasked - ppl_adapter:+.4f})")
    base_manifest = read_manifest(resolve_model_path(args.model)) or {}
    manifest = {
        **{k: v for k, v in base_manifest.items() if k not in ("versions", "sparsity")},
        "merged_into": model_identity(args.model),
        "merged_adapter": {"path": args.adapter, "method": method, "remasked": args.remask,
                           "adapter_manifest": read_manifest(args.adapter) or {}},
    }
    path = save_merged(merged, tokenizer, args.save_model, manifest, overwrite=args.overwrite)
    kind = ("exactly the pruned sparsity" if report.exact else
            f"sparsity {report.sparsity_after:.4f}, pruned pattern intact" if report.pattern_kept else f"sparsity {report.sparsity_after:.4f}")
    print(f"merged {method} adapter into {args.model}: {kind}; saved to {path}")
    if args.json_path == "-":
        print_json(payload)
    elif args.json_path:
        write_json(args.json_path, payload)
    return 0
