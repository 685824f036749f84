"""The bundled tiny model: shape, size, and that it is a real (prunable) language model.

The numbers are recomputed here rather than read from the card: perplexity (the library's
evaluator) on the first 64 windows of 256 tokens of the builtin test split, against an
add-one unigram model with the same tokenizer, and after the library's magnitude pruner
zeroes 50% of each decoder linear layer. Runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys

import pytest
import torch
from torch import nn

from prunetune.data import load_documents, tokenize_stream
from prunetune.evaluate import perplexity as library_perplexity
from prunetune.loading import TINY_PATH as TINY

SEQLEN = 256
WINDOWS = 64
MAX_TOTAL_BYTES = 25 * 1000 * 1000
ARTIFACT_SUFFIXES = {".json", ".safetensors", ".md", ".txt", ".model"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def test_windows(tokenizer) -> torch.Tensor:
    stream = tokenize_stream(tokenizer, load_documents("builtin", "test")).reshape(-1)
    n = min(WINDOWS, stream.numel() // SEQLEN)
    assert n >= 16, "the builtin test split is unexpectedly small"
    return stream[: n * SEQLEN].view(n, SEQLEN)


def _perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    return library_perplexity(model, windows.reshape(1, -1), SEQLEN, batch_size=16).perplexity


@pytest.fixture(scope="module")
def perplexity(model, test_windows) -> float:
    return _perplexity(model, test_windows)


def _decoder_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]


def test_architecture_is_llama_with_gqa(model, tokenizer):
    config = model.config
    assert config.model_type == "llama"
    assert type(model).__name__ == "LlamaForCausalLM"
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert config.max_position_embeddings >= SEQLEN
    linears = _decoder_linears(model)
    assert len(linears) == 7 * config.num_hidden_layers  # q k v o gate up down
    for linear in linears:  # 2:4 and 4:8 need every in_features divisible by 8
        assert linear.in_features % 8 == 0, linear
    assert len(tokenizer) == config.vocab_size


def test_tokenizer_adds_bos(tokenizer, model):
    ids = tokenizer("def f(x):\n    return x\n").input_ids
    assert ids[0] == tokenizer.bos_token_id == model.config.bos_token_id
    assert tokenizer.eos_token_id == model.config.eos_token_id
    assert tokenizer.pad_token_id is not None
    text = "import os\n\nclass A:\n    pass\n"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_files_fit_in_size_budget():
    files = [p for p in TINY.iterdir() if p.is_file() and p.suffix in ARTIFACT_SUFFIXES]
    names = {p.name for p in files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md"} <= names
    total = sum(p.stat().st_size for p in files)
    assert total <= MAX_TOTAL_BYTES, f"tiny model files total {total / 1e6:.2f} MB > 25 MB"


def test_perplexity_beats_unigram_tenfold(tokenizer, model, test_windows, perplexity):
    train = tokenize_stream(tokenizer, load_documents("builtin", "train")).reshape(-1)
    counts = torch.bincount(train, minlength=len(tokenizer)).double() + 1.0  # add-one smoothing
    log_probs = counts.log() - counts.sum().log()
    unigram = math.exp(-log_probs[test_windows[:, 1:].reshape(-1)].mean().item())
    assert math.isfinite(perplexity)
    assert perplexity * 10 <= unigram, f"model ppl {perplexity:.2f} vs unigram ppl {unigram:.2f}"


def test_magnitude_pruning_half_of_each_layer_hurts(model, test_windows, perplexity):
    from prunetune.pruning import PruneConfig, prune

    pruned = copy.deepcopy(model)
    prune(pruned, None, PruneConfig(method="magnitude", sparsity_ratio=0.5))
    assert all((linear.weight == 0).float().mean().item() == 0.5 for linear in _decoder_linears(pruned))
    pruned_ppl = _perplexity(pruned, test_windows)
    assert pruned_ppl >= 1.2 * perplexity, f"dense {perplexity:.3f}, 50% magnitude-pruned {pruned_ppl:.3f}"
    # the shipped model itself must be untouched (pruning was on a copy)
    assert all((m.weight == 0).float().mean().item() < 0.01 for m in _decoder_linears(model))


def test_model_card_records_training_and_corpus():
    card = (TINY / "MODEL_CARD.md").read_text(encoding="utf-8")
    for needle in ("llama", "tools/train_tiny.py", "perplexity", "unigram", "seed"):
        assert needle in card.lower(), needle
    log = json.loads((TINY / "train_log.json").read_text(encoding="utf-8"))
    assert log["losses"] and log["evaluation"]["test_ppl"] > 0
    match = re.search(r"Python version\s*\|\s*(\d+)\.(\d+)", card)
    assert match, "the model card does not record the Python version"
    card_minor = (int(match.group(1)), int(match.group(2)))
    if card_minor != sys.version_info[:2]:
        pytest.skip(
            f"the card was written under Python {card_minor[0]}.{card_minor[1]}; this is "
            f"{sys.version_info[0]}.{sys.version_info[1]}, whose standard library (the builtin "
            "corpus) differs, so its fingerprint cannot match"
        )
    fingerprint = load_documents("builtin", "train").fingerprint
    assert fingerprint in card, f"train corpus fingerprint {fingerprint} not in MODEL_CARD.md"
