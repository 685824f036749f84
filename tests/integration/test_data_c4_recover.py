"""The seed's recovery command line (`--dataset_name c4 --max_train_samples ... --block_size ...`) on a local C4 shard.

The hub cannot be reached here, so the C4 files are written in allenai/c4's own layout and
the folder is given as the dataset: it gets C4's protocol (train shard 0 for training,
validation shard 0's first 1100 documents for evaluation), read by the same loaders.
"""

import gzip
import json
import random

import pytest
from factories import make_tokenizer, prune_half_rows, save_model_folder

from prunetune.cli import main

WORDS = ["the", "model", "prunes", "weights", "and", "recovers", "accuracy", "with", "low", "rank", "adapters", "sparse", "masks"]


def _shard(path, documents, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for i in range(documents):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
            handle.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{i}"}) + "\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("c4-recover")
    model = save_model_folder(root / "pruned", "llama")
    prune_half_rows(model)
    model.save_pretrained(root / "pruned")
    make_tokenizer().save_pretrained(root / "pruned")
    rng = random.Random(0)
    _shard(root / "c4" / "en" / "c4-train.00000-of-01024.json.gz", 400, rng)
    _shard(root / "c4" / "en" / "c4-validation.00000-of-00008.json.gz", 1200, rng)
    return root


def test_the_seed_command_line_runs_on_a_local_c4_shard(workspace, tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # not the user's cache
    out = tmp_path / "out"
    seed = (f"recover --model_name_or_path {workspace / 'pruned'} --dataset_name {workspace / 'c4'} --num_train_epochs 1 "
            "--block_size 64 --per_device_train_batch_size 1 --per_device_eval_batch_size 8 --do_train --do_eval "
            "--max_train_samples 30 --max_eval_samples 2 --learning_rate 1e-4 --overwrite_output_dir "
            f"--output_dir {out} --max_steps 2 --save_strategy no --disable_tqdm true")
    assert main(seed.split()) == 0
    result = json.loads((out / "recovery.json").read_text())
    assert result["perplexity_after"] > 0 and result["sparsity_after"] == pytest.approx(0.5)
