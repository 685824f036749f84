"""`--memory_estimate`: the shape without weights (offline), each term against what PyTorch really holds, the CLI."""

import importlib.util
import json

import pytest
import torch
import transformers as T
from factories import make_model, prune_half_rows, random_tokens

from prunetune.cli import main
from prunetune.errors import UsageError
from prunetune.masks import MaskSet
from prunetune.recipe.memory_estimate import (
    GB,
    KNOWN_SHAPES,
    TrainingSetup,
    block_activation_bytes,
    estimate,
    model_shape,
    shape_from_config,
)

LLAMA2_7B = "meta-llama/Llama-2-7b-hf"
RECOMMENDED_7B = TrainingSetup(dtype="bfloat16", optim="adamw_bnb_8bit", bf16=True, gradient_checkpointing=True,
                               micro_batch=1, block_size=1024)


def test_llama2_7b_shape_comes_from_the_built_in_table_offline():
    shape = model_shape(LLAMA2_7B)
    assert "built-in shape of meta-llama/Llama-2-7b-hf" in shape.source
    assert shape.params == 6_738_415_616  # embeddings + 32 blocks + norm + output layer
    assert shape.masked == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # every linear layer of every block
    assert (shape.hidden, shape.layers, shape.intermediate, shape.vocab, shape.kv_dim) == (4096, 32, 11008, 32000, 4096)


def test_a_local_config_is_used_first_and_named(tmp_path):
    values = dict(KNOWN_SHAPES[LLAMA2_7B])
    config = T.AutoConfig.for_model(values.pop("model_type"), **values)
    config.save_pretrained(tmp_path)
    for given in (tmp_path, tmp_path / "config.json"):
        shape = model_shape("out/llama2-7b-wanda50", config_name=str(given))
        assert str(tmp_path) in shape.source and shape.params == model_shape(LLAMA2_7B).params


def test_a_model_without_a_readable_shape_is_refused_naming_what_works():
    with pytest.raises(UsageError, match="--config_name.*meta-llama/Llama-2-7b-hf"):
        model_shape("someone/unknown-model-7b")


def test_recommended_setup_for_llama2_7b_fits_80_gb_and_the_default_does_not():
    shape = model_shape(LLAMA2_7B)
    recommended = estimate(shape, RECOMMENDED_7B)
    assert recommended.peak <= 80 * GB
    default = estimate(shape, TrainingSetup(micro_batch=1, block_size=1024))  # fp32 weights, fused AdamW, autocast
    assert default.peak > 80 * GB
    # the terms the issue names: fp32 weights 27 GB + gradients 27 GB + AdamW 54 GB before activations
    assert default.resident["weights"] == pytest.approx(27e9, rel=0.01)
    assert default.resident["optimizer state (adamw_torch_fused)"] == pytest.approx(54e9, rel=0.01)
    # 8-bit AdamW: 2 bytes of state per weight and a float32 scale per 256, instead of 8 bytes; the Trainer keeps
    # the embedding (32000 x 4096) in 32 bits (the norms, 4,096 values each, are just big enough for 8 bits)
    thirty_two = 32000 * 4096
    assert shape.embedding + shape.small == thirty_two
    eight = 2 * (1 + 4 / 256) * (shape.params - thirty_two) + 8 * thirty_two
    assert recommended.resident["optimizer state (adamw_bnb_8bit)"] == pytest.approx(eight, rel=1e-6)
    fsdp = estimate(shape, TrainingSetup(micro_batch=1, block_size=1024, processes=8, fsdp=True))
    assert fsdp.resident["weights"] == shape.params * 4 // 8
    assert fsdp.moments["optimizer step"]["gradients"] == shape.params * 4 // 8
    # over 8 GPUs the whole fp32 model and masks each process loads before sharding are the peak
    assert fsdp.peak_moment == "before sharding" and fsdp.peak == shape.params * 4 + shape.masked
    two = estimate(shape, TrainingSetup(micro_batch=1, block_size=1024, processes=2, fsdp=True))
    assert two.peak_moment == "end of backward" and two.peak < 80 * GB < default.peak


def saved_bytes_per_token(model, tokens, autocast: bool) -> float:
    """Bytes of what autograd keeps for the backward pass (weights excluded), per token."""
    storages, weights = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=tokens, labels=tokens)
    return sum(storages.values()) / tokens.numel()


@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, False), (torch.float32, False), (torch.float32, True)])
def test_block_activations_match_what_autograd_saves(dtype, autocast, one_thread):
    """Per block and token, counted as the difference between a 3-block and a 1-block model (the head cancels)."""
    def model(layers):
        config = T.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=4, vocab_size=512, max_position_embeddings=512)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        return T.AutoModelForCausalLM.from_config(config).to(dtype).train(), config

    tokens = torch.randint(0, 512, (2, 128))
    (small, config), (large, _) = model(1), model(3)
    measured = (saved_bytes_per_token(large, tokens, autocast) - saved_bytes_per_token(small, tokens, autocast)) / 2
    shape = shape_from_config(config, "test", "test")
    weight_bytes = 4 if dtype == torch.float32 else 2
    compute_bytes = 2 if autocast or weight_bytes == 2 else 4
    predicted = block_activation_bytes(shape, weight_bytes, compute_bytes, autocast_inputs=autocast)
    if autocast:  # autocast keeps a bf16 copy of each block's weights too (a separate term of the estimate)
        block_weights = 4 * 256 * 256 + 3 * 256 * 688
        predicted += 2 * block_weights / tokens.numel()
    assert measured == pytest.approx(predicted, rel=0.002)


def test_resident_terms_match_the_tensors_of_a_real_step(one_thread):
    """Weights, gradients, masks and AdamW state, by count, on the tiny model after one optimizer step."""
    model = prune_half_rows(make_model("llama", hidden=128, intermediate=256)).train()
    shape = shape_from_config(model.config, "tiny", "test")
    masks = MaskSet.from_zeros(model)
    names = ["adamw_torch_fused", "adamw_torch"]
    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes as bnb

        bnb.optim.GlobalOptimManager.get_instance().initialize()  # process-wide: drop other tests' overrides
        names.append("adamw_bnb_8bit")
    for name in names:  # built as a run builds it: the Trainer's create_optimizer (32-bit state for embeddings)
        args = T.TrainingArguments(output_dir="unused", optim=name, use_cpu=True, report_to=[])
        optimizer = T.Trainer(model=model, args=args).create_optimizer()
        tokens = random_tokens(2, 16)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        result = estimate(shape, TrainingSetup(optim=name, bf16=False, micro_batch=2, block_size=16))
        params = list(model.parameters())
        assert result.resident["weights"] == sum(p.numel() * p.element_size() for p in params)
        assert result.moments["optimizer step"]["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in params)
        assert result.resident["masks (bool, 1 byte per masked weight)"] == sum(m.numel() for m in masks.masks.values())
        state = {t.untyped_storage().data_ptr(): t.numel() * t.element_size() for s in optimizer.state.values()
                 for key, t in s.items() if torch.is_tensor(t) and t.dim() > 0 and not key.startswith("qmap")}
        assert result.resident[f"optimizer state ({name})"] == pytest.approx(sum(state.values()), rel=0.001), name
        optimizer.zero_grad(set_to_none=True)


def dry_run(capsys, *extra):
    code = main(["recover", "--model_name_or_path", LLAMA2_7B, "--recovery_method", "full", "--memory_estimate", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_dry_run_prints_a_labelled_prediction_without_an_output_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = dry_run(capsys, "--dtype", "bfloat16", "--optim", "adamw_bnb_8bit", "--gradient_checkpointing",
                           "--per_device_train_batch_size", "1", "--block_size", "1024")
    assert code == 0
    assert out.startswith("PREDICTED peak GPU memory (not a measurement)")
    assert "built-in shape of meta-llama/Llama-2-7b-hf" in out and "fits a GPU of 80 GB" in out
    assert "bfloat16 weights, bf16 autocast, adamw_bnb_8bit, gradient checkpointing, micro-batch 1 x 1024" in out
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_dry_run_reads_fsdp_and_the_process_count(capsys):
    code, out, _ = dry_run(capsys, "--fsdp", "full_shard", "--memory_estimate_processes", "8",
                           "--per_device_train_batch_size", "1")
    assert code == 0 and "FSDP2 over 8 processes" in out and "fits a GPU of 80 GB" in out


def test_the_dry_run_from_an_argument_file(capsys, tmp_path):
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"model_name_or_path": LLAMA2_7B, "recovery_method": "full", "memory_estimate": True}))
    assert main(["recover", str(args)]) == 0
    assert "PREDICTED peak GPU memory" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--recovery_method", "lora"], "predicts --recovery_method full"),
    (["--memory_estimate_processes", "0"], "--memory_estimate_processes 0"),
    (["--memory_estimate_budget_gb", "-1"], "--memory_estimate_budget_gb -1"),
    (["--optim", "lomo"], "does not model --optim lomo"),
])
def test_bad_dry_run_input_exits_2(capsys, extra, message):
    code, _, err = dry_run(capsys, *extra)
    assert code == 2 and message in err


def test_recover_refuses_memory_estimate_from_python():
    from prunetune.commands.recover import parse
    from prunetune.recipe import recover

    parsed = parse(["--model_name_or_path", LLAMA2_7B, "--recovery_method", "full", "--memory_estimate",
                    "--output_dir", "unused"])
    with pytest.raises(UsageError, match="memory_estimate.report"):
        recover(*parsed)
