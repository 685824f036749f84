"""Masked LoRA: forward and gradients equal the reference formula, merges keep the sparsity, saves round-trip."""

import warnings

import pytest
import torch
from factories import ARCHS, make_model, random_tokens
from peft import LoraConfig, PeftModel, get_peft_model

from prunetune.errors import UsageError
from prunetune.export import merge_adapter, merged_zero_fraction
from prunetune.masks import measure_sparsity
from prunetune.modules import prunable_layers, weight_matrix
from prunetune.recover.args import RecoveryArguments
from prunetune.recover.lora import build_lora_config, resolve_targets
from prunetune.recover.masked_lora import MaskedLoraConfig, MaskedLoraLinear


def pruned_model(arch="llama", seed=0):
    """A random model with half of every row of every block linear zeroed by magnitude."""
    model = make_model(arch, seed=seed)
    with torch.no_grad():
        for module in prunable_layers(model).values():
            weight = weight_matrix(module)
            weight.scatter_(1, weight.abs().argsort(dim=1)[:, : weight.shape[1] // 2], 0.0)
    return model


def masked(model, targets="all-linear", dropout=0.0, **kwargs):
    args = RecoveryArguments(recovery_method="masked_lora", lora_target_modules=targets, lora_dropout=dropout, lora_r=4)
    config = build_lora_config(model, args, masked=True)
    config.init_lora_weights = False  # random B too, so the update is not zero
    for key, value in kwargs.items():
        setattr(config, key, value)
    return get_peft_model(model, config)


def reference(layer: MaskedLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """x @ (W + s (B A) * M)^T + b, written out."""
    weight = weight_matrix(layer.base_layer)  # (out, in)
    kept = weight != 0
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    out = x @ (weight + delta * kept).T
    return out if layer.base_layer.bias is None else out + layer.base_layer.bias


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_and_gradients_equal_reference(arch):
    model = masked(pruned_model(arch))
    layers = [m for m in model.modules() if isinstance(m, MaskedLoraLinear)]
    assert layers and all(type(m.lora_variant["default"]).__name__ == "MaskedLoraVariant" for m in layers)
    layer = layers[0]
    x = torch.randn(3, 5, layer.in_features)
    expected = reference(layer, x)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    model.train()
    fused = layer(x)  # no dropout: one-matmul path
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(fused.square().sum(), params), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    layer.lora_dropout["default"] = torch.nn.Dropout(0.0)  # a dropout module: the variant's two-matmul path
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    model.eval()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_keeps_sparsity_exactly(arch):
    model = pruned_model(arch)
    before = measure_sparsity(model).per_module()
    peft_model = masked(model)
    tokens = random_tokens(2, 16)
    with torch.no_grad():
        logits = peft_model(input_ids=tokens).logits
    assert merged_zero_fraction(peft_model) == pytest.approx(0.5)
    merged, report = merge_adapter(peft_model, "masked_lora")
    assert report.exact and report.pruned_nonzero == 0 and len(report.layers) == len(before)
    assert measure_sparsity(merged).per_module() == before
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=tokens).logits, logits, rtol=1e-4, atol=1e-4)


def test_plain_lora_merge_densifies_and_remask_restores():
    model = pruned_model()
    config = build_lora_config(model, RecoveryArguments(lora_r=4), masked=False)
    config.init_lora_weights = False
    merged, report = merge_adapter(get_peft_model(model, config), "lora")
    assert report.pruned_nonzero > 0 and report.sparsity_after < report.sparsity_before
    model = pruned_model()
    before = measure_sparsity(model).per_module()
    merged, report = merge_adapter(get_peft_model(model, config), "lora", remask=True)
    assert report.pruned_nonzero == 0 and measure_sparsity(merged).per_module() == before


@pytest.mark.parametrize("method", ["lora", "masked_lora"])
def test_adapter_round_trip(method, tmp_path):
    from prunetune.recover.adapter import apply_adapter

    model = pruned_model()
    args = RecoveryArguments(recovery_method=method, lora_r=4)
    config = build_lora_config(model, args, masked=method == "masked_lora")
    config.init_lora_weights = False
    peft_model = get_peft_model(model, config).eval()
    tokens = random_tokens(2, 16)
    with torch.no_grad():
        logits = peft_model(input_ids=tokens).logits
    peft_model.save_pretrained(tmp_path)
    if method == "lora":  # plain PEFT loads it as is
        loaded = PeftModel.from_pretrained(pruned_model(), tmp_path)
    else:  # plain PEFT ignores the variant field, with a warning; prunetune's loader restores it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            PeftModel.from_pretrained(pruned_model(), tmp_path)
        assert any("use_masked_lora" in str(w.message) for w in caught)
        loaded = PeftModel.from_pretrained(pruned_model(), tmp_path, config=MaskedLoraConfig.load(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, logits)
        torch.testing.assert_close(apply_adapter(pruned_model(), tmp_path)(input_ids=tokens).logits, logits)


def test_adapter_that_does_not_match_the_base_is_refused(tmp_path):
    from prunetune.recover.adapter import apply_adapter

    model = pruned_model()
    get_peft_model(model, build_lora_config(model, RecoveryArguments(lora_r=4), masked=False)).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="does not match"):
        apply_adapter(make_model("llama", hidden=32), tmp_path)
    with pytest.raises(UsageError, match="not a PEFT adapter"):
        apply_adapter(pruned_model(), tmp_path.parent)


def test_target_names():
    model = make_model("llama")
    assert len(resolve_targets(model, ["q_proj", "v_proj"])) == 4
    assert len(resolve_targets(model, ["all-linear"])) == 14
    assert len(resolve_targets(model, ["self_attn.*"])) == 8
    with pytest.raises(UsageError, match="q_prj.*matches no layer.*self_attn.q_proj"):
        resolve_targets(model, ["q_proj", "q_prj"])
    gpt2 = build_lora_config(make_model("gpt2"), RecoveryArguments(lora_target_modules="c_attn"), masked=False)
    assert gpt2.fan_in_fan_out and gpt2.target_modules == {"attn.c_attn"}
    assert isinstance(build_lora_config(make_model("opt"), RecoveryArguments(), masked=False), LoraConfig)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_forward_matches_reference(dtype):
    model = masked(pruned_model().to("cuda", dtype))
    layer = next(m for m in model.modules() if isinstance(m, MaskedLoraLinear))
    assert layer.prunetune_kept_mask_default.dtype == torch.bool  # 1 byte per weight on CUDA
    x = torch.randn(4, 7, layer.in_features, device="cuda", dtype=dtype)
    with torch.no_grad():
        expected = reference(layer, x.float()) if dtype == torch.float32 else None
        layer.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            fused = layer(x)
            layer.lora_dropout["default"] = torch.nn.Dropout(0.0)
            unfused = layer(x)
    if expected is not None:
        torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.float(), unfused.float(), rtol=2e-2, atol=2e-2)
    merged, report = merge_adapter(model, "masked_lora")
    # no pruned weight revived; in bf16 a kept weight can round to exactly zero (W + delta == 0)
    assert report.pattern_kept and (report.exact or dtype == torch.bfloat16)
    assert all(layer.zeros_after - layer.zeros_before == layer.kept_zeroed for layer in report.layers)
