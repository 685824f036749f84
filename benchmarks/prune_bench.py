"""Pruning speed, peak memory and mask checks: Wanda and SparseGPT, both block schedules, every block.

Run from the repository root::

    python benchmarks/prune_bench.py --device cuda                   # Llama-2-7B shape, fp16, 128 x 2048 tokens, 32 blocks
    python benchmarks/prune_bench.py --device cuda --stream_blocks   # the same, model in CPU memory (--compute_device cuda)
    python benchmarks/prune_bench.py --smoke                         # CPU smoke test: a 2-block random Llama (seconds)
    python benchmarks/prune_bench.py                                 # CPU: the bundled tiny model, builtin data

The model is built once; a copy of its weights (pinned CPU memory) restores the dense model before
every run. Per method it times one plain calibration pass (:func:`prunetune.calibrate.forward_blocks`:
capture + every block once, the physical floor of a one-forward schedule), then per schedule
(``sequential`` = ``--true_sequential``, ``parallel`` = the papers' schedule) one
:func:`prunetune.pruning.prune` call (tokenization excluded). Figures:

* seconds in total and per block (statistics forward, mask choice, propagate forward);
* ``ratio_to_one_pass`` = pruning seconds / one calibration pass (issue 16's targets: Wanda
  sequential <= 1.15, parallel <= 2.0); ``ratio_to_two_passes`` for the older README table;
* SparseGPT's floor: one pass + ``blocks x`` the seconds of
  :func:`prunetune.pruning.sparsegpt.inverse_hessian_factor` for each distinct layer input of a
  block (found by :func:`prunetune.calibrate.probe_groups`), and ``ratio_to_floor`` (target <= 1.5);
* peak accelerator memory (``torch.cuda.max_memory_allocated`` from just before the prune call,
  model weights included; ``model_gib`` is the weights alone) or, on CPU, the process's peak RSS.
  With ``--stream_blocks`` the model and activations stay in CPU memory and each block visits the
  GPU for its turn: the peak is then one block and its work.

Checks (``benchmarks/prune_checks.py``), after each timed run and on that run's own result: the
first and last linear of *every* block, their calibration inputs re-collected in float64. Wanda: the
mask must equal the formula (a mismatch within ``--tie_tolerance`` of its row's cut is a rounding
tie); SparseGPT: the reconstruction error ``||(W - W') X||`` must be below magnitude pruning's
(float64 Gram of the first ``--check_tokens`` rows); both: the mask's structure.

``--budget_s`` makes the run end on its own before an outer timeout: a run or a check that would
not fit is skipped and named in the JSON, which is rewritten after every step (``--json``, or
``$OUT/prune_bench.json`` when ``$OUT`` is set). Prints a table at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prunetune.calibrate import CalibrationOptions, ExtrasCache, capture_inputs, forward_blocks, probe_groups  # noqa: E402
from prunetune.calibrate.blocks import BlockPlacement  # noqa: E402
from prunetune.modules import find_decoder_blocks, weight_matrix  # noqa: E402
from prunetune.pruning import PruneConfig, prune  # noqa: E402
from prunetune.pruning.sparsegpt import inverse_hessian_factor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_checks import verify  # noqa: E402

LLAMA2_7B = dict(hidden=4096, intermediate=11008, heads=32, layers=32, vocab=32000)
SMOKE = dict(device="cpu", model="random", layers=2, hidden=256, intermediate=688, heads=4, vocab=1000,
             nsamples=8, seqlen=64, batch_size=4)
# pruning seconds / one calibration pass seen on an H100 (README): used only to decide whether a run fits the budget
PRIOR_RATIO = {("wanda", "sequential"): 1.3, ("wanda", "parallel"): 1.9,
               ("sparsegpt", "sequential"): 3.5, ("sparsegpt", "parallel"): 4.5}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    parser.add_argument("--model", default=None, choices=["tiny", "random"],
                        help="tiny (bundled) or random (Llama shapes below); default: tiny on cpu, random on cuda")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], help="methods to time")
    parser.add_argument("--schedules", nargs="+", default=["sequential", "parallel"], choices=["parallel", "sequential"],
                        help="sequential: --true_sequential, one block forward; parallel: the papers' two "
                             "(dense-block statistics); in this order (default: both)")
    parser.add_argument("--sparsity_ratio", type=float, default=0.5)
    parser.add_argument("--sparsity_type", default="unstructured")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: 128)")
    parser.add_argument("--seqlen", type=int, default=None, help="default: 2048 (random), 256 (tiny)")
    parser.add_argument("--batch_size", type=int, default=None, help="windows per block forward (default: 8)")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--layers", type=int, default=None, help="decoder blocks to build (default: all; 7B: 32)")
    for name, value in LLAMA2_7B.items():
        if name != "layers":
            parser.add_argument(f"--{name}", type=int, default=None,
                                help=f"random model: {name} (default: {value}, Llama-2-7B)")
    parser.add_argument("--offload_activations", action="store_true", help="keep calibration activations in CPU memory")
    parser.add_argument("--stream_blocks", action="store_true",
                        help="larger-than-accelerator mode (--compute_device): the model stays in CPU memory, each block "
                             "visits --device for its turn (activations then live in pinned CPU memory too)")
    parser.add_argument("--solve_block", type=int, default=None, help="SparseGPT: columns per batched triangular solve")
    parser.add_argument("--check", default=None, choices=["all", "ends", "none"],
                        help="mask checks on the first and last linear of every block (all), of the first and last "
                             "block (ends), or none (default: all; none with --stream_blocks, whose masks are the "
                             "resident run's)")
    parser.add_argument("--no_quality", action="store_true", help="the same as --check none (older name)")
    parser.add_argument("--check_tokens", type=int, default=32768,
                        help="SparseGPT check: input rows in the float64 Gram (0: all; default: %(default)s, 2 batches)")
    parser.add_argument("--tie_tolerance", type=float, default=1e-4,
                        help="Wanda check: relative distance to the row's cut under which a mismatch is a rounding tie")
    parser.add_argument("--calibration_pass", default="method", choices=["method", "run"],
                        help="time the plain calibration pass once per method (default) or before every run")
    parser.add_argument("--budget_s", type=float, default=None, help="end on its own within this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write results here (default: $OUT/prune_bench.json when $OUT is set)")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    args.device = args.device or "cpu"
    args.model = args.model or ("tiny" if args.device == "cpu" else "random")
    for name, value in LLAMA2_7B.items():
        if name != "layers" and getattr(args, name) is None:
            setattr(args, name, value)
    args.nsamples = args.nsamples or 128
    args.batch_size = args.batch_size or 8
    args.dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "float16"))
    args.seqlen = args.seqlen or (256 if args.model == "tiny" else 2048)
    args.home = "cpu" if args.stream_blocks else args.device  # where the model lives
    args.compute = args.device if args.stream_blocks else None  # where blocks run (None: in place)
    args.offload_activations = args.offload_activations or args.stream_blocks
    if args.no_quality:
        args.check = "none"
    args.check = args.check or ("none" if args.stream_blocks else "all")
    return args


class Budget:
    """Seconds left before ``--budget_s`` runs out (infinite without one)."""

    def __init__(self, seconds: float | None):
        self.end = time.perf_counter() + seconds if seconds else math.inf

    def left(self) -> float:
        return self.end - time.perf_counter()


# --------------------------------------------------------------------------- models and data


def build_model(args):
    """The model at ``args.home``. Random weights are drawn on the accelerator when there is one (a
    7B model initialised on CPU takes minutes), then moved home."""
    torch.manual_seed(args.seed)
    if args.model == "tiny":
        from prunetune.loading import LoadOptions, load_model

        model = load_model("tiny", LoadOptions(dtype=str(args.dtype).replace("torch.", ""), device=args.home))
        if args.layers is not None:
            blocks = find_decoder_blocks(model)
            stack = dict(model.named_modules())[blocks[0].name.rsplit(".", 1)[0]]
            del stack[args.layers:]
            model.config.num_hidden_layers = args.layers
        return model.eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, num_hidden_layers=args.layers or LLAMA2_7B["layers"],
                         vocab_size=args.vocab, max_position_embeddings=4096, rms_norm_eps=1e-5)
    build_on = args.device if args.device.startswith("cuda") else args.home
    previous = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)
    try:
        with torch.device(build_on):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if build_on != args.home:
        model.to(args.home)
        torch.cuda.empty_cache()
    return model.eval()


def calibration_ids(args) -> torch.Tensor:
    if args.model == "tiny":
        from prunetune.data import calibration_samples
        from prunetune.loading import load_tokenizer

        return calibration_samples(load_tokenizer("tiny"), "builtin", args.nsamples, args.seqlen, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=generator)


class WeightSnapshot:
    """Every parameter copied to CPU memory (pinned where CUDA is: fast restores), by qualified name."""

    def __init__(self, model):
        pin = torch.cuda.is_available()
        self.saved = {}
        for name, param in model.named_parameters():
            copy = torch.empty(param.shape, dtype=param.dtype, device="cpu", pin_memory=pin)
            copy.copy_(param.detach())
            self.saved[name] = copy

    @torch.no_grad()
    def restore(self, model) -> None:
        for name, param in model.named_parameters():
            param.copy_(self.saved[name], non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.saved.values())


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


# --------------------------------------------------------------------------- SparseGPT's floor


def distinct_input_widths(model, ids: torch.Tensor, args) -> list[int]:
    """Input width of each group of layers that share one input, in block 0 (q/k/v, o, gate/up, down)."""
    blocks = find_decoder_blocks(model)
    options = CalibrationOptions(batch_size=args.batch_size, offload_activations=args.offload_activations, device=args.compute)
    inputs = capture_inputs(model, blocks, ids[: args.batch_size], options)
    block = blocks[0]
    with BlockPlacement(block.module, options.device) as device:
        groups = probe_groups(block.module, block.linears, inputs, device, ExtrasCache(device))
    return [weight_matrix(block.linears[names[0]]).shape[1] for names in groups]


def hessian_inverse_seconds(widths: list[int], device: str, repeats: int = 3) -> dict:
    """Median seconds of ``inverse_hessian_factor`` on a positive definite (in, in) fp32 matrix, per width."""
    seconds = {}
    generator = torch.Generator(device=device).manual_seed(0)
    for width in sorted(set(widths)):
        samples = torch.randn(2 * width, width, device=device, generator=generator)
        hessian = samples.t() @ samples / samples.shape[0]  # (in, in)
        del samples
        times = []
        for attempt in range(repeats + 1):
            matrix = hessian.clone()
            synchronize(device)
            start = time.perf_counter()
            inverse_hessian_factor(matrix, in_place=True)
            synchronize(device)
            if attempt:  # the first warms up the solver
                times.append(time.perf_counter() - start)
        seconds[width] = sorted(times)[len(times) // 2]
        del hessian, matrix
    per_block = sum(seconds[w] for w in widths)
    return {"widths": widths, "seconds_by_width": {str(k): v for k, v in seconds.items()}, "per_block": per_block}


@torch.no_grad()
def warm_up_pruner(args, method: str) -> None:
    """One small layer through the pruner's own code: library handles and kernels load outside the timed run."""
    from prunetune.pruning.api import build_pruner

    pruner = build_pruner(method, args.sparsity_ratio, args.sparsity_type, options=method_options(args, method))
    device = args.device
    for width in (256, 512):
        weight = torch.randn(width, width, device=device, dtype=args.dtype)
        statistic = pruner.new_statistic(width, torch.device(device))
        statistic.update(torch.randn(4 * width, width, device=device, dtype=args.dtype))
        pruner.prune_group([weight], statistic)
    synchronize(device)


# --------------------------------------------------------------------------- timing


def time_pass(args, model, ids: torch.Tensor) -> float:
    options = CalibrationOptions(batch_size=args.batch_size, offload_activations=args.offload_activations, device=args.compute)
    synchronize(args.device)
    return forward_blocks(model, ids, options)


def time_prune(args, model, method: str, ids: torch.Tensor, depth: int, sequential: bool, pass_seconds: float) -> dict:
    reset_peak(args.device)
    config = PruneConfig(method=method, sparsity_ratio=args.sparsity_ratio, sparsity_type=args.sparsity_type,
                         calibration_ids=ids, batch_size=args.batch_size, offload_activations=args.offload_activations,
                         device=args.compute, options=method_options(args, method), true_sequential=sequential)
    report = prune(model, None, config)
    synchronize(args.device)
    blocks = [t.to_dict() for t in report.block_timings]
    built = len(blocks)
    result = {
        "method": method,
        "schedule": "sequential" if sequential else "parallel",
        "seconds": report.seconds,
        "blocks_built": built,
        "per_block_seconds": sum(b["total"] for b in blocks) / built,
        "calibration_pass_seconds": pass_seconds,
        "ratio_to_one_pass": report.seconds / pass_seconds,
        "ratio_to_two_passes": report.seconds / (2 * pass_seconds),
        "peak_memory_gib": peak_gib(args.device),
        "sparsity": report.sparsity.overall,
        "blocks": blocks,
    }
    if args.device.startswith("cuda"):
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if 1 < built < depth:  # capture once + the mean of the inner blocks + the last (no propagate)
        capture = report.seconds - sum(b["total"] for b in blocks)
        inner = sum(b["total"] for b in blocks[:-1]) / (built - 1)
        result["extrapolated_seconds_full_depth"] = capture + inner * (depth - 1) + blocks[-1]["total"]
    del report
    return result


def print_table(results: list[dict], depth: int) -> None:
    print(f"\n{'method':<10} {'schedule':<10} {'blocks':>6} {'s/block':>8} {'total s':>8} {'1 pass s':>8} {'x pass':>7} "
          f"{'x floor':>7} {'peak GiB':>9} {'sparsity':>8}  check")
    for r in results:
        floor = f"{r['ratio_to_floor']:.2f}" if "ratio_to_floor" in r else "-"
        checks = r.get("checks", {})
        if "all_masks_equal_formula" in checks:
            check = (f"masks = formula on {checks['layers_checked']} layers" if checks["all_masks_equal_formula"] else
                     f"{checks['mismatches_beyond_rounding']} mismatches beyond rounding") + \
                    f" ({checks['mask_mismatches']} rounding ties)"
        elif "max_error_ratio_vs_magnitude" in checks:
            check = (f"error / magnitude's: max {checks['max_error_ratio_vs_magnitude']:.3f}, mean "
                     f"{checks['mean_error_ratio_vs_magnitude']:.3f} on {checks['layers_checked']} layers")
        else:
            check = checks.get("error", r.get("check_skipped", "-"))
        print(f"{r['method']:<10} {r['schedule']:<10} {r['blocks_built']:>6} {r['per_block_seconds']:>8.3f} "
              f"{r['seconds']:>8.2f} {r['calibration_pass_seconds']:>8.2f} {r['ratio_to_one_pass']:>7.2f} {floor:>7} "
              f"{r['peak_memory_gib']:>9.2f} {r['sparsity']:>8.4f}  {check}")
    print(f"(x pass: pruning time / one plain calibration pass; x floor: SparseGPT / (one pass + its Hessian inverses); "
          f"full depth = {depth} blocks)")


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("prunetune.pruning.api").setLevel(logging.WARNING)
    logging.getLogger("prunetune.calibrate.driver").setLevel(logging.WARNING)
    if args.model == "tiny":
        from prunetune.loading import TINY_PATH

        if not (TINY_PATH / "model.safetensors").exists():
            print(f"the bundled model is not trained yet ({TINY_PATH}); use --model random", file=sys.stderr)
            return 2
        depth = json.loads((TINY_PATH / "config.json").read_text())["num_hidden_layers"]
    else:  # a Llama-2-7B-shaped model is reported at its full 32 blocks, extrapolated if needed
        seven_b = all(getattr(args, k) == v for k, v in LLAMA2_7B.items() if k != "layers")
        depth = LLAMA2_7B["layers"] if seven_b else (args.layers or LLAMA2_7B["layers"])
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    out_path = args.json or (os.path.join(os.environ["OUT"], "prune_bench.json") if os.environ.get("OUT") else None)
    import transformers

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    payload = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
               "model": args.model, "dtype": str(args.dtype), "nsamples": args.nsamples, "seqlen": args.seqlen,
               "batch_size": args.batch_size, "sparsity_ratio": args.sparsity_ratio, "sparsity_type": args.sparsity_type,
               "full_depth": depth, "threads": torch.get_num_threads(), "stream_blocks": args.stream_blocks,
               "offload_activations": args.offload_activations, "check": args.check, "check_tokens": args.check_tokens,
               "shape": None if args.model == "tiny" else {k: getattr(args, k) for k in LLAMA2_7B if k != "layers"},
               "llama2_7b_shape": args.model != "tiny" and all(getattr(args, k) == v for k, v in LLAMA2_7B.items() if k != "layers"),
               "results": [], "skipped": [], "complete": False}

    def save() -> None:
        if out_path:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(json.dumps(payload, indent=1))

    start = time.perf_counter()
    model = build_model(args)
    snapshot = WeightSnapshot(model)
    ids = calibration_ids(args)
    payload["layers_built"] = len(find_decoder_blocks(model))
    payload["model_gib"] = snapshot.nbytes() / 2**30
    payload["setup_seconds"] = time.perf_counter() - start
    mode = ", model in CPU memory, blocks streamed to the GPU" if args.stream_blocks else ""
    print(f"{device_name}: {args.model} model ({payload['layers_built']} blocks, {payload['model_gib']:.2f} GiB), "
          f"{args.nsamples} x {args.seqlen} calibration tokens, {args.dtype}{mode}; setup {payload['setup_seconds']:.1f} s",
          flush=True)
    options = CalibrationOptions(batch_size=args.batch_size, offload_activations=args.offload_activations, device=args.compute)
    forward_blocks(model, ids[: args.batch_size], options)  # warm-up: kernels, allocator
    save()
    runs = [(method, schedule) for method in args.methods for schedule in args.schedules]
    pass_by_method: dict[str, float] = {}

    def estimate(index: int, pass_seconds: float) -> float:
        """Seconds the timed runs from ``index`` on should take (priors from the H100 figures)."""
        return sum(PRIOR_RATIO.get(run, 3.0) * pass_seconds + (0 if run[0] in pass_by_method else pass_seconds)
                   for run in runs[index:])

    for index, (method, schedule) in enumerate(runs):
        sequential = schedule == "sequential"
        known = pass_by_method.get(method) or next(iter(pass_by_method.values()), None)
        if known is not None and budget.left() < estimate(index, known) - estimate(index + 1, known):
            payload["skipped"].append(f"{method} {schedule}: about {estimate(index, known) - estimate(index + 1, known):.0f} s "
                                      f"needed, {budget.left():.0f} s left")
            save()
            continue
        run_start = time.perf_counter()
        snapshot.restore(model)
        if method not in pass_by_method:
            warm_up_pruner(args, method)
            if method == "sparsegpt" and "hessian_inverse" not in payload:  # also warms up the Cholesky solvers
                payload["hessian_inverse"] = hessian_inverse_seconds(distinct_input_widths(model, ids, args), args.device)
        if method not in pass_by_method or args.calibration_pass == "run":
            pass_by_method[method] = time_pass(args, model, ids)
        pass_seconds = pass_by_method[method]
        result = time_prune(args, model, method, ids, depth, sequential, pass_seconds)
        if method == "sparsegpt":
            result["floor_seconds"] = pass_seconds + result["blocks_built"] * payload["hessian_inverse"]["per_block"]
            result["ratio_to_floor"] = result["seconds"] / result["floor_seconds"]
        payload["results"].append(result)
        save()
        if args.check != "none":
            # the timed runs still to come go first: a check only takes time they leave
            needed = pass_seconds * (1.3 if sequential else 2.6) + (12 if method == "sparsegpt" else 5)  # + float64 work
            if budget.left() < needed + estimate(index + 1, pass_seconds):
                result["check_skipped"] = f"check skipped: about {needed:.0f} s needed, {budget.left():.0f} s left"
            else:
                result["checks"] = verify(args, model, ids, method, sequential, snapshot.saved, budget.left)
        result["wall_seconds"] = time.perf_counter() - run_start
        print_table([result], depth)
        save()
    del model
    payload["complete"] = not payload["skipped"]
    payload["wall_seconds"] = time.perf_counter() - start
    save()
    print_table(payload["results"], depth)
    for line in payload["skipped"]:
        print("skipped:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
