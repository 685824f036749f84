"""Cost of one recovery step with and without distillation, robust to a shared machine.

On a machine shared with other jobs, wall-clock seconds per step say more about the neighbours
than about the step. This measures **CPU seconds per optimizer step on one thread** (process
time, which other jobs do not inflate) for each recovery method and loss variant, on the same
batch, after one warm-up step, median of ``--repeats``; and the bytes distillation adds: the
teacher's weights and the largest logits chunk. Run from the repository root::

    python benchmarks/distill_cost.py --pruned runs/demo/stages/prune_wanda_50pct/model --dense tiny
    python benchmarks/distill_cost.py --pruned runs/smollm2-135m/stages/prune_wanda_50pct/model \\
        --dense runs/smollm2-135m/stages/dense/model --batch_size 4 --block_size 512 --targets q_proj,v_proj

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pruned", required=True)
    parser.add_argument("--dense", required=True)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from prunetune.loading import load_model
    from prunetune.recover.args import RecoveryArguments
    from prunetune.recover.distill import Distiller, DistillSettings
    from prunetune.recover.recipe import SETUPS

    teacher = load_model(args.dense).requires_grad_(False).eval()
    vocab = teacher.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.batch_size, args.block_size), generator=generator)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
    variants = {"ce": None, "kl": (0.0, 1.0, 0.0), "kl+sq": (0.0, 1.0, 1.0)}
    teacher_mib = sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20
    print(f"teacher {teacher_mib:.0f} MiB; logits chunk {1024 * vocab * 4 / 2**20:.0f} MiB per tensor "
          f"(1024 positions x {vocab} x fp32); batch {args.batch_size} x {args.block_size}, 1 thread")
    print("| method | variant | CPU s / step | x cross-entropy |")
    print("|---|---|---|---|")
    for method in ("masked_lora", "full"):
        base = None
        for variant, weights in variants.items():
            student = load_model(args.pruned)
            setup = SETUPS[method](student, RecoveryArguments(recovery_method=method, lora_target_modules=args.targets))
            model = setup.model.train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            distiller = None if weights is None else Distiller(model, teacher, DistillSettings(
                teacher=args.dense, ce_weight=weights[0], kl_weight=weights[1], hidden_weight=weights[2]))
            times = []
            for step in range(args.repeats + 1):
                started = time.process_time()
                loss = model(**batch).loss if distiller is None else distiller.loss(model, batch).total
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if step:  # the first is a warm-up
                    times.append(time.process_time() - started)
            seconds = statistics.median(times)
            base = base or seconds
            print(f"| {method} | {variant} | {seconds:.2f} | {seconds / base:.2f} |", flush=True)
            if distiller is not None:
                distiller.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
