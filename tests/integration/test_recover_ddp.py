"""`full` under torchrun with 2 CPU processes (gloo DDP): each rank checks its masks; the saved model keeps them."""

import os
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_recover_cli import workspace  # noqa: F401  (module fixture)

from prunetune.masks import MaskSet


@pytest.mark.parametrize("distill", [False, True])
def test_full_under_ddp_keeps_masks_on_both_ranks(workspace, tmp_path, distill):  # noqa: F811
    """With --distill_from each rank loads its own teacher; the output layer, applied to the chunked losses in a hook
    inside the student's (DDP-wrapped) forward, has its gradients reduced like every other weight (the masks and
    the logged KL show both ranks trained)."""
    out = tmp_path / "ddp"
    # torch's launcher run by this interpreter: no PATH lookup, so the test never skips for want of `torchrun`
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000), "-m", "prunetune.cli",
           "-v", "recover", "--model_name_or_path", str(workspace / "pruned"), "--dataset_name", str(workspace / "text.txt"),
           "--block_size", "32", "--per_device_train_batch_size", "2", "--max_steps", "3", "--learning_rate", "1e-3",
           "--weight_decay", "0.1", "--recovery_method", "full", "--save_strategy", "no", "--disable_tqdm", "true",
           "--output_dir", str(out)]
    if distill:
        cmd += ["--distill_from", str(workspace / "dense"), "--distill_hidden_weight", "1", "--logging_steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    ranks = set(re.findall(r"rank (\d): sparsity 0\.5000, no pruned weight nonzero in 14 checked layers", log))
    assert ranks == {"0", "1"}, log[-3000:]
    assert "384 tokens" in log  # 3 steps x 2 ranks x 2 blocks x 32 tokens: both ranks trained
    assert ("loss_kl" in log) == distill
    masks = MaskSet.load(out / "masks.safetensors")
    weights = load_file(str(out / "model.safetensors"))
    for name, kept in masks.masks.items():
        assert not weights[name + ".weight"][~kept].any(), name
