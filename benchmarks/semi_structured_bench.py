"""2:4 inference: dense fp16 matmuls against PyTorch's semi-structured sparse ones, 7B-shaped layers and model.

    python benchmarks/semi_structured_bench.py --device cuda   # Llama-2-7B shapes (~30 s)
    python benchmarks/semi_structured_bench.py --smoke         # CPU: the dense path only, 2:4 skipped with the reason

Weights are random fp16, pruned 2:4 by magnitude (the 2 smallest of every 4 consecutive inputs of a
row), then converted with ``torch.sparse.SparseSemiStructuredTensorCUSPARSELT.from_dense`` (what
``to_sparse_semi_structured`` gives by default, cuSPARSELt) and ``...CUTLASS.from_dense`` (CUTLASS
kernels), whichever this torch and GPU support. Two measurements:

* **layers**: ``F.linear(x, W)`` for the three Llama-2-7B linear shapes (out x in: 4096x4096 q/k/v/o,
  11008x4096 gate/up, 4096x11008 down) at 1, 16, 256 and 4096 tokens, shaped as a prefill
  (1, tokens, in) and as a decode step of ``tokens`` sequences (tokens, 1, in) -- the same matmul
  for a linear layer, timed both ways. Each is timed eagerly (CUDA events around ``--iters``
  calls: what a Python loop pays, dispatch included) and, where it can be captured, as a CUDA
  graph replay (the GPU's time alone); median of ``--rounds``. Correctness: the relative error
  ``||y - y_ref|| / ||y_ref||`` against an fp32 matmul of the same pruned weight, for dense and
  2:4 alike (2:4 passes when within 2x dense's error or under 2e-3).
* **model**: a 7B-shaped Llama (``--layers`` blocks) with every block linear 2:4-pruned, forward
  in ``torch.inference_mode`` with ``logits_to_keep=1``: prefill-shaped (1, T) and decode-shaped
  (B, 1) inputs for the same token counts, dense and with each block linear's weight replaced by
  its semi-structured form; tokens/s, eager and CUDA graph where capture works. Decode-shaped
  inputs carry no KV cache: the attention over a cache is the same work for dense and 2:4, so
  these figures are an upper bound of 2:4's gain in a real decode step. Correctness: logits of
  the 2:4 model against the dense one on the same pruned weights.

``speedup`` = dense seconds / 2:4 seconds (above 1: 2:4 is faster). Skips cleanly (exit 0, the
reason in the JSON) without CUDA, on a GPU below compute capability 8.0, or where torch cannot
build either kind of semi-structured tensor. Writes ``--json`` (or ``$OUT/semi_structured_bench.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LAYER_SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
SMOKE_SHAPES = {"q/k/v/o": (256, 256), "gate/up": (688, 256), "down": (256, 688)}
TOKENS = [1, 16, 256, 4096]
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 num_hidden_layers=32, vocab_size=32000)
SMOKE_MODEL = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4,
                   num_hidden_layers=2, vocab_size=1000)


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Zero the 2 smallest |w| of every 4 consecutive inputs of each row, (out, in)."""
    groups = weight.reshape(-1, 4)
    smallest = groups.abs().argsort(dim=1, stable=True)[:, :2]
    return groups.scatter(1, smallest, 0).view_as(weight)


def sparse_backends(device: torch.device) -> tuple[dict, str | None]:
    """name -> class for each semi-structured backend that works here; else the reason there is none."""
    if device.type != "cuda":
        return {}, "no CUDA device: torch's semi-structured sparse tensors are CUDA-only"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return {}, f"compute capability {major}.{minor}: 2:4 sparse tensor cores need 8.0 or newer"
    try:
        from torch.sparse import (
            SparseSemiStructuredTensorCUSPARSELT,
            SparseSemiStructuredTensorCUTLASS,
        )
    except ImportError as err:
        return {}, f"this torch ({torch.__version__}) has no semi-structured sparse tensors: {err}"
    found, reasons = {}, []
    probe = prune_2_4(torch.randn(128, 128, device=device, dtype=torch.float16))
    x = torch.randn(64, 128, device=device, dtype=torch.float16)
    for name, cls in (("cusparselt", SparseSemiStructuredTensorCUSPARSELT), ("cutlass", SparseSemiStructuredTensorCUTLASS)):
        try:
            F.linear(x, cls.from_dense(probe))
            torch.cuda.synchronize(device)
            found[name] = cls
        except Exception as err:  # a backend this build or card lacks
            reasons.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return found, None if found else "; ".join(reasons)


def record_timing(row: dict, mode: str, fn, device: torch.device, iters: int, rounds: int) -> None:
    """Time ``fn`` in ``mode`` (eager / graph) into ``row``: ``MODE_seconds`` and tokens/s, or ``MODE_error``."""
    try:
        seconds = time_call(fn, device, iters, rounds, mode == "graph")
    except Exception as err:
        row[f"{mode}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        return
    row[f"{mode}_seconds"] = seconds
    if seconds:
        row[f"{mode}_tokens_per_second"] = row["tokens"] / seconds


def time_call(fn, device: torch.device, iters: int, rounds: int, graph: bool) -> float | None:
    """Median seconds per call: eager (events around ``iters`` calls) or a captured CUDA graph of ``iters`` calls."""
    if device.type != "cuda":
        if graph:
            return None  # CUDA graphs only
        fn()
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - start) / iters)
        return statistics.median(samples)
    for _ in range(3):
        fn()
    torch.cuda.synchronize(device)
    if graph:
        try:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
                fn()
            torch.cuda.current_stream(device).wait_stream(stream)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                for _ in range(iters):
                    fn()
            run = cuda_graph.replay
        except Exception:  # not capturable (host syncs, allocations the capture refuses)
            torch.cuda.synchronize(device)
            return None
        per_run = iters
    else:
        def run():
            for _ in range(iters):
                fn()
        per_run = iters
    samples = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / per_run)
    if graph:
        del cuda_graph
    return statistics.median(samples)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference).norm() / reference.norm().clamp_min(1e-30))


def add_speedups(rows: list[dict], keys: tuple[str, ...]) -> None:
    """``{mode}_speedup`` = dense seconds / this row's, against the dense row with the same ``keys``."""
    for row in rows:
        if row["impl"] == "dense" or "skipped" in row:
            continue
        dense = next((r for r in rows if r["impl"] == "dense" and all(r.get(k) == row.get(k) for k in keys)), {})
        for mode in ("eager", "graph"):
            if row.get(f"{mode}_seconds") and dense.get(f"{mode}_seconds"):
                row[f"{mode}_speedup"] = dense[f"{mode}_seconds"] / row[f"{mode}_seconds"]


def time_rows(rows: list[dict], calls: list, device, iters: int, rounds: int) -> None:
    """Eager timings of every row first, then CUDA graph replays: a capture that goes wrong costs only graph figures."""
    for mode in ("eager", "graph"):
        for row, call in zip(rows, calls):
            if call is None or "error" in row:
                continue
            record_timing(row, mode, call, device, iters, rounds)


def layer_rows(args, device, backends: dict) -> list[dict]:
    rows, calls, keep = [], [], []
    generator = torch.Generator(device=device).manual_seed(0)
    for layer, (out_features, in_features) in args.shapes.items():
        weight = prune_2_4(torch.randn(out_features, in_features, device=device, dtype=args.dtype, generator=generator) * 0.02)
        forms = {"dense": weight}
        for name, cls in backends.items():
            forms[name] = cls.from_dense(weight)
        keep.append(forms)
        for tokens in args.tokens:
            x2d = torch.randn(tokens, in_features, device=device, dtype=args.dtype, generator=generator)
            reference = x2d.float() @ weight.float().t()  # (tokens, out), fp32
            for layout, x in (("prefill", x2d.view(1, tokens, in_features)), ("decode", x2d.view(tokens, 1, in_features))):
                dense_error = None
                for name, w in forms.items():
                    row = {"layer": layer, "out": out_features, "in": in_features, "tokens": tokens, "layout": layout,
                           "impl": name}
                    call = None
                    try:
                        y = F.linear(x, w)
                        row["relative_error"] = relative_error(y.reshape(tokens, out_features), reference)
                        if name == "dense":
                            dense_error = row["relative_error"]
                        else:
                            row["correct"] = row["relative_error"] <= max(2 * (dense_error or 0), 2e-3)
                        call = (lambda x=x, w=w: F.linear(x, w))
                    except Exception as err:
                        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                    rows.append(row)
                    calls.append(call)
            del reference
    time_rows(rows, calls, device, args.iters, args.rounds)
    del keep, calls
    add_speedups(rows, ("layer", "tokens", "layout"))
    return rows


def block_linear_summary(rows: list[dict], layers: int) -> list[dict]:
    """Seconds of one block's 7 linears (4 q/k/v/o, 2 gate/up, 1 down) x blocks, per tokens/layout/impl."""
    count = {"q/k/v/o": 4, "gate/up": 2, "down": 1}
    summary = []
    keys = sorted({(r["tokens"], r["layout"], r["impl"]) for r in rows})
    for tokens, layout, impl in keys:
        entry = {"tokens": tokens, "layout": layout, "impl": impl}
        for mode in ("eager", "graph"):
            parts = [r.get(f"{mode}_seconds") for r in rows if (r["tokens"], r["layout"], r["impl"]) == (tokens, layout, impl)]
            if parts and all(parts) and len(parts) == len(count):
                by_layer = {r["layer"]: r[f"{mode}_seconds"] for r in rows
                            if (r["tokens"], r["layout"], r["impl"]) == (tokens, layout, impl)}
                seconds = layers * sum(count[k] * by_layer[k] for k in count if k in by_layer)
                entry[f"{mode}_seconds"] = seconds
                entry[f"{mode}_tokens_per_second"] = tokens / seconds
        summary.append(entry)
    add_speedups(summary, ("tokens", "layout"))
    return summary


@torch.inference_mode()
def model_rows(args, device, backends: dict, budget_end: float) -> tuple[list[dict], dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from prunetune.modules import prunable_layers

    config = LlamaConfig(**args.model_shape, max_position_embeddings=8192, use_cache=False)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    linears = prunable_layers(model)
    for module in linears.values():
        module.weight.copy_(prune_2_4(module.weight))
    weights = {"dense": {name: module.weight for name, module in linears.items()}}
    for impl, cls in backends.items():
        if time.perf_counter() > budget_end:
            break
        weights[impl] = {name: torch.nn.Parameter(cls.from_dense(w), requires_grad=False) for name, w in weights["dense"].items()}

    def use(impl: str) -> None:
        for name, module in linears.items():
            module.weight = weights[impl][name]

    generator = torch.Generator(device="cpu").manual_seed(1)
    inputs = {}
    for tokens in args.tokens:
        inputs[(tokens, "prefill")] = torch.randint(0, config.vocab_size, (1, tokens), generator=generator).to(device)
        inputs[(tokens, "decode")] = torch.randint(0, config.vocab_size, (tokens, 1), generator=generator).to(device)
    check_ids = inputs[(max(args.tokens), "prefill")]
    reference = model(input_ids=check_ids, logits_to_keep=0).logits.float()
    rows = [{"impl": impl, "tokens": tokens, "layout": layout} for impl in weights for (tokens, layout) in inputs]
    for impl in weights:
        if impl != "dense":
            use(impl)
            error = relative_error(model(input_ids=check_ids, logits_to_keep=0).logits, reference)
            for row in rows:
                if row["impl"] == impl:
                    row["logits_relative_error"] = error
    use("dense")
    del reference
    # eager for every row first, then graphs (see time_rows); the weights switch per row
    for mode in ("eager", "graph"):
        for row in rows:
            if time.perf_counter() > budget_end:
                row[f"{mode}_skipped"] = "budget"
                continue
            use(row["impl"])
            ids = inputs[(row["tokens"], row["layout"])]
            record_timing(row, mode, functools.partial(model, input_ids=ids, logits_to_keep=1), device,
                          args.model_iters, args.model_rounds)
    use("dense")
    add_speedups(rows, ("tokens", "layout"))
    facts = {"blocks": config.num_hidden_layers, "hidden": config.hidden_size, "intermediate": config.intermediate_size,
             "check_tokens": int(check_ids.numel())}
    weights.clear()  # the model and its weights go with this frame
    return rows, facts


def verdict(layer_summary: list[dict], model: list[dict], threshold: float) -> dict:
    """Where 2:4 is faster than dense by more than ``threshold`` (GPU time: graph replays where captured)."""
    def faster(entries):
        wins = []
        for e in entries:
            speed = e.get("graph_speedup") or e.get("eager_speedup")
            if speed and speed > 1 + threshold:
                wins.append(f"{e['impl']} {e['layout']} {e['tokens']} tokens: {speed:.2f}x")
        return wins

    layer_wins, model_wins = faster(layer_summary), faster([m for m in model if "skipped" not in m])
    return {"threshold": threshold, "block_linears_faster_at": layer_wins, "model_faster_at": model_wins,
            "faster_anywhere": bool(layer_wins or model_wins)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts (default: 1,16,256,4096)")
    parser.add_argument("--layers", type=int, default=None, help="blocks of the model measurement (default: 32; 0 skips it)")
    parser.add_argument("--iters", type=int, default=20, help="calls per timed layer round")
    parser.add_argument("--model_iters", type=int, default=3, help="forwards per timed model round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per layer configuration; the median counts")
    parser.add_argument("--model_rounds", type=int, default=3, help="timed rounds per model configuration")
    parser.add_argument("--threshold", type=float, default=0.05, help="speedup above 1 + this counts as faster")
    parser.add_argument("--budget_s", type=float, default=None, help="skip the model measurement past this many seconds")
    parser.add_argument("--json", default=None, help="default: $OUT/semi_structured_bench.json when $OUT is set")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    budget_end = started + args.budget_s if args.budget_s else math.inf
    if args.smoke:
        args.device = "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    small = device.type == "cpu"
    args.dtype = torch.float16 if not small else torch.float32  # CPU fp16 matmuls are emulated: a smoke test only
    args.shapes = SMOKE_SHAPES if small else LAYER_SHAPES
    args.model_shape = dict(SMOKE_MODEL if small else LLAMA2_7B)
    if args.layers is not None:
        args.model_shape["num_hidden_layers"] = args.layers
    args.tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else ([1, 16, 64] if small else TOKENS)
    if small:
        args.iters, args.model_iters, args.rounds, args.model_rounds = 3, 1, 2, 2
    out_path = args.json or (os.path.join(os.environ["OUT"], "semi_structured_bench.json") if os.environ.get("OUT") else None)
    backends, reason = sparse_backends(device)
    payload = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "dtype": str(args.dtype), "tokens": args.tokens, "backends": list(backends), "skipped": reason,
               "cusparselt_version": getattr(torch.backends.cusparselt, "version", lambda: None)() if device.type == "cuda" else None}
    if reason:
        print(f"2:4 semi-structured sparsity skipped: {reason} (the dense path still runs as a smoke test)", flush=True)

    def save():
        if out_path:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(json.dumps(payload, indent=1))

    payload["layers"] = layer_rows(args, device, backends)
    payload["block_linears"] = block_linear_summary(payload["layers"], args.model_shape["num_hidden_layers"])
    save()
    print(f"\n{'tokens':>6} {'layout':<8} {'impl':<11} {'linears tok/s (graph)':>22} {'eager':>12} {'speedup':>8}")
    for e in payload["block_linears"]:
        speed = e.get("graph_speedup") or e.get("eager_speedup")
        print(f"{e['tokens']:>6} {e['layout']:<8} {e['impl']:<11} {e.get('graph_tokens_per_second', float('nan')):>22,.0f} "
              f"{e.get('eager_tokens_per_second', float('nan')):>12,.0f} {speed or float('nan'):>8.2f}")
    bad = [r for r in payload["layers"] if r.get("correct") is False or "error" in r]
    payload["layers_correct"] = not bad
    if bad:
        print(f"{len(bad)} layer rows failed the correctness check or errored, e.g. {bad[0]}", flush=True)
    if args.model_shape["num_hidden_layers"] > 0:
        payload["model"], payload["model_facts"] = model_rows(args, device, backends, budget_end)
        print(f"\nmodel ({payload['model_facts']['blocks']} blocks), tokens/s:")
        print(f"{'tokens':>6} {'layout':<8} {'impl':<11} {'graph':>12} {'eager':>12} {'speedup':>8} {'logits err':>10}")
        for r in payload["model"]:
            if "skipped" in r:
                print(f"{r['impl']}: skipped ({r['skipped']})")
                continue
            speed = r.get("graph_speedup") or r.get("eager_speedup")
            print(f"{r['tokens']:>6} {r['layout']:<8} {r['impl']:<11} {r.get('graph_tokens_per_second') or float('nan'):>12,.0f} "
                  f"{r.get('eager_tokens_per_second') or float('nan'):>12,.0f} {speed or float('nan'):>8.2f} "
                  f"{r.get('logits_relative_error', float('nan')):>10.2e}")
    payload["verdict"] = verdict(payload["block_linears"], payload.get("model", []), args.threshold) if backends else None
    payload["wall_seconds"] = time.perf_counter() - started
    save()
    if payload["verdict"]:
        v = payload["verdict"]
        print("\n2:4 faster than dense (> {:.0%}): {}".format(v["threshold"], "; ".join(v["block_linears_faster_at"] + v["model_faster_at"])
                                                            if v["faster_anywhere"] else "nowhere"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
