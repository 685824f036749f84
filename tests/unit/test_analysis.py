"""Per-layer reconstruction error: the Gram-matrix shortcut against the brute-force computation."""

import math

import pytest
import torch
from factories import make_model, random_tokens

from prunetune.analysis import input_grams, layer_weights, reconstruction_errors, relative_error
from prunetune.modules import prunable_layers, weight_matrix


def _brute_force(x: torch.Tensor, dense: torch.Tensor, other: torch.Tensor) -> float:
    x, dense, other = x.double(), dense.double(), other.double()
    return float(torch.linalg.norm(x @ dense.T - x @ other.T) / torch.linalg.norm(x @ dense.T))


def test_relative_error_matches_the_definition():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 24, generator=generator)
    dense = torch.randn(16, 24, generator=generator)
    pruned = dense * (torch.rand(16, 24, generator=generator) > 0.5)
    gram = x.double().T @ x.double()
    assert relative_error(dense, pruned, gram) == pytest.approx(_brute_force(x, dense, pruned), rel=1e-9)
    assert relative_error(dense, dense, gram) == 0.0
    assert relative_error(dense, torch.zeros_like(dense), gram) == pytest.approx(1.0, rel=1e-12)
    assert math.isnan(relative_error(dense, pruned, torch.zeros(24, 24, dtype=torch.float64)))  # no signal: undefined


def _captured_inputs(model, token_ids, batch_size):
    """Every prunable layer's inputs, (tokens, in), captured by hooks: the brute-force X."""
    inputs = {name: [] for name in prunable_layers(model)}
    handles = [module.register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0].reshape(-1, args[0].shape[-1])))
               for name, module in prunable_layers(model).items()]
    with torch.no_grad():
        for first in range(0, token_ids.shape[0], batch_size):
            model(input_ids=token_ids[first : first + batch_size])
    for handle in handles:
        handle.remove()
    return {name: torch.cat(chunks) for name, chunks in inputs.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D layers store their weight transposed
def test_per_layer_errors_of_a_pruned_model_match_brute_force(arch, one_thread):
    model = make_model(arch)
    token_ids = random_tokens(5, 16)
    grams = input_grams(model, token_ids, batch_size=2)  # 3 batches, one of them short
    dense = layer_weights(model)
    captured = _captured_inputs(model, token_ids, batch_size=2)
    assert set(grams) == set(dense) == set(captured) and len(grams) >= 4
    for name, x in captured.items():
        assert x.shape[0] == 5 * 16
        assert torch.allclose(grams[name], x.double().T @ x.double(), rtol=1e-9, atol=1e-9), name

    generator = torch.Generator().manual_seed(1)
    pruned = {name: w * (torch.rand(w.shape, generator=generator) > 0.5) for name, w in dense.items()}
    errors = reconstruction_errors(dense, pruned, grams)
    for name, x in captured.items():
        assert errors[name] == pytest.approx(_brute_force(x, dense[name], pruned[name]), rel=1e-6), name
    assert all(0 < e < 1.5 for e in errors.values())
    assert set(reconstruction_errors(dense, dense, grams).values()) == {0.0}


def test_layer_weights_are_copies_in_out_by_in_layout():
    model = make_model("gpt2")
    weights = layer_weights(model)
    name, module = next(iter(prunable_layers(model).items()))
    assert weights[name].shape == weight_matrix(module).shape
    weights[name].zero_()
    assert weight_matrix(module).abs().sum() > 0  # the model's weights are untouched
