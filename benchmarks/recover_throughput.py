"""Recovery throughput and MFU on a Llama-2-7B-shaped model: lora, masked_lora, full, and what the ecosystem offers.

    python benchmarks/recover_throughput.py --device cuda    # one H100/H200: bf16, block 1024 (~2 min)
    python benchmarks/recover_throughput.py --smoke          # CPU smoke test: a 4-block 256-wide Llama (~1 min)

One random Llama-2-7B-shaped model in bf16 (no download), 50% of every block linear's row zeroed by
magnitude so the masks are real, trained on random tokens by ``prunetune recover``'s own training
path (``make_trainer``: Trainer, sparsity guard, the method's callbacks, its defaults: fused AdamW,
bf16 autocast, no gradient checkpointing). Cases, in this order (a case that would not fit
``--budget_s`` is skipped and named in the JSON):

1. ``lora`` (the seed's recipe: q_proj/v_proj, r=8) at every micro-batch of ``--micro_batches``
   until one runs out of memory; the fastest is the *best micro-batch* B used below;
2. ``masked_lora`` on q/v at B; 3. a plain PEFT LoRA loop at B (no Trainer: the reference the
   README's "cost vs unmasked" column used);
4. ``lora`` and ``masked_lora`` on all linear layers at B (masked_lora keeps weight-sized tensors
   for backward: peak memory is reported for both; if it does not fit, both run at B/2);
5. ``lora`` at B with a fused linear + cross-entropy that never materialises the (tokens x vocab)
   logits: Liger's ``LigerFusedLinearCrossEntropyLoss`` where ``liger_kernel`` is installed, torch's
   ``F.linear_cross_entropy`` with chunking where torch has it, else this file's chunked fallback
   (torch ops, no kernel); the loss is swapped in on the model instance only;
6. the seed's recipe as written: ``lora`` at micro-batch 1 with gradient checkpointing;
7. ``full`` (masked full fine-tuning) against a plain ``transformers.Trainer`` with the same
   arguments, same model and micro-batch ``--full_batch`` (bf16 weights: 7B fp32 master weights
   with AdamW take ~108 GB before activations; ``benchmarks/full_7b_memory.py`` measures those);
8. ``lora`` at B with ``torch.compile`` of every decoder block (regional: one compiled graph
   shared by the 32 identical blocks), last because its compilation costs the most.

Timing: ``--steps`` optimizer steps after ``--warmup`` (``torch.cuda.synchronize`` at both ends);
peak memory: ``torch.cuda.max_memory_allocated`` over the case (CPU: peak RSS).

MFU (the issue's formula, PaLM appendix B): model FLOPs per token = ``6 N + 12 L d T``, N the
weights of every matrix multiply (block linears and lm_head; not the input embedding), L blocks,
d hidden size, T block length (attention counted without the causal halving); MFU = tokens/s x
that / the GPU's datasheet dense bf16 peak (``--peak_tflops`` overrides). LoRA does not compute
the frozen weights' gradients, so ``work_utilization`` also counts the FLOPs the step must do:
``4 N_frozen + 6 N_trainable + 12 L d T``. The measured rate of one 8192^3 bf16 matmul is
recorded beside the peak.

Prints a table; writes JSON to ``--json`` (or ``$OUT/recover_throughput.json``) after every case.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from recover_bench import SHAPES, Memory, batches, build_model, loop, trainer_run  # noqa: E402

# dense bf16 tensor-core peak by datasheet, TFLOP/s, matched against torch.cuda.get_device_name()
DATASHEET_BF16_TFLOPS = [("H200 NVL", 835.0), ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                         ("H100", 989.4), ("GH200", 989.4), ("A100", 312.0), ("L40S", 362.0), ("B200", 2250.0)]
CASES = {
    "cuda": dict(shape="llama2-7b", block=1024, micro_batches=[8, 16, 24], full_batch=4, warmup=2, steps=5,
                 dtype="bfloat16"),
    "cpu": dict(shape="cpu-small", block=64, micro_batches=[2, 4], full_batch=2, warmup=1, steps=2, dtype="float32"),
}


class Budget:
    def __init__(self, seconds: float | None):
        self.end = time.perf_counter() + seconds if seconds else math.inf

    def left(self) -> float:
        return self.end - time.perf_counter()


# --------------------------------------------------------------------------- FLOPs


def matmul_weights(model) -> int:
    """Weights of every matrix multiply: each nn.Linear (lm_head included), not the input embedding."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def flops_per_token(model, block: int) -> dict:
    config = model.config
    n = matmul_weights(model)
    attention = 12 * config.num_hidden_layers * config.hidden_size * block
    return {"matmul_weights": n, "attention_flops_per_token": attention, "model_flops_per_token": 6 * n + attention,
            "formula": "6 N + 12 L d T (N: weights of every matmul incl. lm_head; L blocks, d hidden, T block length)"}


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak_tflops"
    if device.type != "cuda":
        return None, "none on CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in DATASHEET_BF16_TFLOPS:
        if key in name:
            return value, f"datasheet dense bf16 for {key}"
    return None, f"unknown GPU {name!r}: pass --peak_tflops"


def measured_matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / repeats
    del a, b
    return 2 * size**3 / seconds / 1e12


# --------------------------------------------------------------------------- fused linear + cross-entropy


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` (-100 ignored), chunk by chunk of
    rows: the (rows, vocab) logits exist one chunk at a time; the gradients are computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        valid = (labels != -100).sum().clamp_min(1)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                rows = hidden[start : start + chunk]  # (c, d)
                target = labels[start : start + chunk]
                keep = target != -100
                safe = target.clamp_min(0)
                logits = (rows @ weight.t()).float()  # (c, vocab)
                lse = logits.logsumexp(-1)
                loss += ((lse - logits.gather(1, safe[:, None]).squeeze(1)) * keep).sum()
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(grad.shape[0], device=grad.device), safe] -= 1
                grad.mul_((keep / valid)[:, None])
                grad = grad.to(rows.dtype)
                grad_hidden[start : start + chunk] = grad @ weight
                if grad_weight is not None:
                    grad_weight += (grad.t() @ rows).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss / valid

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden * grad_output.to(grad_hidden.dtype), grad_weight, None, None


def fused_loss_function():
    """(name, fn(hidden (n, d), weight (V, d), labels (n,)) -> mean loss): the ecosystem's first, else ours."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        return "liger_kernel LigerFusedLinearCrossEntropyLoss", lambda h, w, y: liger(w, h, y)
    except Exception:  # not installed, or a release that does not import with this transformers
        pass
    import torch.nn.functional as F

    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        return "torch F.linear_cross_entropy (chunked)", lambda h, w, y: F.linear_cross_entropy(h, w, y, options=options)
    return "benchmark's chunked fallback (torch ops)", lambda h, w, y: ChunkedLinearCrossEntropy.apply(h, w, y, 4096)


def patch_fused_loss(model, loss_fn) -> None:
    """Replace this model instance's forward by one whose loss never materialises the full logits."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        for key in ("num_items_in_batch", "return_dict", "use_cache", "output_attentions", "output_hidden_states"):
            kwargs.pop(key, None)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state  # (B, T, d)
        if labels is None:
            return CausalLMOutputWithPast(logits=self.lm_head(hidden))
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # next-token prediction: shift by one
        return CausalLMOutputWithPast(loss=loss_fn(flat, self.lm_head.weight, labels[:, 1:].reshape(-1)))

    model.forward = types.MethodType(forward, model)


def unpatch_fused_loss(model) -> None:
    model.__dict__.pop("forward", None)


# --------------------------------------------------------------------------- cases


def decoder_blocks(model):
    from prunetune.modules import find_decoder_blocks

    return [block.module for block in find_decoder_blocks(model)]


def adapter_case(model, device, data, warmup, batch, method: str, targets: str, fused_loss=None, compile_blocks=False,
                 **training):
    """Seconds of ``prunetune recover --recovery_method method`` on ``model`` (adapter unloaded afterwards)."""
    from prunetune.recipe.args import RecoveryArguments
    from prunetune.recover.lora import setup_lora, setup_masked_lora

    if fused_loss is not None:
        patch_fused_loss(model, fused_loss)
    model.requires_grad_(False)
    setup_fn = setup_masked_lora if method == "masked_lora" else setup_lora
    setup = setup_fn(model, RecoveryArguments(recovery_method=method, lora_target_modules=targets))
    compiled = []
    try:
        if compile_blocks:
            for block in decoder_blocks(model):
                block.compile()
                compiled.append(block)
        return trainer_run(setup, device, data, warmup, batch, **training)
    finally:
        for block in compiled:
            block._compiled_call_impl = None
        if compiled:
            torch._dynamo.reset()
        setup.model.unload()
        unpatch_fused_loss(model)
        if training.get("gradient_checkpointing"):
            model.gradient_checkpointing_disable()


def peft_loop_case(model, device, data, warmup, batch):
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    try:
        return loop(peft_model, device, data, warmup)
    finally:
        peft_model.unload()


class FullCases:
    """``full`` and a plain Trainer on the same pruned model, each starting from the same weights."""

    def __init__(self, model):
        self.model = model
        pin = torch.cuda.is_available()  # pinned: each restore of a 7B model is then a fast upload
        self.pristine = {}
        for key, value in model.state_dict().items():
            self.pristine[key] = torch.empty(value.shape, dtype=value.dtype, pin_memory=pin).copy_(value.detach())

    def fresh(self) -> None:
        from prunetune.recover.full import KEPT_BUFFER

        for param in self.model.parameters():
            param.grad = None
        self.model.load_state_dict(self.pristine)
        for module in self.model.modules():
            module._buffers.pop(KEPT_BUFFER, None)
        self.model.requires_grad_(True)

    def plain(self, device, data, warmup, batch):
        self.fresh()
        return trainer_run(None, device, data, warmup, batch, model=self.model)

    def masked(self, device, data, warmup, batch):
        from prunetune.recipe.args import RecoveryArguments
        from prunetune.recover.full import setup_full

        self.fresh()
        setup = setup_full(self.model, RecoveryArguments(recovery_method="full"))
        try:
            return trainer_run(setup, device, data, warmup, batch)
        finally:
            setup.check.detach()
            self.restore()

    def restore(self) -> None:
        """The pruned weights back, no masks or gradients left on the model."""
        self.fresh()
        self.model.requires_grad_(False)


# --------------------------------------------------------------------------- driver


class Runner:
    """Runs cases, records rows and rewrites the JSON after each."""

    def __init__(self, args, device, model, flops, peak, payload, out_path):
        self.args, self.device, self.model, self.flops, self.peak = args, device, model, flops, peak
        self.payload, self.out_path = payload, out_path
        self.memory = Memory(device)
        self.step_seconds_per_sample: float | None = None  # from the sweep, for budget estimates

    def save(self) -> None:
        if self.out_path:
            Path(self.out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out_path).write_text(json.dumps(self.payload, indent=1))

    def estimate(self, batch: int, steps: int, factor: float = 1.0, fixed: float = 8.0) -> float:
        per_sample = self.step_seconds_per_sample or 0.0
        return per_sample * batch * steps * factor + fixed

    def run(self, name: str, method: str, batch: int, fn, *, budget: Budget, estimate: float, trainable: int = 0,
            **facts) -> dict:
        row = {"case": name, "method": method, "micro_batch": batch, **facts}
        if trainable:
            row["trainable_weights"] = trainable
        if budget.left() < estimate:
            row["skipped"] = f"about {estimate:.0f} s needed, {budget.left():.0f} s left"
            self.payload["rows"].append(row)
            self.save()
            print(f"  {name:<34} skipped ({row['skipped']})", file=sys.stderr, flush=True)
            return row
        args = self.args
        data = batches(self.model.config.vocab_size, args.warmup + args.steps, batch, args.block, self.device)
        self.memory.reset()
        started = time.perf_counter()
        try:
            seconds = fn(data, batch)
            tokens = batch * args.block * args.steps
            row.update(tokens_per_second=tokens / seconds, step_seconds=seconds / args.steps,
                       peak_memory_gib=self.memory.peak() / 2**30)
            if self.peak:
                per_token = self.flops["model_flops_per_token"]
                work = 4 * (self.flops["matmul_weights"] - trainable) + 6 * trainable + self.flops["attention_flops_per_token"]
                row["mfu"] = row["tokens_per_second"] * per_token / (self.peak * 1e12)
                row["work_utilization"] = row["tokens_per_second"] * (per_token if method == "full" else work) / (self.peak * 1e12)
        except torch.OutOfMemoryError as err:
            row.update(error=f"out of memory: {str(err).splitlines()[0][:200]}", out_of_memory=True,
                       peak_memory_gib=self.memory.peak() / 2**30)
        except Exception as err:  # keep measuring the other cases; the row says what broke
            traceback.print_exc()
            row["error"] = f"{type(err).__name__}: {err}"[:400]
        finally:
            del data
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        row["wall_seconds"] = time.perf_counter() - started
        self.payload["rows"].append(row)
        self.save()
        shown = f"{row['tokens_per_second']:>10,.0f} tok/s" if "tokens_per_second" in row else row.get("error", "")
        mfu = f"  MFU {row['mfu']:.1%}" if "mfu" in row else ""
        print(f"  {name:<34} mb {batch:>3}  {shown}{mfu}  peak {row.get('peak_memory_gib', 0):.1f} GiB", file=sys.stderr, flush=True)
        return row


def trainable_adapter_weights(model, targets: str, rank: int = 8) -> int:
    """Weights of r-rank adapters on the targeted block linears (A: r x in, B: out x r)."""
    from prunetune.recover.lora import resolve_targets

    layers = resolve_targets(model, [t.strip() for t in targets.split(",")])
    return sum(rank * (m.weight.shape[0] + m.weight.shape[1]) for m in layers.values())


def table(rows: list[dict]) -> str:
    lines = [f"{'case':<34} {'mb':>4} {'tokens/s':>10} {'step s':>8} {'MFU':>6} {'work':>6} {'peak GiB':>9}"]
    for r in rows:
        if "tokens_per_second" not in r:
            lines.append(f"{r['case']:<34} {r['micro_batch']:>4} {r.get('error') or r.get('skipped', '')}")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        work = f"{r['work_utilization']:.1%}" if "work_utilization" in r else "-"
        lines.append(f"{r['case']:<34} {r['micro_batch']:>4} {r['tokens_per_second']:>10,.0f} {r['step_seconds']:>8.3f} "
                     f"{mfu:>6} {work:>6} {r['peak_memory_gib']:>9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test (tiny shapes, few steps)")
    parser.add_argument("--micro_batches", default=None, help="comma-separated sweep for lora q/v (cuda: 8,16,24)")
    parser.add_argument("--full_batch", type=int, default=None, help="micro-batch of the full cases (cuda: 4)")
    parser.add_argument("--block", type=int, default=None, help="tokens per block (cuda: 1024)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: datasheet)")
    parser.add_argument("--skip", default="", help="comma-separated case families to leave out: "
                                                   "masked,peft_loop,all_linear,fused_ce,seed,full,compile")
    parser.add_argument("--budget_s", type=float, default=None, help="end on its own within this many seconds")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU)")
    parser.add_argument("--json", default=None, help="default: $OUT/recover_throughput.json when $OUT is set")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    case = dict(CASES[args.device])
    for key in ("full_batch", "block", "steps", "warmup"):
        if getattr(args, key) is not None:
            case[key] = getattr(args, key)
    if args.micro_batches:
        case["micro_batches"] = [int(v) for v in args.micro_batches.split(",")]
    for key, value in case.items():
        setattr(args, key, value)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
        skip.add("compile")  # inductor on CPU compiles C++: minutes, and says nothing about a GPU
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    out_path = args.json or (os.path.join(os.environ["OUT"], "recover_throughput.json") if os.environ.get("OUT") else None)

    import peft
    import transformers

    print(f"building {args.shape} ({args.dtype}) on {device}", file=sys.stderr, flush=True)
    model = build_model(args.shape, device, getattr(torch, args.dtype))
    flops = flops_per_token(model, args.block)
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    loss_name, loss_fn = fused_loss_function()
    payload = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "case": case, "llama2_7b_shape": args.shape == "llama2-7b",
        "shape": dict(zip(("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"), SHAPES[args.shape])),
        "flops": flops, "peak_tflops": peak, "peak_source": peak_source,
        "measured_matmul_tflops": measured_matmul_tflops(device),
        "attention_implementation": getattr(model.config, "_attn_implementation", None),
        "sdpa_backends": ({"flash": torch.backends.cuda.flash_sdp_enabled(),
                           "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                           "cudnn": torch.backends.cuda.cudnn_sdp_enabled(), "math": torch.backends.cuda.math_sdp_enabled()}
                          if device.type == "cuda" else None),
        "fused_loss": loss_name, "rows": [], "complete": False,
    }
    runner = Runner(args, device, model, flops, peak, payload, out_path)
    qv, every = "q_proj,v_proj", "all-linear"
    qv_trainable, all_trainable = trainable_adapter_weights(model, qv), trainable_adapter_weights(model, every)

    def adapter(method, targets, **extra):
        return lambda data, batch: adapter_case(model, device, data, args.warmup, batch, method, targets, **extra)

    # 1. lora q/v, micro-batch sweep
    best = None
    for batch in args.micro_batches:
        row = runner.run("lora q/v r8 (sweep)", "lora", batch, adapter("lora", qv), budget=budget,
                         estimate=runner.estimate(batch, args.warmup + args.steps, 1.2) if runner.step_seconds_per_sample else 0,
                         trainable=qv_trainable, targets=qv, sweep=True)
        if "tokens_per_second" not in row:
            break
        runner.step_seconds_per_sample = row["step_seconds"] / batch
        if best is None or row["tokens_per_second"] > best["tokens_per_second"]:
            best = row
    if best is None:
        print(table(payload["rows"]), flush=True)
        runner.save()
        return 1
    best_batch = best["micro_batch"]
    best["best_micro_batch"] = True
    payload["best_micro_batch"] = best_batch
    steps = args.warmup + args.steps
    # 2-3. masked_lora q/v, plain PEFT loop
    if "masked" not in skip:
        runner.run("masked_lora q/v r8", "masked_lora", best_batch, adapter("masked_lora", qv), budget=budget,
                   estimate=runner.estimate(best_batch, steps, 1.2), trainable=qv_trainable, targets=qv)
    if "peft_loop" not in skip:
        runner.run("plain PEFT LoRA loop q/v r8", "lora", best_batch,
                   lambda data, batch: peft_loop_case(model, device, data, args.warmup, batch), budget=budget,
                   estimate=runner.estimate(best_batch, steps, 1.1), trainable=qv_trainable, targets=qv, reference=True)
    # 4. all linear layers
    if "all_linear" not in skip:
        batch = best_batch
        lora_all = runner.run("lora all-linear r8", "lora", batch, adapter("lora", every), budget=budget,
                              estimate=runner.estimate(batch, steps, 1.5), trainable=all_trainable, targets=every)
        masked_all = runner.run("masked_lora all-linear r8", "masked_lora", batch, adapter("masked_lora", every), budget=budget,
                                estimate=runner.estimate(batch, steps, 1.8), trainable=all_trainable, targets=every)
        if (lora_all.get("out_of_memory") or masked_all.get("out_of_memory")) and best_batch > 1:
            batch = best_batch // 2
            runner.run("lora all-linear r8", "lora", batch, adapter("lora", every), budget=budget,
                       estimate=runner.estimate(batch, steps, 1.5), trainable=all_trainable, targets=every)
            runner.run("masked_lora all-linear r8", "masked_lora", batch, adapter("masked_lora", every), budget=budget,
                       estimate=runner.estimate(batch, steps, 1.8), trainable=all_trainable, targets=every)
    # 5. fused linear + cross-entropy
    if "fused_ce" not in skip:
        runner.run("lora q/v r8, fused linear+CE", "lora", best_batch, adapter("lora", qv, fused_loss=loss_fn), budget=budget,
                   estimate=runner.estimate(best_batch, steps, 1.2), trainable=qv_trainable, targets=qv, fused_loss=loss_name)
    # 6. the seed's recipe as written
    if "seed" not in skip:
        runner.run("lora q/v r8, mb 1 + checkpointing (seed)", "lora", 1, adapter("lora", qv, gradient_checkpointing=True),
                   budget=budget, estimate=runner.estimate(1, steps, 1.6, fixed=10), trainable=qv_trainable, targets=qv,
                   gradient_checkpointing=True)
    # 7. full vs a plain Trainer
    if "full" not in skip:
        full = FullCases(model)
        batch = args.full_batch
        # fwd + bwd with weight gradients ~1.5x LoRA's step, plus optimizer state allocation
        estimate = runner.estimate(batch, steps, 1.7, fixed=15)
        runner.run("plain Trainer, full fine-tuning", "full", batch,
                   lambda data, b: full.plain(device, data, args.warmup, b), budget=budget,
                   estimate=2 * estimate, reference=True)
        runner.run("full (masked full fine-tuning)", "full", batch,
                   lambda data, b: full.masked(device, data, args.warmup, b), budget=budget, estimate=estimate)
        full.restore()
        del full
        gc.collect()
    # 8. torch.compile of every block
    if "compile" not in skip:
        runner.run("lora q/v r8, torch.compile blocks", "lora", best_batch, adapter("lora", qv, compile_blocks=True),
                   budget=budget, estimate=runner.estimate(best_batch, steps, 1.2, fixed=60), trainable=qv_trainable,
                   targets=qv, compiled=True)
    payload["complete"] = not any("skipped" in r for r in payload["rows"])
    runner.save()
    print(table(payload["rows"]), flush=True)
    print(f"MFU: {flops['formula']}, {flops['model_flops_per_token'] / 1e9:.2f} GFLOP/token, over "
          f"{peak or float('nan'):.0f} TFLOP/s ({peak_source}); work: 4 N_frozen + 6 N_trainable + attention", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
