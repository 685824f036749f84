"""`prunetune recover` / `merge` / `eval --lora_weights` end to end on a small pruned random model."""

import json
import random

import pytest
import torch
from factories import make_tokenizer, prune_half_rows, save_model_folder

from prunetune.cli import main
from prunetune.masks import measure_sparsity

WORDS = "the model prunes weights and recovers accuracy with low rank adapters sparse masks".split()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A 50%-pruned random llama folder, a dense one, and a small text corpus."""
    root = tmp_path_factory.mktemp("recover")
    model = save_model_folder(root / "dense", "llama")
    prune_half_rows(model)
    model.save_pretrained(root / "pruned")
    make_tokenizer().save_pretrained(root / "pruned")
    rng = random.Random(0)
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)))
    return root


def recover_args(ws, method, out, *extra):
    return ["recover", "--model_name_or_path", str(ws / "pruned"), "--dataset_name", str(ws / "text.txt"),
            "--block_size", "64", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
            "--recovery_method", method, "--output_dir", str(out), "--save_strategy", "no",
            "--disable_tqdm", "true", *extra]


def test_masked_lora_recovers_merges_exactly_and_evaluates(workspace, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(recover_args(workspace, "masked_lora", out, "--max_steps", "6", "--do_eval", "--max_eval_samples", "4")) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "perplexity" in printed
    result = json.loads((out / "recovery.json").read_text())
    assert result["perplexity_after"] < result["perplexity_before"]
    assert result["sparsity_after"] == result["merged_sparsity"] == pytest.approx(0.5)
    assert json.loads((out / "adapter_config.json").read_text())["use_masked_lora"] is True

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(workspace / "pruned"), "--adapter", str(out), "--save_model", str(merged)]) == 0
    from transformers import AutoModelForCausalLM

    pruned = measure_sparsity(AutoModelForCausalLM.from_pretrained(workspace / "pruned")).per_module()
    assert measure_sparsity(AutoModelForCausalLM.from_pretrained(merged)).per_module() == pruned
    assert json.loads((merged / "prunetune.json").read_text())["merged_adapter"]["method"] == "masked_lora"

    ppl = tmp_path / "ppl.json"
    assert main(["eval", "--model", str(workspace / "pruned"), "--lora_weights", str(out), "--dataset",
                 str(workspace / "text.txt"), "--split", "validation", "--seqlen", "64", "--max_windows", "4",
                 "--json", str(ppl)]) == 0
    assert json.loads(ppl.read_text())["perplexity"] == pytest.approx(result["perplexity_after"], rel=1e-4)


def test_plain_lora_merge_refuses_to_densify_unless_asked(workspace, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(recover_args(workspace, "lora", out, "--max_steps", "2", "--lora_target_modules", "all-linear")) == 0
    merged = tmp_path / "merged"
    base = ["merge", "--model", str(workspace / "pruned"), "--adapter", str(out), "--save_model", str(merged)]
    assert main(base) == 2
    captured = capsys.readouterr()
    assert "densifies" in captured.err and "0.5000" in captured.out and not merged.exists()
    assert main(base + ["--remask", "--dataset", str(workspace / "text.txt"), "--seqlen", "64", "--max_windows", "2"]) == 0
    assert "perplexity cost" in capsys.readouterr().out
    assert measure_sparsity(__import__("transformers").AutoModelForCausalLM.from_pretrained(merged)).overall == 0.5


@pytest.mark.parametrize("case, message", [
    ("exists", "already exists.*--overwrite_output_dir"),
    ("dense", "no sparsity.*--allow_dense_finetune"),
    ("target", "'q_prj' matches no layer"),
    ("not_adapter", "not a PEFT adapter"),
])
def test_bad_input_exits_2(case, message, workspace, tmp_path, capsys):
    out = tmp_path / "out"
    if case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
        argv = recover_args(workspace, "full", out)
    elif case == "dense":
        argv = recover_args(workspace, "full", out)
        argv[argv.index("--model_name_or_path") + 1] = str(workspace / "dense")
    elif case == "target":
        argv = recover_args(workspace, "lora", out, "--lora_target_modules", "q_proj,q_prj")
    else:
        argv = ["eval", "--model", str(workspace / "pruned"), "--lora_weights", str(workspace), "--dataset", str(workspace / "text.txt")]
    assert main(argv) == 2
    assert __import__("re").search(message, " ".join(capsys.readouterr().err.split()))
    if case == "exists":
        assert (out / "keep.txt").read_text() == "precious"


def test_adapter_runs_are_reproducible(workspace, tmp_path):
    """The adapter's random init is seeded by --seed: two runs give the same weights, another seed others."""
    from safetensors.torch import load_file

    weights = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = tmp_path / name
        torch.manual_seed(int(name == "b") + 7)  # whatever the process did before must not matter
        assert main(recover_args(workspace, "lora", out, "--max_steps", "2", "--seed", seed)) == 0
        weights.append(load_file(out / "adapter_model.safetensors"))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
