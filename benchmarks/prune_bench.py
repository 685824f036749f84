"""Pruning speed and memory: seconds per block and in total, peak memory, and quality checks.

Run from the repository root::

    python benchmarks/prune_bench.py                      # CPU, the bundled tiny model, builtin data
    python benchmarks/prune_bench.py --device cuda        # a Llama-2-7B-shaped model, random fp16 weights
    python benchmarks/prune_bench.py --device cpu --model random --layers 2 --hidden 512 \\
        --intermediate 1376 --heads 8 --vocab 1000 --nsamples 8 --seqlen 128   # the CUDA path, small, on CPU

For each method it builds a fresh model, times one plain calibration pass (capture + every
block once: the cost two of which a data-aware pruner cannot avoid), then times
:func:`prunetune.pruning.prune` (tokenization excluded). Figures: seconds per block
(statistics forward, mask choice, propagate forward), total seconds, the ratio of pruning
time to two calibration passes, peak accelerator memory (``torch.cuda.max_memory_allocated``,
model weights included) or peak process RSS on CPU. With ``--layers`` below the model's
depth the full-depth total is extrapolated from the per-block mean and marked as such.

Quality, on block 0 of a separate one-block model with the same shapes and data (so the
timed runs carry no checking hooks): Wanda's mask against the formula recomputed in float64
(every row prunes its floor(ratio * in) lowest |W_ij| * ||X_j||_2), and SparseGPT's layer
reconstruction error ``||W X - W' X||_F`` against magnitude pruning at the same sparsity.

Prints a table; writes ``prune_bench.json`` into ``$OUT`` (or ``--json``) after each method.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prunetune.calibrate import CalibrationOptions, forward_blocks  # noqa: E402
from prunetune.modules import find_decoder_blocks, weight_matrix  # noqa: E402
from prunetune.pruning import PruneConfig, prune  # noqa: E402

LLAMA2_7B = dict(hidden=4096, intermediate=11008, heads=32, layers=32, vocab=32000)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default=None, choices=["tiny", "random"],
                        help="tiny (bundled) or random (Llama shapes below); default: tiny on cpu, random on cuda")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], help="methods to time")
    parser.add_argument("--schedules", nargs="+", default=["parallel", "sequential"], choices=["parallel", "sequential"],
                        help="parallel: the papers' two block forwards (dense-block statistics); sequential: "
                             "--true_sequential, one block forward (default: both)")
    parser.add_argument("--sparsity_ratio", type=float, default=0.5)
    parser.add_argument("--sparsity_type", default="unstructured")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=None, help="default: 2048 (random), 256 (tiny)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--layers", type=int, default=None, help="decoder blocks to build (default: all; 7B: 32)")
    for name, value in LLAMA2_7B.items():
        if name != "layers":
            parser.add_argument(f"--{name}", type=int, default=value, help=f"random model: {name} (default: %(default)s, Llama-2-7B)")
    parser.add_argument("--offload_activations", action="store_true", help="keep calibration activations in CPU memory")
    parser.add_argument("--stream_blocks", action="store_true",
                        help="larger-than-accelerator mode: the model and activations stay in CPU memory, each block "
                             "visits --device for its turn (peak accelerator memory = one block + its work)")
    parser.add_argument("--solve_block", type=int, default=None, help="SparseGPT: columns per batched triangular solve")
    parser.add_argument("--no_quality", action="store_true", help="skip the quality checks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write results here (default: $OUT/prune_bench.json when $OUT is set)")
    args = parser.parse_args(argv)
    args.model = args.model or ("tiny" if args.device == "cpu" else "random")
    args.dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "float16"))
    args.seqlen = args.seqlen or (256 if args.model == "tiny" else 2048)
    args.home = "cpu" if args.stream_blocks else args.device  # where the model lives
    args.compute = args.device if args.stream_blocks else None  # where blocks run (None: in place)
    args.offload_activations = args.offload_activations or args.stream_blocks
    return args


# --------------------------------------------------------------------------- models and data


def build_model(args, layers: int | None = None):
    """A fresh model on args.device; random weights are initialised directly there."""
    torch.manual_seed(args.seed)
    layers = layers or args.layers
    if args.model == "tiny":
        from prunetune.loading import LoadOptions, load_model

        model = load_model("tiny", LoadOptions(dtype=str(args.dtype).replace("torch.", ""), device=args.home))
        if layers is not None:
            blocks = find_decoder_blocks(model)
            stack = dict(model.named_modules())[blocks[0].name.rsplit(".", 1)[0]]
            del stack[layers:]
            model.config.num_hidden_layers = layers
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, num_hidden_layers=layers or LLAMA2_7B["layers"],
                         vocab_size=args.vocab, max_position_embeddings=4096, rms_norm_eps=1e-5)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)
    try:
        with torch.device(args.home):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def calibration_ids(args) -> torch.Tensor:
    if args.model == "tiny":
        from prunetune.data import calibration_samples
        from prunetune.loading import load_tokenizer

        return calibration_samples(load_tokenizer("tiny"), "builtin", args.nsamples, args.seqlen, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=generator)


def method_options(args, method: str) -> dict:
    return {"solve_block": args.solve_block} if method == "sparsegpt" and args.solve_block else {}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, process lifetime


# --------------------------------------------------------------------------- quality


class InputRecorder:
    """float64 ||X_j||^2 and X^T X of one layer's inputs during the statistics pass only.

    Parallel schedule: the first ``tokens`` input rows (later calls are the propagate pass over
    pruned weights). Sequential: the rows seen in the lock-step forward's worker threads (not
    the one-batch probe that finds the layers sharing an input).
    """

    def __init__(self, module, tokens: int, hessian: bool, sequential: bool):
        self.tokens, self.seen = tokens, 0
        self.norms = self.gram = None
        self.hessian = hessian
        self.sequential = sequential
        self.handle = module.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        if self.sequential and not threading.current_thread().name.startswith("prunetune-lockstep"):
            return
        if self.seen >= self.tokens:
            return
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        self.seen += x.shape[0]
        norms = (x * x).sum(0)
        self.norms = norms if self.norms is None else self.norms + norms
        if self.hessian:
            gram = x.t() @ x
            self.gram = gram if self.gram is None else self.gram + gram


def quality_check(args, method: str, ids: torch.Tensor, sequential: bool, which: str) -> dict:
    """The check on the first or the last linear of block 0 (the last one reads the output of the
    others: with ``sequential`` the pruned ones, so its statistic is the one-pass forward's own)."""
    model = build_model(args, layers=1)
    block = find_decoder_blocks(model)[0]
    linears = list(block.linears.items())
    relative, layer = linears[0] if which == "first" else linears[-1]  # q_proj / down_proj for Llama
    dense = weight_matrix(layer).double().clone()
    recorder = InputRecorder(layer, ids.numel(), hessian=method == "sparsegpt", sequential=sequential)
    prune(model, None, PruneConfig(method=method, sparsity_ratio=args.sparsity_ratio, sparsity_type=args.sparsity_type,
                                   calibration_ids=ids, batch_size=args.batch_size, options=method_options(args, method),
                                   true_sequential=sequential))
    recorder.handle.remove()
    pruned = weight_matrix(layer).double()
    result = {"layer": block.qualified(relative), "sparsity": float((pruned == 0).double().mean())}
    if method == "wanda":
        scores = dense.abs() * recorder.norms.sqrt()
        count = int(args.sparsity_ratio * dense.shape[1] + 1e-9)
        expected = torch.ones_like(dense, dtype=torch.bool)
        expected.scatter_(1, scores.argsort(dim=1, stable=True)[:, :count], False)
        mismatched = expected != (pruned != 0)
        # a mismatch is a rounding tie when its score sits at the row's cut (fp32 vs fp64 scores)
        ranked = scores.sort(dim=1).values
        cut = (ranked[:, count - 1 : count] + ranked[:, count : count + 1]) / 2  # (out, 1)
        gap = ((scores - cut).abs() / cut)[mismatched]
        beyond = int((gap > 1e-5).sum())
        result.update(mask_mismatches=int(mismatched.sum()), rows_mismatched=int(mismatched.any(1).sum()),
                      mismatches_beyond_rounding=beyond, mask_equals_formula=beyond == 0)
    if method == "sparsegpt":
        count = int(args.sparsity_ratio * dense.numel() + 1e-9)
        magnitude = dense.clone().view(-1)
        magnitude[dense.abs().view(-1).argsort(stable=True)[:count]] = 0

        def error(weight):  # ||(W - W') X||_F from X^T X
            delta = dense - weight.view_as(dense)
            return float(torch.einsum("ij,jk,ik->", delta, recorder.gram, delta).clamp_min(0).sqrt())

        result.update(reconstruction_error=error(pruned), magnitude_error=error(magnitude))
        result["error_ratio_vs_magnitude"] = result["reconstruction_error"] / result["magnitude_error"]
    del model
    return result


# --------------------------------------------------------------------------- timing


def time_method(args, method: str, ids: torch.Tensor, depth: int, sequential: bool) -> dict:
    model = build_model(args)
    options = CalibrationOptions(batch_size=args.batch_size, offload_activations=args.offload_activations,
                                 device=args.compute)
    forward_blocks(model, ids[: args.batch_size], options)  # warm-up: kernels, allocator
    synchronize(args.device)
    calibration_pass = forward_blocks(model, ids, options)
    reset_peak(args.device)
    config = PruneConfig(method=method, sparsity_ratio=args.sparsity_ratio, sparsity_type=args.sparsity_type,
                         calibration_ids=ids, batch_size=args.batch_size, offload_activations=args.offload_activations,
                         device=args.compute, options=method_options(args, method), true_sequential=sequential)
    report = prune(model, None, config)
    synchronize(args.device)
    blocks = [t.to_dict() for t in report.block_timings]
    built = len(blocks)
    per_block = sum(b["total"] for b in blocks) / built
    result = {
        "method": method,
        "schedule": "sequential" if sequential else "parallel",
        "seconds": report.seconds,
        "blocks_built": built,
        "per_block_seconds": per_block,
        "calibration_pass_seconds": calibration_pass,
        "ratio_to_two_passes": report.seconds / (2 * calibration_pass),
        "peak_memory_gib": peak_gib(args.device),
        "sparsity": report.sparsity.overall,
        "blocks": blocks,
    }
    if 1 < built < depth:  # capture once + the mean of the inner blocks + the last (no propagate)
        capture = report.seconds - sum(b["total"] for b in blocks)
        inner = sum(b["total"] for b in blocks[:-1]) / (built - 1)
        result["extrapolated_seconds_full_depth"] = capture + inner * (depth - 1) + blocks[-1]["total"]
    del model, report
    reset_peak(args.device)
    return result


def print_table(results: list[dict], depth: int) -> None:
    print(f"\n{'method':<10} {'schedule':<10} {'blocks':>6} {'s/block':>8} {'total s':>8} {'full-depth s':>13} "
          f"{'2 passes s':>10} {'ratio':>6} {'peak GiB':>9} {'sparsity':>8}")
    for r in results:
        full = r.get("extrapolated_seconds_full_depth")
        full_text = f"~{full:.1f}" if full is not None else f"{r['seconds']:.1f}"
        print(f"{r['method']:<10} {r['schedule']:<10} {r['blocks_built']:>6} {r['per_block_seconds']:>8.3f} {r['seconds']:>8.2f} "
              f"{full_text:>13} {2 * r['calibration_pass_seconds']:>10.2f} {r['ratio_to_two_passes']:>6.2f} "
              f"{r['peak_memory_gib']:>9.2f} {r['sparsity']:>8.4f}")
        for check in r.get("quality", []):
            print("    " + ", ".join(f"{key}: {value}" for key, value in check.items()))
    print(f"(full depth = {depth} blocks; '~' marks an extrapolation from the per-block mean)")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("prunetune.pruning.api").setLevel(logging.WARNING)
    if args.model == "tiny":
        from prunetune.loading import TINY_PATH

        if not (TINY_PATH / "model.safetensors").exists():
            print(f"the bundled model is not trained yet ({TINY_PATH}); use --model random", file=sys.stderr)
            return 2
    out_path = args.json or (os.path.join(os.environ["OUT"], "prune_bench.json") if os.environ.get("OUT") else None)
    ids = calibration_ids(args)
    if args.model == "tiny":
        from prunetune.loading import TINY_PATH

        depth = json.loads((TINY_PATH / "config.json").read_text())["num_hidden_layers"]
    else:  # a Llama-2-7B-shaped model is reported at its full 32 blocks, extrapolated if needed
        seven_b = all(getattr(args, k) == v for k, v in LLAMA2_7B.items() if k != "layers")
        depth = LLAMA2_7B["layers"] if seven_b else (args.layers or LLAMA2_7B["layers"])
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    payload = {"device": device_name, "torch": torch.__version__, "model": args.model, "dtype": str(args.dtype),
               "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size,
               "sparsity_ratio": args.sparsity_ratio, "sparsity_type": args.sparsity_type, "full_depth": depth,
               "threads": torch.get_num_threads(), "stream_blocks": args.stream_blocks,
               "offload_activations": args.offload_activations, "results": []}
    mode = ", blocks streamed from CPU memory" if args.stream_blocks else ""
    print(f"{device_name}: {args.model} model, {args.nsamples} x {args.seqlen} calibration tokens, {args.dtype}{mode}")
    for method in args.methods:
        for schedule in args.schedules:
            start = time.perf_counter()
            sequential = schedule == "sequential"
            quality = []
            if not (args.no_quality or args.stream_blocks) and method in ("wanda", "sparsegpt"):
                # also warms up the method's kernels
                quality = [quality_check(args, method, ids, sequential, which) for which in ("first", "last")]
            result = time_method(args, method, ids, depth, sequential)
            if quality:
                result["quality"] = quality
            result["wall_seconds"] = time.perf_counter() - start
            payload["results"].append(result)
            print_table([result], depth)
            if out_path:
                Path(out_path).parent.mkdir(parents=True, exist_ok=True)
                Path(out_path).write_text(json.dumps(payload, indent=2))
    print_table(payload["results"], depth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
