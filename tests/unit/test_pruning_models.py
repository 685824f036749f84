"""Whole models: exact sparsity for every architecture and method, reports, bad input."""

import pytest
import torch
from torch import nn

from factories import ARCHS, make_model, random_tokens
from prunetune.errors import UsageError
from prunetune.masks import measure_sparsity
from prunetune.pruning import PruneConfig, prune


pytestmark = pytest.mark.usefixtures("one_thread")

IDS = random_tokens(4, 16)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_exactly_half_sparse(arch, method):
    model = make_model(arch)
    report = prune(model, None, PruneConfig(method=method, sparsity_ratio=0.5, calibration_ids=IDS))
    assert set(report.sparsity.per_module().values()) == {0.5}
    assert report.sparsity.to_dict() == measure_sparsity(model).to_dict()
    if method == "magnitude":
        assert report.calibration is None
    else:
        assert report.calibration["dataset"] == "tokens" and len(report.calibration["fingerprint"]) == 16


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_in_every_layer(method, pattern):
    n, m = map(int, pattern.split(":"))
    model = make_model("llama")
    report = prune(model, None, PruneConfig(method=method, sparsity_type=pattern, calibration_ids=IDS))
    assert report.sparsity_type == pattern and report.sparsity_ratio == n / m
    for name, param in model.named_parameters():
        if "layers" in name and param.dim() == 2:
            groups = (param == 0).view(param.shape[0], -1, m).sum(-1)
            assert torch.all(groups == n), name


def test_wanda_variant_close_to_target():
    model = make_model("mistral")
    report = prune(model, None, PruneConfig(method="wanda", sparsity_ratio=0.6, use_variant=True, calibration_ids=IDS))
    assert all(abs(s - 0.6) <= 1e-3 for s in report.sparsity.per_module().values())


def test_already_sparse_model_keeps_its_zeros():
    model = make_model("llama")
    prune(model, None, PruneConfig(method="magnitude", sparsity_ratio=0.6))
    zeros_before = [p == 0 for p in model.parameters()]
    report = prune(model, None, PruneConfig(method="sparsegpt", sparsity_ratio=0.5, calibration_ids=IDS))
    assert report.already_sparse and report.initial_sparsity == pytest.approx(0.6, abs=1e-3)
    for before, param in zip(zeros_before, model.parameters()):
        assert torch.all(param[before] == 0)
    assert report.sparsity.overall >= report.initial_sparsity


def test_ignore_and_targets():
    model = make_model("llama")
    report = prune(model, None, PruneConfig(method="wanda", sparsity_ratio=0.5, calibration_ids=IDS, ignore=["down_proj"]))
    per_module = report.sparsity.per_module()
    assert per_module["model.layers.0.mlp.down_proj"] == 0.0 and per_module["model.layers.1.self_attn.q_proj"] == 0.5
    with pytest.raises(UsageError, match="No layer matches"):
        prune(model, None, PruneConfig(method="wanda", sparsity_ratio=0.5, calibration_ids=IDS, targets=["nothing*"]))


def test_bad_input_fails_before_any_work():
    model = make_model("llama")
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(UsageError, match=r"3:7.*64 input features|64 input features.*3:7"):
        prune(model, None, PruneConfig(method="wanda", sparsity_type="3:7", calibration_ids=IDS))
    with pytest.raises(UsageError, match="vocabulary"):
        prune(model, None, PruneConfig(method="wanda", sparsity_ratio=0.5, calibration_ids=IDS + 1000))
    with pytest.raises(UsageError, match="seqlen=300"):
        prune(model, None, PruneConfig(method="wanda", sparsity_ratio=0.5, calibration_ids=random_tokens(1, 300)))
    with pytest.raises(UsageError, match="tokenizer"):
        prune(model, None, PruneConfig(method="wanda", sparsity_ratio=0.5, calib_dataset="builtin"))
    with pytest.raises(UsageError, match="nosuchdata"):
        PruneConfig(method="wanda", sparsity_ratio=0.5, calib_dataset="nosuchdata")
    with pytest.raises(UsageError, match="calibration_ids"):
        PruneConfig(method="wanda", sparsity_ratio=0.5, calibration_ids=torch.rand(4, 8))
    with pytest.raises(UsageError, match="blocksize"):
        PruneConfig(method="wanda", sparsity_ratio=0.5, options={"blocksize": 64})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(UsageError, match="decoder blocks"):
        prune(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), None, PruneConfig(method="magnitude", sparsity_ratio=0.5))
