"""Recovery throughput: training tokens/s and peak memory of prunetune's methods vs plain loops.

    python benchmarks/recover_bench.py                 # CPU: small random Llama shapes (~1 min)
    python benchmarks/recover_bench.py --device cuda   # one H100: Llama-2-7B-shaped LoRA, ~1.1B full FT

Every model is random (no download) and 50%-pruned by magnitude per row, so the masks are
real. Rows, all on the same model and batch:

* ``peft_lora_loop``: a plain PEFT LoRA loop (the reference); ``masked_lora_loop``: the same
  loop with prunetune's masked LoRA (its default: no adapter dropout, fused forward), and
  ``masked_lora_dropout_loop`` with dropout (the unfused path);
* ``prunetune_lora`` / ``prunetune_masked_lora``: what ``prunetune recover`` runs with its
  defaults (Trainer, sparsity guard, fused AdamW, bf16 on CUDA);
* ``full_loop``: plain full fine-tuning; ``masked_full_loop``: the same loop with prunetune's
  masks (gradient masking; AdamW needs no weight re-mask, see recover/full.py) and
  ``masked_full_remask_loop`` re-masking the weights after every step as well;
  ``trainer_full``: a plain ``transformers.Trainer``; ``prunetune_full``: the recover path.

Loops clip gradients at 1.0 like the Trainer. Timing covers ``--steps`` steps after
``--warmup`` steps, between ``torch.cuda.synchronize()`` calls (fastest of ``--repeats``
interleaved runs); memory is
``torch.cuda.max_memory_allocated`` (CPU: the process's peak RSS since the run began). A
table is printed; with ``$OUT`` set, JSON goes to ``$OUT/recover_bench.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback

import torch

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama-1.1b": (2048, 5632, 22, 32, 4, 32000),
    "cpu-small": (256, 688, 4, 8, 8, 2048),
}
# CPU timings on a shared machine are noisy: cases are interleaved `repeats` times and the fastest kept.
CASES = {"cuda": dict(lora_shape="llama2-7b", full_shape="llama-1.1b", block=1024, batch=8, warmup=3, steps=10, repeats=1),
         "cpu": dict(lora_shape="cpu-small", full_shape="cpu-small", block=128, batch=4, warmup=1, steps=4, repeats=3)}


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    """A random Llama of ``shape`` on ``device``, 50% of every block linear's row zeroed by magnitude."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunetune.modules import prunable_layers

    hidden, intermediate, layers, heads, kv_heads, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=4096, use_cache=False)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a fp32 7B would take 27 GB first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        for module in prunable_layers(model).values():
            weight = module.weight  # (out, in)
            threshold = weight.abs().float().kthvalue(weight.shape[1] // 2, dim=1, keepdim=True).values
            weight.masked_fill_(weight.abs().float() <= threshold, 0)
    return model


class Memory:
    """Peak memory of one run: CUDA allocator peak, or the process's RSS high-water mark on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:  # Linux: writing 5 resets VmHWM, the peak RSS
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
            except OSError:
                pass

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            with open("/proc/self/status") as handle:
                line = next(row for row in handle if row.startswith("VmHWM"))
            return int(line.split()[1]) * 1024
        except (OSError, StopIteration):
            return 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(vocab: int, n: int, batch: int, block: int, device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (batch, block), generator=generator).to(device) for _ in range(n)]


def loop(model, device, data, warmup: int, enforcer=None) -> float:
    """Plain training loop (optionally with prunetune's masks); returns seconds after ``warmup``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    remask = enforcer is not None and enforcer.needs_remask(optimizer)
    model.train()
    start = None
    for step, ids in enumerate(data):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if remask:
            enforcer.remask()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def trainer_run(setup, device, data, warmup: int, batch: int, model=None, **training) -> float:
    """``prunetune recover``'s training path (Trainer + guard + method callbacks) with its defaults.

    With ``setup=None``, a plain ``transformers.Trainer`` on ``model`` with the same arguments.
    ``training``: further ``RecoveryTrainingArguments`` (e.g. ``gradient_checkpointing=True``).
    """
    from transformers import Trainer, TrainerCallback, default_data_collator

    from prunetune.data import BlockDataset
    from prunetune.recipe.args import RecoveryTrainingArguments
    from prunetune.recipe.trainer import make_trainer

    timing = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                sync(device)
                timing["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == len(data):
                sync(device)
                timing["end"] = time.perf_counter()

    blocks = BlockDataset(torch.cat([ids.cpu() for ids in data]), "random")
    with tempfile.TemporaryDirectory() as output_dir:
        args = RecoveryTrainingArguments(output_dir=output_dir, max_steps=len(data), per_device_train_batch_size=batch,
                                         learning_rate=1e-5, save_strategy="no", disable_tqdm=True, report_to=[],
                                         **training)
        if setup is None:
            trainer = Trainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator,
                              callbacks=[Clock()])
        else:
            trainer, _ = make_trainer(setup, args, blocks, callbacks=[Clock()])
        trainer.train()
    return timing["end"] - timing["start"]


def lora_cases(model, device, data, warmup, batch):
    from peft import LoraConfig, get_peft_model

    from prunetune.recipe.args import RecoveryArguments
    from prunetune.recover.lora import setup_lora, setup_masked_lora
    from prunetune.recover.masked_lora import MaskedLoraConfig

    targets = ["q_proj", "v_proj"]
    peft_kwargs = dict(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")

    def peft_loop(config_class, dropout):
        def run():
            peft_model = get_peft_model(model, config_class(lora_dropout=dropout, **peft_kwargs))
            try:
                return loop(peft_model, device, data, warmup)
            finally:
                peft_model.unload()  # drop the adapter, keep the same base for the next case
        return run

    def recipe(setup_fn, method):
        def run():
            setup = setup_fn(model, RecoveryArguments(recovery_method=method))
            try:
                return trainer_run(setup, device, data, warmup, batch)
            finally:
                setup.model.unload()
        return run

    model.requires_grad_(False)
    return {
        "peft_lora_loop": ("lora", 0.05, peft_loop(LoraConfig, 0.05)),
        "masked_lora_loop": ("masked_lora", 0.0, peft_loop(MaskedLoraConfig, 0.0)),
        "masked_lora_dropout_loop": ("masked_lora", 0.05, peft_loop(MaskedLoraConfig, 0.05)),
        "prunetune_lora": ("lora", 0.05, recipe(setup_lora, "lora")),
        "prunetune_masked_lora": ("masked_lora", 0.0, recipe(setup_masked_lora, "masked_lora")),
    }


def full_cases(model, device, data, warmup, batch):
    from prunetune.masks import MaskSet
    from prunetune.recipe.args import RecoveryArguments
    from prunetune.recover.full import KEPT_BUFFER, MaskEnforcer, setup_full

    pristine = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def fresh():
        model.load_state_dict(pristine)  # the plain cases revive pruned weights; every case starts pruned
        for module in model.modules():
            module._buffers.pop(KEPT_BUFFER, None)
        model.requires_grad_(True)

    def plain():
        fresh()
        return loop(model, device, data, warmup)

    def masked(remask):
        def run():
            fresh()
            enforcer = MaskEnforcer(model, MaskSet.from_zeros(model), remask=remask).attach()
            try:
                return loop(model, device, data, warmup, enforcer)
            finally:
                enforcer.detach()
        return run

    def plain_trainer():
        fresh()
        return trainer_run(None, device, data, warmup, batch, model=model)

    def recipe():
        fresh()
        setup = setup_full(model, RecoveryArguments(recovery_method="full"))
        try:
            return trainer_run(setup, device, data, warmup, batch)
        finally:
            setup.check.detach()

    return {"full_loop": ("full", None, plain), "masked_full_loop": ("full", None, masked("auto")),
            "masked_full_remask_loop": ("full", None, masked("always")),
            "trainer_full": ("full", None, plain_trainer), "prunetune_full": ("full", None, recipe)}


def measure(cases: dict, memory: Memory, tokens_per_step: int, steps: int, repeats: int, shape: str) -> list[dict]:
    """Run every case ``repeats`` times, interleaved; keep each case's fastest run and highest peak."""
    rows = {name: {"case": name, "method": kind, "model": shape, "lora_dropout": dropout, "seconds": []}
            for name, (kind, dropout, _) in cases.items()}
    for _ in range(repeats):
        for name, (_, _, run) in cases.items():
            row = rows[name]
            if "error" in row:
                continue
            memory.reset()
            try:
                row["seconds"].append(run())
                row["peak_memory_bytes"] = max(row.get("peak_memory_bytes", 0), memory.peak())
            except Exception as err:  # keep measuring the other cases; the row says what broke
                traceback.print_exc()
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            print(f"  {name:<26} {row['seconds'][-1] / steps if row['seconds'] and 'error' not in row else float('nan'):.3f} s/step",
                  file=sys.stderr, flush=True)
    for row in rows.values():
        if row["seconds"] and "error" not in row:
            best = min(row["seconds"])
            row.update(tokens_per_second=tokens_per_step * steps / best, step_seconds=best / steps)
    return list(rows.values())


def table(rows: list[dict]) -> str:
    refs = {"masked_lora_loop": "peft_lora_loop", "masked_lora_dropout_loop": "peft_lora_loop",
            "prunetune_lora": "peft_lora_loop", "prunetune_masked_lora": "peft_lora_loop",
            "masked_full_loop": "full_loop", "masked_full_remask_loop": "full_loop", "prunetune_full": "trainer_full"}
    by_case = {r["case"]: r for r in rows}
    lines = [f"{'case':<26} {'model':<11} {'tokens/s':>10} {'step s':>8} {'peak GiB':>9} {'vs plain':>9}"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['case']:<26} {row['model']:<11} error: {row['error']}")
            continue
        ref = by_case.get(refs.get(row["case"], ""), {})
        cost = f"{ref['tokens_per_second'] / row['tokens_per_second'] - 1:+.1%}" if ref.get("tokens_per_second") else ""
        lines.append(f"{row['case']:<26} {row['model']:<11} {row['tokens_per_second']:>10,.0f} {row['step_seconds']:>8.3f} "
                     f"{row['peak_memory_bytes'] / 2**30:>9.2f} {cost:>9}")
    lines.append("vs plain: extra step time against the unmasked counterpart (+3% = 3% slower): the plain PEFT loop for\n"
                 "LoRA rows, the plain loop for masked loops, a plain transformers.Trainer for prunetune_full.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", choices=["lora", "full"], default=None, help="run one family of cases")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per case; the fastest counts")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (CPU default 1: on a shared machine, more threads spin-wait and time noise)")
    args = parser.parse_args()
    case = dict(CASES[args.device])
    case.update({k: v for k, v in (("steps", args.steps), ("warmup", args.warmup), ("repeats", args.repeats)) if v is not None})
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    memory, rows = Memory(device), []
    tokens_per_step = case["batch"] * case["block"]
    families = [("lora", case["lora_shape"], torch.bfloat16 if device.type == "cuda" else torch.float32, lora_cases),
                ("full", case["full_shape"], torch.float32, full_cases)]
    for family, shape, dtype, make_cases in families:
        if args.only and args.only != family:
            continue
        print(f"{family}: building {shape} ({dtype}) on {device}", file=sys.stderr, flush=True)
        model = build_model(shape, device, dtype)
        data = batches(SHAPES[shape][-1], case["warmup"] + case["steps"], case["batch"], case["block"], device)
        cases = make_cases(model, device, data, case["warmup"], case["batch"])
        rows += measure(cases, memory, tokens_per_step, case["steps"], case["repeats"], shape)
        del model, data
        memory.reset()
    print(table(rows))
    import peft
    import transformers

    payload = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "case": case, "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
               "rows": rows}
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "recover_bench.json")
        with open(path, "w") as handle:
            json.dump(payload, handle, indent=2)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
