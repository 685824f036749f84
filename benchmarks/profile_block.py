"""Where the time goes: torch.profiler over pruning two Llama-2-7B-shaped blocks and over one training step.

    python benchmarks/profile_block.py --device cuda   # fp16 pruning (128 x 2048 tokens), bf16 training (mb 8 x 1024)
    python benchmarks/profile_block.py --smoke         # CPU smoke test, tiny shapes

For a speed target that is missed (``benchmarks/speed_tables.py`` says which), this is the note's
evidence. Pruning: a 2-block random Llama at the 7B shape (block 0 runs in full; block 1 is the last,
without its propagate), Wanda and SparseGPT in both schedules, each after an unprofiled warm-up run.
Training: one optimizer step of ``lora`` and ``masked_lora`` (q/v, r=8; a plain loop with bf16
autocast and fused AdamW, as the Trainer runs it) on the same shape, after two warm-up steps.

For each: wall seconds, the GPU's busy seconds (sum of kernel time; the rest of the wall time is the
GPU waiting for the host: launches, Python, synchronisations, the lock step's thread hand-overs)
and the ``--top`` operators by their own device time (CPU: their own CPU time). JSON to ``--json``
(or ``$OUT/profile_block.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def device_time(event) -> float:
    """Own device time of a profiler average in microseconds (the attribute changed name across torch releases)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def summarize(prof, device: torch.device, top: int, wall: float) -> dict:
    averages = prof.key_averages()
    on_device = device.type == "cuda"
    key = device_time if on_device else (lambda e: float(e.self_cpu_time_total))
    rows = sorted(averages, key=key, reverse=True)[:top]
    busy = sum(device_time(e) for e in averages) / 1e6 if on_device else None
    return {"wall_seconds": wall, "device_busy_seconds": busy,
            "device_idle_fraction": (1 - busy / wall) if busy is not None and wall > 0 else None,
            "top_ops": [{"name": e.key, "calls": e.count, "self_ms": key(e) / 1e3,
                         "cpu_total_ms": float(e.cpu_time_total) / 1e3} for e in rows]}


def activities(device: torch.device):
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def profile_pruning(args, device, budget_end: float) -> list[dict]:
    import prune_bench

    from prunetune.pruning import PruneConfig, prune

    bench_args = prune_bench.parse_args(["--device", device.type, "--model", "random", "--layers", "2",
                                         "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                                         *(["--hidden", "256", "--intermediate", "688", "--heads", "4", "--vocab", "1000"]
                                           if args.smoke else [])])
    model = prune_bench.build_model(bench_args)
    snapshot = prune_bench.WeightSnapshot(model)
    ids = prune_bench.calibration_ids(bench_args)
    results = []
    for method in ("wanda", "sparsegpt"):
        for schedule in ("sequential", "parallel"):
            if time.perf_counter() > budget_end:
                results.append({"method": method, "schedule": schedule, "skipped": "budget"})
                continue
            config = PruneConfig(method=method, sparsity_ratio=0.5, calibration_ids=ids, batch_size=bench_args.batch_size,
                                 true_sequential=schedule == "sequential")
            snapshot.restore(model)
            prune(model, None, config)  # warm-up: kernels, allocator
            snapshot.restore(model)
            prune_bench.synchronize(str(device))
            with profile(activities=activities(device)) as prof:
                start = time.perf_counter()
                report = prune(model, None, config)
                prune_bench.synchronize(str(device))
                wall = time.perf_counter() - start
            row = {"method": method, "schedule": schedule, "blocks": [t.to_dict() for t in report.block_timings],
                   **summarize(prof, device, args.top, wall)}
            results.append(row)
            print_summary(f"prune {method} {schedule} (2 blocks)", row)
    del model, snapshot
    return results


def profile_training(args, device, budget_end: float) -> list[dict]:
    from recover_bench import batches, build_model

    from prunetune.recipe.args import RecoveryArguments
    from prunetune.recover.lora import setup_lora, setup_masked_lora

    shape = "cpu-small" if args.smoke else "llama2-7b"
    model = build_model(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    from prunetune.modules import find_decoder_blocks

    blocks = find_decoder_blocks(model)
    stack = dict(model.named_modules())[blocks[0].name.rsplit(".", 1)[0]]
    del stack[2:]  # two blocks, as for pruning
    model.config.num_hidden_layers = 2
    data = batches(model.config.vocab_size, 3, args.micro_batch, args.block, device)
    results = []
    for method, setup_fn in (("lora", setup_lora), ("masked_lora", setup_masked_lora)):
        if time.perf_counter() > budget_end:
            results.append({"method": method, "skipped": "budget"})
            continue
        model.requires_grad_(False)
        setup = setup_fn(model, RecoveryArguments(recovery_method=method))
        params = [p for p in setup.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

        def step(ids):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = setup.model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            setup.model.train()
            for ids in data[:2]:
                step(ids)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            with profile(activities=activities(device)) as prof:
                start = time.perf_counter()
                step(data[2])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall = time.perf_counter() - start
            row = {"method": method, "targets": "q_proj,v_proj", "micro_batch": args.micro_batch, "block": args.block,
                   **summarize(prof, device, args.top, wall)}
            results.append(row)
            print_summary(f"train step {method} q/v r8 (2 blocks, mb {args.micro_batch} x {args.block})", row)
        finally:
            setup.model.unload()
    return results


def print_summary(title: str, row: dict) -> None:
    busy = f", GPU busy {row['device_busy_seconds']:.3f} s" if row.get("device_busy_seconds") is not None else ""
    print(f"\n{title}: {row['wall_seconds']:.3f} s wall{busy}")
    for op in row["top_ops"][:10]:
        print(f"  {op['self_ms']:>10.2f} ms  {op['calls']:>6}x  {op['name'][:90]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128; smoke 8)")
    parser.add_argument("--seqlen", type=int, default=None, help="default 2048 (smoke 64)")
    parser.add_argument("--micro_batch", type=int, default=None, help="training micro-batch (default 8; smoke 2)")
    parser.add_argument("--block", type=int, default=None, help="training block length (default 1024; smoke 64)")
    parser.add_argument("--top", type=int, default=25, help="operators kept per profile")
    parser.add_argument("--parts", default="prune,train", help="prune and/or train")
    parser.add_argument("--budget_s", type=float, default=None, help="skip what is left past this many seconds")
    parser.add_argument("--json", default=None, help="default: $OUT/profile_block.json when $OUT is set")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
        torch.set_num_threads(1)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    args.nsamples = args.nsamples or (8 if args.smoke else 128)
    args.seqlen = args.seqlen or (64 if args.smoke else 2048)
    args.micro_batch = args.micro_batch or (2 if args.smoke else 8)
    args.block = args.block or (64 if args.smoke else 1024)
    budget_end = time.perf_counter() + args.budget_s if args.budget_s else math.inf
    device = torch.device(args.device)
    payload = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__}
    out_path = args.json or (os.path.join(os.environ["OUT"], "profile_block.json") if os.environ.get("OUT") else None)

    def save():
        if out_path:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(json.dumps(payload, indent=1))

    parts = {p.strip() for p in args.parts.split(",")}
    if "prune" in parts:
        payload["prune"] = profile_pruning(args, device, budget_end)
        save()
    if "train" in parts:
        payload["train"] = profile_training(args, device, budget_end)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
