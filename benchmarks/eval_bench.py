"""Evaluation throughput: tokens/s of perplexity on the builtin test split.

Run: python benchmarks/eval_bench.py [--model tiny] [--seqlen 256] [--batch_size 8] [--device cpu]
Prints a table; writes JSON to $OUT/eval_bench.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from prunetune.evaluate import evaluate_dataset
from prunetune.loading import LoadOptions, load_model, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dataset", default="builtin")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch_sizes", default="1,8,32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    options = LoadOptions(dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(args.model, options)
    model = load_model(args.model, options)
    evaluate_dataset(model, tokenizer, args.dataset, args.seqlen, batch_size=8, max_windows=8)  # warm-up + tokenize
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        start = time.perf_counter()
        result = evaluate_dataset(model, tokenizer, args.dataset, args.seqlen, batch_size=batch_size)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append({"batch_size": batch_size, "windows": result.windows, "tokens": result.windows * args.seqlen,
                     "seconds": round(seconds, 3), "tokens_per_s": round(result.windows * args.seqlen / seconds),
                     "perplexity": round(result.perplexity, 4)})
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"eval throughput: model={args.model} dataset={args.dataset} seqlen={args.seqlen} device={args.device} ({machine})")
    print(f"{'batch':>6} {'windows':>8} {'tokens':>9} {'seconds':>8} {'tok/s':>9} {'ppl':>9}")
    for r in rows:
        print(f"{r['batch_size']:>6} {r['windows']:>8} {r['tokens']:>9} {r['seconds']:>8} {r['tokens_per_s']:>9} {r['perplexity']:>9}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "eval_bench.json"), "w") as handle:
            json.dump({"machine": machine, "args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
