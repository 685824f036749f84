"""``prune(..., PruneConfig(reconstruct=True))``: each block is pruned, then its kept weights train
to the dense block's outputs before they propagate. Each block keeps exactly the mask pruning chose
for it (the first block: plain pruning's; later ones are chosen from the reconstructed stream), every
pruned weight stays zero (unstructured and 2:4, both schedules), every block's error goes down, and the bundled model ends with a lower held-out perplexity than plain Wanda."""

import copy

import pytest
import torch

from prunetune.calibrate import driver
from prunetune.calibrate.reconstruct import reconstruct_block
from prunetune.errors import UsageError
from prunetune.evaluate import evaluate_dataset
from prunetune.loading import TINY_PATH, load_model, load_tokenizer
from prunetune.modules import find_decoder_blocks, prunable_layers, weight_matrix
from prunetune.pipeline import Pipeline, load_config
from prunetune.pipeline.config import PipelineConfig
from prunetune.pipeline.stages import stage_hash
from prunetune.pruning import PruneConfig, prune
from tests.factories import make_model, random_tokens

TINY_READY = (TINY_PATH / "model.safetensors").exists()


@pytest.mark.parametrize("structure,ratio", [("unstructured", 0.5), ("2:4", None)])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("true_sequential", [False, True], ids=["two_pass", "true_sequential"])
def test_reconstruction_keeps_the_masks_pruning_chose_exactly(structure, ratio, method, true_sequential, monkeypatch,
                                                               one_thread):
    dense = make_model(hidden=64, layers=2)
    ids = random_tokens(8, 16)
    plain, rebuilt = copy.deepcopy(dense), copy.deepcopy(dense)
    common = dict(method=method, sparsity_ratio=ratio, sparsity_type=structure, calibration_ids=ids, batch_size=4,
                  true_sequential=true_sequential)
    prune(plain, config=PruneConfig(**common))
    chosen = {}  # each block's zeros right after pruning, before its reconstruction

    def spy(block, index, layers, *args):
        chosen.update({index: {name: weight_matrix(m) == 0 for name, m in layers.items()}})
        return reconstruct_block(block, index, layers, *args)

    monkeypatch.setattr(driver, "reconstruct_block", spy)
    report = prune(rebuilt, config=PruneConfig(**common, reconstruct=True, reconstruct_epochs=2, reconstruct_lr=1e-3))
    blocks = find_decoder_blocks(rebuilt)
    assert sorted(chosen) == [b.index for b in blocks]
    for block in blocks:
        for relative, module in block.linears.items():
            zeros = weight_matrix(module) == 0
            assert torch.equal(zeros, chosen[block.index][relative]), block.qualified(relative)  # held exactly
            if structure == "2:4":
                assert (zeros.reshape(zeros.shape[0], -1, 4).sum(-1) >= 2).all()
            plain_weight = weight_matrix(prunable_layers(plain)[block.qualified(relative)])
            if block.index == 0:  # same inputs as plain pruning: the same mask
                assert torch.equal(zeros, plain_weight == 0)
    # later blocks are pruned from the reconstructed blocks' outputs; the kept weights trained
    assert not torch.equal(weight_matrix(blocks[0].linears["self_attn.q_proj"]),
                           weight_matrix(prunable_layers(plain)[blocks[0].qualified("self_attn.q_proj")]))
    assert report.sparsity.overall == pytest.approx(prune(copy.deepcopy(dense), config=PruneConfig(**common)).sparsity.overall)


def test_every_block_error_goes_down_and_is_reported(one_thread):
    model = make_model(hidden=64, layers=3)
    report = prune(model, config=PruneConfig(method="wanda", sparsity_ratio=0.5, calibration_ids=random_tokens(8, 16),
                                             reconstruct=True, reconstruct_epochs=3, reconstruct_lr=1e-3,
                                             reconstruct_batch_size=2))
    summary = report.to_dict()["reconstruction"]
    assert summary["epochs"] == 3 and summary["learning_rate"] == 1e-3 and summary["batch_size"] == 2
    assert [b["block"] for b in summary["blocks"]] == [0, 1, 2]
    for block in summary["blocks"]:
        assert block["error_after"] < block["error_before"] and not block["reverted"], block
        assert len(block["epoch_losses"]) == 3 and block["seconds"] >= 0
    timings = [t.to_dict() for t in report.block_timings]
    assert all(t["reconstruction"]["error_after"] < t["reconstruction"]["error_before"] for t in timings)


def test_plain_prune_report_has_no_reconstruction(one_thread):
    report = prune(make_model(hidden=64, layers=2), config=PruneConfig(calibration_ids=random_tokens(4, 16)))
    assert "reconstruction" not in report.to_dict()
    assert "reconstruction" not in report.block_timings[0].to_dict()


@pytest.mark.parametrize("settings,fragment", [
    ({"reconstruct": True, "reconstruct_epochs": 0}, "got 0"),
    ({"reconstruct": True, "reconstruct_lr": -1e-3}, "got -0.001"),
    ({"reconstruct": True, "reconstruct_lr": float("nan")}, "got nan"),
    ({"reconstruct": True, "reconstruct_batch_size": 0}, "reconstruct_batch_size"),
    ({"reconstruct_epochs": 2}, "--reconstruct_epochs"),
    ({"reconstruct_lr": 1e-3, "reconstruct_batch_size": 2}, "--reconstruct_lr, --reconstruct_batch_size"),
    ({"reconstruct": True, "method": "magnitude"}, "magnitude"),
])
def test_bad_settings_are_refused_naming_them(settings, fragment):
    with pytest.raises(UsageError, match="reconstruct") as err:
        PruneConfig(**{"method": "wanda", **settings})
    assert fragment in str(err.value)


@pytest.mark.skipif(not TINY_READY, reason=f"the bundled tiny model is not trained yet ({TINY_PATH / 'model.safetensors'} missing)")
def test_reconstruction_beats_plain_wanda_on_held_out_text(one_thread):
    tokenizer = load_tokenizer("tiny")
    common = dict(method="wanda", sparsity_ratio=0.5, calib_dataset="builtin", nsamples=16, seqlen=64)
    scores = {}
    for reconstruct in (False, True):
        model = load_model("tiny")
        extra = {"reconstruct": True, "reconstruct_lr": 1e-3} if reconstruct else {}
        prune(model, tokenizer, PruneConfig(**common, **extra))
        # builtin's test split: text the calibration windows (train split) never saw
        scores[reconstruct] = evaluate_dataset(model, tokenizer, "builtin", 64, split="test").perplexity
    assert scores[True] < scores[False]


# --------------------------------------------------------------------------- pipeline prune entries


def _prune_inputs(tmp_path, **entry) -> tuple[dict, PipelineConfig]:
    """What the config's prune stage would be keyed on (nothing runs), and the config."""
    raw = {"model": "tiny", "output_dir": str(tmp_path / "run"), "device": "cpu",
           "calibration": {"dataset": "builtin"}, "prune": [{"method": "wanda", **entry}]}
    pipeline = Pipeline(load_config(raw))
    recorded = {}
    pipeline.stages.run = lambda name, stage_inputs, work, folder=None: recorded.setdefault("inputs", stage_inputs)
    pipeline.prune_stage(pipeline.config.prune[0])
    return recorded["inputs"], pipeline.config


def test_a_pipeline_prune_entry_takes_the_reconstruction_keys(tmp_path):
    plain, _ = _prune_inputs(tmp_path)
    assert not any(key.startswith("reconstruct") for key in plain["prune"])  # off: keyed as before the option
    inputs, config = _prune_inputs(tmp_path, reconstruct=True, reconstruct_epochs=2, reconstruct_lr=5e-4,
                                   reconstruct_batch_size=4)
    assert inputs["prune"]["reconstruct_epochs"] == 2 and stage_hash(inputs) != stage_hash(plain)
    spec = config.prune[0]
    assert spec.label() == "wanda 50% reconstructed"
    options = config.prune_config(spec).reconstruction
    assert (options.epochs, options.learning_rate) == (2, 5e-4)


@pytest.mark.parametrize("entry,fragment", [({"reconstruct": True, "reconstruct_epochs": 0}, "got 0"),
                                            ({"reconstruct_lr": 1e-3}, "--reconstruct_lr")])
def test_a_pipeline_prune_entry_with_bad_reconstruction_keys_is_refused(tmp_path, entry, fragment):
    with pytest.raises(UsageError, match="reconstruct") as err:
        _prune_inputs(tmp_path, **entry)
    assert fragment in str(err.value)


def test_a_block_training_made_worse_is_put_back_as_pruned(one_thread):
    dense, ids = make_model(hidden=64, layers=2), random_tokens(8, 16)
    plain, rebuilt = copy.deepcopy(dense), copy.deepcopy(dense)
    prune(plain, config=PruneConfig(calibration_ids=ids))
    report = prune(rebuilt, config=PruneConfig(calibration_ids=ids, reconstruct=True, reconstruct_lr=10.0))
    blocks = report.to_dict()["reconstruction"]["blocks"]
    assert blocks[0]["reverted"] and blocks[0]["error_after"] == blocks[0]["error_before"]
    first = find_decoder_blocks(rebuilt)[0]
    for relative, module in first.linears.items():  # a learning rate of 10 wrecks the block: the pruned weights are back
        assert torch.equal(weight_matrix(module), weight_matrix(prunable_layers(plain)[first.qualified(relative)]))
