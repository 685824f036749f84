"""`full` (and `lora`) under FSDP2 with 2 CPU processes (gloo): sharded masks, same model as one process, resume.

torch's FSDP2 (`fully_shard`, DTensor parameters, reduce-scatter) runs on CPU with gloo, but
accelerate turns FSDP on only for accelerator devices: on a CPU machine the Trainer silently
runs DDP for `--fsdp`. The Trainer-level tests therefore launch `prunetune` through a small
driver that lifts that one device check (the rest of accelerate's FSDP2 path, `fsdp2_prepare_model`,
the full-state-dict saves and loads, is the real one); the logs prove the weights were sharded.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_recover_cli import workspace  # noqa: F401  (module fixture)

from prunetune.errors import UsageError
from prunetune.masks import MaskSet


# accelerate enables FSDP only on GPUs and similar devices; this lets it shard on CPU (gloo) too.
CPU_FSDP_DRIVER = '''
import sys

from accelerate import state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _init_allowing_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState re-reads it


state.AcceleratorState.__init__ = _init_allowing_cpu_fsdp

from prunetune.cli import main

sys.exit(main(sys.argv[1:]))
'''

# The masks' own logic on a model sharded by fully_shard directly, rank by rank (no Trainer).
SHARDED_MASKS_SCRIPT = '''
import json, os, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from factories import make_model, prune_half_rows, random_tokens
from prunetune.masks import MaskSet
from prunetune.modules import find_decoder_blocks
from prunetune.recover.callbacks import SparsityGuard, TrainingStopped
from prunetune.recover.full import KEPT_BUFFER, MaskEnforcer

dist.init_process_group("gloo")
rank = dist.get_rank()
model = prune_half_rows(make_model("llama", intermediate=96)).train()  # 96 rows: 48 per rank
masks = MaskSet.from_zeros(model)
enforcer = MaskEnforcer(model, masks).attach()
for block in find_decoder_blocks(model):
    fully_shard(block.module)
fully_shard(model)
report = {"moved": enforcer.sync_with_parameters(), "again": enforcer.sync_with_parameters()}
same_layout, slices_match = True, True
for name, module in enforcer.layers.items():
    kept, weight = module._buffers[KEPT_BUFFER], module.weight
    same_layout &= isinstance(kept, DTensor) and kept.placements == weight.placements and kept.device_mesh == weight.device_mesh
    same_layout &= kept.to_local().shape == weight.to_local().shape
    rows = torch.chunk(masks.masks[name], dist.get_world_size(), dim=0)[rank]  # FSDP2's Shard(0) cut
    slices_match &= torch.equal(kept.to_local() != 0, rows)
report.update(same_layout=bool(same_layout), slices_match=bool(slices_match))

optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
tokens = random_tokens(4, 16, seed=rank)
model(input_ids=tokens, labels=tokens).loss.backward()
report["grads_masked"] = all(
    not module.weight.grad.to_local()[module._buffers[KEPT_BUFFER].to_local() == 0].any() for module in enforcer.layers.values())
report["grads_sharded"] = all(isinstance(module.weight.grad, DTensor) for module in enforcer.layers.values())
optimizer.step()
optimizer.zero_grad()
report["violations_after_step"] = enforcer.violations()
report["sparsity"] = enforcer.sparsity()
name, layer = next(iter(enforcer.layers.items()))
if rank == 1:  # revive one pruned weight in rank 1's slice only
    with torch.no_grad():
        local_kept = layer._buffers[KEPT_BUFFER].to_local()
        layer.weight.to_local()[tuple((local_kept == 0).nonzero()[0])] = 1.0
report["violations_revived"] = enforcer.violations()
enforcer.remask()
report["violations_remasked"] = enforcer.violations()
gathered = enforcer.mask_set()
report["gathered_equal"] = all(torch.equal(gathered.masks[n], masks.masks[n]) for n in masks.masks)
guard = SparsityGuard(enforcer, [p for p in model.parameters() if p.requires_grad])
if rank == 0:
    with torch.no_grad():
        layer.weight.to_local()[0, 0] = float("nan")
try:
    guard.verify(1, ".")
    report["nan_stopped"] = False
except TrainingStopped as err:
    report["nan_stopped"] = "NaN" in str(err)
Path = __import__("pathlib").Path
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(report))
dist.destroy_process_group()
'''


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def _port() -> str:
    return str(29500 + (os.getpid() * 7) % 1000)


def torchrun(script: Path, *args, timeout=150):
    # torch's launcher run by this interpreter: no PATH lookup, so the test never skips for want of `torchrun`
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(), str(script),
           *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def recover_argv(ws, out, method="full", *extra):
    return ["-v", "recover", "--model_name_or_path", ws / "pruned", "--dataset_name", ws / "text.txt", "--block_size", "32",
            "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-3", "--weight_decay", "0.1",
            "--recovery_method", method, "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "3",
            "--output_dir", out, *extra]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsdp") / "cpu_fsdp.py"
    path.write_text(CPU_FSDP_DRIVER)
    return path


@pytest.fixture(scope="module")
def fsdp_run(workspace, driver):  # noqa: F811
    """`full` for 4 steps under FSDP2 on 2 processes, micro-batch 2 each, checkpoints at steps 2 and 4."""
    out = driver.parent / "fsdp"
    log = torchrun(driver, *recover_argv(workspace, out), "--per_device_train_batch_size", "2", "--fsdp", "full_shard")
    return out, log


def losses(folder: Path) -> list[float]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_sharded_masks_follow_their_weights_and_counts_add_up_over_ranks(tmp_path):
    """fully_shard directly: masks become DTensors laid out like their weights, hooks mask the gradient slices,
    a weight revived on one rank is reported on both, re-masking acts on slices, a NaN on one rank stops both."""
    script = tmp_path / "sharded_masks.py"
    script.write_text(textwrap.dedent(SHARDED_MASKS_SCRIPT))
    torchrun(script, tmp_path)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["moved"] and not report["again"]
        assert report["same_layout"] and report["slices_match"]
        assert report["grads_sharded"] and report["grads_masked"]
        assert report["violations_after_step"] == {}
        assert report["sparsity"] == 0.5
        assert list(report["violations_revived"].values()) == [1]  # rank 1's revived weight, counted on both ranks
        assert report["violations_remasked"] == {}
        assert report["gathered_equal"]
        assert report["nan_stopped"]  # rank 0's NaN stops rank 1 as well


def test_fsdp2_full_matches_one_process_with_the_same_seed(workspace, fsdp_run, tmp_path):  # noqa: F811
    """Same masks, exact sparsity, same losses and (to fp tolerance) the same weights as one process with the same
    global batch (2 x 2 blocks); each rank sharded its weights and masks (the log says so on both)."""
    out, log = fsdp_run
    assert len(re.findall(r"masks follow the sharded weights: 14 layers, Shard slices", log)) == 2, log[-3000:]
    assert set(re.findall(r"rank (\d): sparsity 0\.5000, no pruned weight nonzero in 14 checked layers", log)) == {"0", "1"}
    from prunetune.cli import main

    single = tmp_path / "single"
    assert main([str(a) for a in recover_argv(workspace, single)[1:]] + ["--per_device_train_batch_size", "4"]) == 0

    expected = MaskSet.from_zeros(__import__("transformers").AutoModelForCausalLM.from_pretrained(workspace / "pruned"))
    for folder in (out, out / "checkpoint-2", single):
        saved = MaskSet.load(folder / "masks.safetensors")
        assert saved.masks.keys() == expected.masks.keys()
        assert all(torch.equal(saved.masks[name], expected.masks[name]) for name in expected.masks), folder
    sharded, whole = load_file(str(out / "model.safetensors")), load_file(str(single / "model.safetensors"))
    for name, kept in expected.masks.items():
        weight = sharded[name + ".weight"]
        assert not weight[~kept].any() and weight[kept].ne(0).all(), name  # exact sparsity, nothing else zero
    assert sharded.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(sharded[name], whole[name], rtol=0, atol=1e-5)
    assert any(not torch.equal(sharded[n], load_file(str(workspace / "pruned" / "model.safetensors"))[n]) for n in whole)
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    assert json.loads((out / "recovery.json").read_text())["sparsity_after"] == 0.5


def test_fsdp2_full_resumes_from_its_checkpoint_with_masks_intact(workspace, driver, fsdp_run, tmp_path):  # noqa: F811
    """A run resumed from the FSDP2 run's step-2 checkpoint (weights, optimizer, masks) ends where it ended."""
    straight, _ = fsdp_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    log = torchrun(driver, *recover_argv(workspace, resumed), "--per_device_train_batch_size", "2", "--fsdp", "full_shard",
                   "--resume_from_checkpoint", "latest")
    assert "masks follow the sharded weights" in log
    result = json.loads((resumed / "recovery.json").read_text())
    assert result["resumed_from"].endswith("checkpoint-2") and result["steps"] == 2 and result["sparsity_after"] == 0.5
    assert losses(resumed)[-2:] == pytest.approx(losses(straight)[-2:], rel=1e-6)
    masks = MaskSet.load(resumed / "masks.safetensors")
    assert all(torch.equal(masks.masks[n], MaskSet.load(straight / "masks.safetensors").masks[n]) for n in masks.masks)
    ended, expected = load_file(str(resumed / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    for name in expected:
        torch.testing.assert_close(ended[name], expected[name], rtol=0, atol=1e-6)


def test_lora_under_fsdp2_keeps_the_frozen_base_and_checks_it_on_shards(workspace, driver, tmp_path):  # noqa: F811
    out = tmp_path / "lora"
    log = torchrun(driver, *recover_argv(workspace, out, "lora"), "--per_device_train_batch_size", "2",
                   "--fsdp", "full_shard", "--max_steps", "2", "--save_strategy", "no")
    assert set(re.findall(r"rank (\d): sparsity 0\.5000, no pruned weight nonzero in 14 checked layers", log)) == {"0", "1"}
    result = json.loads((out / "recovery.json").read_text())
    assert result["steps"] == 2 and result["sparsity_after"] == 0.5
    assert (out / "adapter_model.safetensors").exists()


def test_fsdp2_full_distills_like_one_process(workspace, driver, tmp_path):  # noqa: F811
    """--distill_from under FSDP2: the chunked output layer runs inside the sharded model's forward (its weights
    gathered, its gradient reduce-scattered), so CE + KL train as one process with the same global batch does."""
    distill = ["--distill_from", workspace / "dense", "--distill_ce_weight", "0.5", "--distill_kl_weight", "1",
               "--distill_hidden_weight", "0", "--max_steps", "2", "--save_strategy", "no"]
    out = tmp_path / "fsdp"
    log = torchrun(driver, *recover_argv(workspace, out), "--per_device_train_batch_size", "2", "--fsdp", "full_shard",
                   *distill)
    assert len(re.findall(r"masks follow the sharded weights", log)) == 2, log[-3000:]
    from prunetune.cli import main

    single = tmp_path / "single"
    assert main([str(a) for a in [*recover_argv(workspace, single)[1:], "--per_device_train_batch_size", "4", *distill]]) == 0
    assert len(losses(out)) == 2 and losses(out) == pytest.approx(losses(single), rel=1e-5)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert all(entry["loss_kl"] > 0 for entry in history if "loss" in entry)
    sharded, whole = load_file(str(out / "model.safetensors")), load_file(str(single / "model.safetensors"))
    assert sharded.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(sharded[name], whole[name], rtol=0, atol=1e-5)


def _args(**changes):
    base = dict(deepspeed=None, fsdp=True, use_cpu=False, optim="adamw_torch_fused", do_eval=False,
                fsdp_plugin_args={"fsdp_version": 2, "cpu_ram_efficient_loading": False, "state_dict_type": "FULL_STATE_DICT"})
    plugin = changes.pop("plugin", {})
    base["fsdp_plugin_args"] = {**base["fsdp_plugin_args"], **plugin}
    return SimpleNamespace(**{**base, **changes})


@pytest.mark.parametrize("method, changes, message", [
    ("full", {"deepspeed": "ds.json"}, "DeepSpeed ZeRO flattens"),
    ("full", {"plugin": {"fsdp_version": 1}}, "FSDP version 1"),
    ("full", {"plugin": {"cpu_ram_efficient_loading": True}}, "cpu_ram_efficient_loading"),
    ("full", {"plugin": {"state_dict_type": "SHARDED_STATE_DICT"}}, "FULL_STATE_DICT"),
    ("full", {"optim": "adamw_bnb_8bit"}, "sharded parameters"),
    ("lora", {"do_eval": True}, "prunetune eval"),
    ("masked_lora", {}, "Use DDP"),
])
def test_sharded_setups_the_masks_cannot_follow_are_refused(method, changes, message):
    from prunetune.recover.sharding import check_sharding

    with pytest.raises(UsageError, match=message):
        check_sharding(method, _args(**changes))


def test_supported_sharded_setups_pass_the_check(monkeypatch):
    from prunetune.recover.sharding import check_sharding

    check_sharding("full", _args())
    check_sharding("lora", _args(plugin={"fsdp_version": 1}))
    check_sharding("full", _args(fsdp=False, fsdp_plugin_args=None))  # DDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch with an FSDP1 config file
    with pytest.raises(UsageError, match="FSDP version 1"):
        check_sharding("full", _args(fsdp=False, fsdp_plugin_args=None))
