"""Batched perplexity equals a naive one-window-at-a-time computation."""

import math

import pytest
import torch
from factories import make_model

from prunetune.errors import UsageError
from prunetune.evaluate import perplexity


def naive_perplexity(model, stream, seqlen):
    windows = stream.shape[1] // seqlen
    nlls = []
    for i in range(windows):
        ids = stream[:, i * seqlen : (i + 1) * seqlen]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss  # mean over seqlen-1 predictions
        nlls.append(loss.float() * seqlen)
    return math.exp(torch.stack(nlls).sum().item() / (windows * seqlen))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_matches_naive(arch):
    model = make_model(arch)
    stream = torch.randint(0, 128, (1, 32 * 7 + 5), generator=torch.Generator().manual_seed(1))
    expected = naive_perplexity(model, stream, 32)
    for batch_size in (1, 3, 16):
        result = perplexity(model, stream, 32, batch_size=batch_size)
        assert result.windows == 7 and result.tokens == 7 * 31
        assert result.perplexity == pytest.approx(expected, rel=1e-5)


def test_perplexity_moves_with_damage():
    model = make_model("llama")
    stream = torch.randint(0, 128, (1, 512), generator=torch.Generator().manual_seed(2))
    before = perplexity(model, stream, 64).perplexity
    assert 20 < before < 500  # near-uniform over 128 tokens for a random model
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    assert perplexity(model, stream, 64).perplexity > before


def test_seqlen_limits():
    model = make_model("llama")  # max_position_embeddings 256
    stream = torch.zeros(1, 1000, dtype=torch.long)
    with pytest.raises(UsageError, match="exceeds the model's maximum of 256"):
        perplexity(model, stream, 512)
    with pytest.raises(UsageError, match="fewer than one window"):
        perplexity(model, stream[:, :10], 64)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size=0"),
    ({"batch_size": 2.5}, "batch_size=2.5"),
    ({"max_windows": 0}, "max_windows=0"),
    ({"max_windows": -1}, "max_windows=-1"),
    ({"seqlen": "64"}, "seqlen='64'"),
    ({"seqlen": 1}, "seqlen=1"),
])
def test_bad_window_options_are_usage_errors(kwargs, message):
    model = make_model("llama")
    stream = torch.zeros(1, 512, dtype=torch.long)
    arguments = {"seqlen": 64, **kwargs}
    with pytest.raises(UsageError, match=message):
        perplexity(model, stream, **arguments)


def test_non_finite_logits_say_whether_the_weights_hold_nan():
    stream = torch.randint(0, 128, (1, 128), generator=torch.Generator().manual_seed(3))
    model = make_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(1e38)  # finite weights whose logits overflow float32
    with pytest.raises(UsageError, match="weights are finite: the forward pass overflowed in float32"):
        perplexity(model, stream, 64)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = math.nan
    with pytest.raises(UsageError, match=r"weights hold NaN/inf \(1 tensor\(s\), first model.layers.1.mlp.down_proj.weight\)"):
        perplexity(model, stream, 64)
    assert not model.training  # restored after the error
