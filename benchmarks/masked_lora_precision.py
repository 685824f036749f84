"""Masked LoRA's fused forward: how much of a small update reaches the output in bf16, what it saves, its speed.

    python benchmarks/masked_lora_precision.py                 # CPU (~1-2 min on 2 cores)
    python benchmarks/masked_lora_precision.py --device cuda   # one GPU: 4096x4096 layer, 8,192 tokens

Three tables, each comparing the fused forward of ``prunetune.recover.masked_lora`` with the
one it replaced (kept below as :func:`old_fused_forward`) and with PEFT's plain LoRA:

* **precision**: one 512x512 bf16 layer, half of every row zeroed by magnitude, an adapter
  (r = 8, s = 1) whose masked update has mean ``|delta| / |W|`` = 1.5e-3 over the kept
  weights, 4,096 random inputs. ``slope`` is the least-squares slope of the layer's output
  change (output with the adapter minus the base output, both in bf16) against the intended
  change ``x @ delta^T`` computed in fp64 from the exact values of the parameters: 1.0 means
  the whole update reaches the output, as the gradient assumes. Two settings: everything in
  bf16 without autocast, and what ``prunetune recover`` trains with on CUDA (bf16 base, PEFT's
  fp32 adapters, bf16 autocast). Rows: ``peft_lora`` (plain LoRA, same factors, its own
  unmasked delta), ``peft_order_masked`` (PEFT's order on the masked delta: bf16 base output +
  bf16 adapter output, masked LoRA's dropout path), ``old_fused`` (``W + s (B A) * M`` by
  ``addcmul`` in the weight's dtype), ``fp32_sum_nearest`` (the same sum accumulated in fp32,
  rounded to nearest once), ``new_fused`` (fp32 sum, stochastic rounding; mean and range over
  seeds).
* **saved for backward**: bytes autograd keeps for one layer's forward (counted with
  ``torch.autograd.graph.saved_tensors_hooks``), split into tensors the module holds anyway
  (parameters, buffers: no extra memory), the layer input, and everything else.
* **speed**: forward + backward (input and adapter gradients) of one layer, fastest of
  ``--repeats`` rounds that each run every case once (interleaved, so drift on a shared machine
  hits all cases alike), fp32 and bf16 (bf16 base, fp32 adapters, bf16 autocast). On a CPU
  without AVX512-BF16 the bf16 matmuls have no native kernel (the input gradient's layout is
  ~10x slower still, for PEFT and both fused paths alike) and dominate everything else, so
  CPU figures say little about a GPU.

Prints the tables; ``--json PATH`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.utils.other import transpose
from torch import nn

from prunetune.recover.masked_lora import FusedPlan, MaskedLoraConfig, MaskedLoraLinear, effective_weight, kept_mask

RANK = 8


def old_fused_forward(layer: MaskedLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The fused forward this benchmark compares against (prunetune before the fp32 sum)."""
    base = layer.get_base_layer()
    weight = base.weight
    for adapter in layer.active_adapters:
        product = transpose(layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight, layer.fan_in_fan_out)
        weight = torch.addcmul(weight, product.to(weight.dtype), kept_mask(layer, adapter), value=layer.scaling[adapter])
    return F.linear(x, weight.t() if layer.fan_in_fan_out else weight, base.bias)


def nearest_fused_forward(layer: MaskedLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The fp32 sum rounded to nearest once (what the issue first suggested)."""
    base = layer.get_base_layer()
    plan = FusedPlan((float(layer.scaling["default"]),), bool(layer.fan_in_fan_out), x.dtype, seed=None)
    factors = (layer.lora_A["default"].weight, layer.lora_B["default"].weight, kept_mask(layer, "default"))
    return F.linear(x, effective_weight(base.weight, factors, plan), base.bias)


def pruned_weight(size: int, generator: torch.Generator) -> torch.Tensor:
    """(size, size) fp32 weight, half of every row zeroed by magnitude."""
    weight = torch.randn(size, size, generator=generator) * 0.02
    return weight.scatter_(1, weight.abs().argsort(dim=1)[:, : size // 2], 0.0)


def factors_for(weight: torch.Tensor, ratio: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16-representable A (r, in), B (out, r) with mean |(B A) * M| / mean |W kept| == ratio."""
    kept = weight != 0
    lora_A = torch.randn(RANK, weight.shape[1], generator=generator) / weight.shape[1] ** 0.5
    lora_B = torch.randn(weight.shape[0], RANK, generator=generator)
    delta = (lora_B.double() @ lora_A.double())[kept]
    lora_B = lora_B * float(ratio * weight.double()[kept].abs().mean() / delta.abs().mean())
    return lora_A.bfloat16().float(), lora_B.bfloat16().float()


def build(config_class, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, adapter_dtype: torch.dtype):
    """One-layer PEFT model; returns the adapted layer (train mode)."""
    net = nn.Sequential(OrderedDict(proj=nn.Linear(weight.shape[1], weight.shape[0], bias=False)))
    net.proj.weight = nn.Parameter(weight.clone(), requires_grad=False)
    config = config_class(r=RANK, lora_alpha=RANK, target_modules=["proj"], init_lora_weights=False)
    layer = get_peft_model(net, config).base_model.model.proj
    layer.lora_A["default"].weight = nn.Parameter(lora_A.to(weight.device, adapter_dtype))
    layer.lora_B["default"].weight = nn.Parameter(lora_B.to(weight.device, adapter_dtype))
    return layer.train()


def slope(actual: torch.Tensor, intended: torch.Tensor) -> float:
    actual = actual.double()
    return float((actual * intended).sum() / (intended * intended).sum())


def precision_table(device: torch.device, seeds: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    weight = pruned_weight(512, generator).bfloat16().to(device)
    lora_A, lora_B = factors_for(weight.float().cpu(), 1.5e-3, generator)
    x = torch.randn(4096, 512, generator=generator).bfloat16().to(device)
    kept = (weight != 0).double()
    full_delta = lora_B.double().to(device) @ lora_A.double().to(device)  # s = 1
    intended = {"masked": x.double() @ (full_delta * kept).T, "plain": x.double() @ full_delta.T}
    rows = []
    for setting, adapter_dtype, autocast in [("bf16, no autocast", torch.bfloat16, False),
                                             ("bf16 base, fp32 adapters, bf16 autocast", torch.float32, True)]:
        masked = build(MaskedLoraConfig, weight, lora_A, lora_B, adapter_dtype)
        plain = build(LoraConfig, weight, lora_A, lora_B, adapter_dtype)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            base = F.linear(x, weight).double()
            found = {"peft_lora": slope(plain(x) - base, intended["plain"]),
                     "old_fused": slope(old_fused_forward(masked, x) - base, intended["masked"]),
                     "fp32_sum_nearest": slope(nearest_fused_forward(masked, x) - base, intended["masked"])}
            masked.lora_dropout["default"] = nn.Dropout(0.0)  # train mode + a dropout module: the unfused path
            found["peft_order_masked"] = slope(masked(x) - base, intended["masked"])
            masked.lora_dropout["default"] = nn.Identity()
            new = []
            for seed in range(seeds):
                torch.manual_seed(seed)
                new.append(slope(masked(x) - base, intended["masked"]))
        rows.append({"setting": setting, **found, "new_fused": statistics.mean(new), "new_fused_min": min(new),
                     "new_fused_max": max(new)})
    return rows


def saved_bytes(forward, layer: nn.Module, x: torch.Tensor) -> dict:
    """Bytes autograd saves for one forward: held by the module anyway / the layer input / other."""
    owned = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    found = {"module": 0, "input": 0, "other": 0, "largest_other": 0}

    def pack(tensor):
        size = tensor.untyped_storage().nbytes()
        if tensor.untyped_storage().data_ptr() in owned:
            found["module"] += size
        elif tensor.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            found["input"] += size
        else:
            found["other"] += size
            found["largest_other"] = max(found["largest_other"], size)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward(x)
    return found


def layer_for_speed(size: int, device: torch.device, setting: str):
    generator = torch.Generator().manual_seed(1)
    weight = pruned_weight(size, generator)
    lora_A, lora_B = factors_for(weight, 1e-2, generator)
    weight = weight.to(device, torch.bfloat16 if setting == "bf16" else torch.float32)
    masked = build(MaskedLoraConfig, weight, lora_A, lora_B, torch.float32)
    plain = build(LoraConfig, weight, lora_A, lora_B, torch.float32)
    return masked, plain


def fwd_bwd(forward, x: torch.Tensor, params: list[torch.Tensor], device: torch.device, autocast: bool) -> float:
    """Seconds for one forward + backward (gradients of ``params``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = forward(x)
    torch.autograd.grad(out.float().square().sum(), params)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def speed_and_memory_table(device: torch.device, size: int, tokens: int, repeats: int, settings: list[str]) -> list[dict]:
    rows = []
    x_fp32 = torch.randn(tokens, size, generator=torch.Generator().manual_seed(2)).to(device)
    for setting in settings:
        masked, plain = layer_for_speed(size, device, setting)
        autocast = setting == "bf16"
        # the input needs a gradient, as in every layer but the first of a model being trained (else autograd
        # keeps no weight for the input gradient, and the old path's effective weight would not show)
        x = (x_fp32.bfloat16() if autocast else x_fp32).requires_grad_()
        masked_params = [x, masked.lora_A["default"].weight, masked.lora_B["default"].weight]
        plain_params = [x, plain.lora_A["default"].weight, plain.lora_B["default"].weight]
        cases = {"peft_lora": (plain, plain, plain_params),
                 "old_fused": (lambda v: old_fused_forward(masked, v), masked, masked_params),
                 "new_fused": (masked, masked, masked_params)}
        seconds = {name: float("inf") for name in cases}
        for attempt in range(repeats + 1):  # interleaved, so drift on a shared machine hits every case alike
            for name, (forward, _, params) in cases.items():
                elapsed = fwd_bwd(forward, x, params, device, autocast)
                if attempt:  # the first round warms up
                    seconds[name] = min(seconds[name], elapsed)
        for name, (forward, layer, _) in cases.items():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                saved = saved_bytes(forward, layer, x)
            rows.append({"setting": setting, "case": name, "seconds": seconds[name], **saved})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="speed layer is size x size (cpu: 1024, cuda: 4096)")
    parser.add_argument("--tokens", type=int, default=None, help="inputs per forward for speed (cpu: 1024, cuda: 8192)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5, help="rounding seeds for new_fused's slope")
    parser.add_argument("--settings", default="fp32,bf16", help="speed settings: fp32 and/or bf16 (bf16 base, autocast)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    size = args.size or (4096 if device.type == "cuda" else 1024)
    tokens = args.tokens or (8192 if device.type == "cuda" else 1024)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    precision = precision_table(device, args.seeds)
    print("\nslope of the output change against the intended change (1.0 = the whole update), 512x512, |delta|/|W| = 1.5e-3")
    columns = ["peft_lora", "peft_order_masked", "old_fused", "fp32_sum_nearest", "new_fused"]
    print(f"{'setting':42s}" + "".join(f"{c:>19s}" for c in columns))
    for row in precision:
        print(f"{row['setting']:42s}" + "".join(f"{row[c]:19.3f}" for c in columns)
              + f"   (new_fused over {args.seeds} seeds: {row['new_fused_min']:.3f}-{row['new_fused_max']:.3f})")

    speed = speed_and_memory_table(device, size, tokens, args.repeats, args.settings.split(","))
    print(f"\none {size}x{size} layer, {tokens} inputs: forward + backward, and what autograd saves for it (MiB)")
    print(f"{'setting':8s}{'case':12s}{'seconds':>10s}{'module-held':>13s}{'input':>9s}{'other':>9s}{'largest other':>15s}")
    mib = 2.0 ** 20
    for row in speed:
        print(f"{row['setting']:8s}{row['case']:12s}{row['seconds']:10.4f}{row['module'] / mib:13.2f}{row['input'] / mib:9.2f}"
              f"{row['other'] / mib:9.2f}{row['largest_other'] / mib:15.2f}")
    print("module-held: parameters and buffers the layer keeps anyway (no extra memory); other: extra tensors "
          f"(one {size}x{size} weight is {size * size * 4 / mib:.0f} MiB in fp32, {size * size * 2 / mib:.0f} MiB in bf16)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": str(device), "name": name, "torch": torch.__version__, "size": size, "tokens": tokens,
                       "precision": precision, "speed_and_memory": speed}, handle, indent=2)


if __name__ == "__main__":
    main()
