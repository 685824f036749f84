"""Mask identity: pruned positions are fingerprinted, and an adapter refuses a base pruned at other positions.

Two bases with the same zero count in every layer (half of every row) but the zeros at other
positions must be told apart: by the adapter loader (``apply_adapter``, ``eval``, ``merge``)
and by the frozen-base check that runs during training.
"""

import json
import logging
import random
import shutil

import numpy as np
import pytest
import torch
from factories import make_model, make_tokenizer, random_tokens
from peft import PeftModel

from prunetune.cli import main
from prunetune.errors import UsageError
from prunetune.masks import layer_digests, mask_digest, mask_digests, pack_kept, popcount
from prunetune.modules import prunable_layers, weight_matrix
from prunetune.outputs import MANIFEST_NAME, read_manifest, write_json
from prunetune.recover.adapter import apply_adapter, check_base_manifest
from prunetune.recipe.args import RecoveryArguments
from prunetune.recover.base import FrozenBaseCheck
from prunetune.recover.lora import setup_masked_lora

FIRST = "model.layers.0.self_attn.q_proj"


@torch.no_grad()
def prune_half_rows(model, shift: int = 0):
    """Zero the smaller half of every row; ``shift`` moves those zeros ``shift`` columns (same count per row)."""
    for module in prunable_layers(model).values():
        weight = weight_matrix(module)  # (out, in)
        columns = weight.abs().argsort(dim=1)[:, : weight.shape[1] // 2]
        weight.scatter_(1, (columns + shift) % weight.shape[1], 0.0)
    return model


def save_base(path, shift: int):
    model = prune_half_rows(make_model("llama"), shift)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """base1 and base2 (same per-layer zero counts, other positions), a masked LoRA adapter trained on base1, text."""
    root = tmp_path_factory.mktemp("identity")
    base1, base2 = save_base(root / "base1", 0), save_base(root / "base2", 1)
    assert [int((m.weight == 0).sum()) for m in prunable_layers(base1).values()] == \
           [int((m.weight == 0).sum()) for m in prunable_layers(base2).values()]
    setup = setup_masked_lora(base1, RecoveryArguments(recovery_method="masked_lora", lora_r=4))
    with torch.no_grad():
        for name, param in setup.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # a nonzero update, so outputs tell adapters apart
    setup.model.save_pretrained(root / "adapter")
    write_json(root / "adapter" / MANIFEST_NAME, {"kind": "adapter", "base_model": str(root / "base1"), **setup.manifest})
    rng = random.Random(0)
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice("abc de fgh ij".split()) for _ in range(12)) for _ in range(200)))
    return root


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def copy_adapter(workspace, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(workspace / "adapter", folder)
    return folder


# -- the digest ---------------------------------------------------------------------------------

@pytest.mark.parametrize("numel", [7, 8, 13, 64 * 128])
def test_packing_is_numpy_packbits_and_popcount_counts(numel):
    kept = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5
    assert np.array_equal(pack_kept(kept).numpy(), np.packbits(kept.numpy()))
    assert int(popcount(pack_kept(kept))) == int(kept.sum())
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert [int(popcount(b.reshape(1))) for b in every_byte] == [bin(i).count("1") for i in range(256)]


def test_digest_follows_positions_not_counts():
    weight = torch.randn(16, 24)
    weight[weight.abs() < 0.5] = 0
    kept = weight != 0
    assert mask_digest(kept) == mask_digest(kept.clone()) and len(mask_digest(kept)) == 16
    swapped = kept.clone()
    row = int(torch.nonzero(kept.any(1) & (~kept).any(1))[0])
    on, off = int(kept[row].nonzero()[0]), int((~kept[row]).nonzero()[0])
    swapped[row, on], swapped[row, off] = False, True  # same count, two positions exchanged
    assert swapped.sum() == kept.sum() and mask_digest(swapped) != mask_digest(kept)
    assert mask_digest(kept.reshape(24, 16)) != mask_digest(kept)  # the shape is part of it


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_digest_does_not_depend_on_device_or_dtype(device, dtype):
    model = prune_half_rows(make_model("llama"))
    expected = {name: mask_digest(weight_matrix(m) != 0) for name, m in prunable_layers(model).items()}
    assert layer_digests(prunable_layers(model.to(device, dtype))) == expected
    assert mask_digests(model) == expected


def test_conv1d_digest_is_in_out_in_orientation():
    model = prune_half_rows(make_model("gpt2"))
    for name, module in prunable_layers(model).items():
        assert module.weight.shape[::-1] == weight_matrix(module).shape  # Conv1D stores (in, out)
        assert mask_digests(model)[name] == mask_digest(module.weight.t() != 0)


# -- the frozen-base check ----------------------------------------------------------------------

def test_frozen_base_check_sees_a_zero_that_moved():
    model = prune_half_rows(make_model("llama"))
    layers = prunable_layers(model)
    check = FrozenBaseCheck(layers)
    assert check.violations() == {}
    assert check.zeros == {name: int((m.weight == 0).sum()) for name, m in layers.items()}
    assert check.digests() == mask_digests(model)
    weight = weight_matrix(layers[FIRST])
    zero, nonzero = int((weight[0] == 0).nonzero()[0]), int((weight[0] != 0).nonzero()[0])
    with torch.no_grad():
        weight[0, zero], weight[0, nonzero] = 0.25, 0.0  # the count is unchanged
    assert int((weight == 0).sum()) == check.zeros[FIRST]
    assert check.violations() == {FIRST: 1}
    with torch.no_grad():
        weight[weight == 0] = 1.0  # every pruned weight revived
    assert check.violations() == {FIRST: check.zeros[FIRST]}


def test_frozen_base_check_on_conv1d_and_after_peft_wraps():
    model = prune_half_rows(make_model("gpt2"))
    before = mask_digests(model)  # PEFT wraps the layers in place
    setup = setup_masked_lora(model, RecoveryArguments(recovery_method="masked_lora", lora_target_modules="c_attn", lora_r=4))
    assert setup.check.violations() == {}
    assert set(setup.manifest["base_mask_digests"]) == set(setup.manifest["base_zero_counts"])
    assert setup.manifest["base_mask_digests"] == before  # every prunable layer, not only the adapted ones
    module = setup.check.layers["transformer.h.1.attn.c_attn"]
    with torch.no_grad():
        row = weight_matrix(module)[3]
        row[(row == 0).nonzero()[0]] = 1.0
        row[(row != 0).nonzero()[-1]] = 0.0
    assert setup.check.violations() == {"transformer.h.1.attn.c_attn": 1}


# -- adapters -----------------------------------------------------------------------------------

def test_manifest_records_digests_of_every_prunable_layer(workspace):
    manifest = read_manifest(workspace / "adapter")
    assert manifest["base_mask_digests"] == mask_digests(load(workspace / "base1"))
    assert set(manifest["base_zero_counts"]) == set(manifest["base_mask_digests"])


def test_adapter_is_refused_on_a_base_pruned_at_other_positions(workspace):
    tokens = random_tokens(2, 16)
    peft_model = apply_adapter(load(workspace / "base1"), workspace / "adapter")
    assert isinstance(peft_model, PeftModel)
    with torch.no_grad():
        assert peft_model(input_ids=tokens).logits.isfinite().all()
    with pytest.raises(UsageError) as caught:
        apply_adapter(load(workspace / "base2"), workspace / "adapter")
    message = str(caught.value)
    assert FIRST in message and str(workspace / "base1") in message and "same count at other positions" in message
    assert "more of its 14 recorded layers" in message


def test_check_base_manifest_takes_a_dict_and_a_wrapped_model(workspace):
    manifest = read_manifest(workspace / "adapter")
    check_base_manifest(load(workspace / "base1"), manifest, "out")
    check_base_manifest(apply_adapter(load(workspace / "base1"), workspace / "adapter"), manifest, "out")  # a PeftModel
    check_base_manifest(load(workspace / "base2"), {}, "out")  # nothing recorded: nothing to check
    check_base_manifest(load(workspace / "base2"), None, "out")
    with pytest.raises(UsageError, match=f"Adapter out does not match.*{FIRST}"):
        check_base_manifest(load(workspace / "base2"), manifest, "out")
    with pytest.raises(UsageError, match=f"Adapter out does not match.*{FIRST}.*50.00% zeros here, 100.00%"):
        check_base_manifest(load(workspace / "base2"), {**manifest, "base_mask_digests": None,
                                                        "base_zero_counts": {FIRST: 64 * 64}}, "out")


def test_adapter_written_before_digests_falls_back_to_counts_with_a_warning(workspace, tmp_path, caplog):
    folder = copy_adapter(workspace, tmp_path)
    manifest = read_manifest(folder)
    del manifest["base_mask_digests"]
    write_json(folder / MANIFEST_NAME, manifest)
    with caplog.at_level(logging.WARNING, logger="prunetune"):
        apply_adapter(load(workspace / "base2"), folder)  # same counts: cannot be told apart
    assert "not where the zeros are" in caplog.text
    with pytest.raises(UsageError, match=f"{FIRST}.*0.00% zeros here, 50.00% in the model it was trained on"):
        apply_adapter(make_model("llama"), folder)  # the dense model


@pytest.mark.parametrize("text, message", [
    ("{not json", "adapter_config.json is not valid JSON"),
    ("[1, 2]", "adapter_config.json holds a JSON list, not an object"),
    ({"r": "abc"}, "adapter_config.json is not a valid LoRA adapter config: r is 'abc'"),
    ({"r": 0}, "r is 0 .expected a positive integer"),
    ({"lora_alpha": None}, "lora_alpha is None"),
    ({"target_modules": 5}, "target_modules is 5"),
    ({"task_type": "NOPE"}, "adapter_config.json is not a valid LoRA adapter config: Invalid task type"),
    ({"layers_to_transform": "x"}, "adapter_config.json is not a valid LoRA adapter config"),
])
def test_garbage_adapter_config_is_a_usage_error(text, message, workspace, tmp_path):
    folder = copy_adapter(workspace, tmp_path)
    if isinstance(text, dict):
        text = json.dumps({**json.loads((folder / "adapter_config.json").read_text()), **text})
    (folder / "adapter_config.json").write_text(text)
    with pytest.raises(UsageError, match=message):
        apply_adapter(load(workspace / "base1"), folder)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "adapter_model.safetensors is corrupt or truncated"),
    ("garbage", "adapter_model.safetensors is corrupt or truncated"),
    ("empty_file", "adapter_model.safetensors is corrupt or truncated"),
    ("missing", "no adapter_model.safetensors: the adapter's weights are missing"),
])
def test_damaged_adapter_weights_are_a_usage_error(damage, message, workspace, tmp_path):
    folder = copy_adapter(workspace, tmp_path)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) - 100])
    elif damage == "garbage":
        weights.write_bytes(b"\x00garbage" * 50)
    elif damage == "empty_file":
        weights.write_bytes(b"")
    else:
        weights.unlink()
    with pytest.raises(UsageError, match=message):
        apply_adapter(load(workspace / "base1"), folder)


# -- through the CLI ----------------------------------------------------------------------------

def test_cli_eval_and_merge_refuse_the_other_base(workspace, tmp_path, capsys):
    evaluate = ["eval", "--model", str(workspace / "base2"), "--lora_weights", str(workspace / "adapter"),
                "--dataset", str(workspace / "text.txt"), "--seqlen", "32", "--max_windows", "2"]
    assert main(evaluate) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "does not match this base model" in err and FIRST in err and "base1" in err
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(workspace / "base2"), "--adapter", str(workspace / "adapter"),
                 "--save_model", str(merged)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert FIRST in err and "Traceback" not in err and not merged.exists()
    assert main(["merge", "--model", str(workspace / "base1"), "--adapter", str(workspace / "adapter"),
                 "--save_model", str(merged)]) == 0


def test_cli_eval_with_a_truncated_adapter_exits_2(workspace, tmp_path, capsys):
    folder = copy_adapter(workspace, tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert main(["eval", "--model", str(workspace / "base1"), "--lora_weights", str(folder), "--dataset",
                 str(workspace / "text.txt"), "--seqlen", "32", "--max_windows", "2"]) == 2
    assert "corrupt or truncated" in " ".join(capsys.readouterr().err.split())
