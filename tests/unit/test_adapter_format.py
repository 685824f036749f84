"""The saved adapter folder: plain PEFT refuses a masked LoRA adapter instead of applying it unmasked,
prunetune loads it (and the earlier format) with the masked outputs, a masked_lora checkpoint resumes,
and every adapter folder carries a README saying how to load and merge it."""

import json
import random

import pytest
import torch
from factories import Killed, make_tokenizer, random_tokens
from factories import kill_after_save as KillAfterSave
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_masked_lora import pruned_model

from prunetune.export import merge_adapter
from prunetune.modules import prunable_layers
from prunetune.recover.adapter import apply_adapter
from prunetune.recipe.args import RecoveryArguments
from prunetune.recover.lora import build_lora_config
from prunetune.recover.masked_lora import MaskedLoraLinear

PEFT_TEMPLATE = "Model Card for Model ID"  # the heading of PEFT's blank model card


def save_adapter(path, method: str):
    model = pruned_model()
    args = RecoveryArguments(recovery_method=method, lora_r=4, lora_target_modules="all-linear")
    config = build_lora_config(model, args, masked=method == "masked_lora")
    config.init_lora_weights = False  # random B as well: a nonzero update
    get_peft_model(model, config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def masked_dir(tmp_path_factory):
    return save_adapter(tmp_path_factory.mktemp("masked") / "adapter", "masked_lora")


def formula_logits(adapter_dir, tokens, masked: bool = True) -> torch.Tensor:
    """Logits of the pruned model with ``W + s (B A) * M`` written into its weights, from the files alone."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    factors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    model = pruned_model()
    layers = prunable_layers(model)
    for key, lora_A in factors.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        weight = layers[name].weight
        delta = factors[key.replace(".lora_A.", ".lora_B.")] @ lora_A * scaling
        with torch.no_grad():
            weight += delta * (weight != 0) if masked else delta
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_plain_peft_refuses_a_masked_adapter_and_names_prunetune(masked_dir):
    saved = json.loads((masked_dir / "adapter_config.json").read_text())
    assert saved["peft_type"].startswith("PRUNETUNE_MASKED_LORA") and saved["use_masked_lora"] is True
    with pytest.raises(KeyError, match="plain PEFT cannot apply it; load it with prunetune"):
        PeftModel.from_pretrained(pruned_model(), masked_dir)
    with pytest.raises(KeyError, match="load it with prunetune"):
        pruned_model().load_adapter(str(masked_dir))  # transformers' own loader


@pytest.mark.parametrize("form", ["saved", "earlier"])
def test_apply_adapter_computes_the_masked_formula_and_merges_exactly(form, masked_dir, tmp_path):
    folder = masked_dir
    if form == "earlier":  # written before this format: peft_type LORA + use_masked_lora
        folder = tmp_path / "earlier"
        folder.mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            (folder / name).write_bytes((masked_dir / name).read_bytes())
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    tokens = random_tokens(2, 16)
    peft_model = apply_adapter(pruned_model(), folder)
    assert any(isinstance(m, MaskedLoraLinear) for m in peft_model.modules())
    with torch.no_grad():
        logits = peft_model(input_ids=tokens).logits
    torch.testing.assert_close(logits, formula_logits(masked_dir, tokens), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, formula_logits(masked_dir, tokens, masked=False), atol=1e-3)  # the test can tell
    _, report = merge_adapter(peft_model, "masked_lora")
    assert report.exact and report.sparsity_after == report.sparsity_before


@pytest.mark.parametrize("method", ["lora", "masked_lora"])
def test_readme_says_what_the_adapter_is_and_how_to_load_and_merge_it(method, tmp_path):
    folder = save_adapter(tmp_path / "adapter", method)
    readme = (folder / "README.md").read_text()
    assert PEFT_TEMPLATE not in readme
    assert "prunetune merge --model BASE --adapter ADAPTER --save_model OUT" in readme  # no base recorded: a placeholder
    assert "prunetune eval --model BASE --lora_weights ADAPTER" in readme and "apply_adapter" in readme
    assert "Rank r = 4, lora_alpha = 16" in readme and "`self_attn.q_proj`" in readme
    if method == "masked_lora":
        assert "Plain PEFT cannot apply it, and refuses" in readme and "Sparsity guarantee" in readme
    else:
        assert "--remask" in readme and "--allow_dense" in readme
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"  # plain PEFT loads it
        PeftModel.from_pretrained(pruned_model(), folder)


def test_readme_names_the_base_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = pruned_model()
    model.config.save_pretrained("out/pruned")  # PEFT reads it to see whether the vocabulary changed
    model.name_or_path = "out/pruned"  # what from_pretrained records; PEFT saves it as base_model_name_or_path
    config = build_lora_config(model, RecoveryArguments(recovery_method="masked_lora", lora_r=4), masked=True)
    get_peft_model(model, config).save_pretrained("adapter")
    readme = (tmp_path / "adapter" / "README.md").read_text()
    assert "Base model: `out/pruned`" in readme
    assert "prunetune merge --model out/pruned --adapter ADAPTER --save_model OUT" in readme


# --------------------------------------------------------------------------- the Trainer's checkpoints




@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A 50%-pruned random llama folder and a small text."""
    root = tmp_path_factory.mktemp("resume")
    pruned_model().save_pretrained(root / "pruned")
    make_tokenizer().save_pretrained(root / "pruned")
    rng = random.Random(0)
    words = ("the", "model", "prunes", "weights", "and", "recovers", "accuracy", "with", "sparse", "masks")
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)))
    return root


def run(ws, out, *extra, callbacks=None):
    from prunetune.commands.recover import parse
    from prunetune.recipe import recover

    argv = ["--model_name_or_path", str(ws / "pruned"), "--dataset_name", str(ws / "text.txt"), "--block_size", "32",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--recovery_method", "masked_lora",
            "--lora_r", "4", "--max_steps", "4", "--save_steps", "2", "--output_dir", str(out),
            "--disable_tqdm", "true", "--seed", "3", *extra]
    return recover(*parse(argv), callbacks=callbacks)


def test_a_masked_lora_checkpoint_is_saved_guarded_and_resumes(workspace, tmp_path):
    straight = tmp_path / "straight"
    run(workspace, straight)
    resumed = tmp_path / "resumed"
    with pytest.raises(Killed):
        run(workspace, resumed, callbacks=[KillAfterSave(2)])
    checkpoint = resumed / "checkpoint-2"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"].startswith("PRUNETUNE_MASKED_LORA")
    assert "Plain PEFT cannot apply it" in (checkpoint / "README.md").read_text()
    # the Trainer loads the checkpoint's weights into the adapter the model has: its config is not re-read
    result = run(workspace, resumed, "--resume_from_checkpoint", "latest")
    assert result.resumed_from.endswith("checkpoint-2") and result.steps == 2
    final = load_file(str(resumed / "adapter_model.safetensors"))
    for name, tensor in load_file(str(straight / "adapter_model.safetensors")).items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-6)  # the same run as without the kill
    assert json.loads((resumed / "adapter_config.json").read_text())["peft_type"].startswith("PRUNETUNE_MASKED_LORA")
    assert "prunetune merge" in (resumed / "README.md").read_text()
