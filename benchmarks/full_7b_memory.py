"""Peak GPU memory and tokens/s of masked full fine-tuning (``full``) on a Llama-2-7B-shaped model, next to
``--memory_estimate``'s prediction and the seed's ~40 GB.

    python benchmarks/full_7b_memory.py                       # one GPU: both setups, 7B shape, block 1024
    python benchmarks/full_7b_memory.py --shape tiny          # CPU smoke test (seconds): same code, tiny shape

Setups (micro-batch 1 x 1024 tokens, the seed's recipe shape):

* ``recommended``: bf16 weights, bitsandbytes 8-bit AdamW (``--optim adamw_bnb_8bit``), gradient checkpointing;
* ``default``: what ``prunetune recover --recovery_method full`` runs without options on CUDA: fp32 master
  weights, bf16 autocast, fused AdamW, no checkpointing (predicted above 80 GB: on an 80 GB card this
  section reports the out-of-memory error; a larger card measures it).

Each setup runs in its own process (a fresh CUDA context and allocator), killed after
``--section_timeout`` seconds. The model is random (no download), 50% of every block linear's row
zeroed by magnitude, and trained by the library's own pieces (``setup_full``, the recipe's
``make_trainer``: Trainer, masks, sparsity guard) on random tokens: only the data loading and the
output folder of ``prunetune recover`` are left out. Memory is ``torch.cuda.max_memory_allocated``
over the whole training (``max_memory_reserved`` beside it); tokens/s covers the steps after
``--warmup``. Every pruned weight is checked to be exactly zero at the end. A table is printed;
with ``$OUT`` set, JSON goes to ``$OUT/full_7b_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

SEED_GB = 40  # the seed's quote for dense fine-tuning of Llama-7B
SETUPS = {
    "recommended": dict(dtype="bfloat16", optim="adamw_bnb_8bit", gradient_checkpointing=True),
    "default": dict(dtype="float32", optim="adamw_torch_fused", gradient_checkpointing=False),
}
TINY = dict(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)


def config_for(shape: str):
    from transformers import AutoConfig

    from prunetune.recipe.memory_estimate import KNOWN_SHAPES

    values = dict(TINY if shape == "tiny" else KNOWN_SHAPES["meta-llama/Llama-2-7b-hf"])
    return AutoConfig.for_model(values.pop("model_type"), **values)


class RandomBlocks(torch.utils.data.Dataset):
    def __init__(self, count: int, block: int, vocab: int):
        self.ids = torch.randint(0, vocab, (count, block), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run_section(name: str, args) -> dict:
    """One setup, in this process: build, prune, train, measure."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    from prunetune.errors import UsageError
    from prunetune.modules import prunable_layers
    from prunetune.recipe.args import RecoveryArguments, RecoveryTrainingArguments
    from prunetune.recover.full import setup_full
    from prunetune.recipe.memory_estimate import TrainingSetup, estimate, shape_from_config
    from prunetune.recover.optimizers import check_optimizer
    from prunetune.recipe.trainer import make_trainer

    choice = SETUPS[name]
    try:
        check_optimizer(argparse.Namespace(optim=choice["optim"]))  # bitsandbytes installed (CUDA for paged)
    except UsageError as err:
        return {"setup": name, **choice, "error": f"skipped: {err}"}
    cuda = torch.cuda.is_available() and args.shape != "tiny"
    device = torch.device("cuda" if cuda else "cpu")
    config = config_for(args.shape)
    config.use_cache = False
    dtype = getattr(torch, choice["dtype"])
    predicted = estimate(shape_from_config(config, args.shape, "benchmark"),
                         TrainingSetup(dtype=choice["dtype"], optim=choice["optim"], bf16=True,
                                       gradient_checkpointing=choice["gradient_checkpointing"],
                                       micro_batch=args.batch, block_size=args.block))
    result = {"setup": name, **choice, "shape": args.shape, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "micro_batch": args.batch, "block": args.block, "predicted_peak_gib": predicted.peak / 2**30}
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for module in prunable_layers(model).values():  # 50% of each row, smallest magnitudes
            weight = module.weight
            threshold = weight.abs().float().kthvalue(weight.shape[1] // 2, dim=1, keepdim=True).values
            weight.masked_fill_(weight.abs().float() <= threshold, 0)
    setup = setup_full(model, RecoveryArguments(recovery_method="full"))
    with tempfile.TemporaryDirectory() as folder:
        training = RecoveryTrainingArguments(
            output_dir=folder, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
            learning_rate=2e-5, optim=choice["optim"], gradient_checkpointing=choice["gradient_checkpointing"],
            bf16=True, save_strategy="no", logging_steps=args.warmup + args.steps, report_to=[], disable_tqdm=True,
            use_cpu=not cuda)
        times: list[float] = []

        class StepClock(TrainerCallback):
            def on_step_end(self, *a, **k):
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter())

        data = RandomBlocks(args.batch * (args.warmup + args.steps), args.block, config.vocab_size)
        trainer, guard = make_trainer(setup, training, data, callbacks=[StepClock()], block_size=args.block)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            result["before_training_gib"] = torch.cuda.memory_allocated() / 2**30
        try:
            trainer.train()
        except torch.OutOfMemoryError as err:
            result["error"] = f"out of memory: {str(err).splitlines()[0]}"
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            return result
        timed = times[args.warmup:]
        if len(timed) >= 2:
            result["tokens_per_s"] = (len(timed) - 1) * args.batch * args.block / (timed[-1] - timed[0])
        if cuda:
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        result["pruned_nonzero"] = sum(guard.check.violations().values())
        result["sparsity"] = guard.check.sparsity()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("llama2-7b", "tiny"), default="llama2-7b")
    parser.add_argument("--setups", default="recommended,default", help="comma-separated: " + ", ".join(SETUPS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block", type=int, default=None, help="tokens per block (default: 1024; tiny: 64)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--section_timeout", type=float, default=300.0, help="seconds per setup before it is killed")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one setup in this process
    args = parser.parse_args()
    args.block = args.block or (64 if args.shape == "tiny" else 1024)
    if args.section:
        print("RESULT " + json.dumps(run_section(args.section, args)), flush=True)
        return 0
    results = []
    for name in [s.strip() for s in args.setups.split(",") if s.strip()]:
        if name not in SETUPS:
            parser.error(f"unknown setup {name!r}; choose from {', '.join(SETUPS)}")
        cmd = [sys.executable, __file__, "--section", name, "--shape", args.shape, "--batch", str(args.batch),
               "--block", str(args.block), "--warmup", str(args.warmup), "--steps", str(args.steps)]
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.section_timeout)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            result = json.loads(lines[-1][7:]) if lines else {"setup": name, "error": proc.stderr.strip()[-600:]}
        except subprocess.TimeoutExpired:
            result = {"setup": name, "error": f"killed after {args.section_timeout:.0f} s"}
        result["wall_s"] = time.perf_counter() - started
        results.append(result)
        print(json.dumps(result), flush=True)
    print("\n| setup | peak allocated GiB (measured) | predicted GiB | reserved GiB | tokens/s | pruned nonzero |"
          "\n|---|---|---|---|---|---|")
    for r in results:
        fmt = lambda key, spec=".2f": format(r[key], spec) if isinstance(r.get(key), (int, float)) else "-"  # noqa: E731
        print(f"| {r['setup']} | {fmt('peak_gib')} | {fmt('predicted_peak_gib')} | {fmt('peak_reserved_gib')} | "
              f"{fmt('tokens_per_s', ',.0f')} | {r.get('pruned_nonzero', '-')} |" + (f" {r['error']}" if "error" in r else ""))
    print(f"seed's quote for dense fine-tuning of Llama-7B: ~{SEED_GB} GB ({SEED_GB * 1e9 / 2**30:.1f} GiB)")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "full_7b_memory.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
