"""The bundled model at 50% unstructured: Wanda and SparseGPT both beat magnitude on builtin."""

import pytest
import torch

from prunetune.loading import TINY_PATH, LoadOptions, load_model, load_tokenizer


pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not (TINY_PATH / "model.safetensors").exists(),
                       reason=f"the bundled tiny model is not trained yet ({TINY_PATH / 'model.safetensors'} missing)"),
]

SEQLEN = 128
WINDOWS = 24  # evaluation windows of SEQLEN tokens: enough to separate the methods, quick on CPU


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def calibration_ids(tokenizer):
    from prunetune.data import calibration_samples

    return calibration_samples(tokenizer, "builtin", 32, SEQLEN, seed=0)


def pruned_perplexity(method, tokenizer, calibration_ids):
    from prunetune.evaluate import evaluate_dataset
    from prunetune.pruning import PruneConfig, prune

    model = load_model("tiny", LoadOptions(dtype="float32", device="cpu"))
    if method != "dense":
        name, _, schedule = method.partition(" ")
        report = prune(model, tokenizer, PruneConfig(method=name, sparsity_ratio=0.5, calibration_ids=calibration_ids,
                                                     true_sequential=schedule == "sequential"))
        assert report.sparsity.overall == pytest.approx(0.5, abs=1e-3)
    return evaluate_dataset(model, tokenizer, "builtin", SEQLEN, max_windows=WINDOWS).perplexity


def test_wanda_and_sparsegpt_beat_magnitude(tokenizer, calibration_ids):
    torch.manual_seed(0)
    methods = ("dense", "magnitude", "wanda", "sparsegpt", "wanda sequential", "sparsegpt sequential")
    ppl = {m: pruned_perplexity(m, tokenizer, calibration_ids) for m in methods}
    for method in methods[2:]:
        assert ppl["dense"] < ppl[method] < ppl["magnitude"], (method, ppl)


def test_prune_with_a_data_name_records_the_fingerprint(tokenizer):
    from prunetune.data import load_documents
    from prunetune.pruning import PruneConfig, prune

    model = load_model("tiny", LoadOptions(dtype="float32", device="cpu"))
    report = prune(model, tokenizer, PruneConfig(method="wanda", sparsity_type="4:8", nsamples=4, seqlen=64,
                                                 calib_dataset="builtin", seed=3))
    assert report.calibration == {"dataset": "builtin", "fingerprint": load_documents("builtin", "train").fingerprint,
                                  "nsamples": 4, "seqlen": 64, "seed": 3}
    assert set(report.sparsity.per_module().values()) == {0.5}
