"""Pins for changes that once survived the whole suite (mutation testing).

Each test here fails on one mutant that every other test let through:

* masked LoRA's merge made unmasked -- the path PEFT's own ``merge_and_unload()`` takes;
* masked LoRA's ``unmerge`` with the sign flipped;
* the Wanda variant replaced by a plain per-layer (or per-row) mask;
* SparseGPT's handling of dead inputs (never nonzero in the calibration data) removed;
* masked LoRA's fused backward recomputing the weight without the forward's rounding seed;
* the fused path taken while LoRA dropout is active in training (dropout silently dropped);
* ``--num_fewshot`` overriding a task whose config fixes it at 0 shots;
* lm-eval run without seeding torch (python, numpy and torch get simple_evaluate's seeds).

(Removing ``check_base`` from :func:`prunetune.recover.adapter.apply_adapter` is already caught by
``test_mask_identity.py``: an adapter applied to a base pruned at other positions is refused there.)
"""

import pytest
import torch
from factories import make_model
from peft import get_peft_model
from test_pruning_sparsegpt import correlated_inputs, reference_sparsegpt, run_pruner

from prunetune.export import prunable_weights
from prunetune.modules import prunable_layers, weight_matrix
from prunetune.pruning import selection
from prunetune.pruning.base import SquaredNorms
from prunetune.pruning.wanda import WandaPruner
from prunetune.recover.masked_lora import MaskedLoraConfig, MaskedLoraLinear
from prunetune.zeroshot import NEXT_LINE_TASK, ZeroShotSettings, evaluate_zeroshot, write_next_line_task

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"]}  # GPT-2's Conv1D stores (in, out): fan_in_fan_out


# -- masked LoRA: merge and unmerge ---------------------------------------------------------------

def masked_adapter(arch):
    """A half-pruned model wrapped by PEFT with a masked LoRA adapter whose update is nonzero everywhere."""
    model = make_model(arch)
    with torch.no_grad():
        for module in prunable_layers(model).values():
            weight = weight_matrix(module)  # (out, in)
            weight.scatter_(1, weight.abs().argsort(dim=1)[:, : weight.shape[1] // 2], 0.0)
    base = {name: weight_matrix(m).detach().clone() for name, m in prunable_layers(model).items()}
    config = MaskedLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], fan_in_fan_out=arch == "gpt2")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    return peft_model, base


def merged_weights(model):
    """(out, in) weights by plain-model name, of a plain or PEFT-wrapped model (wrapped: the base layers)."""
    return {name: weight_matrix(m).detach().clone() for name, m in prunable_weights(model).items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_merge_and_unload_keeps_every_pruned_weight_zero(arch):
    """``PeftModel.merge_and_unload()`` merges through the variant's ``merge_unsafe``, not prunetune's export."""
    peft_model, base = masked_adapter(arch)
    merged = merged_weights(peft_model.merge_and_unload())
    for name, before in base.items():
        pruned = before == 0
        assert pruned.float().mean() == 0.5, name
        assert not merged[name][pruned].any(), name  # exactly zero, every one
        assert (merged[name] != before)[~pruned].float().mean() > 0.99, name  # the update did land on the kept ones


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_then_unmerge_restores_the_base(arch):
    peft_model, base = masked_adapter(arch)
    peft_model.merge_adapter()
    merged = merged_weights(peft_model.get_base_model())
    assert all(not torch.equal(merged[name], base[name]) for name in base)
    peft_model.unmerge_adapter()
    restored = merged_weights(peft_model.get_base_model())
    for name, before in base.items():
        torch.testing.assert_close(restored[name], before, rtol=0, atol=1e-6)
        assert not restored[name][before == 0].any(), name


# -- Wanda's variant ------------------------------------------------------------------------------

def brute_variant_kept(scores, ratio, tolerance=1e-3, max_steps=64):
    """The variant's rule, plainly: in each row prune the lowest scores (earlier column first on ties)
    while their running sum stays <= alpha * the row's total; alpha by bisection on [0, 1] from 1/2,
    moving towards the target sparsity, until within ``tolerance`` (else the closest alpha seen)."""
    rows = [sorted(range(scores.shape[1]), key=lambda j, r=r: (float(scores[r, j]), j)) for r in range(scores.shape[0])]

    def pruned_for(alpha):
        pruned = []
        for r, order in enumerate(rows):
            total, running, count = float(scores[r].double().sum()), 0.0, 0
            for j in order:
                running += float(scores[r, j])
                if running > alpha * total:
                    break
                count += 1
            pruned.append(order[:count])
        return pruned

    low, high, best, best_sparsity = 0.0, 1.0, 0.0, 0.0
    for _ in range(max_steps):
        alpha = (low + high) / 2
        sparsity = sum(map(len, pruned_for(alpha))) / scores.numel()
        if abs(sparsity - ratio) < abs(best_sparsity - ratio):
            best, best_sparsity = alpha, sparsity
        if abs(sparsity - ratio) <= tolerance:
            break
        low, high = (low, alpha) if sparsity > ratio else (alpha, high)
    kept = torch.ones_like(scores, dtype=torch.bool)
    for r, columns in enumerate(pruned_for(best)):
        kept[r, columns] = False
    return kept


@pytest.mark.parametrize("ratio", [0.4, 0.6])
def test_wanda_variant_is_the_cumulative_score_rule(ratio):
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(24, 96, generator=generator) * torch.linspace(0.2, 2.0, 24).unsqueeze(1)
    statistic = SquaredNorms(96, torch.device("cpu"))
    statistic.update(torch.randn(3, 40, 96, generator=generator) * torch.rand(96, generator=generator) * 3)
    scores = weight.abs() * statistic.values.sqrt()  # |W_ij| * ||X_j||, as Wanda scores
    pruned_weight = weight.clone()
    (kept,) = WandaPruner(ratio, use_variant=True).prune_group([pruned_weight], statistic)
    assert torch.equal(kept, brute_variant_kept(scores, ratio))
    assert torch.equal(pruned_weight == 0, ~kept)
    assert abs((~kept).float().mean().item() - ratio) <= 1e-3
    # not the plain masks: rows lose different counts, and the layer is not cut at one score
    assert not torch.equal(kept, selection.row_mask(scores, ratio))
    assert not torch.equal(kept, selection.layer_mask(scores, ratio))
    assert len(set((~kept).sum(1).tolist())) > 1


# -- SparseGPT's dead inputs ----------------------------------------------------------------------

@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_sparsegpt_dead_inputs_are_handled_as_the_reference(structure):
    """Inputs that are zero in every calibration token: H_jj = 1 in the damped Hessian, W[:, j] = 0."""
    torch.manual_seed(4)
    weight = torch.randn(24, 64)
    inputs = correlated_inputs(300, 64, seed=5)
    dead = torch.arange(0, 64, 3)  # a third of the inputs never fire
    inputs[:, dead] = 0
    n, m = (0, 0) if structure == "unstructured" else (2, 4)
    expected_weight, expected_pruned = reference_sparsegpt(weight, inputs, 0.5, n, m, blocksize=32)
    (pruned_weight,), (kept,) = run_pruner([weight], inputs, ratio=0.5, structure=structure, blocksize=32)
    assert not pruned_weight[:, dead].any()  # zeroed, as the reference's W[:, dead] = 0
    assert torch.equal(~kept, expected_pruned)
    torch.testing.assert_close(pruned_weight, expected_weight, rtol=1e-5, atol=1e-5)


# -- masked LoRA's fused path: the backward's rounding seed, dropout ---------------------------------

def first_masked_layer(arch="llama", dtype=torch.float32, dropout=0.0):
    peft_model, _ = masked_adapter(arch)
    for config in peft_model.peft_config.values():
        config.lora_dropout = dropout
    layer = next(m for m in peft_model.modules() if isinstance(m, MaskedLoraLinear))
    if dropout:
        layer.lora_dropout["default"] = torch.nn.Dropout(dropout)
    return layer.to(dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_backward_uses_the_weight_the_forward_rounded(dtype, training):
    """dL/dx = dy @ W_eff with W_eff the forward's stochastically rounded weight (same seed), bit for bit."""
    layer = first_masked_layer(dtype=dtype).train(training)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(3)
        evaluated = layer(torch.eye(layer.in_features, dtype=dtype))  # (in, out) = W_eff^T, exactly (no bias)
    x = torch.randn(6, layer.in_features, dtype=dtype, requires_grad=True)
    grad_output = torch.randn(6, layer.out_features, dtype=dtype)
    with torch.random.fork_rng():
        torch.manual_seed(3)  # training: the forward draws the same seed as above
        layer(x).backward(grad_output)
    assert torch.equal(x.grad, grad_output @ evaluated.t())


def test_fused_path_is_not_used_while_lora_dropout_is_active():
    """With dropout > 0 in training the adapter sees dropout(x): base(x) + dropout(x) @ delta^T, not the fused sum."""
    layer = first_masked_layer(dropout=0.5).train()
    x = torch.randn(4, 5, layer.in_features)
    delta = layer.get_delta_weight("default")  # (out, in) for a Linear
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        got = layer(x)
        torch.manual_seed(0)  # the same dropout mask: PEFT draws it first
        expected = layer.base_layer(x) + torch.nn.functional.dropout(x, 0.5, training=True) @ delta.t()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    layer.eval()  # dropout off: the fused path, the undropped sum
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.t(), rtol=1e-5, atol=1e-5)


# -- zero-shot: the few-shot rule and the seeds lm-eval runs under ------------------------------------

@pytest.fixture(scope="module")
def next_line_tasks(tmp_path_factory):
    """The builtin next-line task as written, and a copy whose YAML fixes it at 0 shots."""
    pytest.importorskip("lm_eval")
    free, fixed = tmp_path_factory.mktemp("free"), tmp_path_factory.mktemp("fixed")
    write_next_line_task(free, examples=8, fewshot_examples=4)
    path = write_next_line_task(fixed, examples=8, fewshot_examples=4)
    path.write_text(path.read_text(encoding="utf-8") + "num_fewshot: 0\n", encoding="utf-8")
    return free, fixed


@pytest.fixture(scope="module")
def tiny_model():
    from prunetune.loading import load_model, load_tokenizer

    return load_model("tiny"), load_tokenizer("tiny")


def test_num_fewshot_leaves_a_task_fixed_at_zero_shots(next_line_tasks, tiny_model):
    """lm-eval's simple_evaluate rule: --num_fewshot applies to every task except one whose config says 0."""
    shots = {}
    for folder in next_line_tasks:
        settings = ZeroShotSettings(tasks=[NEXT_LINE_TASK], num_fewshot=2, limit=4, include_path=str(folder))
        shots[folder.name] = evaluate_zeroshot(*tiny_model, settings).tasks[NEXT_LINE_TASK].n_shot
    free, fixed = (folder.name for folder in next_line_tasks)
    assert shots == {free: 2, fixed: 0}


def test_lm_eval_runs_under_simple_evaluates_seeds(next_line_tasks, tiny_model, monkeypatch):
    """python 0, numpy 1234, torch 1234 while lm-eval runs, whatever the caller's generators were."""
    import random

    import lm_eval.evaluator
    import numpy as np

    run_evaluation, seen = lm_eval.evaluator.evaluate, {}

    def spy(**kwargs):
        seen.update(python=random.getstate(), numpy=np.random.get_state()[1].copy(), torch=torch.random.get_rng_state())
        return run_evaluation(**kwargs)

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", spy)
    with torch.random.fork_rng():
        random.seed(7), np.random.seed(7), torch.manual_seed(7)
        evaluate_zeroshot(*tiny_model, ZeroShotSettings(tasks=[NEXT_LINE_TASK], limit=4,
                                                        include_path=str(next_line_tasks[0])))
        random.seed(0), np.random.seed(1234), torch.manual_seed(1234)
        assert seen["python"] == random.getstate()
        assert np.array_equal(seen["numpy"], np.random.get_state()[1])
        assert torch.equal(seen["torch"], torch.random.get_rng_state())
