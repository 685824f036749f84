"""Distillation variants side by side at equal tokens: the evidence behind --distill_* defaults.

For one pruned model and its dense teacher, trains each recovery method with each loss
variant (cross-entropy only; KL; CE + KL; KL + SquareHead; CE + KL + SquareHead; ...) for the
same steps on the same blocks, and reports held-out perplexity after training, the fraction
of the pruning gap recovered, ``(ppl_pruned - ppl_rec) / (ppl_pruned - ppl_dense)``, seconds
per step and the peak memory increase. Run from the repository root::

    # the bundled model at the demo's budget (30 steps x 8 x 256 tokens), Wanda 50% from the demo
    prunetune demo   # once: writes runs/demo/stages/prune_wanda_50pct/model
    python benchmarks/distill_sweep.py --pruned runs/demo/stages/prune_wanda_50pct/model --dense tiny

    # SmolLM2-135M (after prunetune run src/prunetune/configs/smollm2-135m.yaml)
    python benchmarks/distill_sweep.py --dense runs/smollm2-135m/stages/dense/model \\
        --pruned runs/smollm2-135m/stages/prune_wanda_50pct/model \\
        --dataset ../shared/data/tinyshakespeare/train.txt --eval_dataset ../shared/data/wikitext2-raw \\
        --block_size 512 --batch_size 4 --steps 8 --lr 2e-3 --full_lr 2e-4 --targets q_proj,v_proj

Held-out perplexity is on ``--eval_dataset``'s test split (``--eval_windows`` windows of
``--block_size``), text none of the runs trains on. Prints a table; JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

VARIANTS = {  # name -> (ce, kl, hidden, temperature)
    "ce": None,
    "kl": (0.0, 1.0, 0.0, 1.0),
    "ce+kl": (1.0, 1.0, 0.0, 1.0),
    "ce+kl T2": (1.0, 1.0, 0.0, 2.0),
    "kl+sq": (0.0, 1.0, 1.0, 1.0),
    "ce+kl+sq": (1.0, 1.0, 1.0, 1.0),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pruned", required=True)
    parser.add_argument("--dense", required=True)
    parser.add_argument("--dataset", default="builtin")
    parser.add_argument("--eval_dataset", default="builtin")
    parser.add_argument("--eval_windows", type=int, default=64)
    parser.add_argument("--methods", default="masked_lora,full")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--full_lr", type=float, default=3e-4)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--json", default=os.path.join(os.environ["OUT"], "distill_sweep.json") if os.environ.get("OUT") else None)
    args = parser.parse_args()

    import torch

    from prunetune.evaluate import evaluate_dataset
    from prunetune.export import merge_adapter
    from prunetune.loading import load_model, load_tokenizer
    from prunetune.recipe import recover
    from prunetune.recover.adapter import apply_adapter
    from prunetune.recipe.args import DataArguments, ModelArguments, RecoveryArguments, RecoveryTrainingArguments

    tokenizer = load_tokenizer(args.pruned)

    def perplexity(model) -> float:
        return evaluate_dataset(model, tokenizer, args.eval_dataset, args.block_size, batch_size=8, split="test",
                                max_windows=args.eval_windows, progress=False).perplexity

    dense_ppl = perplexity(load_model(args.dense))
    pruned_ppl = perplexity(load_model(args.pruned))
    print(f"dense {dense_ppl:.3f}, pruned {pruned_ppl:.3f} ({args.eval_dataset}, {args.eval_windows} x {args.block_size})",
          flush=True)
    rows = []
    for method in args.methods.split(","):
        for variant in args.variants.split(","):
            weights = VARIANTS[variant]
            distill = {} if weights is None else dict(
                distill_from=args.dense, distill_ce_weight=weights[0], distill_kl_weight=weights[1],
                distill_hidden_weight=weights[2], distill_temperature=weights[3])
            with tempfile.TemporaryDirectory() as out:
                started = time.perf_counter()
                result = recover(
                    ModelArguments(model_name_or_path=args.pruned),
                    DataArguments(dataset_name=args.dataset, block_size=args.block_size),
                    RecoveryArguments(recovery_method=method, lora_target_modules=args.targets, eval_before_training=False,
                                      **distill),
                    RecoveryTrainingArguments(output_dir=out, do_train=True, max_steps=args.steps,
                                              per_device_train_batch_size=args.batch_size,
                                              learning_rate=args.full_lr if method == "full" else args.lr,
                                              logging_steps=args.steps, save_strategy="no", report_to=[], seed=0,
                                              disable_tqdm=True, use_cpu=not torch.cuda.is_available()))
                wall = time.perf_counter() - started
                if method == "full":
                    model = load_model(out)
                else:
                    model, _ = merge_adapter(apply_adapter(load_model(args.pruned), out), method, remask=False)
                ppl = perplexity(model)
            gap = (pruned_ppl - ppl) / (pruned_ppl - dense_ppl)
            row = {"method": method, "variant": variant, "perplexity": ppl, "gap_recovered": gap,
                   "seconds_per_step": result.train_seconds / max(result.steps, 1), "tokens": result.tokens,
                   "peak_memory_mb": result.peak_memory_bytes / 2**20, "peak_memory_kind": result.peak_memory_kind,
                   "wall_seconds": wall}
            rows.append(row)
            print(f"{method:12s} {variant:10s} ppl {ppl:8.3f}  gap recovered {gap:6.1%}  "
                  f"{row['seconds_per_step']:.2f} s/step  peak {row['peak_memory_mb']:.0f} MiB", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "dense": dense_ppl, "pruned": pruned_ppl, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
