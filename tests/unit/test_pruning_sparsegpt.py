"""SparseGPT: the vectorised OBS walk against the paper's column-by-column loop."""

import pytest
import torch

from prunetune.pruning.base import Hessian
from prunetune.pruning.sparsegpt import SparseGPTPruner


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_sparsegpt(weight, inputs, ratio, n=0, m=0, blocksize=128, percdamp=0.01):
    """Algorithm 1 of the SparseGPT paper, one column at a time, written plainly."""
    W = weight.clone().double()
    X = inputs.double()
    H = X.t() @ X / X.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    columns = W.shape[1]
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if m == 0:
            scores = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            count = int(ratio * scores.numel() + 1e-9)
            order = torch.sort(scores.flatten(), stable=True).indices
            mask1.view(-1)[order[:count]] = True
        for i in range(i2 - i1):
            if m and i % m == 0:
                scores = W1[:, i:i + m] ** 2 / torch.diag(Hinv1)[i:i + m].reshape(1, -1) ** 2
                for row in range(W1.shape[0]):
                    order = torch.sort(scores[row], stable=True).indices
                    mask1[row, i + order[:n]] = True
            w = W1[:, i]
            d = Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        pruned[:, i1:i2] = mask1
    return W.float(), pruned


def run_pruner(weights, inputs, **kwargs):
    statistic = Hessian(inputs.shape[1], inputs.device)
    for chunk in inputs.split(50):
        statistic.update(chunk)
    weights = [w.clone() for w in weights]
    kept = SparseGPTPruner(**kwargs).prune_group(weights, statistic)
    return weights, kept


def correlated_inputs(tokens, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator) / width ** 0.5
    scales = torch.rand(width, generator=generator) * 3 + 0.1
    return (torch.randn(tokens, width, generator=generator) @ mixing + 0.3) * scales


@pytest.mark.parametrize("structure,blocksize", [("unstructured", 16), ("unstructured", 128), ("2:4", 16), ("4:8", 32)])
def test_matches_column_by_column_reference(structure, blocksize):
    torch.manual_seed(0)
    weight = torch.randn(24, 80)
    inputs = correlated_inputs(300, 80)
    n, m = (0, 0) if structure == "unstructured" else map(int, structure.split(":"))
    expected_weight, expected_pruned = reference_sparsegpt(weight, inputs, 0.5, n, m, blocksize)
    (pruned_weight,), (kept,) = run_pruner([weight], inputs, ratio=0.5, structure=structure, blocksize=blocksize)
    assert torch.equal(~kept, expected_pruned)
    torch.testing.assert_close(pruned_weight, expected_weight, rtol=1e-4, atol=1e-4)


def test_shared_hessian_equals_layer_by_layer():
    """q/k/v share a Hessian and are solved stacked; each keeps its own per-layer selection."""
    torch.manual_seed(1)
    inputs = correlated_inputs(200, 64)
    layers = [torch.randn(32, 64), torch.randn(16, 64) * 3, torch.randn(8, 64)]
    together, kept_together = run_pruner(layers, inputs, ratio=0.6, blocksize=32)
    for layer, weight, kept in zip(layers, together, kept_together):
        (alone,), (kept_alone,) = run_pruner([layer], inputs, ratio=0.6, blocksize=32)
        assert torch.equal(kept, kept_alone)
        torch.testing.assert_close(weight, alone)
        # mask chosen per block of 32 columns: floor(0.6 * rows * 32) pruned in each
        assert int((~kept).sum()) == 2 * int(0.6 * layer.shape[0] * 32)


def test_reconstruction_error_below_magnitude():
    torch.manual_seed(2)
    weight = torch.randn(64, 128)
    inputs = correlated_inputs(512, 128, seed=3)
    (pruned,), _ = run_pruner([weight], inputs, ratio=0.5)
    magnitude = weight.clone()
    magnitude.view(-1)[weight.abs().flatten().argsort()[: weight.numel() // 2]] = 0
    assert (pruned == 0).float().mean() == 0.5

    def error(w):
        return torch.linalg.norm(weight @ inputs.t() - w @ inputs.t())

    assert error(pruned) < 0.8 * error(magnitude)
