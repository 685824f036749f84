"""Masked full fine-tuning keeps pruned weights exactly zero with every optimizer the docs recommend.

Each optimizer is built by the Trainer's own factory from its ``--optim`` name (so the test runs
what a command line runs), in float32 and bfloat16 weights, and stepped with masked gradients
and the re-masking callback exactly as a recovery run does. bitsandbytes' 8-bit AdamW runs on CPU
from bitsandbytes 0.50 (checked with 0.50.2); its paged variants need CUDA. Measured with 0.50.2:
the 8-bit moments of pruned positions are not exactly zero after a step (blockwise quantization
does not return exact zeros), so without re-masking 8-bit AdamW moves every pruned weight; it is
therefore not among the zero-preserving optimizers and ``--remask_after_step auto`` re-masks it.
"""

import importlib.util

import pytest
import torch
from factories import make_model, prune_half_rows, random_tokens
from transformers import Trainer

from prunetune.errors import UsageError
from prunetune.masks import MaskSet, measure_sparsity
from prunetune.recipe.args import RecoveryTrainingArguments
from prunetune.recover.full import MaskCallback, MaskEnforcer
from prunetune.recipe.memory_estimate import RECOMMENDED
from prunetune.recover.optimizers import OPTIMIZERS, check_optimizer

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
# README "Several GPUs" / --memory_estimate: the default, its foreach twin, the 8-bit ones, and the light ones.
RECOMMENDED_OPTIMIZERS = ["adamw_torch_fused", "adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "sgd", "adafactor"]


def needs(optim: str, device: str) -> list:
    marks = []
    if OPTIMIZERS[optim].bitsandbytes:
        marks.append(pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install 'prunetune[bnb]')"))
    if device == "cuda" or OPTIMIZERS[optim].paged:
        marks += [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    return marks


def cases(device: str):
    for optim in RECOMMENDED_OPTIMIZERS:
        for dtype in (torch.float32, torch.bfloat16):
            yield pytest.param(optim, dtype, device, marks=needs(optim, device), id=f"{optim}-{str(dtype)[6:]}-{device}")


def train_masked(optim: str, dtype: torch.dtype, device: str, steps: int = 4, checkpointing: bool = False):
    """A pruned model trained as `full` trains it: masked gradients, clipping, the Trainer's optimizer, re-masking."""
    # plain SGD's steps (lr x clipped gradient) must clear bfloat16's resolution to show that the kept weights train
    rate = 1.0 if optim == "sgd" else 1e-2
    args = RecoveryTrainingArguments(output_dir="unused", optim=optim, learning_rate=rate, weight_decay=0.1)
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    # 128 x 256 layers: above bitsandbytes' 4,096-value threshold, so the 8-bit state is really used
    model = prune_half_rows(make_model("llama", hidden=128, intermediate=256)).to(device=device, dtype=dtype).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    masks = MaskSet.from_zeros(model)
    before = {name: module.weight.detach().clone() for name, module in masks.layers(model).items()}
    enforcer = MaskEnforcer(model, masks).attach()
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    callback = MaskCallback(enforcer)
    for step in range(steps):
        tokens = random_tokens(2, 16, seed=step).to(device)
        model(input_ids=tokens, labels=tokens).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        callback.on_optimizer_step(None, None, None, optimizer=optimizer)
        optimizer.zero_grad()
    return model, masks, enforcer, optimizer, before


def assert_exact_sparsity(model, masks, enforcer, before):
    assert enforcer.violations() == {}
    for name, module in masks.layers(model).items():
        kept = masks.masks[name].to(module.weight.device)
        assert not module.weight[~kept].any(), name  # exactly zero
        assert not torch.equal(module.weight[kept], before[name][kept]), name  # the kept weights trained
    assert measure_sparsity(model).overall >= 0.5  # a kept weight may pass through zero; it stays kept


@pytest.mark.parametrize("optim, dtype, device", list(cases("cpu")))
def test_pruned_weights_stay_exactly_zero_with_each_recommended_optimizer(optim, dtype, device, one_thread):
    model, masks, enforcer, optimizer, before = train_masked(optim, dtype, device)
    assert_exact_sparsity(model, masks, enforcer, before)
    if OPTIMIZERS[optim].bitsandbytes:
        layer = next(iter(masks.layers(model).values()))
        assert optimizer.state[layer.weight]["state1"].dtype == torch.uint8  # the 8-bit path ran
        assert enforcer.needs_remask(optimizer)  # not zero-preserving: re-masked after every step


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install 'prunetune[bnb]')")
def test_recommended_7b_setup_keeps_zeros_with_checkpointing(one_thread):
    """bf16 weights, 8-bit AdamW, gradient checkpointing: the setup README recommends for 7B on one 80 GB GPU."""
    assert RECOMMENDED == {"dtype": "bfloat16", "optim": "adamw_bnb_8bit", "gradient_checkpointing": True}
    model, masks, enforcer, _, before = train_masked("adamw_bnb_8bit", torch.bfloat16, "cpu", checkpointing=True)
    assert model.is_gradient_checkpointing
    assert_exact_sparsity(model, masks, enforcer, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optim, dtype, device", list(cases("cuda")))
def test_pruned_weights_stay_exactly_zero_on_cuda(optim, dtype, device):
    """The CUDA kernels (fused AdamW, bitsandbytes' 8-bit and paged steps) with the CUDA mask encoding (bool)."""
    model, masks, enforcer, _, before = train_masked(optim, dtype, device, checkpointing=dtype == torch.bfloat16)
    assert next(iter(enforcer.layers.values())).prunetune_kept_mask.dtype == torch.bool
    assert_exact_sparsity(model, masks, enforcer, before)


def test_bitsandbytes_optimizers_are_refused_clearly_where_they_cannot_run(monkeypatch):
    args = RecoveryTrainingArguments(output_dir="unused", optim="adamw_bnb_8bit")
    real_find_spec = importlib.util.find_spec

    def installed(present):
        return lambda name, *a: (object() if present else None) if name == "bitsandbytes" else real_find_spec(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", installed(False))
    with pytest.raises(UsageError, match=r"adamw_bnb_8bit needs bitsandbytes.*prunetune\[bnb\]"):
        check_optimizer(args)
    monkeypatch.setattr(importlib.util, "find_spec", installed(True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_optimizer(args)  # the 8-bit AdamW itself runs on CPU
    with pytest.raises(UsageError, match="paged_adamw_8bit pages its state.*needs CUDA"):
        check_optimizer(RecoveryTrainingArguments(output_dir="unused", optim="paged_adamw_8bit"))
    check_optimizer(RecoveryTrainingArguments(output_dir="unused", optim="adamw_torch"))  # not bitsandbytes: no check


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install 'prunetune[bnb]')")
def test_recover_full_runs_the_recommended_setup_end_to_end(tmp_path):
    """The command line README gives for 7B, on the tiny test model: the Trainer builds 8-bit AdamW, re-masks."""
    import json
    import random

    from factories import make_tokenizer

    from prunetune.cli import main

    model = prune_half_rows(make_model("llama", hidden=128, intermediate=256))
    model.save_pretrained(tmp_path / "pruned")
    make_tokenizer().save_pretrained(tmp_path / "pruned")
    rng = random.Random(0)
    words = "sparse masks keep pruned weights at zero while the kept ones train".split()
    (tmp_path / "text.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)))
    out = tmp_path / "out"
    assert main(["recover", "--model_name_or_path", str(tmp_path / "pruned"), "--dataset_name", str(tmp_path / "text.txt"),
                 "--recovery_method", "full", "--dtype", "bfloat16", "--optim", "adamw_bnb_8bit", "--gradient_checkpointing",
                 "--block_size", "32", "--per_device_train_batch_size", "2", "--max_steps", "3", "--learning_rate", "1e-3",
                 "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(out)]) == 0
    result = json.loads((out / "recovery.json").read_text())
    assert result["steps"] == 3 and result["sparsity_after"] == 0.5
