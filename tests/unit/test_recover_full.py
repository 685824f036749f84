"""Masked full fine-tuning keeps pruned weights exactly zero under weight decay, momentum, accumulation."""

import pytest
import torch
from factories import make_model, random_tokens
from test_masked_lora import pruned_model

from prunetune.errors import UsageError
from prunetune.masks import MaskSet, measure_sparsity
from prunetune.recover.full import KEPT_BUFFER, MASKS_NAME, MaskEnforcer, kept_mask, masks_for_run, zero_pruned_


def train_steps(model, optimizer, steps=3, accumulation=2, clip=1.0):
    for step in range(steps):
        for micro in range(accumulation):
            tokens = random_tokens(2, 16, seed=step * 10 + micro)
            model(input_ids=tokens, labels=tokens).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum"])
def test_pruned_weights_stay_zero_and_kept_weights_train(arch, optimizer):
    model = pruned_model(arch).train()
    masks = MaskSet.from_zeros(model)
    before = {name: module.weight.detach().clone() for name, module in masks.layers(model).items()}
    enforcer = MaskEnforcer(model, masks).attach()
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=1e-1, momentum=0.9, weight_decay=0.1))
    # gradients are masked as autograd produces them: before clipping and the optimizer see them
    tokens = random_tokens(2, 16)
    model(input_ids=tokens, labels=tokens).loss.backward()
    for name, module in masks.layers(model).items():
        grad = module.weight.grad if isinstance(module, torch.nn.Linear) else module.weight.grad.t()
        assert not grad[~masks.masks[name]].any(), name
    opt.zero_grad()
    assert not enforcer.needs_remask(opt)  # torch AdamW/SGD keep zeros under masked gradients...
    train_steps(model, opt)
    assert enforcer.violations() == {}  # ...with weight decay, momentum, accumulation, clipping, no re-masking
    for name, module in masks.layers(model).items():
        weight = module.weight if isinstance(module, torch.nn.Linear) else module.weight.t()
        kept = masks.masks[name]
        assert not weight[~kept].any(), name  # exactly zero
        assert not torch.equal(weight[kept], (before[name] if isinstance(module, torch.nn.Linear) else before[name].t())[kept])
    assert measure_sparsity(model).overall == pytest.approx(0.5)


class Drift(torch.optim.Optimizer):
    """An optimizer that moves every weight, gradient or not: only re-masking keeps zeros."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1e-3})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(group["lr"])


def test_other_optimizers_are_re_masked_after_every_step():
    from prunetune.recover.full import MaskCallback

    model = pruned_model()
    enforcer = MaskEnforcer(model, MaskSet.from_zeros(model)).attach()
    callback, opt = MaskCallback(enforcer), Drift(model.parameters())
    assert enforcer.needs_remask(opt) and MaskEnforcer(model, MaskSet.from_zeros(model), "always").needs_remask(torch.optim.AdamW(model.parameters()))
    opt.step()
    assert enforcer.violations()
    callback.on_optimizer_step(None, None, None, optimizer=opt)
    assert enforcer.violations() == {} and measure_sparsity(model).overall == pytest.approx(0.5)


def test_violations_are_reported_and_masks_are_not_re_derived():
    model = pruned_model()
    enforcer = MaskEnforcer(model, MaskSet.from_zeros(model))
    layer = next(iter(enforcer.layers.values()))
    with torch.no_grad():
        pruned = (~kept_mask(layer)).nonzero()[0]
        layer.weight[tuple(pruned)] = 1.0  # revive one pruned weight
        kept = kept_mask(layer).nonzero()[0]
        layer.weight[tuple(kept)] = 0.0  # a kept weight passing through zero stays kept
    assert sum(enforcer.violations().values()) == 1
    enforcer.remask()
    assert enforcer.violations() == {}
    assert not enforcer.mask_set().masks[next(iter(enforcer.layers))][tuple(pruned)]
    assert enforcer.mask_set().masks[next(iter(enforcer.layers))][tuple(kept)]


@pytest.mark.parametrize("encoding", ["weight dtype (CPU)", "bool (CUDA)"])
def test_the_stored_mask_is_a_kept_mask_in_either_encoding(encoding):
    model = pruned_model()
    masks = MaskSet.from_zeros(model)
    enforcer = MaskEnforcer(model, masks)
    name, layer = next(iter(enforcer.layers.items()))
    assert layer.prunetune_kept_mask.dtype == layer.weight.dtype  # on CPU: 1 = kept, multiplied
    if encoding == "bool (CUDA)":  # the CUDA encoding, exercised here on CPU
        layer._buffers[KEPT_BUFFER] = layer.prunetune_kept_mask.bool()
    assert torch.equal(kept_mask(layer), masks.masks[name])  # True = kept
    grad = torch.randn_like(layer.weight)
    expected = torch.where(masks.masks[name], grad, torch.zeros(()))
    zero_pruned_(layer, grad)
    assert torch.equal(grad, expected)
    assert enforcer.violations() == {}


def test_resume_masks_must_match_the_model(tmp_path):
    model = pruned_model()
    MaskSet.from_zeros(model).save(tmp_path / MASKS_NAME)
    assert set(masks_for_run(model, tmp_path).masks) == set(MaskSet.from_zeros(model).masks)
    with pytest.raises(UsageError, match="do not match"):
        masks_for_run(make_model("llama"), tmp_path)  # a dense model: checkpoint's pruned weights are not zero there


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_hold_under_fused_adamw_and_autocast():
    model = pruned_model().cuda().train()
    masks = MaskSet.from_zeros(model)
    enforcer = MaskEnforcer(model, masks).attach()
    assert next(iter(enforcer.layers.values())).prunetune_kept_mask.dtype == torch.bool  # applied with torch.where
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(3):
        tokens = random_tokens(2, 16, seed=step).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert enforcer.violations() == {} and measure_sparsity(model).overall == pytest.approx(0.5)
