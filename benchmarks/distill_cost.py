"""Cost of one recovery step with and without distillation: time and peak memory, robust to a shared machine.

On a machine shared with other jobs, wall-clock seconds per step say more about the neighbours
than about the step. This measures, for each recovery method (lora, masked_lora, full) and loss
variant (cross-entropy; KL; KL + SquareHead), on the same random batch:

- **CPU seconds per optimizer step on one thread** (process time, which other jobs do not
  inflate), after one warm-up step, median of ``--repeats``; on CUDA, wall seconds per step
  after a synchronize;
- **peak memory of the steps**, each variant in a **fresh process** so that no earlier variant's
  heap is counted: on CPU the peak resident set above the resident set once the models are
  loaded (VmHWM, reset before the first step); on CUDA the allocator's peak, weights included.

The teacher's weights are loaded before the measured block, so its bytes are printed apart.
Run from the repository root::

    python benchmarks/distill_cost.py --pruned runs/demo/stages/prune_wanda_50pct/model --dense tiny
    python benchmarks/distill_cost.py --pruned runs/smollm2-135m/stages/prune_wanda_50pct/model \\
        --dense runs/smollm2-135m/stages/dense/model --batch_size 1 --block_size 512 --targets q_proj,v_proj

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = ("lora", "masked_lora", "full")
VARIANTS = {"ce": None, "kl": (0.0, 1.0, 0.0), "kl+sq": (0.0, 1.0, 1.0)}  # (ce, kl, hidden) weights


def measure(args) -> dict:
    """One (method, variant) in this process: seconds per step and the steps' peak memory."""
    import torch

    torch.set_num_threads(1)
    from prunetune.loading import load_model
    from prunetune.memory import track_peak_memory
    from prunetune.recipe.args import RecoveryArguments
    from prunetune.recover.distill import Distiller, DistillSettings
    from prunetune.recover.registry import SETUPS

    device = torch.device(args.device)
    weights = VARIANTS[args.variant]
    teacher = None
    if weights is not None:
        teacher = load_model(args.dense).requires_grad_(False).eval().to(device)
    student = load_model(args.pruned).to(device)
    vocab = student.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.batch_size, args.block_size), generator=generator).to(device)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
    setup = SETUPS[args.method](student, RecoveryArguments(recovery_method=args.method, lora_target_modules=args.targets))
    model = setup.model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    distiller = None if weights is None else Distiller(model, teacher, DistillSettings(
        teacher=args.dense, ce_weight=weights[0], kl_weight=weights[1], hidden_weight=weights[2],
        chunk_tokens=args.chunk_tokens))
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    times = []
    with track_peak_memory(device) as peak:
        for step in range(args.repeats + 1):
            started = clock()
            loss = model(**batch).loss if distiller is None else distiller.loss(model, batch).total
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if cuda:
                torch.cuda.synchronize(device)
            if step:  # the first is a warm-up (it also allocates the optimizer's state, counted in the peak)
                times.append(clock() - started)
    teacher_mib = 0.0 if teacher is None else sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20
    return {"seconds": statistics.median(times), "peak_mb": peak.block_mb, "memory_kind": peak.kind,
            "teacher_mib": teacher_mib, "vocab": vocab}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pruned", required=True)
    parser.add_argument("--dense", required=True)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk_tokens", type=int, default=256, help="positions per logits chunk (--distill_chunk_tokens)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "VARIANT"), help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()

    if args.one:
        args.method, args.variant = args.one
        print(json.dumps(measure(args)))
        return 0

    shared = ["--pruned", args.pruned, "--dense", args.dense, "--batch_size", str(args.batch_size), "--block_size",
              str(args.block_size), "--targets", args.targets, "--repeats", str(args.repeats), "--device", args.device,
              "--chunk_tokens", str(args.chunk_tokens)]
    rows = []
    for method in args.methods.split(","):
        base = None
        for variant in VARIANTS:
            child = subprocess.run([sys.executable, __file__, *shared, "--one", method, variant],
                                   capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if child.returncode:
                sys.stderr.write(child.stderr)
                return child.returncode
            figures = json.loads(child.stdout.strip().splitlines()[-1])
            base = base or figures
            rows.append((method, variant, figures, base))
    teacher_mib = max(figures["teacher_mib"] for _, _, figures, _ in rows)
    vocab = rows[0][2]["vocab"]
    memory = "peak RSS above the loaded models" if rows[0][2]["memory_kind"] == "rss" else "peak allocated"
    clock = "wall s / step" if args.device.startswith("cuda") else "CPU s / step (1 thread)"
    print(f"teacher {teacher_mib:.0f} MiB; logits chunk {args.chunk_tokens * vocab * 4 / 2**20:.0f} MiB per tensor "
          f"({args.chunk_tokens} positions x {vocab} x fp32); batch {args.batch_size} x {args.block_size}; median of {args.repeats}; "
          f"each variant in a fresh process")
    print(f"| method | variant | {clock} | x cross-entropy | {memory} (MB) | x cross-entropy |")
    print("|---|---|---|---|---|---|")
    for method, variant, figures, base in rows:
        print(f"| {method} | {variant} | {figures['seconds']:.2f} | {figures['seconds'] / base['seconds']:.2f} | "
              f"{figures['peak_mb']:.0f} | {figures['peak_mb'] / max(base['peak_mb'], 1e-9):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
