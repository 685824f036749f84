"""The block-by-block driver: inputs captured for every architecture, shared statistics,
and Wanda masks equal to a plain sequential reference that re-runs the whole model."""

import pytest
import torch

from factories import ARCHS, make_model, random_tokens
from prunetune.calibrate import CalibrationOptions, LayerStatistics, capture_inputs, forward_blocks
from prunetune.modules import find_decoder_blocks, weight_matrix
from prunetune.pruning import PruneConfig, prune
from prunetune.pruning.base import SquaredNorms


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_wanda(model, ids, ratio):
    """Sequential Wanda, plainly: for each block, run the whole (partly pruned) model, read the
    inputs of the block's layers, prune every row's floor(ratio * in) lowest |W| * ||X_j||."""
    for block in find_decoder_blocks(model):
        norms, handles = {}, []
        for name, module in block.linears.items():
            def hook(module, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                norms[name] = norms.get(name, 0) + (x ** 2).sum(0)
            handles.append(module.register_forward_pre_hook(hook))
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        for handle in handles:
            handle.remove()
        for name, module in block.linears.items():
            prune_rows_by_wanda_score(weight_matrix(module), norms[name].sqrt(), ratio)
    return model


def prune_rows_by_wanda_score(weight, input_norms, ratio):
    """Zero every row's floor(ratio * in) lowest |W_ij| * ||X_j|| (float64 scores, stable ties)."""
    scores = weight.abs().double() * input_norms
    with torch.no_grad():
        weight.scatter_(1, scores.argsort(dim=1, stable=True)[:, : int(ratio * weight.shape[1])], 0.0)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_wanda_equals_sequential_reference(arch):
    ids = random_tokens(8, 24, seed=1)
    expected = reference_wanda(make_model(arch), ids, 0.5)
    model = make_model(arch)
    prune(model, None, PruneConfig(method="wanda", sparsity_ratio=0.5, calibration_ids=ids, batch_size=3))
    for (name, got), (_, want) in zip(model.named_parameters(), expected.named_parameters()):
        assert torch.equal(got == 0, want == 0), name


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_records_block_inputs(arch):
    model = make_model(arch)
    ids = random_tokens(5, 16)
    blocks = find_decoder_blocks(model)
    inputs = capture_inputs(model, blocks, ids, CalibrationOptions(batch_size=2))
    assert [h.shape for h in inputs.hidden] == [(2, 16, 64), (2, 16, 64), (1, 16, 64)]
    # the captured inputs reproduce the model's own hidden states after block 0
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        args, kwargs = inputs.extras[0]
        out = blocks[0].module(inputs.hidden[0], *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(torch.cat(inputs.hidden), states[0])
    torch.testing.assert_close(out, states[1][:2])


@pytest.mark.parametrize("arch,groups", [
    ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    ("opt", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]),
])
def test_layers_reading_one_input_share_a_statistic(arch, groups):
    model = make_model(arch)
    block = find_decoder_blocks(model)[0]
    inputs = capture_inputs(model, [block], random_tokens(4, 8), CalibrationOptions(batch_size=2))
    stats = LayerStatistics(block.linears, SquaredNorms, early_stop=True)
    from prunetune.calibrate import ExtrasCache

    stats.run(block.module, inputs, torch.device("cpu"), ExtrasCache(torch.device("cpu")))
    stats.remove()
    assert [names for names, _ in stats.groups] == groups
    assert all(statistic.rows == 4 * 8 for _, statistic in stats.groups)


@pytest.mark.parametrize("true_sequential", [False, True])
def test_forward_blocks_and_offload_give_the_same_masks(true_sequential):
    ids = random_tokens(6, 16)
    assert forward_blocks(make_model("qwen2"), ids) > 0
    masks = []
    for offload in (False, True):
        model = make_model("qwen2")
        prune(model, None, PruneConfig(method="sparsegpt", sparsity_ratio=0.5, calibration_ids=ids,
                                       offload_activations=offload, device="cpu", true_sequential=true_sequential))
        masks.append([p == 0 for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*masks))


def reference_wanda_true_sequential(model, ids, ratio):
    """True-sequential Wanda, plainly: layer by layer in the order the forward runs them, run the
    whole (partly pruned) model, read that layer's inputs, prune its rows by |W| * ||X_j||."""
    for block in find_decoder_blocks(model):
        order, handles = [], []
        for name, module in block.linears.items():
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: order.append(name) if name not in order else None))
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        for handle in handles:
            handle.remove()
        for name in order:
            module = block.linears[name]
            captured = []
            handle = module.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1]).double()))
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            handle.remove()
            prune_rows_by_wanda_score(weight_matrix(module), (torch.cat(captured) ** 2).sum(0).sqrt(), ratio)
    return model


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_true_sequential_wanda_equals_layer_by_layer_reference(arch):
    ids = random_tokens(8, 24, seed=2)
    expected = reference_wanda_true_sequential(make_model(arch), ids, 0.5)
    model = make_model(arch)
    report = prune(model, None, PruneConfig(method="wanda", sparsity_ratio=0.5, calibration_ids=ids, batch_size=3,
                                            true_sequential=True))
    assert report.true_sequential and report.to_dict()["true_sequential"] is True
    for (name, got), (_, want) in zip(model.named_parameters(), expected.named_parameters()):
        assert torch.equal(got == 0, want == 0), name
    # and it is a different schedule: later layers of a block see pruned inputs
    parallel = make_model(arch)
    prune(parallel, None, PruneConfig(method="wanda", sparsity_ratio=0.5, calibration_ids=ids, batch_size=3))
    assert any(not torch.equal(a == 0, b == 0) for a, b in zip(model.parameters(), parallel.parameters()))


def test_true_sequential_groups_and_one_sparsegpt_factor_per_input(monkeypatch):
    from prunetune.calibrate import ExtrasCache, SequentialPruning, probe_groups
    from prunetune.pruning import sparsegpt

    calls = []
    real = sparsegpt.inverse_hessian_factor
    monkeypatch.setattr(sparsegpt, "inverse_hessian_factor", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = make_model("llama")
    block = find_decoder_blocks(model)[0]
    inputs = capture_inputs(model, [block], random_tokens(5, 8), CalibrationOptions(batch_size=2))
    cpu = torch.device("cpu")
    expected = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert probe_groups(block.module, block.linears, inputs, cpu, ExtrasCache(cpu)) == expected
    pruner = sparsegpt.SparseGPTPruner(0.5)
    solved = []
    real_choose = pruner.choose
    pruner.choose = lambda weights, *a: solved.append(len(weights)) or real_choose(weights, *a)
    hooks = SequentialPruning(block.linears, pruner, expected)
    with torch.no_grad():
        hooks.run(block.module, inputs, cpu, ExtrasCache(cpu))
    hooks.remove()
    assert hooks.groups == expected and solved == [3, 1, 2, 1]  # q/k/v and gate/up solved stacked
    assert [s.rows for s in hooks.statistics] == [5 * 8] * 4
    assert len(calls) == 4  # q/k/v share one inverse-Hessian factor, gate/up another
    assert all((weight_matrix(m) == 0).float().mean() == 0.5 for m in block.linears.values())
    # the outputs that replaced the inputs are the pruned block's
    with torch.no_grad():
        fresh = capture_inputs(model, [block], random_tokens(5, 8), CalibrationOptions(batch_size=2))
        args, kwargs = fresh.extras[0]
        out = block.module(fresh.hidden[0], *args, **kwargs)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, inputs.hidden[0])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_true_sequential_batch_split_does_not_change_the_result(method, device):
    """Lock-step worker threads (on CUDA in fp16 too): how the calibration set is split into
    batches does not change the masks (beyond summation-order near-ties in fp16)."""
    ids = random_tokens(8, 32, seed=3)
    masks = []
    for batch_size in (2, 3, 8):
        model = make_model("llama").to(device, torch.float16 if device == "cuda" else torch.float32)
        report = prune(model, None, PruneConfig(method=method, sparsity_ratio=0.5, calibration_ids=ids,
                                                batch_size=batch_size, true_sequential=True))
        assert set(report.sparsity.per_module().values()) == {0.5}
        masks.append(torch.cat([(p == 0).flatten() for n, p in model.named_parameters() if "layers" in n and p.dim() == 2]))
    for other in masks[1:]:
        differ = float((other != masks[0]).float().mean())
        assert differ == 0 if device == "cpu" else differ < 0.005, differ


def test_true_sequential_refuses_a_group_whose_layers_read_different_inputs():
    from prunetune.calibrate import ExtrasCache, SequentialPruning
    from prunetune.pruning.wanda import WandaPruner

    model = make_model("llama")
    block = find_decoder_blocks(model)[0]
    inputs = capture_inputs(model, [block], random_tokens(4, 8), CalibrationOptions(batch_size=2))
    hooks = SequentialPruning(block.linears, WandaPruner(0.5), [["self_attn.q_proj", "self_attn.o_proj"]])
    with pytest.raises(RuntimeError, match="self_attn.o_proj.*reads another tensor"), torch.no_grad():
        hooks.run(block.module, inputs, torch.device("cpu"), ExtrasCache(torch.device("cpu")))
    hooks.remove()


@pytest.mark.parametrize("true_sequential", [False, True])
def test_blocks_placed_by_accelerate_hooks_prune_like_plain_ones(true_sequential):
    """A model dispatched with a device_map carries accelerate hooks on its blocks: they are
    never cut short, and the masks are those of the same model without hooks."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from prunetune.calibrate import is_dispatched

    ids = random_tokens(6, 16, seed=4)
    masks = []
    for dispatched in (False, True):
        model = make_model("llama")
        if dispatched:
            for block in find_decoder_blocks(model):
                add_hook_to_module(block.module, AlignDevicesHook(execution_device="cpu", io_same_device=True))
            assert all(is_dispatched(b.module) for b in find_decoder_blocks(model))
        prune(model, None, PruneConfig(method="wanda", sparsity_ratio=0.5, calibration_ids=ids, batch_size=4,
                                       true_sequential=true_sequential))
        masks.append([p == 0 for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*masks))


def test_true_sequential_refuses_blocks_whose_path_depends_on_the_data():
    """A layer that only some batches run (as with expert routing) cannot be paused for in lock step."""
    from prunetune.errors import UsageError

    model = make_model("llama")
    mlp = find_decoder_blocks(model)[1].module.mlp
    plain_forward = mlp.forward
    mlp.forward = lambda x: plain_forward(x) if x.shape[0] == 4 else x  # the short last batch skips the MLP
    with pytest.raises(UsageError, match="same layers of a block"):
        prune(model, None, PruneConfig(method="wanda", sparsity_ratio=0.5, calibration_ids=random_tokens(6, 8),
                                       batch_size=4, true_sequential=True))
    mlp.forward = lambda x: x  # no batch runs the MLP: its layers cannot be calibrated
    with pytest.raises(UsageError, match="did not run in the block's forward"):
        prune(model, None, PruneConfig(method="wanda", sparsity_ratio=0.5, calibration_ids=random_tokens(6, 8),
                                       batch_size=4, true_sequential=True))
