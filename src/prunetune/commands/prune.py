"""``prunetune prune``: prune a model with magnitude, Wanda or SparseGPT; unstructured or N:M.

Accepts the Wanda repository's flags (``--model --prune_method --sparsity_ratio
--sparsity_type --nsamples --seed --use_variant --cache_dir --save --save_model``), e.g.::

    prunetune prune --model tiny --prune_method wanda --sparsity_ratio 0.5 \\
        --sparsity_type unstructured --save out/wanda --save_model out/wanda/model

Like Wanda's main.py, it measures perplexity before and after pruning (on WikiText-2, or on
builtin for the bundled model and models made from it); --eval_dataset none skips it.

Everything is validated before the model is loaded, the data included (a hub dataset that
cannot be had offline is refused before any weights load); the layer shapes (N:M divisibility)
and the calibration size (--nsamples x --seqlen tokens) right after, before any evaluation or
calibration work.
"""

from __future__ import annotations

import argparse
import logging
import sys

from prunetune.commands.common import (
    DEFAULT_DATA_HELP,
    CommandParser,
    add_help_pages,
    add_model_arguments,
    default_data,
    load_options,
)
from prunetune.data import calibration_samples, check_source, describe_sources, load_documents, resolve
from prunetune.errors import UsageError, require
from prunetune.evaluate import autocast_for, default_seqlen, evaluate_dataset
from prunetune.loading import load_model, load_tokenizer, model_identity, resolve_model_path
from prunetune.outputs import check_apart, check_output_dir, check_output_file, output_lock, save_model_dir, write_json
from prunetune.pruning import PRUNERS, PruneConfig, prune
from prunetune.pruning.api import check_layers

logger = logging.getLogger(__name__)

REPORT_NAME = "prune_report.json"


NO_EVAL = "none"  # --eval_dataset none: prune without measuring perplexity
EVAL_SPLIT = "test"  # perplexity before/after pruning: the test split, as Wanda's main.py


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="prunetune prune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    group = parser.add_argument_group("pruning")
    group.add_argument("--prune_method", default="wanda", help=f"pruning method: {', '.join(PRUNERS)} (default: %(default)s)")
    group.add_argument("--sparsity_ratio", type=float, default=None,
                       help="fraction of weights to prune, in [0, 1) (default: 0.5 unstructured; N/M for N:M)")
    group.add_argument("--sparsity_type", default="unstructured", help="'unstructured', '2:4', '4:8' or any N:M (N zeros in every M inputs)")
    group.add_argument("--use_variant", action="store_true", help="Wanda's variant: per-row cumulative-score threshold (unstructured only)")
    group.add_argument("--targets", nargs="+", default=None, help="glob patterns of layers to prune (default: every linear in the decoder blocks)")
    group.add_argument("--ignore", nargs="+", default=None, help="glob patterns of layers to keep dense, e.g. 'mlp.down_proj'")
    group.add_argument("--blocksize", type=int, default=None, help="SparseGPT: columns per mask block (default 128)")
    group.add_argument("--percdamp", type=float, default=None, help="SparseGPT: Hessian dampening, fraction of its mean diagonal (default 0.01)")
    group.add_argument("--sparsity_profile", default=None,
                       help="how the ratio varies over layers (unstructured): 'uniform' (default), 'owl' (outlier-weighed "
                            "layerwise sparsity: blocks with more outlier Wanda scores keep more weights), or a JSON/YAML file "
                            "of block index or layer glob -> ratio; overall sparsity stays --sparsity_ratio")
    group.add_argument("--owl_m", type=float, default=5.0,
                       help="OWL: a score is an outlier above this multiple of its block's mean score (default: %(default)s)")
    group.add_argument("--owl_lambda", type=float, default=0.08,
                       help="OWL: largest deviation of a block's ratio from --sparsity_ratio (default: %(default)s)")
    calib = parser.add_argument_group("calibration")
    calib.add_argument("--calib_dataset", default=None, help=f"calibration data: {describe_sources()} ({DEFAULT_DATA_HELP['calibration']})")
    calib.add_argument("--nsamples", type=int, default=128, help="calibration windows (default: %(default)s)")
    calib.add_argument("--seqlen", type=int, default=None, help="tokens per window (default: the model's context, capped at 2048)")
    calib.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default: %(default)s)")
    calib.add_argument("--batch_size", type=int, default=8, help="calibration windows per block forward (default: %(default)s)")
    calib.add_argument("--compute_device", default=None,
                       help="run each block here (e.g. cuda) while the model stays in CPU memory: for models larger than the accelerator")
    calib.add_argument("--offload_activations", action="store_true", help="keep calibration activations in CPU memory")
    calib.add_argument("--true_sequential", action="store_true",
                       help="prune each layer from the inputs the block as pruned so far gives it, in one block forward "
                            "instead of about 1.8 (faster; keeps the activations of all batches at each layer input "
                            "of a block; masks differ from the papers' reference) -- wanda and sparsegpt")
    rec = parser.add_argument_group("reconstruction (prune and repair in one calibration pass)")
    rec.add_argument("--reconstruct", action="store_true",
                     help="right after pruning each block, train its kept weights (masks fixed, so the sparsity and N:M "
                          "pattern stay exact) to reproduce the dense block's outputs on its calibration inputs, before "
                          "those outputs feed the next block -- wanda and sparsegpt")
    rec.add_argument("--reconstruct_epochs", type=int, default=None,
                     help="with --reconstruct: passes over the calibration batches per block (default: 3)")
    rec.add_argument("--reconstruct_lr", type=float, default=None, help="with --reconstruct: Adam's learning rate (default: 1e-3)")
    rec.add_argument("--reconstruct_batch_size", type=int, default=None,
                     help="with --reconstruct: calibration windows per training step; the calibration pass runs in "
                          "batches of this size too (default: --batch_size)")
    out = parser.add_argument_group("evaluation and outputs")
    out.add_argument("--eval_dataset", default=None,
                     help=f"measure perplexity on this data before and after pruning, as Wanda's main.py does: "
                          f"{describe_sources()}, or {NO_EVAL} to skip ({DEFAULT_DATA_HELP['evaluation']})")
    out.add_argument("--eval_max_windows", type=int, default=None, help="score only the first N evaluation windows")
    out.add_argument("--eval_batch_size", type=int, default=8, help="evaluation windows per forward")
    out.add_argument("--save", default=None, help=f"results folder: {REPORT_NAME} is written there")
    out.add_argument("--save_model", default=None, help="write the pruned model (safetensors, tokenizer, prunetune.json) to this folder")
    out.add_argument("--overwrite_output_dir", "--overwrite", dest="overwrite", action="store_true",
                     help="replace an existing --save_model folder written by prunetune, and an existing report in --save")
    return add_help_pages(parser, "prune")


def _same_folder(a: str, b: str) -> bool:
    from pathlib import Path

    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _check_outputs(args: argparse.Namespace) -> None:
    """--save / --save_model before any work: never replace what the user did not ask to replace."""
    from pathlib import Path

    if args.save_model:
        check_apart(args.save_model, {"--model": args.model}, flag="--save_model")
        check_output_dir(args.save_model, overwrite=args.overwrite, what="--save_model folder")
    if args.save and not (args.save_model and _same_folder(args.save, args.save_model)):
        report = Path(args.save) / REPORT_NAME
        if args.save_model:
            inside = Path(args.save_model).expanduser().resolve()
            require(inside not in Path(args.save).expanduser().resolve().parents,
                    f"--save {args.save} lies inside --save_model {args.save_model}, which is written as a whole: the report "
                    "would be lost. Give the same folder for both (the report then goes into the model folder) or another one.")
        require(not report.exists() or args.overwrite,
                f"--save: {report} already exists. Choose another folder, or pass --overwrite_output_dir to replace the report.")
        check_output_file(report, "--save report")


def _validate(args: argparse.Namespace):
    """Every check that needs no model; returns the PruneConfig."""
    resolve_model_path(args.model)  # a missing model path before anything about the data
    options = {k: v for k, v in (("blocksize", args.blocksize), ("percdamp", args.percdamp)) if v is not None}
    require(not options or args.prune_method == "sparsegpt",
            f"--blocksize/--percdamp are SparseGPT options; --prune_method is {args.prune_method!r}.")
    require(args.eval_max_windows is None or args.eval_max_windows >= 1, f"--eval_max_windows must be >= 1, got {args.eval_max_windows}.")
    require(args.eval_batch_size >= 1, f"--eval_batch_size must be >= 1, got {args.eval_batch_size}.")
    config = PruneConfig(method=args.prune_method, sparsity_ratio=args.sparsity_ratio, sparsity_type=args.sparsity_type,
                         use_variant=args.use_variant, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                         calib_dataset=args.calib_dataset or default_data("calibration", args.model), batch_size=args.batch_size,
                         device=args.compute_device, offload_activations=args.offload_activations,
                         true_sequential=args.true_sequential,
                         targets=args.targets, ignore=args.ignore, options=options, cache_dir=args.cache_dir, progress=True,
                         sparsity_profile=args.sparsity_profile, owl_m=args.owl_m, owl_lambda=args.owl_lambda,
                         reconstruct=args.reconstruct, reconstruct_epochs=args.reconstruct_epochs,
                         reconstruct_lr=args.reconstruct_lr, reconstruct_batch_size=args.reconstruct_batch_size)
    args.eval_defaulted = args.eval_dataset is None
    if args.eval_defaulted:
        args.eval_dataset = default_data("evaluation", args.model)
    if args.eval_dataset.lower() == NO_EVAL:
        args.eval_dataset = None
    else:
        check_source(args.eval_dataset)
    _check_outputs(args)
    return config


def _perplexity(model, tokenizer, args, seqlen: int, when: str):
    return evaluate_dataset(model, tokenizer, args.eval_dataset, seqlen, batch_size=args.eval_batch_size, split=EVAL_SPLIT,
                            max_windows=args.eval_max_windows, progress=True, autocast_dtype=autocast_for(model),
                            cache_dir=args.cache_dir, flag="--eval_dataset", desc=f"perplexity {when}",
                            named_file_whole=True)


def _needs_calibration(config) -> bool:
    return bool(getattr(config, "needs_calibration", config.pruner.needs_calibration))


def _check_data(args: argparse.Namespace, config) -> None:
    """Read the calibration and evaluation text before any weights load: a hub dataset that cannot be had
    here (offline, not cached) is refused at once. When only the *default* evaluation data cannot be had,
    one note on stderr, and no evaluation: a perplexity the user did not ask for must not cost them the pruning."""
    if _needs_calibration(config) and config.calibration_ids is None:
        load_documents(config.calib_dataset, "train", config.cache_dir, flag="--calib_dataset")
    if not args.eval_dataset:
        return
    protocol = resolve(args.eval_dataset, "--eval_dataset").protocol
    split = protocol.eval_split if protocol is not None and protocol.eval_split else EVAL_SPLIT
    try:
        load_documents(args.eval_dataset, split, args.cache_dir, flag="--eval_dataset", named_file_whole=True)
    except UsageError as err:
        if not args.eval_defaulted:
            raise
        print(f"prunetune: note: perplexity not measured: the default evaluation data {args.eval_dataset} cannot be "
              f"used here ({' '.join(str(err).split())}) Give --eval_dataset (e.g. a local text file), or "
              "--eval_dataset none.", file=sys.stderr)
        args.eval_dataset = None


def _check_calibration_size(tokenizer, config, seqlen: int) -> None:
    """Enough calibration text for --nsamples x --seqlen tokens, before the perplexity pass and the pruning.

    Draws the windows once (the tokenized text is cached on disk, so pruning reads it back). C4's sampler
    looks for documents longer than seqlen instead, and its train shard always holds them: not drawn twice.
    """
    if not _needs_calibration(config) or config.calibration_ids is not None:
        return
    protocol = resolve(config.calib_dataset, "--calib_dataset").protocol
    if protocol is not None and protocol.documents_for_calibration:
        return
    calibration_samples(tokenizer, config.calib_dataset, config.nsamples, seqlen, seed=config.seed,
                        cache_dir=config.cache_dir, flag="--calib_dataset")


def main(argv: list[str]) -> int:
    import contextlib

    args = build_parser().parse_args(argv)
    config = _validate(args)
    with output_lock(args.save_model, "prunetune prune") if args.save_model else contextlib.nullcontext():
        return _run(args, config)


def _run(args: argparse.Namespace, config) -> int:
    from pathlib import Path

    options = load_options(args)
    _check_data(args, config)  # before any weights load
    tokenizer = load_tokenizer(args.model, options)
    model = load_model(args.model, options)
    check_layers(model, config)  # N:M divisibility, missing blocks: before any work
    eval_seqlen = config.seqlen or default_seqlen(model)
    _check_calibration_size(tokenizer, config, eval_seqlen)  # before the perplexity pass
    before = _perplexity(model, tokenizer, args, eval_seqlen, "before") if args.eval_dataset else None

    report = prune(model, tokenizer, config)

    after = _perplexity(model, tokenizer, args, eval_seqlen, "after") if args.eval_dataset else None
    payload = {"model": args.model, **report.to_dict()}
    if args.eval_dataset:
        payload["evaluation"] = {"dataset": args.eval_dataset, "before": before.to_dict(), "after": after.to_dict()}
    if report.already_sparse:
        print(f"note: the model was already {report.initial_sparsity:.2%} sparse; its zeros stay pruned")
    print(f"{report.method} {report.sparsity_type} (ratio {report.sparsity_ratio:g}) on {args.model}: "
          f"sparsity {report.sparsity.overall:.4f}, {report.seconds:.1f}s")
    if args.eval_dataset:
        print(f"perplexity on {args.eval_dataset} ({after.text}): {before.perplexity:.3f} before, {after.perplexity:.3f} after")
    report_in_model = bool(args.save and args.save_model and _same_folder(args.save, args.save_model))
    if args.save and not report_in_model:
        write_json(Path(args.save) / REPORT_NAME, payload)
        print(f"report: {Path(args.save) / REPORT_NAME}")
    if args.save_model:
        manifest = {"stage": "prune", "base_model": args.model, "base_model_identity": model_identity(args.model),
                    "trust_remote_code": args.trust_remote_code,
                    **{k: v for k, v in payload.items() if k != "block_timings"}}
        save_model_dir(model, tokenizer, args.save_model, manifest, overwrite=args.overwrite,
                       extra_files={REPORT_NAME: payload} if report_in_model else None)
        print(f"pruned model: {args.save_model}" + (f" (report: {Path(args.save_model) / REPORT_NAME})" if report_in_model else ""))
    if not (args.save or args.save_model):
        print("note: nothing was saved (give --save_model DIR to keep the pruned model, --save DIR for the report)")
    return 0
