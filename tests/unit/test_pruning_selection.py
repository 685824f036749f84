"""Mask selection and the data-free pieces of the pruners, against brute-force references."""

import math

import pytest
import torch

from prunetune.errors import UsageError
from prunetune.pruning import PRUNERS, build_pruner, pruner_class
from prunetune.pruning import selection
from prunetune.pruning.base import SquaredNorms


pytestmark = pytest.mark.usefixtures("one_thread")


def brute_row_kept(scores, ratio):
    """Per row: prune the floor(ratio * in) lowest scores (earlier column first on ties)."""
    kept = torch.ones_like(scores, dtype=torch.bool)
    count = math.floor(ratio * scores.shape[1] + 1e-9)
    for r in range(scores.shape[0]):
        ranked = sorted(range(scores.shape[1]), key=lambda j: (float(scores[r, j]), j))
        for j in ranked[:count]:
            kept[r, j] = False
    return kept


def brute_layer_kept(scores, ratio):
    flat = [(float(v), i) for i, v in enumerate(scores.flatten())]
    kept = torch.ones(scores.numel(), dtype=torch.bool)
    for _, i in sorted(flat)[: math.floor(ratio * scores.numel() + 1e-9)]:
        kept[i] = False
    return kept.view_as(scores)


def brute_nm_kept(scores, n, m):
    kept = torch.ones_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for g in range(0, scores.shape[1], m):
            group = sorted(range(g, g + m), key=lambda j: (float(scores[r, j]), j))
            for j in group[:n]:
                kept[r, j] = False
    return kept


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.29, 0.9])
def test_row_and_layer_masks_match_brute_force(ratio):
    scores = torch.rand(7, 100)
    assert torch.equal(selection.row_mask(scores, ratio), brute_row_kept(scores, ratio))
    assert torch.equal(selection.layer_mask(scores, ratio), brute_layer_kept(scores, ratio))
    # exactly floor(ratio * in) per row, 0.29 * 100 included (binary rounding gives 28.999...)
    assert set((~selection.row_mask(scores, ratio)).sum(1).tolist()) == {math.floor(ratio * 100 + 1e-9)}


def test_ties_go_to_the_earlier_column():
    scores = torch.randint(0, 4, (9, 40)).float()  # many ties at every cut
    for ratio in (0.1, 0.5, 0.8):
        assert torch.equal(selection.row_mask(scores, ratio), brute_row_kept(scores, ratio))
        assert torch.equal(selection.layer_mask(scores, ratio), brute_layer_kept(scores, ratio))
    assert torch.equal(selection.nm_mask(scores, selection.Structure(2, 4)), brute_nm_kept(scores, 2, 4))
    for count in (0, 5, 20, 40):  # the sort path (taken on CUDA for few rows) agrees with select
        assert torch.equal(selection.lowest_per_row(scores, count, use_sort=True),
                           selection.lowest_per_row(scores, count, use_sort=False))


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:3", "3:4"])
def test_nm_mask_pattern_and_choice(pattern):
    structure = selection.parse_structure(pattern)
    scores = torch.rand(6, 24)
    kept = selection.nm_mask(scores, structure)
    assert torch.equal(kept, brute_nm_kept(scores, structure.n, structure.m))
    zeros_per_group = (~kept).view(6, -1, structure.m).sum(-1)
    assert torch.all(zeros_per_group == structure.n)


def test_wanda_mask_is_the_formula():
    """|W| * ||X_j||_2 compared within each row, from a statistic fed in batches."""
    torch.manual_seed(0)
    weight = torch.randn(12, 40)
    inputs = torch.randn(3, 50, 40) * torch.rand(40) * 4
    statistic = SquaredNorms(40, torch.device("cpu"))
    for batch in inputs:
        statistic.update(batch.unsqueeze(0))
    pruned = weight.clone()
    (kept,) = pruner_class("wanda")(0.5).prune_group([pruned], statistic)
    norms = torch.sqrt((inputs.reshape(-1, 40).double() ** 2).sum(0))
    expected = brute_row_kept(weight.abs().double() * norms, 0.5)
    assert torch.equal(kept, expected)
    assert torch.equal(pruned, weight * expected)
    assert torch.all((pruned == 0).sum(1) == 20)


def test_magnitude_is_per_layer():
    torch.manual_seed(1)
    weight = torch.randn(10, 30) * torch.linspace(0.1, 3, 10).unsqueeze(1)  # rows of different scale
    pruned = weight.clone()
    (kept,) = pruner_class("magnitude")(0.5).prune_group([pruned])
    assert torch.equal(kept, brute_layer_kept(weight.abs(), 0.5))
    assert int((pruned == 0).sum()) == 150
    assert len(set((pruned == 0).sum(1).tolist())) > 1  # not the same count in every row


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_variant_sparsity_within_tolerance(ratio):
    torch.manual_seed(2)
    scores = torch.rand(64, 256) * torch.rand(256)
    kept = selection.variant_mask(scores, ratio)
    assert abs((~kept).float().mean().item() - ratio) <= 1e-3
    # the pruned entries of every row are its lowest scores
    for r in range(0, 64, 9):
        pruned_scores, kept_scores = scores[r][~kept[r]], scores[r][kept[r]]
        if len(pruned_scores) and len(kept_scores):
            assert pruned_scores.max() <= kept_scores.min()


def test_existing_zeros_stay_pruned():
    torch.manual_seed(3)
    weight = torch.randn(8, 16)
    weight[:, :12] = 0  # 75% zeros already, target 50%
    statistic = SquaredNorms(16, torch.device("cpu"))
    statistic.update(torch.randn(20, 16))
    for method in ("magnitude", "wanda"):
        pruned = weight.clone()
        pruner = build_pruner(method, 0.5, "unstructured")
        pruner.prune_group([pruned], statistic if pruner.needs_calibration else None)
        assert torch.equal(pruned, weight)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(ratio=1.0, structure="unstructured"), "1.0"),
    (dict(ratio=-0.1, structure="unstructured"), "-0.1"),
    (dict(ratio="0.5", structure="unstructured"), "'0.5'"),
    (dict(ratio=None, structure="4:4"), "4:4"),
    (dict(ratio=None, structure="0:4"), "0:4"),
    (dict(ratio=None, structure="2-4"), "2-4"),
    (dict(ratio=0.3, structure="2:4"), "0.3"),
    (dict(ratio=None, structure="2:4", use_variant=True), "use_variant"),
])
def test_bad_sparsity_settings(kwargs, fragment):
    with pytest.raises(UsageError, match=fragment):
        build_pruner("wanda", kwargs["ratio"], kwargs["structure"], kwargs.get("use_variant", False))


def test_structure_parsing_and_divisibility():
    assert selection.parse_structure("2:4").ratio == 0.5
    assert str(selection.parse_structure(" 4:8 ")) == "4:8"
    assert not selection.parse_structure("unstructured").is_nm
    assert build_pruner("wanda", None, "unstructured").ratio == 0.5
    with pytest.raises(UsageError, match="mlp.down_proj.*688.*M=32"):
        build_pruner("wanda", None, "16:32").check_layer("mlp.down_proj", 688)
    with pytest.raises(UsageError, match="bogus.*magnitude"):
        pruner_class("bogus")
    with pytest.raises(UsageError, match="use_variant"):
        build_pruner("sparsegpt", 0.5, "unstructured", use_variant=True)
    assert set(PRUNERS) == {"magnitude", "wanda", "sparsegpt"}
