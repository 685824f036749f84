"""Training blocks at the seed's scale: 30,000 blocks of 1,024 tokens from a C4-shaped shard.

Writes a shard in allenai/c4's layout (``<workdir>/c4/en/c4-train.00000-of-01024.json.gz``,
>= 100 MB gzipped, ``text``/``timestamp``/``url`` records with C4-like, log-normal document
lengths; words drawn with WikiText-2's word frequencies when ../shared/data has them) and
measures ``training_blocks(tiny tokenizer, <workdir>/c4, 1024, max_samples=30000)`` -- what
``prunetune recover --dataset_name c4 --max_train_samples 30000 --block_size 1024`` builds --
in fresh processes: seconds and peak RSS increase of a first call (empty cache), of a second
call (cache hit), and of a first call with ``streaming=True`` (no Arrow conversion of the shard). With ``--old_ref`` it measures the data layer of that commit on the
same shard too (its ``c4`` loader pointed at the local file), stopped at ``--old_cap_gb`` of
RSS or ``--old_timeout`` seconds, whichever comes first.

Run: python benchmarks/data_scale.py [--workdir /tmp/prunetune-data-scale] [--old_ref 0ff3f49]
Prints a table; writes JSON to $OUT/data_scale.json when OUT is set. Targets: RSS grows by
less than 1 GB, and the second call takes under 10 s.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

SHARD = "c4/en/c4-train.00000-of-01024.json.gz"
WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext2-raw" / "test.jsonl"


def word_distribution(seed: int):
    """Words and their frequencies: WikiText-2's when available, else a Zipf law over made-up words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if WIKITEXT.is_file():
        counts: dict[str, int] = {}
        for line in WIKITEXT.read_text(encoding="utf-8").splitlines():
            for word in json.loads(line)["text"].split():
                counts[word] = counts.get(word, 0) + 1
        words = list(counts)
        weights = np.array([counts[w] for w in words], dtype=np.float64)
    else:
        letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
        words = ["".join(rng.choice(letters, size=rng.integers(1, 10))) for _ in range(30_000)]
        weights = 1.0 / np.arange(1, len(words) + 1)
    return np.array(words, dtype=object), weights / weights.sum()


def write_shard(path: Path, target_mb: float, seed: int) -> dict:
    """C4-like documents until the gzipped file reaches ``target_mb``: words per document log-normal
    (median 200, mean about 300; C4 documents average about 2 KB of text)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words, probabilities = word_distribution(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    documents, raw_bytes = 0, 0
    with open(partial, "wb") as raw, gzip.open(raw, "wt", encoding="utf-8") as handle:
        while raw.tell() < target_mb * 2**20:
            lengths = np.maximum(5, rng.lognormal(np.log(200), 0.9, size=1000).astype(int))
            drawn = rng.choice(words, size=int(lengths.sum()), p=probabilities)
            start = 0
            for length in lengths:
                text = " ".join(drawn[start : start + length])
                start += length
                line = json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                                   "url": f"https://example.com/{documents}"}) + "\n"
                handle.write(line)
                raw_bytes += len(line)
                documents += 1
    partial.rename(path)
    return {"documents": documents, "json_mb": raw_bytes / 2**20, "gzip_mb": path.stat().st_size / 2**20}


class RssWatchdog(threading.Thread):
    """Ends the process (exit code 3) once its resident set exceeds ``cap_gb``: the old layer's Python
    lists of the whole shard would otherwise take the memory of a shared machine."""

    def __init__(self, cap_gb: float):
        super().__init__(daemon=True)
        self.cap_kb = cap_gb * 2**20

    def run(self):
        from prunetune.memory import _read_status_kb

        while True:
            if (_read_status_kb("VmRSS") or 0) > self.cap_kb:
                print(json.dumps({"stopped": f"RSS above {self.cap_kb / 2**20:g} GB"}), flush=True)
                os._exit(3)
            time.sleep(0.2)


def measure(args) -> None:
    """One call in this (fresh) process; prints a JSON line."""
    from prunetune.loading import load_tokenizer
    from prunetune.memory import track_peak_memory

    tokenizer = load_tokenizer("tiny")
    workdir = Path(args.workdir)
    cache = str(workdir / "cache")
    if args.measure == "old":
        RssWatchdog(args.old_cap_gb).start()
        data = _old_module(workdir, args.old_ref)
        call = lambda: data.training_blocks(tokenizer, "c4", args.block_size, max_samples=args.max_samples, cache_dir=cache)
    else:
        from prunetune.data import training_blocks

        call = lambda: training_blocks(tokenizer, str(workdir / "c4"), args.block_size, max_samples=args.max_samples,
                                       cache_dir=cache, streaming=args.measure == "streamed")
    started = time.perf_counter()
    with track_peak_memory("cpu") as peak:
        blocks = call()
        first = blocks[0]["input_ids"]
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "rss_increase_mb": peak.increase_mb, "rss_before_mb": peak.baseline_mb,
                      "blocks": len(blocks), "block_size": int(first.numel())}), flush=True)


def _old_module(workdir: Path, ref: str):
    """``src/prunetune/data.py`` of ``ref``, its C4 loader reading the local shard instead of the Hub."""
    import importlib.util

    source = subprocess.run(["git", "show", f"{ref}:src/prunetune/data.py"], check=True, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout
    path = workdir / f"old_data_{ref}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_data"] = module
    spec.loader.exec_module(module)

    def local_c4(name, data_files, split, cache_dir=None):
        import datasets

        files = {key: str(workdir / "c4" / value) for key, value in data_files.items()}
        return datasets.load_dataset("json", data_files=files, split=split, cache_dir=cache_dir)

    module._load_hub_dataset = local_c4
    return module


def run_child(args, what: str, timeout: float | None = None) -> dict:
    command = [sys.executable, __file__, "--measure", what, "--workdir", args.workdir, "--max_samples",
               str(args.max_samples), "--block_size", str(args.block_size), "--old_ref", args.old_ref or "",
               "--old_cap_gb", str(args.old_cap_gb)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired:
        return {"stopped": f"still running after {timeout:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"stopped": f"exit code {done.returncode}: {done.stderr[-300:]}"}
    result["process_seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/prunetune-data-scale")
    parser.add_argument("--shard_mb", type=float, default=100.0, help="gzipped size of the generated shard")
    parser.add_argument("--max_samples", type=int, default=30_000)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--old_ref", default="", help="git revision whose src/prunetune/data.py to measure too")
    parser.add_argument("--old_cap_gb", type=float, default=6.0)
    parser.add_argument("--old_timeout", type=float, default=1800.0)
    parser.add_argument("--measure", choices=("new", "streamed", "old"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args)

    workdir = Path(args.workdir)
    shard = workdir / SHARD
    if not shard.is_file():
        started = time.perf_counter()
        info = write_shard(shard, args.shard_mb, args.seed)
        print(f"wrote {shard}: {info['documents']:,} documents, {info['json_mb']:.0f} MB of JSON, "
              f"{info['gzip_mb']:.0f} MB gzipped, in {time.perf_counter() - started:.0f} s", flush=True)
    subprocess.run(["rm", "-rf", str(workdir / "cache")], check=True)  # the first call starts cold
    rows = {"new, first call (empty cache)": run_child(args, "new")}
    rows["new, second call (cache hit)"] = run_child(args, "new")
    subprocess.run(["rm", "-rf", str(workdir / "cache")], check=True)
    rows["new, streamed (empty cache)"] = run_child(args, "streamed")
    if args.old_ref:
        subprocess.run(["rm", "-rf", str(workdir / "cache")], check=True)
        rows[f"old ({args.old_ref}), first call"] = run_child(args, "old", timeout=args.old_timeout)
    print(f"\ntraining_blocks(tiny, {shard.parent.parent}, {args.block_size}, max_samples={args.max_samples}); "
          f"shard {shard.stat().st_size / 2**20:.0f} MB gzipped")
    print(f"{'':34s} {'seconds':>9s} {'RSS increase':>13s} {'blocks':>8s}")
    for name, row in rows.items():
        if "stopped" in row:
            print(f"{name:34s} stopped: {row['stopped']} (after {row.get('process_seconds', 0):.0f} s)")
        else:
            print(f"{name:34s} {row['seconds']:9.1f} {row['rss_increase_mb']:10.0f} MB {row['blocks']:8,}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "data_scale.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
