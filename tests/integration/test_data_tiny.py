"""The bundled model's data did not move: the same token ids as before the `datasets` rewrite.

The digests were computed with the previous data layer (one module of Python lists) on the
bundled tokenizer and the builtin corpus of the Python the model card was written under;
the demo and the README tables are computed from exactly these ids. Another Python has
another standard library, hence another corpus: the tests skip there.
"""

import hashlib

import pytest
import torch

from prunetune import data
from prunetune.loading import load_tokenizer

CARD_TRAIN_FINGERPRINT = "804825baeafbff37"  # MODEL_CARD.md: the builtin train corpus the model was trained on


def digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def tokenizer():
    if data.load_documents("builtin", "train").fingerprint != CARD_TRAIN_FINGERPRINT:
        pytest.skip("this Python's standard library is not the corpus the digests were computed on")
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))  # tokenize for real, not from an earlier run's cache


@pytest.mark.parametrize("nsamples, seqlen, seed, expected", [
    (32, 256, 0, "cce69e73dc0ceb15"),  # the demo's calibration
    (8, 64, 3, "75a8575afcec5385"),
])
def test_calibration_windows_are_unchanged(tokenizer, cache, nsamples, seqlen, seed, expected):
    samples = data.calibration_samples(tokenizer, "builtin", nsamples, seqlen, seed=seed, cache_dir=cache)
    assert samples.shape == (nsamples, seqlen) and digest(samples) == expected


@pytest.mark.parametrize("split, tokens, expected", [
    ("test", 161_894, "1a0a8a23412a005e"),  # the demo's evaluation text
    ("validation", 168_518, "8f72d52aafc033dc"),
])
def test_evaluation_streams_are_unchanged(tokenizer, cache, split, tokens, expected):
    stream, documents = data.eval_stream(tokenizer, "builtin", seqlen=256, split=split, cache_dir=cache)
    assert stream.shape == (1, tokens) and digest(stream) == expected
    assert documents.description.startswith(f"builtin {split} split")


@pytest.mark.parametrize("split, block_size, max_samples, blocks, expected", [
    ("train", 256, None, 12_312, "a1505927f6dfa51e"),  # the demo's recovery blocks
    ("train", 128, 1000, 1000, "95364dc830e20189"),
    ("test", 256, None, 632, "04ccc07782a2400c"),
])
def test_training_blocks_are_unchanged(tokenizer, cache, split, block_size, max_samples, blocks, expected):
    dataset = data.training_blocks(tokenizer, "builtin", block_size, split=split, max_samples=max_samples, cache_dir=cache)
    assert len(dataset) == blocks and digest(dataset.blocks) == expected
    assert torch.equal(dataset[len(dataset) - 1]["input_ids"], dataset.blocks[-1])


def test_a_perplexity_says_which_text_it_was_computed_on(tokenizer, cache, tmp_path):
    from prunetune.evaluate import evaluate_dataset
    from prunetune.loading import load_model

    model = load_model("tiny")
    result = evaluate_dataset(model, tokenizer, "builtin", 64, max_windows=2, cache_dir=cache)
    assert result.text.startswith("first 2 windows of 64 tokens of builtin test split")
    path = tmp_path / "notes.txt"
    path.write_text("".join(f"note {i}: the model reads plain text line by line\n" for i in range(100)))
    result = evaluate_dataset(model, tokenizer, str(path), 64, cache_dir=cache)
    assert result.text.endswith(f"{path}, held-out first 5% of lines (5 of 100)")
    assert result.to_dict()["text"] == result.text
